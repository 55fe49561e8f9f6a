"""Triton kernels of the MSA KL alignment loss. Query-stationary schedule: forward (per-token KL
and teacher mass), d(qi) per query tile, and d(ki) per key block through the key-block -> query
reverse index. Key-block-stationary ("split") schedule of the sparse form: per-(token, slot)
partial log-sum-exps, KL terms and d(qi), per-(group, chunk) d(ki) partials, and the fixed-order
sums that combine them. Both are deterministic (no atomics).

Not runnable by itself; called by `kernels.kl.op`. Tests: `pytest -q tests/kernels/test_msa_kl.py`.

Shape legend: N flat tokens, H heads (query heads for q/lse, KV = index heads for k/qi/block_idx),
D head dim, I index dim, K top-k slots; inside a kernel R rows (row r = token r // G, head r % G,
as in the attention kernels), TP token slots of a program (TP = R // G), J keys of a sub-block,
KP padded top-k slots.

The teacher lives in row space (one row per query head: p = exp(q.k * scale - lse)) and is
averaged over each token's G rows into token space, where the student (one index head per group)
and the KL are computed. All logits are in base 2 (log2(e) folded into the scales); the KL itself
is in nats. DENSE=True is the warm-up form: the support is every causally visible key.
"""
import triton
import triton.language as tl

from kernels._common import LN2_C, LOG2E_C
from kernels._split import split_list, split_step, split_step_tokens


@triton.jit
def _rows_to_tokens_sum(x_RJ, TP: tl.constexpr, G: tl.constexpr, J: tl.constexpr):
    return tl.sum(tl.reshape(x_RJ, [TP, G, J]), 1)


@triton.jit
def _tokens_to_rows(x_TJ, TP: tl.constexpr, G: tl.constexpr, J: tl.constexpr):
    return tl.reshape(tl.broadcast_to(x_TJ[:, None, :], [TP, G, J]), [TP * G, J])


