"""Rows that each hold one document take plain causal SDPA (cuDNN/flash on a GPU) instead of a
document mask; the result must be the document-masked attention's, and packed rows must not take it.
Packed rows with `dense_impl = "varlen"` take flash attention over the documents (GPU; checked against
an fp32 reference in tests/model/test_gpu.py); on the CPU that is a clear error, not a fallback."""
import pytest
import torch

from model.attention import DenseMask, DocLayout, dense_attention


def test_one_document_per_row_is_plain_causal_and_exact():
    torch.manual_seed(0)
    B, T, Hq, Hkv, D = 3, 96, 8, 2, 16
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    layout = DocLayout.from_segments(torch.ones(B, T, dtype=torch.int32))
    fast = DenseMask(layout, "sdpa")
    assert fast.causal_only
    slow = DenseMask(layout, "sdpa")
    slow.causal_only = False  # the [T, T] document mask
    # an independent fp32 reference: explicit softmax over the causal keys of each group's KV head
    s = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(Hq // Hkv, 2)) / D ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v.repeat_interleave(Hq // Hkv, 2))
    torch.testing.assert_close(dense_attention(q, k, v, fast), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_attention(q, k, v, slow), ref, rtol=1e-5, atol=1e-5)


def test_packed_or_padded_rows_keep_the_document_mask():
    seg = torch.ones(2, 64, dtype=torch.int32)
    seg[0, 40:] = 2  # two documents in row 0
    assert not DenseMask(DocLayout.from_segments(seg), "sdpa").causal_only
    seg = torch.ones(2, 64, dtype=torch.int32)
    seg[1, 50:] = 0  # padding after the document is a run of its own
    assert not DenseMask(DocLayout.from_segments(seg), "sdpa").causal_only


def test_varlen_on_the_cpu_is_refused_for_packed_rows_only():
    seg = torch.ones(2, 64, dtype=torch.int32)
    seg[0, 40:] = 2
    q, k, v = torch.randn(2, 64, 4, 16), torch.randn(2, 64, 2, 16), torch.randn(2, 64, 2, 16)
    with pytest.raises(ValueError, match="dense_impl = 'varlen'.*CUDA tensors in bf16 or fp16"):
        dense_attention(q, k, v, DenseMask(DocLayout.from_segments(seg), "varlen"))
    # one document per row needs no document mask: the causal path, whatever the packed rows' impl
    one = DenseMask(DocLayout.from_segments(torch.ones(2, 64, dtype=torch.int32)), "varlen")
    torch.testing.assert_close(dense_attention(q, k, v, one),
                               dense_attention(q, k, v, DenseMask(DocLayout.from_segments(torch.ones(2, 64)), "sdpa")))
