"""The multimodal decoder-only transformer: text tokens and image patch tokens in one sequence.

Legend: B batch rows, T tokens, E d_model, V vocab, M images, P patches per image.

    model = MultimodalTransformer(ModelConfig(...), special_ids)
    out = model(batch)            # out.losses["lm"], out.stats
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import DenseAttention, document_causal_mask
from model.batch import IGNORE_INDEX, Batch
from model.config import ModelConfig
from model.layers import PatchEncoder, RMSNorm, SwiGLU, rope_cos_sin


@dataclass
class ModelOutput:
    losses: dict[str, torch.Tensor]  # named scalar losses: "lm" always; others by architecture
    stats: dict[str, float] = field(default_factory=dict)  # named statistics (floats, detached)
    n_targets: int = 0  # text tokens that carried an LM target
    logits: torch.Tensor | None = None  # [B, T, V], only when asked for (evaluation)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = DenseAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x_BTE, rope, mask_B1TT):
        x_BTE = x_BTE + self.attn(self.attn_norm(x_BTE), rope, mask_B1TT)
        return x_BTE + self.ffn(self.ffn_norm(x_BTE))


class MultimodalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, img_patch_id: int):
        super().__init__()
        self.cfg = cfg
        self.img_patch_id = img_patch_id
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.patch_encoder = PatchEncoder(cfg.image_size, cfg.patch_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # residual-branch outputs scaled down with depth (GPT-2), so the stream stays O(1)
                scale = (2 * self.cfg.n_layers) ** -0.5 if name.endswith(("o_proj.weight", "w_down.weight")) else 1.0
                nn.init.normal_(p, std=std * scale)

    def embed_inputs(self, batch: Batch) -> torch.Tensor:
        x_BTE = self.embed(batch.tokens_BT)
        is_patch_BT = batch.tokens_BT == self.img_patch_id
        n_slots = batch.images_BNCHW.shape[1]
        used_BN = torch.arange(n_slots, device=x_BTE.device)[None, :] < batch.n_images_B[:, None].long()
        images_MCHW = batch.images_BNCHW[used_BN]
        n_patch_tokens = int(is_patch_BT.sum())
        if n_patch_tokens != images_MCHW.shape[0] * self.cfg.n_patches:
            raise ValueError(
                f"batch has {n_patch_tokens} image-patch tokens but {images_MCHW.shape[0]} images of "
                f"{self.cfg.n_patches} patches: the data's image size/patch size disagree with the model's"
            )
        if images_MCHW.shape[0]:
            patches_MPE = self.patch_encoder(images_MCHW)
            # row-major order of patch positions == order of images in the row, patches in raster order
            x_BTE = x_BTE.masked_scatter(is_patch_BT[..., None], patches_MPE.to(x_BTE.dtype).reshape(-1))
        return x_BTE

    def forward(self, batch: Batch, *, return_logits: bool = False) -> ModelOutput:
        x_BTE = self.embed_inputs(batch)
        rope = rope_cos_sin(batch.positions_BT, self.cfg.effective_rope_dim, self.cfg.rope_theta)
        mask_B1TT = document_causal_mask(batch.segment_ids_BT)
        for block in self.blocks:
            x_BTE = block(x_BTE, rope, mask_B1TT)
        logits_BTV = self.lm_head(self.norm(x_BTE))
        lm = F.cross_entropy(logits_BTV.float().flatten(0, 1), batch.targets_BT.flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(losses={"lm": lm}, n_targets=batch.n_text_targets,
                           logits=logits_BTV if return_logits else None)