@triton.jit
def kl_fwd_kernel(
    q_ptr, k_ptr, qi_ptr, ki_ptr, lse_ptr, ilse_ptr, bidx_ptr, union_ptr, count_ptr,
    start_ptr, seq_start_ptr, seq_end_ptr, n_tiles,
    kl_ptr, psum_ptr,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_qi_n, stride_qi_h, stride_ki_n,
    stride_l_n, stride_il_n, stride_b_n, stride_b_h, stride_u_p, stride_u_h, stride_c_p, stride_kl_n,
    qk_scale_log2, iscale_log2,
    G: tl.constexpr, TM: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, DI: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    DENSE: tl.constexpr, HAS_LSE: tl.constexpr, HAS_ILSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    TP: tl.constexpr = R // G
    # Dense tiles late in a sequence do the most work: start them first.
    tile = (n_tiles - 1 - tl.program_id(0)) if DENSE else tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(start_ptr + tile)
    s0 = tl.load(seq_start_ptr + tile)
    e0 = tl.load(seq_end_ptr + tile)
    last = tl.minimum(t0 + TM, e0) - 1

    r = tl.arange(0, R)
    tok_R = t0 + r // G
    head_R = h * G + r % G
    valid_R = (r < TM * G) & (tok_R < e0)
    i = tl.arange(0, TP)
    tok_T = t0 + i
    valid_T = (i < TM) & (tok_T < e0)
    d = tl.arange(0, D)
    di = tl.arange(0, DI)
    q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                mask=valid_R[:, None], other=0.0)
    qi = tl.load(qi_ptr + tok_R[:, None] * stride_qi_n + h * stride_qi_h + di[None, :],
                 mask=valid_R[:, None], other=0.0)
    slot = tl.arange(0, KP)
    if DENSE:
        n_blocks = (t0 - s0) // BS + 1
        sel_RK = tl.full([R, KP], -1, tl.int32)
        sel_TK = tl.full([TP, KP], -1, tl.int32)
    else:
        n_blocks = tl.load(count_ptr + tile * stride_c_p + h)
        sel_RK = tl.load(bidx_ptr + tok_R[:, None] * stride_b_n + h * stride_b_h + slot[None, :],
                         mask=valid_R[:, None] & (slot[None, :] < TOPK), other=-1)
        sel_TK = tl.load(bidx_ptr + tok_T[:, None] * stride_b_n + h * stride_b_h + slot[None, :],
                         mask=valid_T[:, None] & (slot[None, :] < TOPK), other=-1)
    j = tl.arange(0, BN)

    # Pass 1, only when the caller has no lse / index_lse: online log-sum-exp over the support.
    if HAS_LSE:
        lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E_C
    if HAS_ILSE:
        ilse2_T = tl.load(ilse_ptr + tok_T * stride_il_n + h, mask=valid_T, other=0.0) * LOG2E_C
    if not (HAS_LSE and HAS_ILSE):
        m_R = tl.full([R], -1.0e30, tl.float32)
        l_R = tl.zeros([R], tl.float32)
        mi_T = tl.full([TP], -1.0e30, tl.float32)
        li_T = tl.zeros([TP], tl.float32)
        for u in range(n_blocks):
            if DENSE:
                blk = u
            else:
                blk = tl.load(union_ptr + tile * stride_u_p + h * stride_u_h + u)
            for sub in tl.static_range(BS // BN):
                kpos = s0 + blk * BS + sub * BN + j
                kload = kpos <= last
                if DENSE:
                    ok_R = (kpos[None, :] <= tok_R[:, None]) & valid_R[:, None]
                    ok_T = (kpos[None, :] <= tok_T[:, None]) & valid_T[:, None]
                else:
                    ok_R = (tl.max(tl.where(sel_RK == blk, 1, 0), 1) > 0)[:, None] & (kpos[None, :] <= tok_R[:, None])
                    ok_T = (tl.max(tl.where(sel_TK == blk, 1, 0), 1) > 0)[:, None] & (kpos[None, :] <= tok_T[:, None])
                if not HAS_LSE:
                    k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kload[:, None], other=0.0)
                    s_R = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
                    s_R = tl.where(ok_R, s_R, float("-inf"))
                    m_new = tl.maximum(m_R, tl.max(s_R, 1))
                    l_R = l_R * tl.exp2(m_R - m_new) + tl.sum(tl.exp2(s_R - m_new[:, None]), 1)
                    m_R = m_new
                if not HAS_ILSE:
                    ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + di[None, :], mask=kload[:, None], other=0.0)
                    z_R = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * iscale_log2
                    z_T = tl.max(tl.reshape(z_R, [TP, G, BN]), 1)  # the G rows of a token are equal
                    z_T = tl.where(ok_T, z_T, float("-inf"))
                    mi_new = tl.maximum(mi_T, tl.max(z_T, 1))
                    li_T = li_T * tl.exp2(mi_T - mi_new) + tl.sum(tl.exp2(z_T - mi_new[:, None]), 1)
                    mi_T = mi_new
        if not HAS_LSE:
            lse2_R = m_R + tl.log2(tl.where(valid_R, l_R, 1.0))
        if not HAS_ILSE:
            ilse2_T = mi_T + tl.log2(tl.where(valid_T, li_T, 1.0))

    # Pass 2: KL(p || pI) on the support, p averaged over the group's heads.
    kl_T = tl.zeros([TP], tl.float32)
    ps_T = tl.zeros([TP], tl.float32)
    for u in range(n_blocks):
        if DENSE:
            blk = u
        else:
            blk = tl.load(union_ptr + tile * stride_u_p + h * stride_u_h + u)
        for sub in tl.static_range(BS // BN):
            kpos = s0 + blk * BS + sub * BN + j
            kload = kpos <= last
            if DENSE:
                ok_R = (kpos[None, :] <= tok_R[:, None]) & valid_R[:, None]
                ok_T = (kpos[None, :] <= tok_T[:, None]) & valid_T[:, None]
            else:
                ok_R = (tl.max(tl.where(sel_RK == blk, 1, 0), 1) > 0)[:, None] & (kpos[None, :] <= tok_R[:, None])
                ok_T = (tl.max(tl.where(sel_TK == blk, 1, 0), 1) > 0)[:, None] & (kpos[None, :] <= tok_T[:, None])
            k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kload[:, None], other=0.0)
            ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + di[None, :], mask=kload[:, None], other=0.0)
            s_R = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
            p_R = tl.exp2(tl.where(ok_R, s_R - lse2_R[:, None], float("-inf")))
            p_T = _rows_to_tokens_sum(p_R, TP, G, BN) * (1.0 / G)
            z_R = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * iscale_log2
            z_T = tl.max(tl.reshape(z_R, [TP, G, BN]), 1)
            log_pi_T = (z_T - ilse2_T[:, None]) * LN2_C
            pos = ok_T & (p_T > 0)
            term = tl.where(pos, p_T * (tl.log(tl.where(pos, p_T, 1.0)) - log_pi_T), 0.0)
            kl_T += tl.sum(term, 1)
            ps_T += tl.sum(p_T, 1)

    tl.store(kl_ptr + tok_T * stride_kl_n + h, kl_T, mask=valid_T)
    tl.store(psum_ptr + tok_T * stride_kl_n + h, ps_T, mask=valid_T)
    # The backward needs the lse it used; write what pass 1 computed.
    if not HAS_LSE:
        tl.store(lse_ptr + tok_R * stride_l_n + head_R, lse2_R * LN2_C, mask=valid_R)
    if not HAS_ILSE:
        tl.store(ilse_ptr + tok_T * stride_il_n + h, ilse2_T * LN2_C, mask=valid_T)


