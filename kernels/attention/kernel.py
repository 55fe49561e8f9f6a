"""Triton kernels of MSA block-sparse GQA attention: forward, dQ, and dK/dV through the key-block ->
query reverse index (deterministic, no atomics).

Not runnable by itself; called by `kernels.attention.op`. Tests: `pytest -q tests/kernels/test_attention.py`.

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

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
    tl.store(lse_ptr + tok_R * stride_l_n + head_R, (m_R + tl.log2(l_safe)) * LN2, mask=valid_R)


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
    lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E
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
        lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E
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
