"""Plain-PyTorch fp32 reference of MSA block-sparse GQA attention. Obviously correct, differentiable
in q, k and v through autograd. Shares no code with the Triton path.

Tests: `pytest -q tests/kernels/test_msa_attention.py`.

Memory: scores are built per (sequence, chunk of queries) as [Hkv, G, C, L] fp32, L the keys up to
the chunk's last query (kernels/_reference_common.py). Autograd keeps them for up to SAVED_SCORES
scores per call; the chunks beyond are recomputed in the backward (activation checkpointing), so the
peak stays near one chunk's scores instead of the [Hq, T, T] probabilities of every chunk.

Shape legend: B batch, T tokens, H heads (query heads Hq for q/o/lse, KV heads for k/v/block_idx),
G heads per group, D head dim, K top-k slots, C query rows of a chunk, L keys of one sequence,
M key blocks of one sequence.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from kernels._reference_common import SAVED_SCORES, causal_chunks, sequences


def allowed_keys(block_idx_CHK, q_pos_C, L, block_size):
    """[H, C, L] bool: key j is in a selected block of query c and j <= c (positions in the sequence).

    block_idx_CHK=None means every causally visible key (dense causal attention).
    """
    dev = q_pos_C.device
    k_pos_L = torch.arange(L, device=dev)
    causal_CL = k_pos_L[None, :] <= q_pos_C[:, None]
    if block_idx_CHK is None:
        return causal_CL[None]
    C, H, K = block_idx_CHK.shape
    M = -(-L // block_size)
    member_HCM = torch.zeros(H, C, M + 1, dtype=torch.bool, device=dev)
    idx = block_idx_CHK.permute(1, 0, 2).long()
    idx = torch.where((idx >= 0) & (idx < M), idx, M)
    member_HCM.scatter_(-1, idx, True)
    return member_HCM[..., k_pos_L // block_size] & causal_CL[None]


def _attend(q_CHD, k_LHD, v_LHD, allowed_HCL, scale):
    C, Hq, D = q_CHD.shape
    Hkv = k_LHD.shape[1]
    G = Hq // Hkv
    q_HGCD = q_CHD.view(C, Hkv, G, D).permute(1, 2, 0, 3)
    s_HGCL = torch.einsum("hgcd,lhd->hgcl", q_HGCD, k_LHD) * scale
    s_HGCL = s_HGCL.masked_fill(~allowed_HCL[:, None], float("-inf"))
    lse_HGC = torch.logsumexp(s_HGCL, dim=-1)
    p_HGCL = torch.exp(s_HGCL - lse_HGC[..., None])
    o_HGCD = torch.einsum("hgcl,lhd->hgcd", p_HGCL, v_LHD)
    return o_HGCD.permute(2, 0, 1, 3).reshape(C, Hq, D), lse_HGC.permute(2, 0, 1).reshape(C, Hq)


def msa_attention_reference(q_BTHD, k_BTHD, v_BTHD, block_idx_BTHK, block_size, cu_seqlens=None,
                            softmax_scale=None):
    """o fp32 [B, T, Hq, D] and lse fp32 [B, T, Hq]: exact softmax over the visible keys of the
    selected blocks (block_idx=None: all causally visible keys)."""
    B, T, Hq, D = q_BTHD.shape
    Hkv = k_BTHD.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q, k, v = q_BTHD.float(), k_BTHD.float(), v_BTHD.float()
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    saved = 0  # scores autograd keeps in this call
    o_parts, lse_parts = [], []
    for b, s0, e0 in sequences(B, T, cu_seqlens):
        L = e0 - s0
        q_LHD, k_LHD, v_LHD = q[b, s0:e0], k[b, s0:e0], v[b, s0:e0]
        for c0, c1 in causal_chunks(L, Hq):
            # the chunk's keys: rows [0, c1) of the sequence (a later key is after every query of it)
            q_pos_C = torch.arange(c0, c1, device=q.device)
            bidx = None if block_idx_BTHK is None else block_idx_BTHK[b, s0 + c0:s0 + c1]
            allowed_HCL = allowed_keys(bidx, q_pos_C, c1, block_size)
            args = (q_LHD[c0:c1], k_LHD[:c1], v_LHD[:c1], allowed_HCL, scale)
            saved += Hq * (c1 - c0) * c1 if grad else 0
            if grad and saved > SAVED_SCORES:
                o_CHD, lse_CH = checkpoint(_attend, *args, use_reentrant=False)
            else:
                o_CHD, lse_CH = _attend(*args)
            o_parts.append(o_CHD)
            lse_parts.append(lse_CH)
    # Sequences cover the flat token axis in order (cu_seqlens[-1] == T is checked by the caller).
    o = torch.cat(o_parts).view(B, T, Hq, D)
    lse = torch.cat(lse_parts).view(B, T, Hq)
    return o, lse
