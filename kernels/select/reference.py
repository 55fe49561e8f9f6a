"""Plain-PyTorch fp32 reference of MSA block selection (the index branch). Obviously correct, slow.

Shares no code with the Triton path. Its tests: `pytest -q tests/kernels/test_msa_select.py`.

Shape legend: B batch, T tokens, H index heads (= KV heads), I index dim, K top-k slots,
C query rows of a chunk, L keys of one sequence, M key blocks of one sequence.
"""
from __future__ import annotations

import math

import torch

from kernels._reference_common import CHUNK_ELEMS as _CHUNK_ELEMS, sequences


def index_scores(qi_CHI, ki_LI, q_pos_C, scale):
    """Token scores s[h, c, j] in fp32, -inf where key j is after query c (positions within the sequence)."""
    s_HCL = torch.einsum("chi,li->hcl", qi_CHI.float(), ki_LI.float()) * scale
    k_pos_L = torch.arange(ki_LI.shape[0], device=ki_LI.device)
    causal_CL = k_pos_L[None, :] <= q_pos_C[:, None]
    return s_HCL.masked_fill(~causal_CL, float("-inf"))


def pooled_block_scores(s_HCL, block_size):
    """Max over the visible keys of each block: S[h, c, m]; -inf for blocks with no visible key."""
    H, C, L = s_HCL.shape
    M = -(-L // block_size)
    pad = M * block_size - L
    s = torch.nn.functional.pad(s_HCL, (0, pad), value=float("-inf"))
    return s.view(H, C, M, block_size).amax(-1)


def _chunks(L, H, B_L):
    step = max(1, _CHUNK_ELEMS // max(1, H * B_L))
    for c0 in range(0, L, step):
        yield c0, min(L, c0 + step)


def budget_counts(pooled_HCM, local_C, topk, budget):
    """Blocks per (head, query row) under `budget` (None: static), from the pooled scores of every
    block (-inf where no key is visible). Written from the definitions in budget.py's docstring,
    sharing no code with it."""
    visible_C = local_C + 1
    static_C = torch.clamp(visible_C, max=topk)
    kind = "static" if budget is None else budget.kind
    if kind == "static":
        return static_C[None, :].expand(pooled_HCM.shape[0], -1)
    if kind == "ratio":
        want_C = torch.tensor([math.ceil(budget.ratio * int(v)) for v in visible_C.tolist()],
                              dtype=torch.long, device=local_C.device)
        n_C = torch.minimum(torch.clamp(want_C, min=budget.k_min, max=topk), visible_C)
        return n_C[None, :].expand(pooled_HCM.shape[0], -1)
    # top_p: block probabilities = softmax of the pooled scores over the visible blocks
    prob_HCM = torch.softmax(pooled_HCM.double(), dim=-1)
    M = pooled_HCM.shape[-1]
    is_local_CM = torch.arange(M, device=local_C.device)[None, :] == local_C[:, None]
    p_local_HC = (prob_HCM * is_local_CM[None]).sum(-1)
    others_HCM = torch.where(is_local_CM[None], 0.0, prob_HCM)
    covered_HCM = p_local_HC[..., None] + others_HCM.sort(-1, descending=True).values.cumsum(-1)
    # the fewest other blocks m with local + best m >= p (m = 0 if the local block alone covers p)
    m_HC = torch.where(p_local_HC >= budget.p, 0, 1 + (covered_HCM < budget.p).sum(-1))
    n_HC = torch.clamp(1 + m_HC, min=budget.k_min, max=topk)
    return torch.minimum(n_HC, visible_C[None, :])


def fp8_rounded(x):
    """x as the FP8 selection sees it, in fp32: scaled so that its largest magnitude is e4m3's 448,
    rounded to e4m3, scaled back."""
    scale = max(x.abs().max().item() / 448.0, torch.finfo(torch.float32).tiny)
    return (x.float() / scale).to(torch.float8_e4m3fn).float() * scale


@torch.no_grad()
def msa_select_reference(qi_BTHI, ki_BTI, block_size, topk, cu_seqlens=None, budget=None, fp8=False):
    """block_idx int32 [B, T, H, K] and index_lse fp32 [B, T, H] as defined in kernels/select/README.md;
    with an adaptive `budget` (kernels/select/budget.py) each (token, head) keeps its count n of blocks;
    fp8: ranked on the scores of qi and ki rounded to e4m3 (the index_lse too)."""
    if fp8:
        qi_BTHI, ki_BTI = fp8_rounded(qi_BTHI), fp8_rounded(ki_BTI)
    B, T, H, I = qi_BTHI.shape
    dev = qi_BTHI.device
    scale = 1.0 / math.sqrt(I)
    block_idx_BTHK = torch.full((B, T, H, topk), -1, dtype=torch.int32, device=dev)
    index_lse_BTH = torch.full((B, T, H), float("nan"), dtype=torch.float32, device=dev)
    for b, s0, e0 in sequences(B, T, cu_seqlens):
        L = e0 - s0
        for c0, c1 in _chunks(L, H, L):
            q_pos_C = torch.arange(c0, c1, device=dev)
            s_HCL = index_scores(qi_BTHI[b, s0 + c0:s0 + c1], ki_BTI[b, s0:e0], q_pos_C, scale)
            pooled_HCM = pooled_block_scores(s_HCL, block_size)
            M = pooled_HCM.shape[-1]
            local_C = q_pos_C // block_size
            blocks_M = torch.arange(M, device=dev)
            # Rank only the visible blocks other than the local one.
            others_HCM = pooled_HCM.masked_fill(blocks_M[None, None, :] >= local_C[None, :, None], float("-inf"))
            n_other_HC = budget_counts(pooled_HCM, local_C, topk, budget) - 1
            chosen_HCK = torch.full((H, c1 - c0, topk), -1, dtype=torch.long, device=dev)
            if topk > 1 and M > 1:
                kk = min(topk - 1, M)
                _, top_HCk = torch.topk(others_HCM, kk, dim=-1)
                slot_k = torch.arange(kk, device=dev)
                keep = slot_k[None, None, :] < n_other_HC[..., None]
                chosen_HCK[..., :kk] = torch.where(keep, top_HCk, -1)
            # The local block goes to the last valid slot, n_valid - 1 = n_other.
            slot_K = torch.arange(topk, device=dev)
            is_local = slot_K[None, None, :] == n_other_HC[..., None]
            chosen_HCK = torch.where(is_local, local_C[None, :, None], chosen_HCK)
            block_idx_BTHK[b, s0 + c0:s0 + c1] = chosen_HCK.permute(1, 0, 2).to(torch.int32)
            index_lse_BTH[b, s0 + c0:s0 + c1] = _lse_over_selection(s_HCL, chosen_HCK, block_size).T
    return block_idx_BTHK, index_lse_BTH


def _selected_keys_mask(chosen_HCK, L, block_size):
    """[H, C, L] bool: key j lies in one of the chosen blocks (future keys are masked by the scores)."""
    H, C, K = chosen_HCK.shape
    M = -(-L // block_size)
    member_HCM = torch.zeros(H, C, M + 1, dtype=torch.bool, device=chosen_HCK.device)
    idx = torch.where(chosen_HCK >= 0, chosen_HCK, M).clamp(max=M)
    member_HCM.scatter_(-1, idx, True)
    key_block_L = torch.arange(L, device=chosen_HCK.device) // block_size
    return member_HCM[..., :M][..., key_block_L]


def _lse_over_selection(s_HCL, chosen_HCK, block_size):
    mask = _selected_keys_mask(chosen_HCK, s_HCL.shape[-1], block_size)
    return torch.logsumexp(s_HCL.masked_fill(~mask, float("-inf")), dim=-1)


@torch.no_grad()
def index_lse_reference(qi_BTHI, ki_BTI, block_idx_BTHK, block_size, cu_seqlens=None):
    """index_lse for a given selection (tests use it to check the kernel's lse on the kernel's own choice)."""
    B, T, H, I = qi_BTHI.shape
    out = torch.full((B, T, H), float("nan"), dtype=torch.float32, device=qi_BTHI.device)
    for b, s0, e0 in sequences(B, T, cu_seqlens):
        L = e0 - s0
        for c0, c1 in _chunks(L, H, L):
            q_pos_C = torch.arange(c0, c1, device=qi_BTHI.device)
            s_HCL = index_scores(qi_BTHI[b, s0 + c0:s0 + c1], ki_BTI[b, s0:e0], q_pos_C, 1.0 / math.sqrt(I))
            chosen_HCK = block_idx_BTHK[b, s0 + c0:s0 + c1].permute(1, 0, 2).long()
            out[b, s0 + c0:s0 + c1] = _lse_over_selection(s_HCL, chosen_HCK, block_size).T
    return out


@torch.no_grad()
def pooled_scores_reference(qi_BTHI, ki_BTI, block_size, cu_seqlens=None):
    """List over sequences of (batch row, start, end, pooled scores [H, L, M]) for tie-aware tests."""
    B, T, H, I = qi_BTHI.shape
    out = []
    for b, s0, e0 in sequences(B, T, cu_seqlens):
        q_pos = torch.arange(e0 - s0, device=qi_BTHI.device)
        s_HCL = index_scores(qi_BTHI[b, s0:e0], ki_BTI[b, s0:e0], q_pos, 1.0 / math.sqrt(I))
        out.append((b, s0, e0, pooled_block_scores(s_HCL, block_size)))
    return out
