"""Public MSA KL alignment loss: `msa_kl_loss` validates its inputs and wires the Triton kernels
into autograd (or runs the fp32 reference with backend="reference"). Gradients reach qi and ki only.

Tests: `pytest -q tests/kernels/test_msa_kl.py`.

Shape legend: B batch, T tokens, N = B*T, H heads (query heads for q/lse, KV = index heads for
k/qi/block_idx/index_lse), D head dim, I index dim, K top-k slots, P query tiles, U union slots,
C key blocks, E reverse-index entries, X query chunks (split schedule).
"""
from __future__ import annotations

import math

import torch
import triton

from kernels import _common
from kernels.kl.kernel import (
    kl_bwd_dki_kernel,
    kl_bwd_dqi_kernel,
    kl_bwd_split_kernel,
    kl_bwd_sum_chunks_kernel,
    kl_fwd_kernel,
    kl_fwd_split_kernel,
    kl_lse_split_kernel,
    kl_merge_lse_kernel,
    kl_sum_slots_kernel,
)
from kernels.kl.reference import msa_kl_loss_reference

# Launch parameters on the GPU (the interpreter ignores warps and stages).
GPU_CONFIG = {
    # Which schedule the sparse form uses when the caller does not say (see _common.SCHEDULES); chunk_tokens
    # None: the attention's default (kernels._common.split_chunk_tokens).
    "schedule": dict(name="split", chunk_tokens=None),
    # Query-stationary schedule ("query", and always the dense form).
    "fwd": dict(BN=64, num_warps=4, num_stages=2),
    "dqi": dict(BN=64, num_warps=4, num_stages=2),
    "dki": dict(BN=64, rows=64, num_warps=4, num_stages=2),
    # Key-block-stationary schedule ("split"), rows = query rows (tokens x G) per step; the whole
    # block is one step's keys (BN is unused). fwd/bwd: the sweep's choices on the H100 at 64K
    # (docs/perf/kernels_notes.md; 8 warps 10.4 vs 4 warps 10.8 ms forward, 3 stages 14.3 vs 2 stages 14.5 ms
    # backward); lse_split (only when lse/index_lse are not given) from register counts.
    "lse_split": dict(BN=128, rows=64, num_warps=4, num_stages=1),
    "fwd_split": dict(BN=128, rows=64, num_warps=8, num_stages=1),
    # prefetch: the backward loads each step's token lists a step ahead, so that Triton's pipeliner
    # issues its gathers two steps ahead instead of one (14.3 -> 13.4 ms at 64K; it made the
    # forward and the attention's backward slower: more registers, docs/perf/kernels_notes.md).
    "bwd_split": dict(BN=128, rows=64, num_warps=8, num_stages=3, prefetch=True),
}
# "query": one program per (query token tile, group) walks the tile's blocks, re-reading k and ki
# from L2 per token. "split": one program per (group, query chunk, key block) loads k and ki once
# for all the chunk's tokens that selected the block and writes per-(token, slot) partials that
# fixed-order sums combine (kernels/kl/README.md). The dense form has only the query schedule.
# Elements of one program of the slot and log-sum-exp sums (rows x width).
_SUM_ELEMS = 2048


