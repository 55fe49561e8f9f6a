"""Measured sparsity and recall of an MSA layer's block selection (definitions in model/README.md).

Legend: N flat tokens (B*T), H KV heads = GQA groups = index heads, G heads per group, D head dim,
K top-k slots, C query rows of a chunk, L keys of one document, M key blocks of one document.

Sparsity is cheap (it needs only the selection) and is always computed. The recalls compare the
selection with full attention, so they build dense probabilities per document (O(L^2) per
document, chunked) and run only on request (`forward(batch, compute_stats=True)`).
All functions run without autograd and average over real (non-padding) tokens and groups.

    pytest -q tests/model/test_stats.py
"""
from __future__ import annotations

import math

import torch

from model import fused
from model.attention import DocLayout

_CHUNK_ELEMS = 1 << 24  # query rows per chunk: ~16M fp32 scores at a time


def _attended_keys(block_idx_NHK: torch.Tensor, pos_N: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, H] keys each (token, group) attends to: of a selected block b, all block_size keys of an
    earlier block, the pos + 1 - b * block_size up to the token of its own block, none of a later one."""
    b_NHK = block_idx_NHK.reshape(pos_N.numel(), *block_idx_NHK.shape[-2:]).long()
    keys_NHK = (pos_N[:, None, None] + 1 - b_NHK * block_size).clamp(0, block_size)
    return torch.where(b_NHK >= 0, keys_NHK, 0).sum(-1)


@torch.no_grad()
def selection_means(block_idx_NHK: torch.Tensor, layout: DocLayout, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparsity, blocks per token), each a 0-dim fp32 mean over (real token, group):
    sparsity = 1 - attended keys / causally visible keys; blocks per token = the selected blocks
    (the local one included). Every sparse forward of every MSA layer measures both, so they are
    one fused kernel on CUDA (model/fused.py) rather than a chain of about 35 small launches."""
    sparsity_blocks_2 = _selection_means(block_idx_NHK, layout.pos_N, layout.valid_N, block_size)
    return sparsity_blocks_2[0], sparsity_blocks_2[1]


@fused.fusable
def _selection_means(block_idx_NHK: torch.Tensor, pos_N: torch.Tensor, valid_N: torch.Tensor,
                     block_size: int) -> torch.Tensor:
    attended_NH = _attended_keys(block_idx_NHK, pos_N, block_size).float()
    selected_NH = (block_idx_NHK.reshape(attended_NH.shape + block_idx_NHK.shape[-1:]) >= 0).sum(-1).float()
    w_N1 = valid_N.float()[:, None]
    n = (w_N1.sum() * attended_NH.shape[1]).clamp(min=1)
    sparsity = (w_N1 * (1.0 - attended_NH / (pos_N + 1).float()[:, None])).sum() / n
    blocks = (w_N1 * selected_NH).sum() / n
    return torch.stack([sparsity, blocks])


@torch.no_grad()
def attended_pairs(block_idx_NHK: torch.Tensor, layout: DocLayout, block_size: int) -> torch.Tensor:
    """Sum over (real token, group) of the keys attended: the main branch's work, for the model
    FLOPs of a budget whose counts depend on the data (pipeline/flops.py); 0-dim fp32."""
    keys_NH = _attended_keys(block_idx_NHK, layout.pos_N, block_size).float()
    return (keys_NH * layout.valid_N[:, None]).sum()


