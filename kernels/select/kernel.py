"""Triton kernel of MSA block selection: token scores, causal block max-pooling, a running top-(k-1)
of the non-local blocks kept in registers, and (LSE) the index log-sum-exp over the selected keys.

Not runnable by itself; called by `kernels.select.op.msa_select`. Tests: `pytest -q tests/kernels/test_msa_select.py`.

Shape legend: N flat tokens, H index heads, I index dim, K top-k slots; inside the kernel
R rows of a program (= tokens x heads, row r is token r // HB, head h0 + r % HB), J keys of a block,
KP padded top-k slots.

One program owns a tile of BM consecutive query tokens of one sequence (inside one key block, so
they share the local block) and HB index heads. The key `ki` is shared by all index heads, so each
key block load serves BM x HB rows. Blocks before the local block are fully visible: no mask, and
every block that enters the running top-(k-1) carries its own log-sum-exp so that index_lse needs
no second pass over the selected keys.
"""
import triton
import triton.language as tl

from kernels._common import LN2_C


@triton.jit
def _rank_block(s_RJ, blk, top_v, top_z, top_i, slot, qk_scale_log2, KP: tl.constexpr, Z: tl.constexpr):
    """Offer one fully visible block to each row's running top-(k-1): its max-pooled score and (Z)
    its log-sum-exp, both in log2 units, from the unscaled scores s_RJ (the ranking is unchanged by
    the positive scale, so the scale is applied once per row and inside one FMA per score). Without
    Z the block costs one max per score instead of an exp2 and two more operations: the exp2s are
    as many as the scores, and the SFU's exp2 rate is no faster than the tensor cores' score rate."""
    m_R = tl.max(s_RJ, 1) * qk_scale_log2
    # Replace the smallest kept score if this block beats it (first slot on ties).
    cur_min = tl.min(top_v, 1)
    pos = tl.min(tl.where(top_v == cur_min[:, None], slot[None, :], KP), 1)
    hit = (slot[None, :] == pos[:, None]) & (m_R > cur_min)[:, None]
    top_v = tl.where(hit, m_R[:, None], top_v)
    if Z:
        z_R = m_R + tl.log2(tl.sum(tl.exp2(s_RJ * qk_scale_log2 - m_R[:, None]), 1))
        top_z = tl.where(hit, z_R[:, None], top_z)
    top_i = tl.where(hit, blk, top_i)
    return top_v, top_z, top_i, m_R


@triton.jit
def _add_block_score(bm_R, bs_R, m_R):
    """Online log-sum-exp (log2 units) of the pooled scores of every visible block: the denominator
    of the block softmax that the `top_p` budget thresholds. One exp2 per row and block."""
    new_R = tl.maximum(bm_R, m_R)
    return new_R, bs_R * tl.exp2(bm_R - new_R) + tl.exp2(m_R - new_R)