@triton.jit
def kl_bwd_dqi_kernel(
    q_ptr, k_ptr, qi_ptr, ki_ptr, lse_ptr, ilse_ptr, psum_ptr, dqi_ptr, bidx_ptr, union_ptr, count_ptr,
    start_ptr, seq_start_ptr, seq_end_ptr, n_tiles,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_qi_n, stride_qi_h, stride_ki_n,
    stride_l_n, stride_il_n, stride_b_n, stride_b_h, stride_u_p, stride_u_h, stride_c_p,
    stride_dqi_n, stride_dqi_h,
    qk_scale_log2, iscale_log2, grad_ptr, grad_scale,
    G: tl.constexpr, TM: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, DI: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    DENSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    TP: tl.constexpr = R // G
    tile = (n_tiles - 1 - tl.program_id(0)) if DENSE else tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(start_ptr + tile)
    s0 = tl.load(seq_start_ptr + tile)
    e0 = tl.load(seq_end_ptr + tile)
    last = tl.minimum(t0 + TM, e0) - 1

    r = tl.arange(0, R)
    tok_R = t0 + r // G
    head_R = h * G + r % G
    valid_R = (r < TM * G) & (tok_R < e0)
    i = tl.arange(0, TP)
    tok_T = t0 + i
    valid_T = (i < TM) & (tok_T < e0)
    d = tl.arange(0, D)
    di = tl.arange(0, DI)
    q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                mask=valid_R[:, None], other=0.0)
    qi = tl.load(qi_ptr + tok_R[:, None] * stride_qi_n + h * stride_qi_h + di[None, :],
                 mask=valid_R[:, None], other=0.0)
    lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E_C
    ilse2_T = tl.load(ilse_ptr + tok_T * stride_il_n + h, mask=valid_T, other=0.0) * LOG2E_C
    ps_T = tl.load(psum_ptr + tok_T * stride_il_n + h, mask=valid_T, other=0.0)
    slot = tl.arange(0, KP)
    if DENSE:
        n_blocks = (t0 - s0) // BS + 1
        sel_RK = tl.full([R, KP], -1, tl.int32)
        sel_TK = tl.full([TP, KP], -1, tl.int32)
    else:
        n_blocks = tl.load(count_ptr + tile * stride_c_p + h)
        sel_RK = tl.load(bidx_ptr + tok_R[:, None] * stride_b_n + h * stride_b_h + slot[None, :],
                         mask=valid_R[:, None] & (slot[None, :] < TOPK), other=-1)
        sel_TK = tl.load(bidx_ptr + tok_T[:, None] * stride_b_n + h * stride_b_h + slot[None, :],
                         mask=valid_T[:, None] & (slot[None, :] < TOPK), other=-1)
    j = tl.arange(0, BN)

    dqi = tl.zeros([R, DI], tl.float32)
    for u in range(n_blocks):
        if DENSE:
            blk = u
        else:
            blk = tl.load(union_ptr + tile * stride_u_p + h * stride_u_h + u)
        for sub in tl.static_range(BS // BN):
            kpos = s0 + blk * BS + sub * BN + j
            kload = kpos <= last
            if DENSE:
                ok_R = (kpos[None, :] <= tok_R[:, None]) & valid_R[:, None]
                ok_T = (kpos[None, :] <= tok_T[:, None]) & valid_T[:, None]
            else:
                ok_R = (tl.max(tl.where(sel_RK == blk, 1, 0), 1) > 0)[:, None] & (kpos[None, :] <= tok_R[:, None])
                ok_T = (tl.max(tl.where(sel_TK == blk, 1, 0), 1) > 0)[:, None] & (kpos[None, :] <= tok_T[:, None])
            k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kload[:, None], other=0.0)
            ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + di[None, :], mask=kload[:, None], other=0.0)
            s_R = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
            p_R = tl.exp2(tl.where(ok_R, s_R - lse2_R[:, None], float("-inf")))
            p_T = _rows_to_tokens_sum(p_R, TP, G, BN) * (1.0 / G)
            z_R = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * iscale_log2
            z_T = tl.max(tl.reshape(z_R, [TP, G, BN]), 1)
            pi_T = tl.exp2(tl.where(ok_T, z_T - ilse2_T[:, None], float("-inf")))
            # d KL / d z = pI * sum(p) - p (sum(p) = 1 up to rounding when lse matches the support).
            dz_T = pi_T * ps_T[:, None] - p_T
            # Every row of a token gets the token's gradient; only the first row is stored.
            dz_R = _tokens_to_rows(dz_T, TP, G, BN)
            dqi += tl.dot(dz_R.to(ki.dtype), ki, input_precision=DOT_PREC)

    first_R = valid_R & (r % G == 0)
    tl.store(dqi_ptr + tok_R[:, None] * stride_dqi_n + h * stride_dqi_h + di[None, :],
             (dqi * (tl.load(grad_ptr) * grad_scale)).to(dqi_ptr.dtype.element_ty), mask=first_R[:, None])


