"""The multimodal decoder-only MoE transformer: text tokens and image patch tokens in one sequence,
dense GQA in the first layers and MSA after them, MoE feed-forward after the first dense FFNs.

Legend: B batch rows, T tokens, N = B*T, E d_model, V vocab, M images, P patches per image,
X routed experts.

    model = MultimodalTransformer(ModelConfig(...), img_patch_id)
    model.set_mode("warmup")                       # between steps: "dense" | "warmup" | "sparse"
    out = model(batch, compute_stats=False)        # out.losses: "lm", "kl_index", "moe_aux"; out.stats
    w = model.loss_weights()
    loss = sum(w[k] * v for k, v in out.losses.items())

    pytest -q tests/model
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from model import fused
from model.attention import AttnContext, DenseMask, DocLayout, GQAAttention
from model.batch import IGNORE_INDEX, Batch
from model.config import ATTENTION_MODES, ModelConfig
from model.layers import PatchEncoder, RMSNorm, SwiGLU, rope_cos_sin
from model.moe import MoE
from model.msa import MSAAttention
from model.stats import static_blocks_per_token


@dataclass
class ModelOutput:
    losses: dict[str, torch.Tensor]  # named scalar losses: "lm" always; "kl_index", "moe_aux" by architecture
    stats: dict[str, float] = field(default_factory=dict)  # named statistics (floats, detached)
    n_targets: torch.Tensor | None = None  # 0-dim int64 on the device: text tokens that carried an LM
    #                                         target (not read here: reading it would stop the host)
    logits: torch.Tensor | None = None  # [B, T, V], only when asked for (evaluation)
    selection: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> block_idx [1, B*T, Hkv, K]
    #                                    int32, the MSA layers' selections (only with compute_stats)
    attended_pairs: torch.Tensor | None = None  # 0-dim: (token, group, key) triples the sparse main
    #                      branches attended, summed over MSA layers; only under an adaptive budget


def _sum_or_none(xs: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(xs).sum() if xs else None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MSAAttention(cfg) if cfg.is_msa_layer(layer) else GQAAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg.d_model, cfg.moe) if cfg.is_moe_layer(layer) else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x_BTE: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, dict, dict]:
        a_BTE, attn_extras = self.attn(self.attn_norm(x_BTE), ctx)
        x_BTE = x_BTE + a_BTE
        h_BTE = self.ffn_norm(x_BTE)
        if isinstance(self.ffn, MoE):
            f_BTE, moe_extras = self.ffn(h_BTE, ctx.layout.valid_N)
        else:
            f_BTE, moe_extras = self.ffn(h_BTE), {}
        return x_BTE + f_BTE, attn_extras, moe_extras


class MultimodalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, img_patch_id: int):
        super().__init__()
        self.cfg = cfg
        self.img_patch_id = img_patch_id
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.patch_encoder = PatchEncoder(cfg.image_size, cfg.patch_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # a model with an index branch starts sparse, i.e. natively trained MSA; the training
        # schedule switches it (warmup first, usually) with set_mode between steps
        self._mode = "sparse" if cfg.msa.enabled else "dense"
        # the adaptive budget's ratio or p in use, where training adjusts it (msa.budget_match_topk);
        # None: the config's value
        self.budget_param: float | None = None
        fused.set_enabled(cfg.compile_ops)  # process-wide: one model trains per process
        self.reset_parameters()

    # -----------------------------------------------------------------------------------------
    # parameters

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # residual-branch outputs scaled down with depth (GPT-2), so the stream stays O(1)
                scale = (2 * self.cfg.n_layers) ** -0.5 if name.endswith(("o_proj.weight", "w_down.weight", "w_down")) else 1.0
                nn.init.normal_(p, std=std * scale)

    def index_parameter_names(self) -> list[str]:
        """Names of the index branch's parameters (index projections and their norms)."""
        return [n for n, _ in self.named_parameters() if ".attn.index_" in n]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint groups covering every parameter once.

        "index": index_q_proj, index_k_proj and their norms (trained only by the KL; own LR).
        "experts": the routed experts' weights (sparsely active: each sees ~top_k/n_experts of tokens).
        "backbone": everything else (embeddings, attention, norms, dense FFNs, shared experts, routers).
        """
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "experts": [], "index": []}
        for name, p in self.named_parameters():  # tied weights are yielded once
            if ".attn.index_" in name:
                groups["index"].append(p)
            elif ".ffn.experts." in name:
                groups["experts"].append(p)
            else:
                groups["backbone"].append(p)
        return groups

    def loss_weights(self) -> dict[str, float]:
        """Weights of the named losses: the training loss is sum(w[k] * out.losses[k])."""
        return {"lm": 1.0, "kl_index": float(self.cfg.msa.kl_weight), "moe_aux": float(self.cfg.moe.aux_weight)}

    # -----------------------------------------------------------------------------------------
    # modes

    @property
    def has_index_branch(self) -> bool:
        return bool(self.cfg.msa_layers)

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch the MSA layers' attention between steps: "dense" | "warmup" | "sparse", or
        "oracle" (evaluation only: blocks chosen by the true attention, model/oracle.py).

        Parameters and their shapes never change; only what the forward computes does.
        """
        if mode not in ATTENTION_MODES:
            raise ValueError(f"mode must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
        if mode != "dense" and not self.has_index_branch:
            raise ValueError(f"mode {mode!r} needs an index branch, but this model has none "
                             f"(model.msa.enabled = false): it can only run 'dense'")
        self._mode = mode

    def set_budget_param(self, value: float | None) -> None:
        """Use this ratio (budget "ratio") or p (budget "top_p") instead of the config's, from the next
        forward on (None: the config's). Checked like the config's value."""
        if value is not None:
            self.cfg.msa.selection_budget(param=float(value)).check(self.cfg.msa.topk)
        self.budget_param = None if value is None else float(value)

    # -----------------------------------------------------------------------------------------
    # forward

    def embed_inputs(self, batch: Batch) -> torch.Tensor:
        # the residual stream is fp32 whatever the weights' dtype (autocast leaves an embedding
        # lookup in its weight's dtype; FSDP2's bf16 mixed precision gathers that weight in bf16)
        x_BTE = self.embed(batch.tokens_BT).float()
        is_patch_BT = batch.tokens_BT == self.img_patch_id
        n_slots = batch.images_BNCHW.shape[1]
        used_BN = torch.arange(n_slots, device=x_BTE.device)[None, :] < batch.n_images_B[:, None].long()
        if batch.n_images is None:  # counted here: two host syncs
            images_MCHW = batch.images_BNCHW[used_BN]
            n_images, n_patch_tokens = images_MCHW.shape[0], int(is_patch_BT.sum())
        else:  # counted on the host where the batch was made (model/batch.py)
            # image_slots: the encoder takes that many (the used ones first, then copies of slot 0,
            # whose output goes nowhere), so the shapes do not depend on the count
            M = batch.n_images if batch.image_slots is None else batch.image_slots
            if M < batch.n_images:
                raise ValueError(f"image_slots={M} is fewer than the batch's {batch.n_images} images")
            which_M = torch.nonzero_static(used_BN.reshape(-1), size=M, fill_value=0)[:, 0]
            images_MCHW = batch.images_BNCHW.flatten(0, 1).index_select(0, which_M)
            n_images, n_patch_tokens = batch.n_images, batch.n_patch_tokens
        if n_patch_tokens != n_images * self.cfg.n_patches:
            raise ValueError(
                f"batch has {n_patch_tokens} image-patch tokens but {n_images} images of "
                f"{self.cfg.n_patches} patches: the data's image size/patch size disagree with the model's"
            )
        # run the encoder even on zero images: its weights then stay in the graph (zero gradient),
        # so DDP does not stall on a rank whose batch has no image
        patches_MPE = self.patch_encoder(images_MCHW)
        # row-major order of patch positions == order of images in the row, patches in raster order
        patches_MPE = patches_MPE.to(x_BTE.dtype)
        if batch.n_images is None:
            return x_BTE.masked_scatter(is_patch_BT[..., None], patches_MPE.reshape(-1))
        # the same placement, sized on the host; with image_slots the surplus patches (none when
        # every slot is used) go to a spare row past the last token, which is then cut off (it gets
        # no gradient): the same ops whatever the count, so a captured step replays for every batch
        B, T, E = x_BTE.shape
        P = patches_MPE.shape[0] * patches_MPE.shape[1]
        where_P = torch.nonzero_static(is_patch_BT.reshape(-1), size=P, fill_value=B * T)[:, 0]
        x_NE = torch.cat([x_BTE.reshape(B * T, E), x_BTE.new_zeros(1, E)])
        return x_NE.index_copy(0, where_P, patches_MPE.reshape(-1, E))[:B * T].view(B, T, E)

    def forward(self, batch: Batch, *, compute_stats: bool = False, return_logits: bool = False,
                index_loss: bool = True) -> ModelOutput:
        """index_loss=False skips the MSA layers' KL (no "kl_index" loss): evaluation needs only the LM."""
        cfg = self.cfg
        x_BTE = self.embed_inputs(batch)
        layout = DocLayout.from_segments(batch.segment_ids_BT, batch.n_docs, batch.doc_slots)
        ctx = AttnContext(
            layout=layout, mask=DenseMask(layout, cfg.dense_impl, batch.document_mask),
            rope=rope_cos_sin(batch.positions_BT, cfg.effective_rope_dim, cfg.rope_theta),
            mode=self._mode, compute_stats=compute_stats, index_loss=index_loss, budget_param=self.budget_param,
        )
        attn_extras, moe_extras = {}, {}
        recompute = cfg.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                # non-reentrant: the KL's gradient reaches the index projections through the
                # block's side outputs (attn extras), which the reentrant form would cut off; the
                # RNG state is restored for the recomputation, so the sampled KL draws the same tokens
                x_BTE, a, m = torch.utils.checkpoint.checkpoint(block, x_BTE, ctx, use_reentrant=False)
            else:
                x_BTE, a, m = block(x_BTE, ctx)
            if a:
                attn_extras[block.layer] = a
            if m:
                moe_extras[block.layer] = m
        logits_BTV = self.lm_head(self.norm(x_BTE))
        lm = F.cross_entropy(logits_BTV.float().flatten(0, 1), batch.targets_BT.flatten(), ignore_index=IGNORE_INDEX)
        losses = {"lm": lm}
        kls = [a["kl"] for a in attn_extras.values() if "kl" in a]
        if kls:
            # mean over MSA layers: each layer's index branch is isolated, so this only scales its
            # gradient by 1/n_msa_layers, and the value reads as "KL per layer"
            losses["kl_index"] = torch.stack(kls).mean()
        if moe_extras:
            losses["moe_aux"] = torch.stack([m["aux"] for m in moe_extras.values()]).mean()
        stats_named = self._stats(lm.device, losses, attn_extras, moe_extras)
        if cfg.msa.budget_match_topk and "blocks_per_token" in stats_named:
            # what static top-k would attend on these tokens: the target of the budget's adjustment
            stats_named["blocks_per_token_static"] = static_blocks_per_token(
                layout, cfg.msa.block_size, cfg.msa.budget_match_topk)
        return ModelOutput(losses=losses, stats=stats_named,
                           n_targets=(batch.targets_BT != IGNORE_INDEX).sum(),
                           logits=logits_BTV if return_logits else None,
                           selection={i: a["block_idx"] for i, a in attn_extras.items() if "block_idx" in a},
                           attended_pairs=_sum_or_none([a["attended_pairs"] for a in attn_extras.values()
                                                        if "attended_pairs" in a]))

    @torch.no_grad()
    def _stats(self, device, losses: dict, attn_extras: dict, moe_extras: dict) -> dict[str, torch.Tensor]:
        named: dict[str, torch.Tensor] = {}
        for key in ("sparsity", "blocks_per_token", "kl", "score_recall", "block_recall"):
            per_layer = {i: a[key].detach().float() for i, a in attn_extras.items() if key in a}
            if not per_layer:
                continue
            out_key = "kl_index_loss" if key == "kl" else key
            named[out_key] = torch.stack(list(per_layer.values())).mean()
            for i, v in per_layer.items():
                named[f"layer/{i}/{out_key}"] = v
        if not attn_extras:
            named["sparsity"] = torch.zeros((), device=device)  # a dense model attends to every visible key
        if moe_extras:
            named["moe_aux_loss"] = losses["moe_aux"].detach().float()
            ratios = {}
            for i, m in moe_extras.items():
                load_X = m["load"]
                ratios[i] = load_X.max() / load_X.mean().clamp(min=1e-9)
                named[f"layer/{i}/expert_load_max_over_mean"] = ratios[i]
            named["expert_load_max_over_mean"] = torch.stack(list(ratios.values())).mean()
        # 0-dim fp32 tensors on the device: reading them would stop the host mid-step (a sync before
        # the backward's launches); the training loop sums them on the device and reads them once
        # per logging step
        return {k: v.to(device, torch.float32) for k, v in named.items()}
