"""Triton kernels of MSA block-sparse GQA attention: forward, dQ, and dK/dV through the key-block ->
query reverse index (deterministic, no atomics).

Not runnable by itself; called by `kernels.attention.op`. Tests: `pytest -q tests/kernels/test_msa_attention.py`.

Shape legend: N flat tokens, H heads (query heads for q/o/lse/delta, KV heads for k/v/block_idx),
D head dim, K top-k slots; inside a kernel R rows of a program (row r = token r // G of the tile,
head g = r % G of the group), J keys of a sub-block, KP padded top-k slots.

Forward and dQ: one program per (tile of TM consecutive tokens of one sequence, KV head). Its rows
are the TM x G query heads that share the group's selection; it walks the union of the tiles'
selected blocks (TM = 1: the token's own blocks, as NSA does) and masks, per row, the keys of blocks
that row's token did not select and the keys after it. One K/V block load serves all R rows.
dK/dV: one program per (key sub-block, KV head) that gathers the query tokens that selected the
block, TQ tokens (TQ x G rows) at a time, and owns its dK/dV rows, so the result is deterministic.
Online softmax in base 2 with log2(e) folded into the scale; fp32 accumulation.
"""
import triton
import triton.language as tl

from kernels._common import LN2_C, LOG2E_C
from kernels._split import split_block_kv, split_list, split_step


