"""An MSA attention layer (docs/msa.md): the GQA main branch plus the index branch that selects, per
token and GQA group, the local key block and the top-(k-1) other visible blocks (or, with an
adaptive `msa.budget`, a count of blocks per token and group), trained by a KL to the main branch's
head-averaged attention.

Legend: B batch rows, T tokens per row, N = B*T flat tokens, Hq query heads, Hkv KV heads = groups
= index heads, D head dim, I index dim, K top-k slots, E d_model.

Modes (set per forward by the model; see model/README.md):
  dense   full attention; the index branch is not run (no KL).
  warmup  full attention; the index branch learns from the KL over all visible keys
          (teacher = dense attention, head-averaged per group).
  sparse  attention over the selected blocks only; the KL on the selected visible keys,
          teacher = the main branch's own probabilities (its LSE is reused).
  oracle  evaluation only: attention over blocks chosen by the true attention (model/oracle.py),
          the index branch not run, no KL; a dense checkpoint evaluated block-sparse.
With `msa.kl_sample` / `msa.warmup_kl_sample` below 1 the KL runs on a random sample of query tokens
(an unbiased estimate of the loss and of the index branch's gradient; kernels/kl/sampled.py).

Stop-gradients (all three of docs/msa.md): the index branch's input is the layer's normed hidden state
*detached*; the KL kernel treats q, k and the LSE as constants; top-k has no gradient, so the LM
loss never reaches the index projections. Together: the KL trains only index_q_proj, index_k_proj
and their norms, and nothing else trains them.

All MSA math runs in the kernels' packed varlen form: B=1 and `cu_seqlens` over every document of
every row (model/attention.py, DocLayout), so blocks are counted from each document's start.
The kernels' backend (`model.msa.backend`) is passed explicitly; nothing falls back silently.

    pytest -q tests/model/test_msa.py
"""
from __future__ import annotations

import torch
import torch.nn as nn

import kernels
from kernels.kl.sampled import msa_kl_loss_dense_sampled
from model import fused, oracle, stats
from model.attention import AttnContext, GQAAttention, dense_attention
from model.config import ModelConfig
from model.layers import RMSNorm


def _draw(n: int, fraction: float, device) -> torch.Tensor:
    """Which of n tokens the sampled KL keeps this step: each independently with probability
    `fraction` (the global RNG, so a seeded, checkpointed run draws the same)."""
    return torch.rand(n, device=device) < fraction


