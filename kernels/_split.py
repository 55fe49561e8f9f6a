"""Triton helpers shared by the kernels of the key-block-stationary ("split") schedule of the
attention (`kernels/attention/kernel.py`) and of the KL (`kernels/kl/kernel.py`); never used by
the references. The work lists come from `kernels._common.split_index`.

Not runnable by itself. Tests: `pytest -q tests/kernels`.
"""
import triton
import triton.language as tl


@triton.jit
def split_list(offsets_ptr, blk_start_ptr, blk_seq_end_ptr, n_blocks, n_items):
    """The work list of program (item, h), item = chunk * n_blocks + c: its entries [lo, hi) of the
    reverse index and the flat token range [b0, e0) of key block c (e0 = its sequence's end)."""
    item = tl.program_id(0)
    h = tl.program_id(1)
    c = item % n_blocks
    lo = tl.load(offsets_ptr + h * n_items + item)
    hi = tl.load(offsets_ptr + h * n_items + item + 1)
    b0 = tl.load(blk_start_ptr + c)
    e0 = tl.load(blk_seq_end_ptr + c)
    return item, h, lo, hi, b0, e0


@triton.jit
def split_step(tokens_ptr, e, hi, r, G: tl.constexpr, TQ: tl.constexpr):
    """The rows of one step from list entry e: row r is head r % G of entry e + r // G; rows past
    the step's TQ tokens or the list's end are invalid (their token reads as 0)."""
    ent_R = e + r // G
    valid_R = (r < TQ * G) & (ent_R < hi)
    tok_R = tl.load(tokens_ptr + ent_R, mask=valid_R, other=0)
    return ent_R, valid_R, tok_R


@triton.jit
def split_step_tokens(tokens_ptr, e, hi, i, TQ: tl.constexpr):
    """The step's tokens once each (entries e + i, i < TQ; invalid past the step or the list's end
    hi), for the per-token quantities of the KL's steps."""
    valid_T = (i < TQ) & (e + i < hi)
    return valid_T, tl.load(tokens_ptr + e + i, mask=valid_T, other=0)


@triton.jit
def split_block_kv(k_ptr, v_ptr, b0, e0, h, stride_k_n, stride_k_h, stride_v_n, stride_v_h,
                   BS: tl.constexpr, D: tl.constexpr):
    """K and V [BS, D] of the key block starting at flat token b0 for KV head h (rows past the
    sequence end e0 read as 0), with the block's key positions, their validity and the dh range."""
    kpos = b0 + tl.arange(0, BS)
    kvalid = kpos < e0
    d = tl.arange(0, D)
    k = tl.load(k_ptr + kpos[:, None] * stride_k_n + h * stride_k_h + d[None, :], mask=kvalid[:, None], other=0.0)
    v = tl.load(v_ptr + kpos[:, None] * stride_v_n + h * stride_v_h + d[None, :], mask=kvalid[:, None], other=0.0)
    return k, v, kpos, kvalid, d