@triton.jit
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bidx_ptr, union_ptr, count_ptr,
    start_ptr, seq_start_ptr, seq_end_ptr,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_v_n, stride_v_h,
    stride_o_n, stride_o_h, stride_l_n, stride_b_n, stride_b_h, stride_u_p, stride_u_h, stride_c_p,
    qk_scale_log2,
    G: tl.constexpr, TM: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(start_ptr + tile)
    s0 = tl.load(seq_start_ptr + tile)
    e0 = tl.load(seq_end_ptr + tile)
    last = tl.minimum(t0 + TM, e0) - 1

    r = tl.arange(0, R)
    tok_R = t0 + r // G
    head_R = h * G + r % G
    valid_R = (r < TM * G) & (tok_R < e0)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                mask=valid_R[:, None], other=0.0)
    slot = tl.arange(0, KP)
    sel_RK = tl.load(bidx_ptr + tok_R[:, None] * stride_b_n + h * stride_b_h + slot[None, :],
                     mask=valid_R[:, None] & (slot[None, :] < TOPK), other=-1)

    # A finite start keeps exp2(m_old - m_new) defined for rows that see no key in a block.
    m_R = tl.full([R], -1.0e30, tl.float32)
    l_R = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, D], tl.float32)
    j = tl.arange(0, BN)
    n_blocks = tl.load(count_ptr + tile * stride_c_p + h)
    for u in range(n_blocks):
        blk = tl.load(union_ptr + tile * stride_u_p + h * stride_u_h + u)
        member_R = tl.max(tl.where(sel_RK == blk, 1, 0), 1) > 0
        for sub in tl.static_range(BS // BN):
            kpos = s0 + blk * BS + sub * BN + j
            kload = kpos <= last
            k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kload[:, None], other=0.0)
            v = tl.load(v_ptr + kpos[:, None] * stride_v_n + h * stride_v_h + d[None, :], mask=kload[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
            ok = member_R[:, None] & (kpos[None, :] <= tok_R[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_R, tl.max(s, 1))
            alpha = tl.exp2(m_R - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_R = l_R * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_R = m_new

    # Every valid row sees at least its own key (the local block is always in the union), so l > 0.
    l_safe = tl.where(valid_R, l_R, 1.0)
    o = acc / l_safe[:, None]
    tl.store(o_ptr + tok_R[:, None] * stride_o_n + head_R[:, None] * stride_o_h + d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=valid_R[:, None])
    tl.store(lse_ptr + tok_R * stride_l_n + head_R, (m_R + tl.log2(l_safe)) * LN2_C, mask=valid_R)


@triton.jit
def attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, bidx_ptr, union_ptr, count_ptr,
    start_ptr, seq_start_ptr, seq_end_ptr,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_v_n, stride_v_h,
    stride_do_n, stride_do_h, stride_dq_n, stride_dq_h, stride_l_n,
    stride_b_n, stride_b_h, stride_u_p, stride_u_h, stride_c_p,
    qk_scale_log2, sm_scale,
    G: tl.constexpr, TM: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(start_ptr + tile)
    s0 = tl.load(seq_start_ptr + tile)
    e0 = tl.load(seq_end_ptr + tile)
    last = tl.minimum(t0 + TM, e0) - 1

    r = tl.arange(0, R)
    tok_R = t0 + r // G
    head_R = h * G + r % G
    valid_R = (r < TM * G) & (tok_R < e0)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                mask=valid_R[:, None], other=0.0)
    do = tl.load(do_ptr + tok_R[:, None] * stride_do_n + head_R[:, None] * stride_do_h + d[None, :],
                 mask=valid_R[:, None], other=0.0)
    lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E_C
    delta_R = tl.load(delta_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0)
    slot = tl.arange(0, KP)
    sel_RK = tl.load(bidx_ptr + tok_R[:, None] * stride_b_n + h * stride_b_h + slot[None, :],
                     mask=valid_R[:, None] & (slot[None, :] < TOPK), other=-1)

    dq = tl.zeros([R, D], tl.float32)
    j = tl.arange(0, BN)
    n_blocks = tl.load(count_ptr + tile * stride_c_p + h)
    for u in range(n_blocks):
        blk = tl.load(union_ptr + tile * stride_u_p + h * stride_u_h + u)
        member_R = tl.max(tl.where(sel_RK == blk, 1, 0), 1) > 0
        for sub in tl.static_range(BS // BN):
            kpos = s0 + blk * BS + sub * BN + j
            kload = kpos <= last
            k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kload[:, None], other=0.0)
            v = tl.load(v_ptr + kpos[:, None] * stride_v_n + h * stride_v_h + d[None, :], mask=kload[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
            ok = member_R[:, None] & (kpos[None, :] <= tok_R[:, None]) & valid_R[:, None]
            p = tl.exp2(tl.where(ok, s - lse2_R[:, None], float("-inf")))
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta_R[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    tl.store(dq_ptr + tok_R[:, None] * stride_dq_n + head_R[:, None] * stride_dq_h + d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=valid_R[:, None])


@triton.jit
def attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    tokens_ptr, offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_v_n, stride_v_h,
    stride_do_n, stride_do_h, stride_dk_n, stride_dk_h, stride_dv_n, stride_dv_h, stride_l_n,
    qk_scale_log2, sm_scale,
    G: tl.constexpr, TQ: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    NSUB: tl.constexpr = BS // BN
    c = tl.program_id(0) // NSUB
    sub = tl.program_id(0) % NSUB
    h = tl.program_id(1)
    b0 = tl.load(blk_start_ptr + c)
    e0 = tl.load(blk_seq_end_ptr + c)
    j = tl.arange(0, BN)
    kpos = b0 + sub * BN + j
    kvalid = kpos < e0
    d = tl.arange(0, D)
    k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kvalid[:, None], other=0.0)
    v = tl.load(v_ptr + kpos[:, None] * stride_v_n + h * stride_v_h + d[None, :], mask=kvalid[:, None], other=0.0)

    lo = tl.load(offsets_ptr + h * n_blocks + c)
    hi = tl.load(offsets_ptr + h * n_blocks + c + 1)
    r = tl.arange(0, R)
    g_R = r % G
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for e in range(lo, hi, TQ):
        ent_R = e + r // G
        valid_R = (r < TQ * G) & (ent_R < hi)
        tok_R = tl.load(tokens_ptr + ent_R, mask=valid_R, other=0)
        head_R = h * G + g_R
        q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                    mask=valid_R[:, None], other=0.0)
        do = tl.load(do_ptr + tok_R[:, None] * stride_do_n + head_R[:, None] * stride_do_h + d[None, :],
                     mask=valid_R[:, None], other=0.0)
        lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E_C
        delta_R = tl.load(delta_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
        ok = valid_R[:, None] & kvalid[None, :] & (kpos[None, :] <= tok_R[:, None])
        p = tl.exp2(tl.where(ok, s - lse2_R[:, None], float("-inf")))
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta_R[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)

    tl.store(dk_ptr + kpos[:, None] * stride_dk_n + h * stride_dk_h + d[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kvalid[:, None])
    tl.store(dv_ptr + kpos[:, None] * stride_dv_n + h * stride_dv_h + d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kvalid[:, None])


# ---------------------------------------------------------------------------------------------
# Key-block-stationary ("split") schedule: one program per (KV head, chunk of query tokens, key
# block) loads the block's K and V once and streams the chunk's queries that selected it, TQ
# tokens (TQ x G rows) at a time. With a per-token selection this is the only way to let more than
# the G heads of one token share a K/V load (a block is selected by ~topk * block_size tokens), at
# the price of per-(token, slot) partial results that a second pass merges. Everything is
# deterministic: each partial has one writer and the merges sum in slot order.
# Extra legend: E reverse-index entries (token, slot pairs), J keys of the block (= BS).
# ---------------------------------------------------------------------------------------------
@triton.jit
def attn_fwd_split_kernel(
    q_ptr, k_ptr, v_ptr, op_ptr, lp_ptr, tokens_ptr, slots_ptr, offsets_ptr, blk_start_ptr, blk_seq_end_ptr,
    n_blocks, n_items,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_v_n, stride_v_h,
    stride_op_n, stride_op_h, stride_op_k, stride_lp_n, stride_lp_h, stride_lp_k,
    qk_scale_log2,
    G: tl.constexpr, TQ: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr, Q_EVICT: tl.constexpr, PART_CACHE: tl.constexpr,
):
    # Partial result of one (token, slot): o_s = softmax over the slot's block's visible keys @ V
    # (normalised, in the partial buffer's dtype) and its base-2 log-sum-exp, per head of the group.
    # PREFETCH: load each step's token list one step ahead, so the q gather's addresses are ready
    # (also prefetching the q rows a step ahead measured slower: docs/perf/kernels_notes.md).
    # Q_EVICT / PART_CACHE: cache hints, e.g. "evict_last" for the chunk's q rows (read by every
    # list of the chunk) and ".cs" (streaming) for the partials, written once and read once.
    _, h, lo, hi, b0, e0 = split_list(offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks, n_items)
    if hi > lo:
        k, v, kpos, kvalid, d = split_block_kv(k_ptr, v_ptr, b0, e0, h, stride_k_n, stride_k_h, stride_v_n,
                                               stride_v_h, BS, D)
        r = tl.arange(0, R)
        g_R = r % G
        head_R = h * G + g_R
        if PREFETCH:
            ent_R, valid_R, tok_R = split_step(tokens_ptr, lo, hi, r, G, TQ)
        for e in range(lo, hi, TQ):
            if PREFETCH:
                ent_n, valid_n, tok_n = split_step(tokens_ptr, e + TQ, hi, r, G, TQ)
            else:
                ent_R, valid_R, tok_R = split_step(tokens_ptr, e, hi, r, G, TQ)
            q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                        mask=valid_R[:, None], other=0.0, eviction_policy=Q_EVICT)
            slot_R = tl.load(slots_ptr + ent_R, mask=valid_R, other=0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
            # Tokens are ascending in a list, so when the step's first token comes after the
            # block's last key, every row sees every key and the mask is skipped (padding rows
            # are never stored). Otherwise: a listed token selected this block, which starts at or
            # before it, so its row sees at least key b0, m is finite and masked keys get p = 0.
            if b0 + BS > tl.minimum(tl.load(tokens_ptr + e) + 1, e0):
                ok = kvalid[None, :] & (kpos[None, :] <= tok_R[:, None])
                s = tl.where(ok, s, -1.0e30)
            m_R = tl.max(s, 1)
            p = tl.exp2(s - m_R[:, None])
            l_R = tl.sum(p, 1)
            o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC) * (1.0 / l_R)[:, None]
            part_R = tok_R.to(tl.int64) * stride_op_n + h * stride_op_h + slot_R * stride_op_k + g_R * D
            tl.store(op_ptr + part_R[:, None] + d[None, :], o.to(op_ptr.dtype.element_ty), mask=valid_R[:, None],
                     cache_modifier=PART_CACHE)
            tl.store(lp_ptr + tok_R.to(tl.int64) * stride_lp_n + h * stride_lp_h + slot_R * stride_lp_k + g_R,
                     m_R + tl.log2(l_R), mask=valid_R, cache_modifier=PART_CACHE)
            if PREFETCH:
                ent_R, valid_R, tok_R = ent_n, valid_n, tok_n


@triton.jit
def attn_merge_slots_kernel(
    part_ptr, lp_ptr, valid_ptr, out_ptr, lse_ptr, n_tokens,
    stride_p_n, stride_p_h, stride_p_k, stride_lp_n, stride_lp_h, stride_lp_k,
    stride_v_n, stride_v_h, stride_out_n, stride_out_h, stride_lse_n,
    scale,
    G: tl.constexpr, TN: tl.constexpr, R: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr,
    SOFTMAX: tl.constexpr, PART_EVICT: tl.constexpr,
):
    # Per (TN tokens, KV head): merge the per-slot partials of each row in slot order.
    # SOFTMAX: o = sum_s exp2(lse_s - M) o_s / sum_s exp2(lse_s - M), lse = ln 2 * (M + log2 sum);
    # else:    out = scale * sum_s part_s (the dQ partials).
    pid = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, R)
    tok_R = pid * TN + r // G
    g_R = r % G
    valid_R = (r < TN * G) & (tok_R < n_tokens)
    d = tl.arange(0, D)
    acc = tl.zeros([R, D], tl.float32)
    if SOFTMAX:
        m_R = tl.full([R], -float("inf"), tl.float32)
        for s in range(TOPK):
            ok_R = valid_R & (tl.load(valid_ptr + tok_R * stride_v_n + h * stride_v_h + s, mask=valid_R, other=0) != 0)
            l_R = tl.load(lp_ptr + tok_R.to(tl.int64) * stride_lp_n + h * stride_lp_h + s * stride_lp_k + g_R, mask=ok_R,
                          other=-float("inf"))
            m_R = tl.maximum(m_R, l_R)
        # A token without any valid slot (possible only for a hand-made block_idx) gets o = 0, lse = -inf.
        m_R = tl.where(m_R == -float("inf"), 0.0, m_R)
        den_R = tl.zeros([R], tl.float32)
    for s in range(TOPK):
        ok_R = valid_R & (tl.load(valid_ptr + tok_R * stride_v_n + h * stride_v_h + s, mask=valid_R, other=0) != 0)
        part_R = tok_R.to(tl.int64) * stride_p_n + h * stride_p_h + s * stride_p_k + g_R * D
        x = tl.load(part_ptr + part_R[:, None] + d[None, :], mask=ok_R[:, None], other=0.0,
                    eviction_policy=PART_EVICT).to(tl.float32)
        if SOFTMAX:
            l_R = tl.load(lp_ptr + tok_R.to(tl.int64) * stride_lp_n + h * stride_lp_h + s * stride_lp_k + g_R, mask=ok_R,
                          other=-float("inf"))
            w_R = tl.exp2(l_R - m_R)
            den_R += w_R
            acc += w_R[:, None] * x
        else:
            acc += x
    head_R = h * G + g_R
    if SOFTMAX:
        den_safe = tl.where(den_R > 0, den_R, 1.0)
        acc = acc * (1.0 / den_safe)[:, None]
        lse_R = tl.where(den_R > 0, (m_R + tl.log2(den_safe)) * LN2_C, -float("inf"))
        tl.store(lse_ptr + tok_R * stride_lse_n + head_R, lse_R, mask=valid_R)
    else:
        acc = acc * scale
    tl.store(out_ptr + tok_R[:, None] * stride_out_n + head_R[:, None] * stride_out_h + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid_R[:, None])


@triton.jit
def attn_bwd_delta_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr, n_rows, n_heads,
    stride_o_n, stride_o_h, stride_do_n, stride_do_h, stride_dl_n,
    ROWS: tl.constexpr, D: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    # delta[n, h] = rowsum(dO * O) - dlse (fp32), read straight from the half-precision tensors.
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = i < n_rows
    n = i // n_heads
    hh = i % n_heads
    d = tl.arange(0, D)
    o = tl.load(o_ptr + n[:, None] * stride_o_n + hh[:, None] * stride_o_h + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(do_ptr + n[:, None] * stride_do_n + hh[:, None] * stride_do_h + d[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + n * stride_dl_n + hh, mask=ok, other=0.0)
    tl.store(delta_ptr + i, delta, mask=ok)


@triton.jit
def attn_bwd_split_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dqp_ptr, dkp_ptr, dvp_ptr,
    tokens_ptr, slots_ptr, offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks, n_items, chunk_tokens,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_v_n, stride_v_h, stride_do_n, stride_do_h, stride_l_n,
    stride_dqp_n, stride_dqp_h, stride_dqp_k, stride_dkp_c, stride_dkp_n, stride_dkp_h,
    qk_scale_log2, sm_scale,
    G: tl.constexpr, TQ: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
    DOT_PREC: tl.constexpr, Q_EVICT: tl.constexpr, PART_CACHE: tl.constexpr,
):
    # All of the backward in one pass over each (chunk, key block) list, in the transposed form
    # (keys are the rows of S^T, as in FlashAttention's dK/dV loop): dK, dV of the block summed over
    # the chunk's rows (fp32 partial per chunk, written even when the list is empty), and
    # dQ of each (token, slot) = scale * dS K, a partial that `attn_merge_slots_kernel` sums.
    item, h, lo, hi, b0, e0 = split_list(offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks, n_items)
    chunk = item // n_blocks
    # Chunks that may hold queries of this block: from the block's start to its sequence's end.
    active = (e0 > b0) & (chunk >= b0 // chunk_tokens) & (chunk <= (e0 - 1) // chunk_tokens)
    if active:
        k, v, kpos, kvalid, d = split_block_kv(k_ptr, v_ptr, b0, e0, h, stride_k_n, stride_k_h, stride_v_n,
                                               stride_v_h, BS, D)
        r = tl.arange(0, R)
        g_R = r % G
        head_R = h * G + g_R
        dk = tl.zeros([BS, D], tl.float32)
        dv = tl.zeros([BS, D], tl.float32)
        for e in range(lo, hi, TQ):
            ent_R, valid_R, tok_R = split_step(tokens_ptr, e, hi, r, G, TQ)
            slot_R = tl.load(slots_ptr + ent_R, mask=valid_R, other=0)
            q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                        mask=valid_R[:, None], other=0.0, eviction_policy=Q_EVICT)
            do = tl.load(do_ptr + tok_R[:, None] * stride_do_n + head_R[:, None] * stride_do_h + d[None, :],
                         mask=valid_R[:, None], other=0.0, eviction_policy=Q_EVICT)
            lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E_C
            delta_R = tl.load(delta_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale_log2 - lse2_R[None, :]
            # As in the forward, the mask is needed only where the step reaches into the block;
            # padding rows have q = dO = 0 (and lse = delta = 0), so they add nothing to dK, dV.
            if b0 + BS > tl.minimum(tl.load(tokens_ptr + e) + 1, e0):
                ok = kvalid[:, None] & valid_R[None, :] & (kpos[:, None] <= tok_R[None, :])
                sT = tl.where(ok, sT, float("-inf"))
            pT = tl.exp2(sT)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = (pT * (dpT - delta_R[None, :])).to(q.dtype)
            dk += tl.dot(dsT, q, input_precision=DOT_PREC)
            dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PREC)
            part_R = tok_R.to(tl.int64) * stride_dqp_n + h * stride_dqp_h + slot_R * stride_dqp_k + g_R * D
            tl.store(dqp_ptr + part_R[:, None] + d[None, :], dq.to(dqp_ptr.dtype.element_ty), mask=valid_R[:, None],
                     cache_modifier=PART_CACHE)
        row = chunk.to(tl.int64) * stride_dkp_c + kpos[:, None] * stride_dkp_n + h * stride_dkp_h + d[None, :]
        tl.store(dkp_ptr + row, dk * sm_scale, mask=kvalid[:, None])
        tl.store(dvp_ptr + row, dv, mask=kvalid[:, None])


@triton.jit
def attn_bwd_sum_chunks_kernel(
    dkp_ptr, dvp_ptr, dk_ptr, dv_ptr, blk_start_ptr, blk_seq_end_ptr, chunk_tokens,
    stride_dkp_c, stride_dkp_n, stride_dkp_h, stride_dk_n, stride_dk_h, stride_dv_n, stride_dv_h,
    BN: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
):
    # dK, dV of a key sub-block = the sum of its per-chunk partials, in chunk order.
    NSUB: tl.constexpr = BS // BN
    c = tl.program_id(0) // NSUB
    sub = tl.program_id(0) % NSUB
    h = tl.program_id(1)
    b0 = tl.load(blk_start_ptr + c)
    e0 = tl.load(blk_seq_end_ptr + c)
    kpos = b0 + sub * BN + tl.arange(0, BN)
    kvalid = kpos < e0
    d = tl.arange(0, D)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    first = b0 // chunk_tokens
    last = tl.where(e0 > b0, (e0 - 1) // chunk_tokens, first - 1)
    row = first.to(tl.int64) * stride_dkp_c + kpos[:, None] * stride_dkp_n + h * stride_dkp_h + d[None, :]
    dk_ptrs = dkp_ptr + row
    dv_ptrs = dvp_ptr + row
    for _ in range(first, last + 1):
        dk += tl.load(dk_ptrs, mask=kvalid[:, None], other=0.0)
        dv += tl.load(dv_ptrs, mask=kvalid[:, None], other=0.0)
        dk_ptrs += stride_dkp_c
        dv_ptrs += stride_dkp_c
    tl.store(dk_ptr + kpos[:, None] * stride_dk_n + h * stride_dk_h + d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=kvalid[:, None])
    tl.store(dv_ptr + kpos[:, None] * stride_dv_n + h * stride_dv_h + d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=kvalid[:, None])