def _flat(x_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [1, B*T, ...], the kernels' varlen layout."""
    return x_BT.reshape(1, x_BT.shape[0] * x_BT.shape[1], *x_BT.shape[2:])


class MSAAttention(GQAAttention):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        E, Hkv, I = cfg.d_model, cfg.n_kv_heads, cfg.msa.index_dim
        # one index query head per GQA group, one index key head shared by all groups
        self.index_q_proj = nn.Linear(E, Hkv * I, bias=False)
        self.index_k_proj = nn.Linear(E, I, bias=False)
        # per-head RMSNorm (one weight vector of size I, applied to every head, as QK-norm does)
        self.index_q_norm = RMSNorm(I, cfg.norm_eps)
        self.index_k_norm = RMSNorm(I, cfg.norm_eps)

    def index_qk(self, x_BTE: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """qi [B, T, Hkv, I], ki [B, T, I]: normed, then the main branch's RoPE on the first rope dims."""
        B, T, _ = x_BTE.shape
        cfg = self.cfg
        I = cfg.msa.index_dim
        x_BTE = x_BTE.detach()  # stop-gradient: the KL must not reach the backbone (loss spikes)
        qn, kn = self.index_q_norm, self.index_k_norm
        qi_BTHI, ki_BT1I = fused.norm_rope_pair(  # both norms and RoPEs in one call (fused on CUDA)
            self.index_q_proj(x_BTE).view(B, T, cfg.n_kv_heads, I), self.index_k_proj(x_BTE).view(B, T, 1, I),
            qn.weight, kn.weight, qn.eps, *rope)
        return qi_BTHI, ki_BT1I[:, :, 0]

    def forward(self, x_BTE: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, dict]:
        B, T, _ = x_BTE.shape
        msa = self.cfg.msa
        layout, backend, bs = ctx.layout, msa.backend, msa.block_size
        cu = layout.cu_seqlens
        q_BTHD, k_BTHD, v_BTHD = self.qkv(x_BTE, ctx.rope)
        extras: dict[str, torch.Tensor] = {}
        if ctx.mode == "dense":
            o_BTHD = dense_attention(q_BTHD, k_BTHD, v_BTHD, ctx.mask)
            extras["sparsity"] = q_BTHD.new_zeros((), dtype=torch.float32)
            return self.o_proj(o_BTHD.reshape(B, T, -1)), extras

        if ctx.mode == "oracle":
            return self._oracle_forward(q_BTHD, k_BTHD, v_BTHD, ctx)

        qi_BTHI, ki_BTI = self.index_qk(x_BTE, ctx.rope)
        q_1NHD, k_1NHD, v_1NHD = _flat(q_BTHD), _flat(k_BTHD), _flat(v_BTHD)
        qi_1NHI, ki_1NI = _flat(qi_BTHI), _flat(ki_BTI)
        # a document shorter than topk blocks pads its selection with -1 anyway; capping topk at the
        # blocks of the whole flat axis changes no selection and keeps short test batches legal
        topk = min(msa.topk, -(-B * T // bs))
        block_idx = None
        if ctx.mode == "sparse" or ctx.compute_stats:
            # in warmup this is the selection sparse mode would make, measured for its recall; the
            # student's log-sum-exp only where the KL takes it from here (msa.index_lse)
            with_lse = ctx.mode == "sparse" and ctx.index_loss and msa.index_lse == "select"
            block_idx, index_lse = kernels.msa_select(qi_1NHI.detach(), ki_1NI.detach(), bs, topk, cu,
                                                      budget=msa.selection_budget(topk, ctx.budget_param),
                                                      with_lse=with_lse, fp8=msa.select_fp8, backend=backend)
            sparsity, extras["blocks_per_token"] = stats.selection_means(block_idx, layout, bs)
        if ctx.mode == "sparse":
            o_1NHD, lse_1NH = kernels.msa_attention(q_1NHD, k_1NHD, v_1NHD, block_idx, bs, cu, backend=backend)
            o_BTHD = o_1NHD.view(B, T, *o_1NHD.shape[2:])
            if ctx.index_loss:
                kl_idx, f = block_idx, msa.kl_sample
                if f < 1:  # the tokens not drawn get an empty support: no work, no loss, no gradient
                    kl_idx = torch.where(_draw(B * T, f, x_BTE.device)[None, :, None, None], block_idx, -1)
                extras["kl"] = kernels.msa_kl_loss(q_1NHD, k_1NHD, qi_1NHI, ki_1NI, kl_idx, bs, cu,
                                                   lse=lse_1NH.detach().float(), index_lse=index_lse, backend=backend) / f
            extras["sparsity"] = sparsity
            if msa.budget != "static":  # the main branch's work is data-dependent: measured for the MFU
                extras["attended_pairs"] = stats.attended_pairs(block_idx, layout, bs)
        else:  # warmup: dense attention, dense-support KL (block_idx=None)
            o_BTHD = dense_attention(q_BTHD, k_BTHD, v_BTHD, ctx.mask)
            f = msa.warmup_kl_sample
            if ctx.index_loss and f < 1:
                extras["kl"] = msa_kl_loss_dense_sampled(q_1NHD[0], k_1NHD[0], qi_1NHI[0], ki_1NI[0], cu,
                                                         _draw(B * T, f, x_BTE.device), f)
            elif ctx.index_loss:
                extras["kl"] = kernels.msa_kl_loss(q_1NHD, k_1NHD, qi_1NHI, ki_1NI, None, bs, cu, backend=backend)
            extras["sparsity"] = q_BTHD.new_zeros((), dtype=torch.float32)
        if ctx.compute_stats:
            extras["block_idx"] = block_idx.detach()  # [1, N, Hkv, K], for the selection picture
            extras["score_recall"], extras["block_recall"] = stats.recalls(
                q_1NHD[0].detach(), k_1NHD[0].detach(), block_idx[0], layout, bs)
        return self.o_proj(o_BTHD.reshape(B, T, -1)), extras

    def _oracle_forward(self, q_BTHD, k_BTHD, v_BTHD, ctx: AttnContext) -> tuple[torch.Tensor, dict]:
        """Block-sparse attention over the blocks the true attention ranks highest (evaluation only)."""
        B, T = q_BTHD.shape[:2]
        msa, layout = self.cfg.msa, ctx.layout
        bs = msa.block_size
        topk = min(msa.topk, -(-B * T // bs))
        q_1NHD, k_1NHD, v_1NHD = _flat(q_BTHD), _flat(k_BTHD), _flat(v_BTHD)
        block_idx = oracle.oracle_select(q_1NHD[0].detach(), k_1NHD[0].detach(), layout, bs, topk)[None]
        o_1NHD, _ = kernels.msa_attention(q_1NHD, k_1NHD, v_1NHD, block_idx, bs, layout.cu_seqlens,
                                          backend=msa.backend)
        sparsity, blocks = stats.selection_means(block_idx, layout, bs)
        extras = {"sparsity": sparsity, "blocks_per_token": blocks}
        if ctx.compute_stats:
            extras["block_idx"] = block_idx
            extras["score_recall"], extras["block_recall"] = stats.recalls(
                q_1NHD[0].detach(), k_1NHD[0].detach(), block_idx[0], layout, bs)
        return self.o_proj(o_1NHD.view(B, T, -1)), extras