@triton.jit
def select_kernel(
    qi_ptr, ki_ptr, bidx_ptr, lse_ptr, score_ptr, slot_lse_ptr, block_lse_ptr, fp8_scale_ptr,
    start_ptr, seq_start_ptr, seq_end_ptr, n_tiles,
    stride_qi_n, stride_qi_h, stride_ki_n, stride_b_n, stride_b_h, stride_l_n,
    qk_scale_log2,
    BS: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, HB: tl.constexpr,
    DI: tl.constexpr, DOT_PREC: tl.constexpr, PIPE: tl.constexpr, SCORES: tl.constexpr, LSE: tl.constexpr,
    FP8: tl.constexpr,
):
    R: tl.constexpr = BM * HB
    if FP8:
        # qi and ki arrive as e4m3 (kernels/select/op.py), so the score products run on the FP8 tensor
        # cores at twice the bf16 rate; their two per-tensor scales fold into the one factor that
        # every score is multiplied by anyway
        qk_scale_log2 = qk_scale_log2 * tl.load(fp8_scale_ptr) * tl.load(fp8_scale_ptr + 1)
    # the blocks' log-sum-exps: for index_lse (LSE) and for the adaptive budgets' slot sums (SCORES)
    Z: tl.constexpr = LSE or SCORES
    # Late tiles see the most blocks: launch them first so the long programs do not trail.
    tile = n_tiles - 1 - tl.program_id(0)
    h0 = tl.program_id(1) * HB
    t0 = tl.load(start_ptr + tile)
    s0 = tl.load(seq_start_ptr + tile)
    e0 = tl.load(seq_end_ptr + tile)

    r = tl.arange(0, R)
    tok_R = t0 + r // HB
    head_R = h0 + r % HB
    valid_R = tok_R < e0
    d = tl.arange(0, DI)
    qi = tl.load(qi_ptr + tok_R[:, None] * stride_qi_n + head_R[:, None] * stride_qi_h + d[None, :],
                 mask=valid_R[:, None], other=0.0)

    local = (t0 - s0) // BS
    slot = tl.arange(0, KP)
    # Real slots start at -inf (any block beats them); padding slots at +inf (never the minimum).
    top_v = tl.where(slot[None, :] < TOPK - 1, float("-inf"), float("inf")) + tl.zeros([R, KP], tl.float32)
    top_z = tl.full([R, KP], float("-inf"), tl.float32)
    top_i = tl.full([R, KP], -1, tl.int32)
    bm_R = tl.full([R], float("-inf"), tl.float32)  # block-softmax running max and sum (SCORES only)
    bs_R = tl.zeros([R], tl.float32)
    j = tl.arange(0, BS)
    if PIPE:
        # Software pipelining: the tensor cores compute block blk's scores (an asynchronous
        # product) while the row reductions rank block blk - 1, instead of waiting for each other.
        ki = tl.load(ki_ptr + (s0 + j)[:, None] * stride_ki_n + d[None, :], mask=(j < BS * local)[:, None], other=0.0)
        s_cur = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC)
        for blk in range(1, local):
            kpos = s0 + blk * BS + j
            ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + d[None, :])
            s_next = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC)
            top_v, top_z, top_i, m_R = _rank_block(s_cur, blk - 1, top_v, top_z, top_i, slot, qk_scale_log2, KP, Z)
            if SCORES:
                bm_R, bs_R = _add_block_score(bm_R, bs_R, m_R)
            s_cur = s_next
        if local > 0:
            top_v, top_z, top_i, m_R = _rank_block(s_cur, local - 1, top_v, top_z, top_i, slot, qk_scale_log2, KP, Z)
            if SCORES:
                bm_R, bs_R = _add_block_score(bm_R, bs_R, m_R)
    else:
        for blk in range(0, local):
            kpos = s0 + blk * BS + j
            ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + d[None, :])
            s_RJ = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC)
            top_v, top_z, top_i, m_R = _rank_block(s_RJ, blk, top_v, top_z, top_i, slot, qk_scale_log2, KP, Z)
            if SCORES:
                bm_R, bs_R = _add_block_score(bm_R, bs_R, m_R)

    # Local block: token-causal.
    kpos = s0 + local * BS + j
    last = tl.minimum(t0 + BM, e0) - 1
    ki = tl.load(ki_ptr + kpos[:, None] * stride_ki_n + d[None, :], mask=(kpos <= last)[:, None], other=0.0)
    s_RJ = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC) * qk_scale_log2
    s_RJ = tl.where(kpos[None, :] <= tok_R[:, None], s_RJ, float("-inf"))
    m_loc = tl.max(s_RJ, 1)
    m_loc = tl.where(valid_R, m_loc, 0.0)  # rows past the sequence end see no key; keep them finite

    # Valid slots are filled front to back (ties pick the first free slot), so the local block
    # goes right after them: slot n_valid - 1 with n_valid = min(topk, local + 1).
    n_valid = tl.minimum(TOPK, local + 1)
    out = tl.where(slot[None, :] == n_valid - 1, local, top_i)
    tl.store(bidx_ptr + tok_R[:, None] * stride_b_n + head_R[:, None] * stride_b_h + slot[None, :], out,
             mask=valid_R[:, None] & (slot[None, :] < TOPK))
    if Z:
        z_loc = m_loc + tl.log2(tl.sum(tl.exp2(s_RJ - m_loc[:, None]), 1))
    if LSE:
        mz = tl.maximum(tl.max(top_z, 1), z_loc)
        lse2 = mz + tl.log2(tl.sum(tl.exp2(top_z - mz[:, None]), 1) + tl.exp2(z_loc - mz))
        tl.store(lse_ptr + tok_R * stride_l_n + head_R, lse2 * LN2_C, mask=valid_R)
    if SCORES:
        # For the adaptive budgets (kernels/select/budget.py): each slot's pooled score and key
        # log-sum-exp, and the log-sum-exp of the pooled scores over all visible blocks, natural
        # units, laid out like block_idx; empty slots hold -inf.
        bm_R, bs_R = _add_block_score(bm_R, bs_R, m_loc)
        is_loc = slot[None, :] == n_valid - 1
        filled = slot[None, :] < n_valid - 1
        v_out = tl.where(is_loc, m_loc[:, None], tl.where(filled, top_v, float("-inf")))
        z_out = tl.where(is_loc, z_loc[:, None], tl.where(filled, top_z, float("-inf")))
        smask = valid_R[:, None] & (slot[None, :] < TOPK)
        soff = tok_R[:, None] * stride_b_n + head_R[:, None] * stride_b_h + slot[None, :]
        tl.store(score_ptr + soff, v_out * LN2_C, mask=smask)
        tl.store(slot_lse_ptr + soff, z_out * LN2_C, mask=smask)
        tl.store(block_lse_ptr + tok_R * stride_l_n + head_R, (bm_R + tl.log2(bs_R)) * LN2_C, mask=valid_R)
