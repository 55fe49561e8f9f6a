"""Public MSA block-sparse attention: `msa_attention` validates its inputs and wires the Triton
forward/backward kernels into autograd (or runs the fp32 reference with backend="reference").

Tests: `pytest -q tests/kernels/test_msa_attention.py`.

Shape legend: B batch, T tokens, N = B*T, H heads (query heads for q/o/lse, KV heads for k/v and
block_idx), D head dim, K top-k slots, P query tiles, U union slots, C key blocks, E reverse-index entries.
"""
from __future__ import annotations

import math

import torch
import triton

from kernels import _common
from kernels.attention.kernel import (
    attn_bwd_delta_kernel,
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_split_kernel,
    attn_bwd_sum_chunks_kernel,
    attn_fwd_kernel,
    attn_fwd_split_kernel,
    attn_merge_slots_kernel,
)
from kernels.attention.reference import msa_attention_reference

# Launch parameters on the GPU (the interpreter ignores warps and stages). Tuned in
# docs/perf/kernels_notes.md; `benchmarks/msa_kernels.py --sweep` overrides them to compare variants.
GPU_CONFIG = {
    # Which schedule msa_attention uses when the caller does not say (see _common.SCHEDULES).
    # chunk_tokens None: N / 16 as a power of two in [256, 16384] (_common.split_chunk_tokens).
    "schedule": dict(name="split", chunk_tokens=None),
    # Query-stationary schedule ("query"): the sweep's choices on the H100 (docs/perf/kernels_notes.md).
    "fwd": dict(BN=128, num_warps=4, num_stages=2),
    "dq": dict(BN=64, num_warps=4, num_stages=2),
    "dkdv": dict(BN=64, rows=64, num_warps=4, num_stages=2),
    # Key-block-stationary schedule ("split"), rows = query rows (tokens x G) per step: the sweep's
    # choices on the H100 (docs/perf/kernels_notes.md).
    # prefetch: the forward loads each step's token list a step ahead (a code path, so the
    # interpreter follows it too); q_evict, part_cache, part_evict: cache hints for the q/dO
    # gathers (read by every list of a chunk: keep them in L2; the pipelined backward gathers
    # them with asynchronous copies, which take no hint), the partials' stores (".cs", streamed:
    # written once, read once by the merge) and the partials' loads in the merge.
    "fwd_split": dict(BN=128, rows=64, num_warps=4, num_stages=1, prefetch=True, q_evict="evict_last",
                      part_cache=".cs"),
    "bwd_split": dict(BN=128, rows=64, num_warps=8, num_stages=3, q_evict="", part_cache=".cs"),
    "merge": dict(BN=128, rows=16, num_warps=4, num_stages=1, part_evict=""),
}
_HINTS = {"prefetch": "PREFETCH", "q_evict": "Q_EVICT", "part_cache": "PART_CACHE", "part_evict": "PART_EVICT"}
# "query": one program per (query token tile, KV head) walks the tile's blocks (NSA's layout); K/V
# are re-read from L2 for every token. "split": one program per (KV head, query chunk, key block)
# loads K/V once for all the chunk's tokens that selected the block and writes per-slot partials
# that a second pass merges (kernels/attention/README.md).


