"""Document layout and dense attention: documents never see each other, both dense implementations agree.

    pytest -q tests/model/test_attention.py
"""
import pytest
import torch

from model.attention import DocLayout, GQAAttention
from model.msa import MSAAttention
from model_helpers import attn_context, build_batch, small_config


def test_layout_from_segments():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 2]], dtype=torch.int32)
    lay = DocLayout.from_segments(seg)
    assert lay.cu_seqlens.tolist() == [0, 3, 5, 7, 14, 16, 20, 21]
    assert lay.cu_seqlens.dtype == torch.int32
    assert lay.pos_N.tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2, 3, 0]
    assert lay.seq_valid_S.tolist() == [True, True, False, True, False, True, True]
    assert lay.valid_N.sum() == 21 - 4


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_sdpa_and_flex_agree():
    cfg = small_config()
    batch = build_batch(cfg, [[40, 60, 20], [128]], 128)
    layer = GQAAttention(cfg)
    x = torch.randn(2, 128, cfg.d_model)
    with torch.no_grad():  # FlexAttention has no CPU backward; on CPU it is only this cross-check
        o_sdpa, _ = layer(x, attn_context(cfg, batch, impl="sdpa"))
        o_flex, _ = layer(x, attn_context(cfg, batch, impl="flex"))
    torch.testing.assert_close(o_flex, o_sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_documents_do_not_see_each_other(mode):
    cfg = small_config()
    batch = build_batch(cfg, [[40, 60, 20], [128]], 128)
    layer = MSAAttention(cfg)
    x = torch.randn(2, 128, cfg.d_model)
    o, _ = layer(x, attn_context(cfg, batch, mode))
    x2 = x.clone()
    x2[0, :40] = torch.randn(40, cfg.d_model)  # change the first document of row 0
    o2, _ = layer(x2, attn_context(cfg, batch, mode))
    torch.testing.assert_close(o2[0, 40:], o[0, 40:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(o2[0, :40], o[0, :40])


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_packed_equals_each_document_alone(mode):
    # blocks are counted from each document's start: packing must not change what a document sees
    cfg = small_config()
    lens = [37, 70, 21]
    batch = build_batch(cfg, [lens], 128)
    layer = MSAAttention(cfg)
    x = torch.randn(1, 128, cfg.d_model)
    o, _ = layer(x, attn_context(cfg, batch, mode))
    start = 0
    for L in lens:
        alone = build_batch(cfg, [[L]], L)
        o_alone, _ = layer(x[:, start:start + L], attn_context(cfg, alone, mode))
        torch.testing.assert_close(o[:, start:start + L], o_alone, atol=1e-5, rtol=1e-5)
        start += L
