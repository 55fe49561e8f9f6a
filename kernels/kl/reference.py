"""Plain-PyTorch fp32 reference of the MSA KL alignment loss. Obviously correct; differentiable in qi
and ki only (the teacher q, k and lse are constants). Shares no code with the Triton path.

Tests: `pytest -q tests/kernels/test_msa_kl.py`.

Memory: per (sequence, chunk of queries) the teacher probabilities [Hkv, G, C, L] are built without
autograd and averaged over the group at once, L the keys up to the chunk's last query
(kernels/_reference_common.py); autograd keeps the student's [Hkv, C, L] log-softmax for up to
SAVED_SCORES scores per call and the chunks beyond are checkpointed (recomputed in the backward), so
training through it at a few thousand tokens stays frugal.

Shape legend: B batch, T tokens, H heads (query heads for q/lse, KV heads for k/qi/block_idx),
G heads per group, D head dim, I index dim, K top-k slots, C query rows of a chunk, L keys of one
sequence, M key blocks of one sequence.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from kernels._reference_common import SAVED_SCORES, causal_chunks, sequences


def support_mask(block_idx_CHK, q_pos_C, L, block_size, H):
    """[H, C, L] bool: the KL support S[h, c] = visible keys of the selected blocks (all visible keys
    when block_idx is None)."""
    dev = q_pos_C.device
    k_pos_L = torch.arange(L, device=dev)
    causal_CL = k_pos_L[None, :] <= q_pos_C[:, None]
    if block_idx_CHK is None:
        return causal_CL[None].expand(H, -1, -1)
    M = -(-L // block_size)
    C = q_pos_C.numel()
    member_HCM = torch.zeros(H, C, M + 1, dtype=torch.bool, device=dev)
    idx = block_idx_CHK.permute(1, 0, 2).long()
    idx = torch.where((idx >= 0) & (idx < M), idx, M)
    member_HCM.scatter_(-1, idx, True)
    return member_HCM[..., k_pos_L // block_size] & causal_CL[None]


@torch.no_grad()
def teacher_probs(q_CHD, k_LHD, support_HCL, lse_CH, scale):
    """Head-averaged main-branch probabilities p[h, c, j] on the support (0 outside)."""
    C, Hq, D = q_CHD.shape
    Hkv = k_LHD.shape[1]
    G = Hq // Hkv
    q_HGCD = q_CHD.float().view(C, Hkv, G, D).permute(1, 2, 0, 3)
    s_HGCL = torch.einsum("hgcd,lhd->hgcl", q_HGCD, k_LHD.float()) * scale
    s_HGCL = s_HGCL.masked_fill(~support_HCL[:, None], float("-inf"))
    if lse_CH is None:
        lse_HGC = torch.logsumexp(s_HGCL, dim=-1)
    else:
        lse_HGC = lse_CH.float().view(C, Hkv, G).permute(1, 2, 0)
    return torch.exp(s_HGCL - lse_HGC[..., None]).mean(1)


def _kl_sum(qi_CHI, ki_LI, support_HCL, p_HCL):
    """Sum over (c, h) of KL(p || softmax of qi.ki / sqrt(dI) over the support)."""
    I = qi_CHI.shape[-1]
    z_HCL = torch.einsum("chi,li->hcl", qi_CHI, ki_LI) / math.sqrt(I)
    log_pi_HCL = torch.log_softmax(z_HCL.masked_fill(~support_HCL, float("-inf")), dim=-1)
    pos = p_HCL > 0
    # 0 * log 0 = 0; the support keeps log_pi finite wherever p > 0.
    terms = torch.where(pos, p_HCL * (torch.log(torch.where(pos, p_HCL, 1.0)) - torch.where(pos, log_pi_HCL, 0.0)), 0.0)
    return terms.sum()


def msa_kl_loss_reference(q_BTHD, k_BTHD, qi_BTHI, ki_BTI, block_idx_BTHK, block_size, cu_seqlens=None,
                          lse=None, softmax_scale=None):
    """0-dim fp32: mean over (batch, token, group) of KL(teacher || student) on the selected visible
    keys (block_idx=None: all visible keys). Gradient only into qi and ki."""
    B, T, Hq, D = q_BTHD.shape
    Hkv = k_BTHD.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q, k = q_BTHD.detach(), k_BTHD.detach()
    lse = None if lse is None else lse.detach()
    qi, ki = qi_BTHI.float(), ki_BTI.float()
    grad = torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad)
    saved = 0  # student scores autograd keeps in this call
    total = torch.zeros((), dtype=torch.float32, device=q.device)
    for b, s0, e0 in sequences(B, T, cu_seqlens):
        L = e0 - s0
        qi_LHI, ki_LI = qi[b, s0:e0], ki[b, s0:e0]
        for c0, c1 in causal_chunks(L, Hq):
            # the chunk's keys: rows [0, c1) of the sequence (a later key is after every query of it)
            q_pos_C = torch.arange(c0, c1, device=q.device)
            bidx = None if block_idx_BTHK is None else block_idx_BTHK[b, s0 + c0:s0 + c1]
            support_HCL = support_mask(bidx, q_pos_C, c1, block_size, Hkv)
            p_HCL = teacher_probs(q[b, s0 + c0:s0 + c1], k[b, s0:s0 + c1], support_HCL,
                                  None if lse is None else lse[b, s0 + c0:s0 + c1], scale)
            args = (qi_LHI[c0:c1], ki_LI[:c1], support_HCL, p_HCL)
            saved += Hkv * (c1 - c0) * c1 if grad else 0
            if grad and saved > SAVED_SCORES:
                total = total + checkpoint(_kl_sum, *args, use_reentrant=False)
            else:
                total = total + _kl_sum(*args)
    return total / (B * T * Hkv)