@triton.jit
def kl_bwd_dki_kernel(
    q_ptr, k_ptr, qi_ptr, ki_ptr, lse_ptr, ilse_ptr, psum_ptr, dki_ptr,
    tokens_ptr, offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_qi_n, stride_qi_h, stride_ki_n,
    stride_l_n, stride_il_n, stride_dki_h, stride_dki_n,
    qk_scale_log2, iscale_log2, grad_ptr, grad_scale,
    G: tl.constexpr, TQ: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, DI: tl.constexpr, DENSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    TP: tl.constexpr = R // G
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
    di = tl.arange(0, DI)
    k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kvalid[:, None], other=0.0)
    ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + di[None, :], mask=kvalid[:, None], other=0.0)

    if DENSE:
        # Warm-up: every token of the sequence from the block's first key on sees some of its keys.
        lo = b0 + sub * BN
        hi = e0
    else:
        lo = tl.load(offsets_ptr + h * n_blocks + c)
        hi = tl.load(offsets_ptr + h * n_blocks + c + 1)
    r = tl.arange(0, R)
    g_R = r % G
    i = tl.arange(0, TP)
    dki = tl.zeros([BN, DI], tl.float32)
    for e in range(lo, hi, TQ):
        ent_R = e + r // G
        valid_R = (r < TQ * G) & (ent_R < hi)
        ent_T = e + i
        valid_T = (i < TQ) & (ent_T < hi)
        if DENSE:
            tok_R = ent_R
            tok_T = ent_T
        else:
            tok_R = tl.load(tokens_ptr + ent_R, mask=valid_R, other=0)
            tok_T = tl.load(tokens_ptr + ent_T, mask=valid_T, other=0)
        head_R = h * G + g_R
        q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                    mask=valid_R[:, None], other=0.0)
        qi = tl.load(qi_ptr + tok_R[:, None] * stride_qi_n + h * stride_qi_h + di[None, :],
                     mask=valid_R[:, None], other=0.0)
        lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E_C
        ilse2_T = tl.load(ilse_ptr + tok_T * stride_il_n + h, mask=valid_T, other=0.0) * LOG2E_C
        ps_T = tl.load(psum_ptr + tok_T * stride_il_n + h, mask=valid_T, other=0.0)
        ok_R = valid_R[:, None] & kvalid[None, :] & (kpos[None, :] <= tok_R[:, None])
        ok_T = valid_T[:, None] & kvalid[None, :] & (kpos[None, :] <= tok_T[:, None])
        s_R = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
        p_R = tl.exp2(tl.where(ok_R, s_R - lse2_R[:, None], float("-inf")))
        p_T = _rows_to_tokens_sum(p_R, TP, G, BN) * (1.0 / G)
        z_R = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * iscale_log2
        z_T = tl.max(tl.reshape(z_R, [TP, G, BN]), 1)
        pi_T = tl.exp2(tl.where(ok_T, z_T - ilse2_T[:, None], float("-inf")))
        dz_T = pi_T * ps_T[:, None] - p_T
        # Spread to rows but keep it on each token's first row only: the dot sums over rows.
        dz_R = tl.where((g_R == 0)[:, None], _tokens_to_rows(dz_T, TP, G, BN), 0.0)
        dki += tl.dot(tl.trans(dz_R.to(qi.dtype)), qi, input_precision=DOT_PREC)

    tl.store(dki_ptr + h * stride_dki_h + kpos[:, None] * stride_dki_n + di[None, :],
             dki * (tl.load(grad_ptr) * grad_scale),
             mask=kvalid[:, None])


