"""The oracle block selector (evaluation only): which blocks MSA would pick if it knew the true
attention. Used to evaluate a *dense* checkpoint with block-sparse attention and no training: the
training-free "efficiency patch" that native MSA is compared against (`msa-study`'s dense-patched arm).

Per (query token t, GQA group g) of one document:
  p[g, t](j)  = (1/G) * sum over heads h in g of softmax_j(q_h[t] . k_j / sqrt(dh)), j <= t
                (the group's head-averaged dense attention: the KL teacher of docs/msa.md);
  S[g, t, b]  = max over keys j of block b, j <= t, of p[g, t](j)   (max-pooled, like the index branch);
  selection   = the local block (always) + the top-(k-1) visible non-local blocks by S, padded with -1
                where fewer than k blocks are visible; the local block sits in the last valid slot
                (the layout `kernels.msa_select` returns).
The main branch then attends over the selected blocks exactly as in sparse mode.

Plain PyTorch, fp32 (autocast off), chunked over query rows, without autograd: O(L^2) per document,
an evaluation tool rather than a fast path.

Legend: N flat tokens, Hq query heads, H KV heads = groups, G heads per group, D head dim, K top-k
slots, C query rows of a chunk, L keys of one document, M key blocks of one document.

    pytest -q tests/model/test_oracle.py
"""
from __future__ import annotations

import torch

from model.attention import DocLayout
from model.stats import dense_probs_by_chunk


@torch.no_grad()
def oracle_select(q_NHD: torch.Tensor, k_NHD: torch.Tensor, layout: DocLayout, block_size: int, topk: int,
                  softmax_scale: float | None = None) -> torch.Tensor:
    """block_idx int32 [N, H, K] chosen by the true (head-averaged, max-pooled) attention."""
    N = q_NHD.shape[0]
    H = k_NHD.shape[1]
    dev = q_NHD.device
    out_NHK = torch.full((N, H, topk), -1, dtype=torch.int32, device=dev)
    for s0, c0, c1, L, p_HCL in dense_probs_by_chunk(q_NHD, k_NHD, layout, softmax_scale):
        C, M = c1 - c0, -(-L // block_size)
        pos_C = torch.arange(c0, c1, device=dev)
        # invisible keys have p = 0 and every non-local visible block is fully visible, so
        # pooling the masked probabilities is the max over visible keys
        pooled_HCM = torch.nn.functional.pad(p_HCL, (0, M * block_size - L)).view(H, C, M, block_size).amax(-1)
        local_C = pos_C // block_size
        blocks_M = torch.arange(M, device=dev)
        others_HCM = pooled_HCM.masked_fill(blocks_M[None, None, :] >= local_C[None, :, None], float("-inf"))
        n_other_C = local_C.clamp(max=topk - 1)
        chosen_HCK = torch.full((H, C, topk), -1, dtype=torch.long, device=dev)
        kk = min(topk - 1, M)
        if kk > 0:
            top_HCk = others_HCM.topk(kk, dim=-1).indices
            keep = torch.arange(kk, device=dev)[None, None, :] < n_other_C[None, :, None]
            chosen_HCK[..., :kk] = torch.where(keep, top_HCk, -1)
        slot_K = torch.arange(topk, device=dev)
        is_local = slot_K[None, None, :] == n_other_C[None, :, None]
        chosen_HCK = torch.where(is_local, local_C[None, :, None], chosen_HCK)
        out_NHK[s0 + c0:s0 + c1] = chosen_HCK.permute(1, 0, 2).to(torch.int32)
    return out_NHK