def check_inputs(q, k, v, block_idx, block_size, cu_seqlens, softmax_scale, tokens_per_tile, schedule=None,
                 chunk_tokens=None):
    _common.check_tensor("q", q, 4, _common.FLOAT_DTYPES)
    dev = q.device
    _common.check_tensor("k", k, 4, _common.FLOAT_DTYPES, dev)
    _common.check_tensor("v", v, 4, _common.FLOAT_DTYPES, dev)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"k and v must have shape [B, T, Hkv, dh] with B, T, dh of q {tuple(q.shape)}; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    G = Hq // Hkv
    if G & (G - 1):
        raise ValueError(f"heads per group Hq/Hkv must be a power of two, got {G}")
    _common.check_head_dim("dh (q.shape[-1])", D)
    _common.check_block_size(block_size)
    _common.check_tensor("block_idx", block_idx, 4, (torch.int32,), dev)
    if block_idx.shape[:3] != (B, T, Hkv):
        raise ValueError(f"block_idx must have shape [B, T, Hkv, topk] = [{B}, {T}, {Hkv}, topk], "
                         f"got {tuple(block_idx.shape)}")
    if block_idx.shape[3] < 1 or block_idx.shape[3] > 32:
        raise ValueError(f"block_idx.shape[-1] (topk) must be in [1, 32], got {block_idx.shape[3]}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    if tokens_per_tile is not None:
        tm = tokens_per_tile
        if not isinstance(tm, int) or tm < 1 or tm & (tm - 1) or block_size % tm:
            raise ValueError(f"tokens_per_tile must be a power of two dividing block_size={block_size}, got {tm!r}")
    if schedule is not None and schedule not in _common.SCHEDULES:
        raise ValueError(f"schedule must be one of {_common.SCHEDULES} or None, got {schedule!r}")
    if tokens_per_tile not in (None, 1) and schedule == "split":
        raise ValueError("tokens_per_tile applies to schedule='query' only")
    if chunk_tokens is not None and not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    for name, x in (("q", q), ("k", k), ("v", v), ("block_idx", block_idx)):
        _common.check_last_dim_contiguous(name, x)
        _common.check_size(name, x)
    _common.check_cu_seqlens(cu_seqlens, B, T, dev)


def _flat(x):
    B, T = x.shape[:2]
    return x.reshape(B * T, *x.shape[2:])


class _MSAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, cu_seqlens, scale, tokens_per_tile):
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        N = B * T
        TOPK = block_idx.shape[3]
        q_N, k_N, v_N, b_N = _flat(q), _flat(k), _flat(v), _flat(block_idx)
        cu = _common.flat_cu_seqlens(B, T, cu_seqlens, q.device)
        TM = tokens_per_tile
        start_P, seq_start_P, seq_end_P, P = _common.tile_table(cu, N, TM)
        union_PHU, count_PH = _common.union_lists(b_N, start_P, seq_start_P, seq_end_P, TM, block_size)
        o_N = _common.empty((N, Hq, D), q.dtype, q.device)
        lse_N = _common.empty((N, Hq), torch.float32, q.device)
        R = _common.tile_rows(TM, G)
        cfg = _launch_cfg("fwd", q, block_size, R)
        attn_fwd_kernel[(P, Hkv)](
            q_N, k_N, v_N, o_N, lse_N, b_N, union_PHU, count_PH,
            start_P, seq_start_P, seq_end_P,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), v_N.stride(0), v_N.stride(1),
            o_N.stride(0), o_N.stride(1), lse_N.stride(0), b_N.stride(0), b_N.stride(1),
            union_PHU.stride(0), union_PHU.stride(1), count_PH.stride(0),
            scale * _common.LOG2E,
            G=G, TM=TM, R=R, BS=block_size, D=D, TOPK=TOPK, KP=_common.next_pow2(TOPK),
            DOT_PREC=_common.dot_precision(q.dtype), **cfg,
        )
        ctx.save_for_backward(q_N, k_N, v_N, o_N, lse_N, b_N, cu, union_PHU, count_PH, start_P, seq_start_P, seq_end_P)
        ctx.meta = (B, T, Hq, Hkv, D, block_size, scale, TM)
        ctx.set_materialize_grads(False)  # an unused o or lse arrives as None, not zeros
        return o_N.view(B, T, Hq, D), lse_N.view(B, T, Hq)

    @staticmethod
    def backward(ctx, do, dlse):
        q_N, k_N, v_N, o_N, lse_N, b_N, cu, union_PHU, count_PH, start_P, seq_start_P, seq_end_P = ctx.saved_tensors
        B, T, Hq, Hkv, D, block_size, scale, TM = ctx.meta
        G = Hq // Hkv
        N = B * T
        TOPK = b_N.shape[2]
        dev = q_N.device
        do_N, delta_N = _grad_out_and_delta(do, dlse, o_N, lse_N)
        dq_N = _common.empty((N, Hq, D), q_N.dtype, dev)
        dk_N = _common.empty((N, Hkv, D), k_N.dtype, dev)
        dv_N = _common.empty((N, Hkv, D), v_N.dtype, dev)
        prec = _common.dot_precision(q_N.dtype)
        P = start_P.numel()
        R = _common.tile_rows(TM, G)
        attn_bwd_dq_kernel[(P, Hkv)](
            q_N, k_N, v_N, do_N, lse_N, delta_N, dq_N, b_N, union_PHU, count_PH,
            start_P, seq_start_P, seq_end_P,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), v_N.stride(0), v_N.stride(1),
            do_N.stride(0), do_N.stride(1), dq_N.stride(0), dq_N.stride(1), lse_N.stride(0),
            b_N.stride(0), b_N.stride(1), union_PHU.stride(0), union_PHU.stride(1), count_PH.stride(0),
            scale * _common.LOG2E, scale,
            G=G, TM=TM, R=R, BS=block_size, D=D, TOPK=TOPK, KP=_common.next_pow2(TOPK), DOT_PREC=prec,
            **_launch_cfg("dq", q_N, block_size, R),
        )
        tokens_E, offsets, C = _common.reverse_index(b_N, cu, block_size)
        blk_start_C, _, blk_seq_end_C, _ = _common.tile_table(cu, N, block_size)
        cfg = _launch_cfg("dkdv", q_N, block_size)
        rows = cfg.pop("rows")
        TQ, Rq = _common.step_rows(rows, G)
        attn_bwd_dkdv_kernel[(C * (block_size // cfg["BN"]), Hkv)](
            q_N, k_N, v_N, do_N, lse_N, delta_N, dk_N, dv_N,
            tokens_E, offsets, blk_start_C, blk_seq_end_C, C,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), v_N.stride(0), v_N.stride(1),
            do_N.stride(0), do_N.stride(1), dk_N.stride(0), dk_N.stride(1), dv_N.stride(0), dv_N.stride(1),
            lse_N.stride(0),
            scale * _common.LOG2E, scale,
            G=G, TQ=TQ, R=Rq, BS=block_size, D=D, DOT_PREC=prec, **cfg,
        )
        return (dq_N.view(B, T, Hq, D), dk_N.view(B, T, Hkv, D), dv_N.view(B, T, Hkv, D),
                None, None, None, None, None)


class _MSAAttentionSplit(torch.autograd.Function):
    """The key-block-stationary schedule (see _common.SCHEDULES); same contract as _MSAAttention."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, cu_seqlens, scale, chunk_tokens):
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        N = B * T
        TOPK = block_idx.shape[3]
        dev = q.device
        q_N, k_N, v_N, b_N = _flat(q), _flat(k), _flat(v), _flat(block_idx)
        cu = _common.flat_cu_seqlens(B, T, cu_seqlens, dev)
        idx = _common.split_index(b_N, cu, block_size, chunk_tokens)
        C, NCH, Tc = idx.C, idx.n_chunks, idx.chunk_tokens
        blk_start_C, _, blk_seq_end_C, _ = _common.tile_table(cu, N, block_size)
        # Partials: o_s in the input dtype (as FlashInfer's merge_state takes them), lse_s in fp32.
        op_NHKGD = _common.empty((N, Hkv, TOPK, G, D), q.dtype, dev)
        lp_NHKG = _common.empty((N, Hkv, TOPK, G), torch.float32, dev)
        o_N = _common.empty((N, Hq, D), q.dtype, dev)
        lse_N = _common.empty((N, Hq), torch.float32, dev)
        cfg = _launch_cfg("fwd_split", q, block_size)
        TQ, R = _common.step_rows(cfg.pop("rows"), G)
        cfg.pop("BN")
        prec = _common.dot_precision(q.dtype)
        attn_fwd_split_kernel[(NCH * C, Hkv)](
            q_N, k_N, v_N, op_NHKGD, lp_NHKG, idx.tokens_E, idx.slots_E, idx.offsets,
            blk_start_C, blk_seq_end_C, C, NCH * C,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), v_N.stride(0), v_N.stride(1),
            op_NHKGD.stride(0), op_NHKGD.stride(1), op_NHKGD.stride(2),
            lp_NHKG.stride(0), lp_NHKG.stride(1), lp_NHKG.stride(2),
            scale * _common.LOG2E,
            G=G, TQ=TQ, R=R, BS=block_size, D=D, DOT_PREC=prec, **cfg,
        )
        _merge_slots(op_NHKGD, lp_NHKG, idx.valid_NHK, o_N, lse_N, 1.0, G, D, TOPK, block_size)
        del op_NHKGD, lp_NHKG
        ctx.save_for_backward(q_N, k_N, v_N, o_N, lse_N, cu, idx.tokens_E, idx.slots_E, idx.offsets, idx.valid_NHK,
                              blk_start_C, blk_seq_end_C)
        ctx.meta = (B, T, Hq, Hkv, D, block_size, scale, C, NCH, Tc)
        ctx.set_materialize_grads(False)
        return o_N.view(B, T, Hq, D), lse_N.view(B, T, Hq)

    @staticmethod
    def backward(ctx, do, dlse):
        (q_N, k_N, v_N, o_N, lse_N, cu, tokens_E, slots_E, offsets, valid_NHK,
         blk_start_C, blk_seq_end_C) = ctx.saved_tensors
        B, T, Hq, Hkv, D, block_size, scale, C, NCH, Tc = ctx.meta
        G = Hq // Hkv
        N = B * T
        TOPK = valid_NHK.shape[2]
        dev = q_N.device
        do_N, delta_N = _grad_out_and_delta(do, dlse, o_N, lse_N)
        dqp_NHKGD = _common.empty((N, Hkv, TOPK, G, D), q_N.dtype, dev)
        # Per-chunk dK/dV partials; only (chunk, block) pairs a block's queries can reach are written and read.
        dkp = _common.empty((NCH, N, Hkv, D), torch.float32, dev)
        dvp = _common.empty((NCH, N, Hkv, D), torch.float32, dev)
        dq_N = _common.empty((N, Hq, D), q_N.dtype, dev)
        cfg = _launch_cfg("bwd_split", q_N, block_size)
        TQ, R = _common.step_rows(cfg.pop("rows"), G)
        cfg.pop("BN")
        prec = _common.dot_precision(q_N.dtype)
        attn_bwd_split_kernel[(NCH * C, Hkv)](
            q_N, k_N, v_N, do_N, lse_N, delta_N, dqp_NHKGD, dkp, dvp,
            tokens_E, slots_E, offsets, blk_start_C, blk_seq_end_C, C, NCH * C, Tc,
            q_N.stride(0), q_N.stride(1), k_N.stride(0), k_N.stride(1), v_N.stride(0), v_N.stride(1),
            do_N.stride(0), do_N.stride(1), lse_N.stride(0),
            dqp_NHKGD.stride(0), dqp_NHKGD.stride(1), dqp_NHKGD.stride(2),
            dkp.stride(0), dkp.stride(1), dkp.stride(2),
            scale * _common.LOG2E, scale,
            G=G, TQ=TQ, R=R, BS=block_size, D=D, DOT_PREC=prec, **cfg,
        )
        _merge_slots(dqp_NHKGD, None, valid_NHK, dq_N, None, scale, G, D, TOPK, block_size)
        dk_N = _common.empty((N, Hkv, D), k_N.dtype, dev)
        dv_N = _common.empty((N, Hkv, D), v_N.dtype, dev)
        BN = min(32, block_size)  # two fp32 [BN, dh] sums per program: no register spills at dh = 128
        attn_bwd_sum_chunks_kernel[(C * (block_size // BN), Hkv)](
            dkp, dvp, dk_N, dv_N, blk_start_C, blk_seq_end_C, Tc,
            dkp.stride(0), dkp.stride(1), dkp.stride(2), dk_N.stride(0), dk_N.stride(1),
            dv_N.stride(0), dv_N.stride(1),
            BN=BN, BS=block_size, D=D,
        )
        del dqp_NHKGD, dkp, dvp
        return (dq_N.view(B, T, Hq, D), dk_N.view(B, T, Hkv, D), dv_N.view(B, T, Hkv, D),
                None, None, None, None, None)


def _grad_out_and_delta(do, dlse, o_N, lse_N):
    """The backward's dO as [N, Hq, dh] with a unit last stride (zeros when o got no gradient) and
    delta = rowsum(dO * O) - dlse in fp32 (a gradient on lse enters as -dlse: d lse / d s = p),
    computed by one kernel straight from the half-precision tensors."""
    N, Hq, D = o_N.shape
    do_N = torch.zeros_like(o_N) if do is None else _flat(do)
    if do_N.stride(-1) != 1:
        do_N = do_N.contiguous()
    delta_N = _common.empty((N, Hq), torch.float32, o_N.device)
    dlse_N = _flat(dlse).float() if dlse is not None else lse_N  # unused when there is no dlse
    rows = 64
    attn_bwd_delta_kernel[(triton.cdiv(N * Hq, rows),)](
        o_N, do_N, dlse_N, delta_N, N * Hq, Hq,
        o_N.stride(0), o_N.stride(1), do_N.stride(0), do_N.stride(1), dlse_N.stride(0),
        ROWS=rows, D=D, HAS_DLSE=dlse is not None,
    )
    return do_N, delta_N


def _merge_slots(part, lp, valid_NHK, out_N, lse_N, scale, G, D, TOPK, block_size):
    """Merge per-slot partials into out_N (softmax-weighted when lp is given, else summed x scale)."""
    N, Hkv = part.shape[:2]
    cfg = _launch_cfg("merge", out_N, block_size)
    TN, R = _common.step_rows(cfg.pop("rows"), G)
    cfg.pop("BN")
    softmax = lp is not None
    lp_ = lp if softmax else part  # unused when not softmax
    lse_ = lse_N if softmax else out_N
    attn_merge_slots_kernel[(triton.cdiv(N, TN), Hkv)](
        part, lp_, valid_NHK, out_N, lse_, N,
        part.stride(0), part.stride(1), part.stride(2),
        lp_.stride(0), lp_.stride(1), lp_.stride(2),
        valid_NHK.stride(0), valid_NHK.stride(1), out_N.stride(0), out_N.stride(1), lse_.stride(0),
        scale,
        G=G, TN=TN, R=R, D=D, TOPK=TOPK, SOFTMAX=softmax, **cfg,
    )


def _launch_cfg(kernel: str, x: torch.Tensor, block_size: int, rows: int = 16) -> dict:
    # The prefetch switch and the cache hints become the kernels' constexprs (the interpreter
    # ignores the hints but runs the prefetching code path).
    return _common.launch_config(GPU_CONFIG, kernel, x, block_size, rows, _HINTS)


def default_tokens_per_tile(G: int, block_size: int) -> int:
    # A tile has at least 16 rows (the smallest tensor-core tile), so with G < 16 heads per group
    # the rows of 16 // G tokens are free: the tile then walks the union of their blocks, which
    # costs at most what the tokens would cost one by one and less when neighbours share blocks.
    # With G >= 16 one token's heads fill the tile (NSA's group-centric loading); wider tiles pay
    # off only when neighbouring tokens select the same blocks (see docs/perf/kernels_notes.md).
    return min(block_size, max(1, 16 // G))


def msa_attention(q, k, v, block_idx, block_size: int, cu_seqlens=None, softmax_scale=None, *,
                  backend: str = "triton", schedule: str | None = None, tokens_per_tile: int | None = None,
                  chunk_tokens: int | None = None):
    """Block-sparse GQA attention over the selected blocks, token-causal.

    q [B, T, Hq, dh], k/v [B, T, Hkv, dh], block_idx int32 [B, T, Hkv, topk] (block numbers within
    the token's sequence, -1 = unused). Returns o (dtype of q) [B, T, Hq, dh] and lse fp32
    [B, T, Hq]. Differentiable in q, k, v (and through lse).

    `schedule` picks the kernels ("split": key-block-stationary with per-slot partials, "query":
    query-stationary; None: GPU_CONFIG's choice, or "query" when tokens_per_tile > 1 is given).
    `tokens_per_tile` (query schedule; power of two dividing block_size) sets how many consecutive
    tokens share one pass over their union of blocks. `chunk_tokens` (split schedule) sets the
    query chunk of one work list. See kernels/attention/README.md.
    """
    check_inputs(q, k, v, block_idx, block_size, cu_seqlens, softmax_scale, tokens_per_tile, schedule, chunk_tokens)
    _common.check_backend(backend, q.device, q.dtype)
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if backend == "reference":
        o, lse = msa_attention_reference(q, k, v, block_idx, block_size, cu_seqlens, scale)
        return o.to(q.dtype), lse
    default = GPU_CONFIG["schedule"]
    if schedule is None:
        schedule = "query" if tokens_per_tile not in (None, 1) else default["name"]
    if schedule == "split":
        N = q.shape[0] * q.shape[1]
        tc = chunk_tokens or default["chunk_tokens"] or _common.split_chunk_tokens(N)
        return _MSAAttentionSplit.apply(q, k, v, block_idx, block_size, cu_seqlens, scale, tc)
    G = q.shape[2] // k.shape[2]
    tm = tokens_per_tile or default_tokens_per_tile(G, block_size)
    return _MSAAttention.apply(q, k, v, block_idx, block_size, cu_seqlens, scale, tm)