def _check(q, k, qi, ki, block_idx, block_size, cu_seqlens, lse, index_lse, softmax_scale, tokens_per_tile,
           schedule=None, chunk_tokens=None):
    _common.check_tensor("q", q, 4, _common.FLOAT_DTYPES)
    dev = q.device
    _common.check_tensor("k", k, 4, _common.FLOAT_DTYPES, dev)
    _common.check_tensor("qi", qi, 4, _common.FLOAT_DTYPES, dev)
    _common.check_tensor("ki", ki, 3, _common.FLOAT_DTYPES, dev)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, D):
        raise ValueError(f"k must have shape [B, T, Hkv, dh] with B, T, dh of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if Hkv < 1 or Hq % Hkv or (Hq // Hkv) & (Hq // Hkv - 1):
        raise ValueError(f"q heads ({Hq}) must be a power-of-two multiple of k heads ({Hkv})")
    I = qi.shape[-1]
    if qi.shape != (B, T, Hkv, I):
        raise ValueError(f"qi must have shape [B, T, Hkv, dI] = [{B}, {T}, {Hkv}, dI], got {tuple(qi.shape)}")
    if ki.shape != (B, T, I):
        raise ValueError(f"ki must have shape [B, T, dI] = {(B, T, I)}, got {tuple(ki.shape)}")
    if ki.dtype != qi.dtype:
        raise TypeError(f"qi and ki must share a dtype, got {qi.dtype} and {ki.dtype}")
    _common.check_head_dim("dh (q.shape[-1])", D)
    _common.check_head_dim("dI (qi.shape[-1])", I)
    _common.check_block_size(block_size)
    if block_idx is not None:
        _common.check_tensor("block_idx", block_idx, 4, (torch.int32,), dev)
        if block_idx.shape[:3] != (B, T, Hkv) or not 1 <= block_idx.shape[3] <= 32:
            raise ValueError(f"block_idx must have shape [B, T, Hkv, topk] = [{B}, {T}, {Hkv}, topk<=32], "
                             f"got {tuple(block_idx.shape)}")
    if lse is not None:
        _common.check_tensor("lse", lse, 3, (torch.float32,), dev)
        if lse.shape != (B, T, Hq):
            raise ValueError(f"lse must have shape [B, T, Hq] = {(B, T, Hq)}, got {tuple(lse.shape)}")
    if index_lse is not None:
        _common.check_tensor("index_lse", index_lse, 3, (torch.float32,), dev)
        if index_lse.shape != (B, T, Hkv):
            raise ValueError(f"index_lse must have shape [B, T, Hkv] = {(B, T, Hkv)}, got {tuple(index_lse.shape)}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    if tokens_per_tile is not None:
        tm = tokens_per_tile
        if not isinstance(tm, int) or tm < 1 or tm & (tm - 1) or block_size % tm:
            raise ValueError(f"tokens_per_tile must be a power of two dividing block_size={block_size}, got {tm!r}")
    if schedule is not None and schedule not in _common.SCHEDULES:
        raise ValueError(f"schedule must be one of {_common.SCHEDULES} or None, got {schedule!r}")
    if schedule == "split" and block_idx is None:
        raise ValueError("schedule='split' needs block_idx (the dense form has only the query schedule)")
    if tokens_per_tile not in (None, 1) and schedule == "split":
        raise ValueError("tokens_per_tile applies to schedule='query' only")
    if chunk_tokens is not None and not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    for name, x in (("q", q), ("k", k), ("qi", qi), ("ki", ki), ("block_idx", block_idx), ("lse", lse),
                    ("index_lse", index_lse)):
        if x is not None:
            _common.check_last_dim_contiguous(name, x)
            _common.check_size(name, x)
    _common.check_cu_seqlens(cu_seqlens, B, T, dev)


def _flat(x):
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _cfg(kernel, x, block_size, rows=16):
    # The prefetch switch is a code path: the kernel's constexpr on the GPU and in the interpreter.
    return _common.launch_config(GPU_CONFIG, kernel, x, block_size, rows, {"prefetch": "PREFETCH"})


class _MSAKLLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qi, ki, q, k, block_idx, lse, index_lse, block_size, cu_seqlens, scale, TM):
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        I = qi.shape[-1]
        G = Hq // Hkv
        N = B * T
        dev = q.device
        dense = block_idx is None
        q_N, k_N, qi_N, ki_N = _flat(q), _flat(k), _flat(qi), _flat(ki)
        cu = _common.flat_cu_seqlens(B, T, cu_seqlens, dev)
        start_P, seq_start_P, seq_end_P, P = _common.tile_table(cu, N, TM)
        if dense:
            b_N = torch.full((1, 1, 1), -1, dtype=torch.int32, device=dev)  # unused placeholder
            union_PHU = count_PH = b_N
            TOPK = 1
        else:
            b_N = _flat(block_idx)
            TOPK = b_N.shape[2]
            union_PHU, count_PH = _common.union_lists(b_N, start_P, seq_start_P, seq_end_P, TM, block_size)
        has_lse, has_ilse = lse is not None, index_lse is not None
        # Without a given lse the kernel computes it and writes it here for the backward.
        lse_N = _flat(lse) if has_lse else _common.empty((N, Hq), torch.float32, dev)
        ilse_N = _flat(index_lse) if has_ilse else _common.empty((N, Hkv), torch.float32, dev)
        kl_NH = _common.empty((N, Hkv), torch.float32, dev)
        psum_NH = _common.empty((N, Hkv), torch.float32, dev)
        R = _common.tile_rows(TM, G)
        prec = _common.dot_precision(q.dtype)
        kl_fwd_kernel[(P, Hkv)](
            q_N, k_N, qi_N, ki_N, lse_N, ilse_N, b_N, union_PHU, count_PH,
            start_P, seq_start_P, seq_end_P, P,
            kl_NH, psum_NH,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), qi_N.stride(0), qi_N.stride(1), ki_N.stride(0),
            lse_N.stride(0), ilse_N.stride(0), b_N.stride(0), b_N.stride(1),
            union_PHU.stride(0), union_PHU.stride(1), count_PH.stride(0), kl_NH.stride(0),
            scale * _common.LOG2E, _common.LOG2E / math.sqrt(I),
            G=G, TM=TM, R=R, BS=block_size, D=D, DI=I, TOPK=TOPK, KP=_common.next_pow2(TOPK),
            DENSE=dense, HAS_LSE=has_lse, HAS_ILSE=has_ilse, DOT_PREC=prec, **_cfg("fwd", q, block_size, R),
        )
        ctx.save_for_backward(q_N, k_N, qi_N, ki_N, lse_N, ilse_N, psum_NH, b_N, union_PHU, count_PH, cu,
                              start_P, seq_start_P, seq_end_P)
        ctx.meta = (B, T, Hq, Hkv, D, I, block_size, scale, TM, dense, TOPK)
        return kl_NH.sum() / (N * Hkv)

    @staticmethod
    def backward(ctx, grad):
        (q_N, k_N, qi_N, ki_N, lse_N, ilse_N, psum_NH, b_N, union_PHU, count_PH, cu,
         start_P, seq_start_P, seq_end_P) = ctx.saved_tensors
        B, T, Hq, Hkv, D, I, block_size, scale, TM, dense, TOPK = ctx.meta
        G = Hq // Hkv
        N = B * T
        dev = q_N.device
        grad = grad.reshape(1).float().contiguous()
        grad_scale = 1.0 / (N * Hkv * math.sqrt(I))  # mean over (token, group); d z / d (qi.ki)
        prec = _common.dot_precision(q_N.dtype)
        P = start_P.numel()
        R = _common.tile_rows(TM, G)
        dqi_N = _common.empty((N, Hkv, I), qi_N.dtype, dev)
        kl_bwd_dqi_kernel[(P, Hkv)](
            q_N, k_N, qi_N, ki_N, lse_N, ilse_N, psum_NH, dqi_N, b_N, union_PHU, count_PH,
            start_P, seq_start_P, seq_end_P, P,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), qi_N.stride(0), qi_N.stride(1), ki_N.stride(0),
            lse_N.stride(0), ilse_N.stride(0), b_N.stride(0), b_N.stride(1),
            union_PHU.stride(0), union_PHU.stride(1), count_PH.stride(0), dqi_N.stride(0), dqi_N.stride(1),
            scale * _common.LOG2E, _common.LOG2E / math.sqrt(I), grad, grad_scale,
            G=G, TM=TM, R=R, BS=block_size, D=D, DI=I, TOPK=TOPK, KP=_common.next_pow2(TOPK),
            DENSE=dense, DOT_PREC=prec, **_cfg("dqi", q_N, block_size, R),
        )
        if dense:
            tokens_E = offsets = torch.zeros(1, dtype=torch.int32, device=dev)  # unused placeholder
            C = triton.cdiv(N, block_size) + cu.numel() - 1
        else:
            tokens_E, offsets, C = _common.reverse_index(b_N, cu, block_size)
        blk_start_C, _, blk_seq_end_C, _ = _common.tile_table(cu, N, block_size)
        cfg = _cfg("dki", q_N, block_size)
        TQ, Rq = _common.step_rows(cfg.pop("rows"), G)
        dki_HNI = _common.empty((Hkv, N, I), torch.float32, dev)
        kl_bwd_dki_kernel[(C * (block_size // cfg["BN"]), Hkv)](
            q_N, k_N, qi_N, ki_N, lse_N, ilse_N, psum_NH, dki_HNI,
            tokens_E, offsets, blk_start_C, blk_seq_end_C, C,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), qi_N.stride(0), qi_N.stride(1), ki_N.stride(0),
            lse_N.stride(0), ilse_N.stride(0), dki_HNI.stride(0), dki_HNI.stride(1),
            scale * _common.LOG2E, _common.LOG2E / math.sqrt(I), grad, grad_scale,
            G=G, TQ=TQ, R=Rq, BS=block_size, D=D, DI=I, DENSE=dense, DOT_PREC=prec, **cfg,
        )
        # ki is shared by the groups: sum their partial gradients in a fixed order (deterministic).
        dki_N = dki_HNI.sum(0).to(ki_N.dtype)
        return (dqi_N.view(B, T, Hkv, I), dki_N.view(B, T, I)) + (None,) * 9


class _MSAKLLossSplit(torch.autograd.Function):
    """The key-block-stationary schedule of the sparse form (see _common.SCHEDULES); same contract as _MSAKLLoss."""

    @staticmethod
    def forward(ctx, qi, ki, q, k, block_idx, lse, index_lse, block_size, cu_seqlens, scale, chunk_tokens):
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        I = qi.shape[-1]
        G = Hq // Hkv
        N = B * T
        TOPK = block_idx.shape[3]
        dev = q.device
        q_N, k_N, qi_N, ki_N, b_N = _flat(q), _flat(k), _flat(qi), _flat(ki), _flat(block_idx)
        cu = _common.flat_cu_seqlens(B, T, cu_seqlens, dev)
        idx = _common.split_index(b_N, cu, block_size, chunk_tokens)
        C, NCH, Tc = idx.C, idx.n_chunks, idx.chunk_tokens
        blk_start_C, _, blk_seq_end_C, _ = _common.tile_table(cu, N, block_size)
        work = (idx.tokens_E, idx.slots_E, idx.offsets, blk_start_C, blk_seq_end_C, C, NCH * C)
        strides = (q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), qi_N.stride(0), qi_N.stride(1),
                   ki_N.stride(0))
        scales = (scale * _common.LOG2E, _common.LOG2E / math.sqrt(I))
        prec = _common.dot_precision(q.dtype)
        has_lse, has_ilse = lse is not None, index_lse is not None
        lse_N = _flat(lse) if has_lse else _common.empty((N, Hq), torch.float32, dev)
        ilse_N = _flat(index_lse) if has_ilse else _common.empty((N, Hkv), torch.float32, dev)
        if not (has_lse and has_ilse):
            # Per-(token, slot) partial log-sum-exps (base 2), merged over the valid slots in slot order.
            # A given lse / index_lse stands in for the partials it makes unnecessary (never accessed).
            lp_NHK = lse_N if has_lse else _common.empty((N, Hq, TOPK), torch.float32, dev)
            lip_NHK = ilse_N if has_ilse else _common.empty((N, Hkv, TOPK), torch.float32, dev)
            cfg = _cfg("lse_split", q, block_size)
            # With the teacher's lse given, only the student's is computed, which has no head axis:
            # one row per token (G = 1 in the kernel's row mapping), not G copies of each token's
            # row as the teacher's heads need.
            G_rows = 1 if has_lse else G
            TQ, R = _common.step_rows(cfg.pop("rows"), G_rows)
            cfg.pop("BN")
            kl_lse_split_kernel[(NCH * C, Hkv)](
                q_N, k_N, qi_N, ki_N, lp_NHK, lip_NHK, *work, *strides,
                lp_NHK.stride(0), lp_NHK.stride(1), lip_NHK.stride(0), lip_NHK.stride(1), *scales,
                G=G_rows, TQ=TQ, R=R, BS=block_size, D=D, DI=I, HAS_LSE=has_lse, HAS_ILSE=has_ilse, DOT_PREC=prec,
                **cfg,
            )
            if not has_lse:
                _merge_lse(lp_NHK, idx.valid_NHK, lse_N, G)
            if not has_ilse:
                _merge_lse(lip_NHK, idx.valid_NHK, ilse_N, 1)
            del lp_NHK, lip_NHK
        # Per (token, slot): the KL terms and the teacher mass over the slot's block (fp32).
        klp_NHK2 = _common.empty((N, Hkv, TOPK, 2), torch.float32, dev)
        cfg = _cfg("fwd_split", q, block_size)
        TQ, R = _common.step_rows(cfg.pop("rows"), G)
        cfg.pop("BN")
        kl_fwd_split_kernel[(NCH * C, Hkv)](
            q_N, k_N, qi_N, ki_N, lse_N, ilse_N, klp_NHK2, *work, *strides,
            lse_N.stride(0), ilse_N.stride(0), klp_NHK2.stride(0), klp_NHK2.stride(1), klp_NHK2.stride(2), *scales,
            G=G, TQ=TQ, R=R, BS=block_size, D=D, DI=I, DOT_PREC=prec, **cfg,
        )
        kl_NH2 = _common.empty((N, Hkv, 2), torch.float32, dev)  # (KL, teacher mass) per (token, group)
        _sum_slots(klp_NHK2, idx.valid_NHK, kl_NH2, 1.0, None)
        del klp_NHK2
        psum_NH = kl_NH2[..., 1]
        ctx.save_for_backward(q_N, k_N, qi_N, ki_N, lse_N, ilse_N, psum_NH, idx.tokens_E, idx.slots_E, idx.offsets,
                              idx.valid_NHK, blk_start_C, blk_seq_end_C)
        ctx.meta = (B, T, Hq, Hkv, D, I, block_size, scale, C, NCH, Tc)
        return kl_NH2[..., 0].sum() / (N * Hkv)

    @staticmethod
    def backward(ctx, grad):
        (q_N, k_N, qi_N, ki_N, lse_N, ilse_N, psum_NH, tokens_E, slots_E, offsets, valid_NHK,
         blk_start_C, blk_seq_end_C) = ctx.saved_tensors
        B, T, Hq, Hkv, D, I, block_size, scale, C, NCH, Tc = ctx.meta
        G = Hq // Hkv
        N = B * T
        TOPK = valid_NHK.shape[2]
        dev = q_N.device
        grad = grad.reshape(1).float().contiguous()
        grad_scale = 1.0 / (N * Hkv * math.sqrt(I))  # mean over (token, group); d z / d (qi.ki)
        # fp32 partials: no rounding per slot or chunk before the sums. The d qi partials have no
        # head axis, so they are G times smaller than the attention's d q partials.
        dqip_NHKI = _common.empty((N, Hkv, TOPK, I), torch.float32, dev)
        # Per-(chunk, group) d ki partials; only the (chunk, block) pairs that a block's queries can
        # reach are written and read.
        dkip_XNHI = _common.empty((NCH, N, Hkv, I), torch.float32, dev)
        cfg = _cfg("bwd_split", q_N, block_size)
        TQ, R = _common.step_rows(cfg.pop("rows"), G)
        cfg.pop("BN")
        kl_bwd_split_kernel[(NCH * C, Hkv)](
            q_N, k_N, qi_N, ki_N, lse_N, ilse_N, psum_NH, dqip_NHKI, dkip_XNHI,
            tokens_E, slots_E, offsets, blk_start_C, blk_seq_end_C, C, NCH * C, Tc,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), qi_N.stride(0), qi_N.stride(1), ki_N.stride(0),
            lse_N.stride(0), ilse_N.stride(0), psum_NH.stride(0), psum_NH.stride(1),
            dqip_NHKI.stride(0), dqip_NHKI.stride(1), dqip_NHKI.stride(2),
            dkip_XNHI.stride(0), dkip_XNHI.stride(1), dkip_XNHI.stride(2),
            scale * _common.LOG2E, _common.LOG2E / math.sqrt(I),
            G=G, TQ=TQ, R=R, BS=block_size, D=D, DI=I, DOT_PREC=_common.dot_precision(q_N.dtype), **cfg,
        )
        dqi_N = _common.empty((N, Hkv, I), qi_N.dtype, dev)
        _sum_slots(dqip_NHKI, valid_NHK, dqi_N, grad_scale, grad)
        del dqip_NHKI
        dki_N = _common.empty((N, I), ki_N.dtype, dev)
        BN = min(32, block_size)  # one fp32 [BN, dI] sum per program: few registers, many programs
        kl_bwd_sum_chunks_kernel[(C * (block_size // BN),)](
            dkip_XNHI, dki_N, grad, blk_start_C, blk_seq_end_C, Tc, Hkv, grad_scale,
            dkip_XNHI.stride(0), dkip_XNHI.stride(1), dkip_XNHI.stride(2), dki_N.stride(0),
            BN=BN, BS=block_size, DI=I,
        )
        return (dqi_N.view(B, T, Hkv, I), dki_N.view(B, T, I)) + (None,) * 9


def _merge_lse(lp, valid_NHK, lse_N, G):
    """lse_N [N, H] (natural log) from the base-2 partials lp [N, H, K] of its valid slots."""
    n_rows = lse_N.numel()
    rows = 512  # 4 per thread at 4 warps: ~30 registers (2048 rows took up to 127)
    kl_merge_lse_kernel[(triton.cdiv(n_rows, rows),)](lp, valid_NHK, lse_N, n_rows, G=G, ROWS=rows,
                                                      TOPK=lp.shape[-1])


def _sum_slots(part, valid_NHK, out, scale, grad):
    """out [N, Hkv, W] = scale (x grad) x the sum of part [N, Hkv, K, W] over the valid slots."""
    N, Hkv, K, W = part.shape
    rows = max(1, _SUM_ELEMS // W)
    kl_sum_slots_kernel[(triton.cdiv(N * Hkv, rows),)](
        part, valid_NHK, out, part if grad is None else grad, N * Hkv, scale,
        ROWS=rows, W=W, TOPK=K, HAS_GRAD=grad is not None,
    )


def default_tokens_per_tile(G: int, block_size: int) -> int:
    # Same choice as the attention: 16 // G tokens fill the smallest tensor-core tile for free.
    return min(block_size, max(1, 16 // G))


def msa_kl_loss(q, k, qi, ki, block_idx, block_size: int, cu_seqlens=None, lse=None, index_lse=None, *,
                softmax_scale=None, backend: str = "triton", schedule: str | None = None,
                tokens_per_tile: int | None = None, chunk_tokens: int | None = None):
    """Mean over (batch, token, group) of KL(teacher || student) on the selected visible keys.

    teacher = softmax(q.k * scale) (scale = softmax_scale or 1/sqrt(dh)) averaged over the group's
    heads, with `lse` (fp32 [B, T, Hq], e.g. from msa_attention) or recomputed over the support;
    student = softmax(qi.ki / sqrt(dI)) over the same support, `index_lse` (fp32 [B, T, Hkv] from
    msa_select) or recomputed. block_idx=None: the dense warm-up form (all visible keys).
    Returns a 0-dim fp32 tensor; gradients flow only into qi and ki (q, k, lse are constants).
    `schedule` picks the kernels of the sparse form ("split": key-block-stationary with per-slot
    partials, "query": query-stationary; None: GPU_CONFIG's choice, or "query" when tokens_per_tile
    > 1 is given); the dense form always runs the query schedule. `tokens_per_tile` (query
    schedule) sets how many consecutive tokens share one pass over their union of blocks,
    `chunk_tokens` (split schedule) the query chunk of one work list. See kernels/kl/README.md.
    """
    _check(q, k, qi, ki, block_idx, block_size, cu_seqlens, lse, index_lse, softmax_scale, tokens_per_tile,
           schedule, chunk_tokens)
    _common.check_backend(backend, q.device, q.dtype, qi.dtype)
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if backend == "reference":
        return msa_kl_loss_reference(q, k, qi, ki, block_idx, block_size, cu_seqlens, lse, scale)
    lse = None if lse is None else lse.detach()
    index_lse = None if index_lse is None else index_lse.detach()
    default = GPU_CONFIG["schedule"]
    if schedule is None:
        schedule = "query" if block_idx is None or tokens_per_tile not in (None, 1) else default["name"]
    if schedule == "split":
        tc = chunk_tokens or default["chunk_tokens"] or _common.split_chunk_tokens(q.shape[0] * q.shape[1])
        return _MSAKLLossSplit.apply(qi, ki, q.detach(), k.detach(), block_idx, lse, index_lse, block_size,
                                     cu_seqlens, scale, tc)
    G = q.shape[2] // k.shape[2]
    tm = tokens_per_tile or default_tokens_per_tile(G, block_size)
    return _MSAKLLoss.apply(qi, ki, q.detach(), k.detach(), block_idx, lse, index_lse, block_size, cu_seqlens,
                            scale, tm)