# ---------------------------------------------------------------------------------------------
# Key-block-stationary ("split") schedule of the sparse form, as in the attention: one program per
# (KV group h, chunk of query tokens, key block) loads the block's k and ki once and streams the
# chunk's tokens that selected it (kernels._common.split_index), TQ tokens (TQ x G rows) a step.
# Once the teacher lse and the student index_lse are known, the KL of a (token, group) is a plain
# sum over its selected keys, so each (token, slot) needs only two fp32 partials (the KL terms and
# the teacher mass of the slot's block), summed in slot order afterwards. Every partial has one
# writer and every sum runs in a fixed order: deterministic, no atomics.
# Extra legend: E work-list entries ((token, slot) pairs), W width of a partial.
# ---------------------------------------------------------------------------------------------
@triton.jit
def kl_lse_split_kernel(
    q_ptr, k_ptr, qi_ptr, ki_ptr, lp_ptr, lip_ptr, tokens_ptr, slots_ptr, offsets_ptr, blk_start_ptr,
    blk_seq_end_ptr, n_blocks, n_items,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_qi_n, stride_qi_h, stride_ki_n,
    stride_lp_n, stride_lp_h, stride_lip_n, stride_lip_h,
    qk_scale_log2, iscale_log2,
    G: tl.constexpr, TQ: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    HAS_LSE: tl.constexpr, HAS_ILSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Only when the caller has no lse / index_lse: per (token, slot) the base-2 log-sum-exp over the
    # slot's block's visible keys, of the teacher per head (lp [N, Hq, K]) and of the student
    # (lip [N, Hkv, K]); `kl_merge_lse_kernel` combines the slots.
    TP: tl.constexpr = R // G
    _, h, lo, hi, b0, e0 = split_list(offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks, n_items)
    if hi > lo:
        kpos = b0 + tl.arange(0, BS)
        kvalid = kpos < e0
        r = tl.arange(0, R)
        head_R = h * G + r % G
        i = tl.arange(0, TP)
        d = tl.arange(0, D)
        di = tl.arange(0, DI)
        if not HAS_LSE:
            k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kvalid[:, None],
                        other=0.0)
        if not HAS_ILSE:
            ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + di[None, :], mask=kvalid[:, None], other=0.0)
        for e in range(lo, hi, TQ):
            ent_R, valid_R, tok_R = split_step(tokens_ptr, e, hi, r, G, TQ)
            # Tokens ascend in a list: when the step's first token is past the block, every key is
            # visible to every row. Otherwise a listed token sees at least key b0, so its maximum
            # is finite; -1e30 (not -inf) keeps the padding rows free of NaN.
            masked = b0 + BS > tl.minimum(tl.load(tokens_ptr + e) + 1, e0)
            if not HAS_LSE:
                slot_R = tl.load(slots_ptr + ent_R, mask=valid_R, other=0)
                q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                            mask=valid_R[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2
                if masked:
                    s = tl.where(kvalid[None, :] & (kpos[None, :] <= tok_R[:, None]), s, -1.0e30)
                m_R = tl.max(s, 1)
                l_R = tl.sum(tl.exp2(s - m_R[:, None]), 1)
                tl.store(lp_ptr + tok_R.to(tl.int64) * stride_lp_n + head_R * stride_lp_h + slot_R,
                         m_R + tl.log2(l_R), mask=valid_R)
            if not HAS_ILSE:
                valid_T, tok_T = split_step_tokens(tokens_ptr, e, hi, i, TQ)
                slot_T = tl.load(slots_ptr + e + i, mask=valid_T, other=0)
                # Row space (G equal rows per token) keeps the product a tensor-core tile.
                qi = tl.load(qi_ptr + tok_R[:, None] * stride_qi_n + h * stride_qi_h + di[None, :],
                             mask=valid_R[:, None], other=0.0)
                z = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * iscale_log2
                z_T = tl.max(tl.reshape(z, [TP, G, BS]), 1)
                if masked:
                    z_T = tl.where(kvalid[None, :] & (kpos[None, :] <= tok_T[:, None]), z_T, -1.0e30)
                mi_T = tl.max(z_T, 1)
                li_T = tl.sum(tl.exp2(z_T - mi_T[:, None]), 1)
                tl.store(lip_ptr + tok_T.to(tl.int64) * stride_lip_n + h * stride_lip_h + slot_T,
                         mi_T + tl.log2(li_T), mask=valid_T)


@triton.jit
def kl_merge_lse_kernel(
    lp_ptr, valid_ptr, lse_ptr, n_rows,
    G: tl.constexpr, ROWS: tl.constexpr, TOPK: tl.constexpr,
):
    # lse of a row (token, head) of the [N, H, K] base-2 partials = ln 2 * log2 sum over its valid
    # slots of exp2(partial), in slot order. Head h belongs to group h // G (valid [N, Hkv, K]); a
    # row without a valid slot (hand-made block_idx only) gets -inf and is never read.
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = row < n_rows
    row = row.to(tl.int64)  # rows x slots may pass 2**31
    m = tl.full([ROWS], -float("inf"), tl.float32)
    for s in range(TOPK):
        v = ok & (tl.load(valid_ptr + (row // G) * TOPK + s, mask=ok, other=0) != 0)
        m = tl.maximum(m, tl.load(lp_ptr + row * TOPK + s, mask=v, other=-float("inf")))
    m = tl.where(m == -float("inf"), 0.0, m)
    den = tl.zeros([ROWS], tl.float32)
    for s in range(TOPK):
        v = ok & (tl.load(valid_ptr + (row // G) * TOPK + s, mask=ok, other=0) != 0)
        den += tl.exp2(tl.load(lp_ptr + row * TOPK + s, mask=v, other=-float("inf")) - m)
    lse = tl.where(den > 0, (m + tl.log2(tl.where(den > 0, den, 1.0))) * LN2_C, -float("inf"))
    tl.store(lse_ptr + row, lse, mask=ok)


@triton.jit
def kl_fwd_split_kernel(
    q_ptr, k_ptr, qi_ptr, ki_ptr, lse_ptr, ilse_ptr, klp_ptr, tokens_ptr, slots_ptr, offsets_ptr, blk_start_ptr,
    blk_seq_end_ptr, n_blocks, n_items,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_qi_n, stride_qi_h, stride_ki_n,
    stride_l_n, stride_il_n, stride_klp_n, stride_klp_h, stride_klp_k,
    qk_scale_log2, iscale_log2,
    G: tl.constexpr, TQ: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Per (token, slot), over the slot's block's visible keys j: klp[tok, h, slot] =
    # (sum_j p (log p - log pI), sum_j p), p the head-averaged teacher, pI the student, both with
    # the full (merged or given) log-sum-exps; `kl_sum_slots_kernel` sums the slots.
    TP: tl.constexpr = R // G
    _, h, lo, hi, b0, e0 = split_list(offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks, n_items)
    if hi > lo:
        kpos = b0 + tl.arange(0, BS)
        kvalid = kpos < e0
        d = tl.arange(0, D)
        di = tl.arange(0, DI)
        k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kvalid[:, None], other=0.0)
        ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + di[None, :], mask=kvalid[:, None], other=0.0)
        r = tl.arange(0, R)
        head_R = h * G + r % G
        i = tl.arange(0, TP)
        for e in range(lo, hi, TQ):
            ent_R, valid_R, tok_R = split_step(tokens_ptr, e, hi, r, G, TQ)
            valid_T, tok_T = split_step_tokens(tokens_ptr, e, hi, i, TQ)
            slot_T = tl.load(slots_ptr + e + i, mask=valid_T, other=0)
            q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                        mask=valid_R[:, None], other=0.0)
            qi = tl.load(qi_ptr + tok_R[:, None] * stride_qi_n + h * stride_qi_h + di[None, :],
                         mask=valid_R[:, None], other=0.0)
            lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E_C
            ilse2_T = tl.load(ilse_ptr + tok_T * stride_il_n + h, mask=valid_T, other=0.0) * LOG2E_C
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale_log2 - lse2_R[:, None]
            # The mask only where the step reaches into the block (see kl_lse_split_kernel); padding
            # rows are never stored, so whatever they hold does not matter.
            if b0 + BS > tl.minimum(tl.load(tokens_ptr + e) + 1, e0):
                s = tl.where(kvalid[None, :] & (kpos[None, :] <= tok_R[:, None]), s, -float("inf"))
            p_T = _rows_to_tokens_sum(tl.exp2(s), TP, G, BS) * (1.0 / G)
            z = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * iscale_log2
            log_pi_T = (tl.max(tl.reshape(z, [TP, G, BS]), 1) - ilse2_T[:, None]) * LN2_C
            # p = 0 exactly on the masked keys, where log pI (finite: masked keys load ki = 0) is unused.
            pos = p_T > 0
            term = tl.where(pos, p_T * (tl.log(tl.where(pos, p_T, 1.0)) - log_pi_T), 0.0)
            part_T = tok_T.to(tl.int64) * stride_klp_n + h * stride_klp_h + slot_T * stride_klp_k
            tl.store(klp_ptr + part_T, tl.sum(term, 1), mask=valid_T)
            tl.store(klp_ptr + part_T + 1, tl.sum(p_T, 1), mask=valid_T)


@triton.jit
def kl_sum_slots_kernel(
    part_ptr, valid_ptr, out_ptr, grad_ptr, n_rows, scale,
    ROWS: tl.constexpr, W: tl.constexpr, TOPK: tl.constexpr, HAS_GRAD: tl.constexpr,
):
    # out[row] = scale (x upstream gradient) x the sum over the row's valid slots of part[row, slot],
    # in slot order; rows are (token, group), part [rows, K, W] and out [rows, W] contiguous.
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = row < n_rows
    row = row.to(tl.int64)  # rows x slots x W may pass 2**31
    w = tl.arange(0, W)
    acc = tl.zeros([ROWS, W], tl.float32)
    for s in range(TOPK):
        v = ok & (tl.load(valid_ptr + row * TOPK + s, mask=ok, other=0) != 0)
        acc += tl.load(part_ptr + (row * TOPK + s)[:, None] * W + w[None, :], mask=v[:, None], other=0.0)
    if HAS_GRAD:
        scale = scale * tl.load(grad_ptr)
    tl.store(out_ptr + row[:, None] * W + w[None, :], (acc * scale).to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def kl_bwd_split_kernel(
    q_ptr, k_ptr, qi_ptr, ki_ptr, lse_ptr, ilse_ptr, psum_ptr, dqip_ptr, dkip_ptr,
    tokens_ptr, slots_ptr, offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks, n_items, chunk_tokens,
    stride_q_n, stride_q_h, stride_k_n, stride_k_h, stride_qi_n, stride_qi_h, stride_ki_n,
    stride_l_n, stride_il_n, stride_ps_n, stride_ps_h,
    stride_dqip_n, stride_dqip_h, stride_dqip_k, stride_dkip_c, stride_dkip_n, stride_dkip_h,
    qk_scale_log2, iscale_log2,
    G: tl.constexpr, TQ: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr = False,
):
    # One pass over each (chunk, key block) list in the transposed form (keys are the rows, as in
    # the attention's backward): with dz = pI * sum(p) - p (the upstream factor is applied by the
    # sums), d ki of the block summed over the chunk's tokens (fp32 partial per (group, chunk),
    # written even when the list is empty) and d qi of each (token, slot) = dz ki, an fp32 partial
    # that `kl_sum_slots_kernel` sums. 1/sqrt(dI) is part of the upstream factor too.
    TP: tl.constexpr = R // G
    item, h, lo, hi, b0, e0 = split_list(offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks, n_items)
    chunk = item // n_blocks
    # Chunks that may hold queries of this block: from the block's start to its sequence's end.
    active = (e0 > b0) & (chunk >= b0 // chunk_tokens) & (chunk <= (e0 - 1) // chunk_tokens)
    if active:
        kpos = b0 + tl.arange(0, BS)
        kvalid = kpos < e0
        d = tl.arange(0, D)
        di = tl.arange(0, DI)
        k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kvalid[:, None], other=0.0)
        ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + di[None, :], mask=kvalid[:, None], other=0.0)
        r = tl.arange(0, R)
        g_R = r % G
        head_R = h * G + g_R
        i = tl.arange(0, TP)
        dki = tl.zeros([BS, DI], tl.float32)
        # PREFETCH: the step's token lists come from the previous step, so the gathers below are
        # direct loads, which Triton's pipeliner issues two steps ahead (indirect ones: one step).
        if PREFETCH:
            ent_R, valid_R, tok_R = split_step(tokens_ptr, lo, hi, r, G, TQ)
            valid_T, tok_T = split_step_tokens(tokens_ptr, lo, hi, i, TQ)
        for e in range(lo, hi, TQ):
            if PREFETCH:
                ent_n, valid_n, tok_n = split_step(tokens_ptr, e + TQ, hi, r, G, TQ)
                valid_Tn, tok_Tn = split_step_tokens(tokens_ptr, e + TQ, hi, i, TQ)
            else:
                ent_R, valid_R, tok_R = split_step(tokens_ptr, e, hi, r, G, TQ)
                valid_T, tok_T = split_step_tokens(tokens_ptr, e, hi, i, TQ)
            slot_R = tl.load(slots_ptr + ent_R, mask=valid_R, other=0)
            q = tl.load(q_ptr + tok_R[:, None] * stride_q_n + head_R[:, None] * stride_q_h + d[None, :],
                        mask=valid_R[:, None], other=0.0)
            qi = tl.load(qi_ptr + tok_R[:, None] * stride_qi_n + h * stride_qi_h + di[None, :],
                         mask=valid_R[:, None], other=0.0)
            lse2_R = tl.load(lse_ptr + tok_R * stride_l_n + head_R, mask=valid_R, other=0.0) * LOG2E_C
            ilse2_T = tl.load(ilse_ptr + tok_T * stride_il_n + h, mask=valid_T, other=0.0) * LOG2E_C
            ps_T = tl.load(psum_ptr + tok_T * stride_ps_n + h * stride_ps_h, mask=valid_T, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale_log2 - lse2_R[None, :]
            zT = tl.dot(ki, tl.trans(qi), input_precision=DOT_PREC) * iscale_log2
            zT_T = tl.max(tl.reshape(zT, [BS, TP, G]), 2) - ilse2_T[None, :]
            # Masked as in the forward. Padding rows have qi = 0, so they add nothing to d ki, and
            # their d qi is not stored.
            if b0 + BS > tl.minimum(tl.load(tokens_ptr + e) + 1, e0):
                sT = tl.where(kvalid[:, None] & (kpos[:, None] <= tok_R[None, :]), sT, -float("inf"))
                zT_T = tl.where(kvalid[:, None] & (kpos[:, None] <= tok_T[None, :]), zT_T, -float("inf"))
            pT_T = tl.sum(tl.reshape(tl.exp2(sT), [BS, TP, G]), 2) * (1.0 / G)
            # d KL / d z = pI * sum(p) - p (sum(p) = 1 up to rounding when lse matches the support).
            dzT_T = tl.exp2(zT_T) * ps_T[None, :] - pT_T
            dzT_R = tl.reshape(tl.broadcast_to(dzT_T[:, :, None], [BS, TP, G]), [BS, R])
            # The dot sums over rows: keep each token's gradient on its first row only.
            dki += tl.dot(tl.where((g_R == 0)[None, :], dzT_R, 0.0).to(qi.dtype), qi, input_precision=DOT_PREC)
            dqi = tl.dot(tl.trans(dzT_R.to(ki.dtype)), ki, input_precision=DOT_PREC)
            part_R = tok_R.to(tl.int64) * stride_dqip_n + h * stride_dqip_h + slot_R * stride_dqip_k
            tl.store(dqip_ptr + part_R[:, None] + di[None, :], dqi, mask=(valid_R & (g_R == 0))[:, None])
            if PREFETCH:
                ent_R, valid_R, tok_R, valid_T, tok_T = ent_n, valid_n, tok_n, valid_Tn, tok_Tn
        row = chunk.to(tl.int64) * stride_dkip_c + kpos[:, None] * stride_dkip_n + h * stride_dkip_h + di[None, :]
        tl.store(dkip_ptr + row, dki, mask=kvalid[:, None])


@triton.jit
def kl_bwd_sum_chunks_kernel(
    dkip_ptr, dki_ptr, grad_ptr, blk_start_ptr, blk_seq_end_ptr, chunk_tokens, n_groups, grad_scale,
    stride_dkip_c, stride_dkip_n, stride_dkip_h, stride_dki_n,
    BN: tl.constexpr, BS: tl.constexpr, DI: tl.constexpr,
):
    # d ki of a key sub-block = upstream factor x the sum of its (group, chunk) partials, groups
    # outer and chunks inner, over the chunks that can reach the block (those the backward wrote).
    NSUB: tl.constexpr = BS // BN
    c = tl.program_id(0) // NSUB
    sub = tl.program_id(0) % NSUB
    b0 = tl.load(blk_start_ptr + c)
    e0 = tl.load(blk_seq_end_ptr + c)
    kpos = b0 + sub * BN + tl.arange(0, BN)
    kvalid = kpos < e0
    di = tl.arange(0, DI)
    dki = tl.zeros([BN, DI], tl.float32)
    first = b0 // chunk_tokens
    last = tl.where(e0 > b0, (e0 - 1) // chunk_tokens, first - 1)
    rows = first.to(tl.int64) * stride_dkip_c + kpos[:, None] * stride_dkip_n + di[None, :]
    for h in range(n_groups):
        ptrs = dkip_ptr + rows + h * stride_dkip_h
        for _ in range(first, last + 1):
            dki += tl.load(ptrs, mask=kvalid[:, None], other=0.0)
            ptrs += stride_dkip_c
    tl.store(dki_ptr + kpos[:, None] * stride_dki_n + di[None, :],
             (dki * (tl.load(grad_ptr) * grad_scale)).to(dki_ptr.dtype.element_ty), mask=kvalid[:, None])
