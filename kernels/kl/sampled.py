"""The warm-up's KL (dense support: every visible key) on a sample of query tokens.

The full dense-support KL costs O(T^2) per layer: at 32K it is most of a warm-up step. Its gradient
reaches only the index projections, and the loss is a mean over (token, group), so the mean over a
random sample of tokens, divided by the sampling fraction, is an unbiased estimate of the loss and
of its gradient (each token is kept independently with probability `fraction`):

    E[ (1 / (N * Hkv * f)) * sum over kept t, g of KL_tg ] = (1 / (N * Hkv)) * sum over t, g of KL_tg

The sparse form needs nothing new for sampling (rows of -1 in `block_idx` have an empty support and
add nothing, in the kernels as in the reference; model/msa.py does that). This dense form is plain
PyTorch: for a chunk of kept tokens, the teacher's head-averaged probabilities over the keys of each
token's document up to it (fp32, no autograd; the teacher is a constant), then the student's
log-softmax over the same keys (recomputed in the backward) and the KL. Work and memory scale with
the kept tokens times the document length, not its square.

Tested against the fp32 reference (`reference.py`, sparse form with every visible block listed for
the kept tokens) in tests/kernels/test_msa_kl_sampled.py.

Shape legend: N flat tokens, H heads (query heads for q, KV heads for k/qi), G heads per group,
D head dim, I index dim, C kept tokens of a chunk, L keys of a chunk's window.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMS = 1 << 26  # teacher scores per chunk (C x Hq x L fp32: 256 MiB)


def _student_kl(qi_CHI: torch.Tensor, ki_LI: torch.Tensor, visible_CL: torch.Tensor, p_HCL: torch.Tensor) -> torch.Tensor:
    I = qi_CHI.shape[-1]
    z_HCL = torch.einsum("chi,li->hcl", qi_CHI.float(), ki_LI.float()) / math.sqrt(I)
    log_pi_HCL = torch.log_softmax(z_HCL.masked_fill(~visible_CL[None], float("-inf")), dim=-1)
    pos = p_HCL > 0
    return torch.where(pos, p_HCL * (torch.log(torch.where(pos, p_HCL, 1.0)) - torch.where(pos, log_pi_HCL, 0.0)),
                       0.0).sum()


def msa_kl_loss_dense_sampled(q_NHD: torch.Tensor, k_NHD: torch.Tensor, qi_NHI: torch.Tensor, ki_NI: torch.Tensor,
                              cu_seqlens: torch.Tensor, keep_N: torch.Tensor, fraction: float,
                              softmax_scale: float | None = None) -> torch.Tensor:
    """0-dim fp32: the dense-support KL summed over the kept tokens and their groups, divided by
    (N * Hkv * fraction). Gradients reach qi and ki only. Inputs are the packed varlen form without
    the batch axis ([N, ...]); `keep_N` is a bool mask of the tokens whose KL is computed."""
    N, Hq, D = q_NHD.shape
    Hkv = k_NHD.shape[1]
    G = Hq // Hkv
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if keep_N.shape != (N,) or keep_N.dtype != torch.bool:
        raise ValueError(f"keep_N must be a bool tensor of shape [{N}], got {tuple(keep_N.shape)} {keep_N.dtype}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dev = q_NHD.device
    kept = torch.nonzero(keep_N).flatten()  # one host sync: how many tokens were drawn
    total = torch.zeros((), dtype=torch.float32, device=dev)
    if kept.numel() == 0:
        return total + 0.0 * (qi_NHI.sum() + ki_NI.sum())  # keeps qi and ki in the graph
    cu = cu_seqlens.to(dev).long()
    start_K = cu[torch.searchsorted(cu[1:], kept, right=True)]  # first token of each kept token's document
    # host copies to plan the chunks (one more sync)
    kept_h, start_h = kept.tolist(), start_K.tolist()
    q = q_NHD.detach()
    k = k_NHD.detach()
    i = 0
    while i < len(kept_h):
        # a chunk of consecutive kept tokens whose key window [start of the first, last token] keeps
        # the teacher's score tensor under CHUNK_ELEMS
        j = i + 1
        while j < len(kept_h) and (j + 1 - i) * Hq * (kept_h[j] - start_h[i] + 1) <= CHUNK_ELEMS:
            j += 1
        k0, k1 = start_h[i], kept_h[j - 1] + 1
        t_C = kept[i:j]
        k_pos_L = torch.arange(k0, k1, device=dev)
        visible_CL = (k_pos_L[None, :] >= start_K[i:j, None]) & (k_pos_L[None, :] <= t_C[:, None])
        with torch.no_grad():
            q_HGCD = q[t_C].float().view(-1, Hkv, G, D).permute(1, 2, 0, 3)
            s_HGCL = torch.einsum("hgcd,lhd->hgcl", q_HGCD, k[k0:k1].float()) * scale
            p_HCL = torch.softmax(s_HGCL.masked_fill(~visible_CL[None, None], float("-inf")), dim=-1).mean(1)
            del s_HGCL
        args = (qi_NHI[t_C], ki_NI[k0:k1], visible_CL, p_HCL)
        if torch.is_grad_enabled() and (qi_NHI.requires_grad or ki_NI.requires_grad):
            total = total + checkpoint(_student_kl, *args, use_reentrant=False)
        else:
            total = total + _student_kl(*args)
        i = j
    return total / (N * Hkv * fraction)
