"""Public MSA block selection: `msa_select` validates its inputs and runs the Triton kernel (or the
fp32 reference with backend="reference"). Not differentiable (top-k has no gradient).

Tests: `pytest -q tests/kernels/test_msa_select.py`.

Shape legend: B batch, T tokens, N = B*T, H index heads (= KV heads), I index dim, K top-k slots.
"""
from __future__ import annotations

import math

import torch
import triton

from kernels import _common
from kernels.select.budget import Budget, trim
from kernels.select.kernel import select_kernel
from kernels.select.reference import msa_select_reference

# Launch parameters on the GPU (the interpreter ignores them); `benchmarks/msa_kernels.py --sweep` compares variants.
# rows: query rows (tokens x index heads) per program, 8 warps from 128 rows; pipe: rank block
# b - 1 while the tensor cores compute block b's scores. rows and pipe change the code path, so
# the interpreter follows them too.
GPU_CONFIG = {"num_stages": 3, "rows": 128, "pipe": True}


FP8_MAX = 448.0  # the largest finite e4m3 value (torch.float8_e4m3fn)


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded to e4m3 after dividing by one fp32 scale for the whole tensor, its largest magnitude
    mapped to 448, and that scale (0-dim, on x's device: no host sync). One scale suffices here:
    qi and ki leave RMSNorm and RoPE with entries of similar size, and e4m3 keeps 3 mantissa bits at
    any magnitude within its range."""
    scale = (x.detach().abs().amax().float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def _check(qi_BTHI, ki_BTI, block_size, topk, cu_seqlens):
    _common.check_tensor("qi", qi_BTHI, 4, _common.FLOAT_DTYPES)
    dev = qi_BTHI.device
    _common.check_tensor("ki", ki_BTI, 3, _common.FLOAT_DTYPES, dev)
    B, T, H, I = qi_BTHI.shape
    if ki_BTI.shape != (B, T, I):
        raise ValueError(f"ki must have shape [B, T, dI] = {(B, T, I)} to match qi {tuple(qi_BTHI.shape)}, "
                         f"got {tuple(ki_BTI.shape)}")
    if ki_BTI.dtype != qi_BTHI.dtype:
        raise TypeError(f"ki dtype {ki_BTI.dtype} differs from qi dtype {qi_BTHI.dtype}")
    _common.check_head_dim("dI (qi.shape[-1])", I)
    _common.check_block_size(block_size)
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if topk > 32:
        raise ValueError(f"topk must be at most 32 (registers hold the running top-k), got {topk}")
    longest = T  # the longest possible sequence; with cu_seqlens a sequence is at most T
    if topk > triton.cdiv(longest, block_size):
        raise ValueError(f"topk={topk} is larger than useful: a sequence of at most T={T} tokens has only "
                         f"{triton.cdiv(longest, block_size)} blocks of block_size={block_size}")
    _common.check_last_dim_contiguous("qi", qi_BTHI)
    _common.check_last_dim_contiguous("ki", ki_BTI)
    _common.check_size("qi", qi_BTHI)
    _common.check_cu_seqlens(cu_seqlens, B, T, dev)


def msa_select(qi, ki, block_size: int, topk: int, cu_seqlens=None, *, budget: Budget | None = None,
               with_lse: bool = True, fp8: bool = False, backend: str = "triton"):
    """Select, per (token, index head), the local block plus the top-(topk-1) other visible blocks,
    or, with an adaptive `budget`, the local block plus the best n-1 of them for a count n per
    (token, head) in [budget.k_min, topk] (kernels/select/budget.py).

    qi [B, T, Hkv, dI], ki [B, T, dI] (fp16/bf16/fp32). Returns block_idx int32 [B, T, Hkv, topk]
    (local block in slot n_valid-1, -1 after it) and index_lse fp32 [B, T, Hkv], the log-sum-exp of
    qi.ki/sqrt(dI) over the visible keys of the selected blocks. See kernels/select/README.md.

    with_lse=False returns (block_idx, None) and spares the scan one exp2 per score: for a caller that
    has the KL compute index_lse over the selected keys of the tokens it samples (`msa_kl_loss`
    with index_lse=None). An adaptive budget computes the log-sum-exps anyway and returns it.

    fp8=True ranks the blocks on FP8 index scores: qi and ki are rounded to e4m3 with one scale per
    tensor (`to_fp8`) and their products run on the FP8 tensor cores (twice the bf16 rate on Hopper).
    It changes which blocks win only where the rounding reorders close pooled scores (measured in
    docs/perf). Only with the static top-k and with_lse=False: scores that feed a log-sum-exp or a
    budget's probabilities would carry the rounding into the KL or the block count.
    """
    _check(qi, ki, block_size, topk, cu_seqlens)
    budget = budget or Budget()
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a kernels.select.budget.Budget, got {type(budget).__name__}")
    budget.check(topk)
    _common.check_backend(backend, qi.device, qi.dtype)
    if not isinstance(with_lse, bool):
        raise TypeError(f"with_lse must be True or False, got {with_lse!r}")
    scores = budget.adaptive
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be True or False, got {fp8!r}")
    if fp8 and (with_lse or scores):
        raise ValueError("fp8=True ranks blocks on rounded scores and returns no index_lse: it needs "
                         "with_lse=False and the static budget (got "
                         + ("with_lse=True" if with_lse else f"budget {budget.kind!r}") + ")")
    with_lse = with_lse or scores  # an adaptive budget's cut needs the slots' log-sum-exps anyway
    if backend == "reference":
        block_idx, index_lse = msa_select_reference(qi, ki, block_size, topk, cu_seqlens, budget=budget, fp8=fp8)
        return block_idx, index_lse if with_lse else None

    B, T, H, I = qi.shape
    N = B * T
    # Flat token axis; reshape copies only if B and T do not merge.
    qi_NHI = qi.reshape(N, H, I)
    ki_NI = ki.reshape(N, I)
    fp8_scale = None
    if fp8:
        qi_NHI, q_scale = to_fp8(qi_NHI)
        ki_NI, k_scale = to_fp8(ki_NI)
        fp8_scale = torch.stack([q_scale, k_scale])
    cu = _common.flat_cu_seqlens(B, T, cu_seqlens, qi.device)
    block_idx_NHK = _common.empty((N, H, topk), torch.int32, qi.device)
    # not written without LSE; a one-element stand-in for the pointer
    index_lse_NH = _common.empty((N, H) if with_lse else (1, 1), torch.float32, qi.device)
    if scores:  # each slot's pooled score and key LSE, and the block-softmax LSE, for the budget
        score_NHK = _common.empty((N, H, topk), torch.float32, qi.device)
        slot_lse_NHK = _common.empty((N, H, topk), torch.float32, qi.device)
        block_lse_NH = _common.empty((N, H), torch.float32, qi.device)
    else:  # not written (SCORES=False); any valid pointer
        score_NHK = slot_lse_NHK = block_lse_NH = index_lse_NH

    # Rows per program = BM tokens x HB heads; ~128 rows fill the tensor cores and amortise each
    # key-block load, and BM must divide block_size so a tile has one local block.
    rows = GPU_CONFIG["rows"]
    HB = 1
    while HB < 4 and H % (2 * HB) == 0:
        HB *= 2
    BM = min(block_size, max(16, rows // HB))
    start_P, seq_start_P, seq_end_P, P = _common.tile_table(cu, N, BM)
    grid = (P, H // HB)
    select_kernel[grid](
        qi_NHI, ki_NI, block_idx_NHK, index_lse_NH, score_NHK, slot_lse_NHK, block_lse_NH,
        fp8_scale if fp8 else index_lse_NH, start_P, seq_start_P, seq_end_P, P,
        qi_NHI.stride(0), qi_NHI.stride(1), ki_NI.stride(0), block_idx_NHK.stride(0), block_idx_NHK.stride(1),
        index_lse_NH.stride(0),
        _common.LOG2E / math.sqrt(I),
        BS=block_size, TOPK=topk, KP=max(2, _common.next_pow2(topk)), BM=BM, HB=HB, DI=I,
        # FP8 runs the plain loop: on the H200 (triton 3.6) it took 4.93 ms at 128K against the pipelined
        # loop's 5.67 ms (kernels/select/README.md)
        DOT_PREC=_common.dot_precision(qi_NHI.dtype), PIPE=bool(GPU_CONFIG.get("pipe", False)) and not fp8,
        SCORES=scores, LSE=with_lse, FP8=fp8, num_warps=8 if BM * HB >= 128 else 4, num_stages=GPU_CONFIG["num_stages"],
    )
    if scores:
        block_idx_NHK, index_lse_NH = trim(block_idx_NHK, score_NHK, slot_lse_NHK, block_lse_NH, budget)
    return block_idx_NHK.view(B, T, H, topk), index_lse_NH.view(B, T, H) if with_lse else None