@torch.no_grad()
def static_blocks_per_token(layout: DocLayout, block_size: int, k: int) -> torch.Tensor:
    """What the blocks per token of `selection_means` would be under static top-k on the same tokens:
    the mean over real tokens of min(k, blocks visible to the token) (the same for every group); 0-dim fp32."""
    n_N1 = torch.clamp(layout.pos_N // block_size + 1, max=k).float()[:, None]
    return _mean_over_valid(n_N1, layout.valid_N)


@torch.no_grad()
def recalls(q_NHD: torch.Tensor, k_NHD: torch.Tensor, block_idx_NHK: torch.Tensor, layout: DocLayout,
            block_size: int, softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(score recall, block recall), each a 0-dim fp32 mean over (real token, group).

    score recall: the head-averaged dense attention mass inside the selected blocks.
    block recall: |selected blocks ∩ the n blocks with the most dense mass| / n, where n is the
    number of blocks selected for that token (k, or fewer near a document's start).
    """
    N = q_NHD.shape[0]
    H = k_NHD.shape[1]
    K = block_idx_NHK.shape[-1]
    b_NHK = block_idx_NHK.reshape(N, H, K).long()
    dev = q_NHD.device
    score_sum = torch.zeros((), dtype=torch.float64, device=dev)
    block_sum = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    for s0, c0, c1, L, p_HCL in dense_probs_by_chunk(q_NHD, k_NHD, layout, softmax_scale, skip_padding=True):
        C, M = c1 - c0, -(-L // block_size)
        mass_HCM = torch.nn.functional.pad(p_HCL, (0, M * block_size - L)).view(H, C, M, block_size).sum(-1)
        chosen_HCK = b_NHK[s0 + c0:s0 + c1].permute(1, 0, 2)
        sel_HCM = torch.zeros(H, C, M + 1, dtype=torch.bool, device=dev)
        sel_HCM.scatter_(-1, torch.where(chosen_HCK >= 0, chosen_HCK, M), True)
        sel_HCM = sel_HCM[..., :M]
        score_sum += (mass_HCM * sel_HCM).sum(-1).double().sum()
        n_sel_HC = (chosen_HCK >= 0).sum(-1)
        kk = min(K, M)
        top_HCk = mass_HCM.topk(kk, dim=-1).indices
        hit_HCk = sel_HCM.gather(-1, top_HCk) & (torch.arange(kk, device=dev) < n_sel_HC[..., None])
        block_sum += (hit_HCk.sum(-1).float() / n_sel_HC.clamp(min=1)).double().sum()
        count += H * C
    if count == 0:
        nan = torch.tensor(float("nan"), device=dev)
        return nan, nan
    return (score_sum / count).float(), (block_sum / count).float()


def dense_probs_by_chunk(q_NHD: torch.Tensor, k_NHD: torch.Tensor, layout: DocLayout,
                         softmax_scale: float | None = None, skip_padding: bool = False):
    """The true attention, head-averaged per group, chunk by chunk of query rows of each document:
    yields (document start s0, first row c0, end row c1, document length L, p [H, C, L] fp32).

    p[h, c, j] = mean over the group's heads of softmax_j(q . k_j * scale), keys j <= c of the same
    document (0 elsewhere). fp32 with autocast off, no autograd; O(L^2) per document, chunked so that
    a chunk's scores stay near _CHUNK_ELEMS. `skip_padding` leaves out the padding runs."""
    N, Hq, D = q_NHD.shape
    H = k_NHD.shape[1]
    G = Hq // H
    dev = q_NHD.device
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cu = layout.cu_seqlens.tolist()
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        q_N, k_N = q_NHD.float(), k_NHD.float()
        for s, (s0, e0) in enumerate(zip(cu[:-1], cu[1:])):
            if e0 == s0 or (skip_padding and not bool(layout.seq_valid_S[s])):
                continue
            L = e0 - s0
            k_LHD = k_N[s0:e0]
            step = max(1, _CHUNK_ELEMS // (Hq * L))
            for c0 in range(0, L, step):
                c1 = min(L, c0 + step)
                q_CHGD = q_N[s0 + c0:s0 + c1].view(c1 - c0, H, G, D)
                s_HGCL = torch.einsum("chgd,lhd->hgcl", q_CHGD, k_LHD) * scale
                causal_CL = torch.arange(L, device=dev)[None, :] <= torch.arange(c0, c1, device=dev)[:, None]
                yield s0, c0, c1, L, torch.softmax(s_HGCL.masked_fill(~causal_CL, float("-inf")), dim=-1).mean(1)


def _mean_over_valid(x_NH: torch.Tensor, valid_N: torch.Tensor) -> torch.Tensor:
    n = valid_N.sum() * x_NH.shape[1]
    return (x_NH * valid_N[:, None]).sum() / n.clamp(min=1)
