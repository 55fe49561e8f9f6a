"""The oracle selector (evaluation only) against per-token brute force, and the model's oracle mode.

    pytest -q tests/model/test_oracle.py
"""
import math

import pytest
import torch

from model.attention import DocLayout
from model.oracle import oracle_select
from model.transformer import MultimodalTransformer
from model_helpers import build_batch, small_config


def _layout(lens, T):
    seg = torch.zeros(1, T, dtype=torch.int32)
    t = 0
    for i, L in enumerate(lens):
        seg[0, t:t + L] = i + 1
        t += L
    return DocLayout.from_segments(seg)


def _brute_selection(q, k, layout, bs, K):
    """Per (token, group): head-averaged softmax over the visible keys of the document, max per block,
    local block + the K-1 best earlier blocks, as sets (loops straight from the definition)."""
    N, Hq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    cu = layout.cu_seqlens.tolist()
    out = {}
    for s0, e0 in zip(cu[:-1], cu[1:]):
        for t in range(s0, e0):
            pos = t - s0
            for g in range(H):
                p = torch.zeros(pos + 1, dtype=torch.float64)
                for h in range(g * G, (g + 1) * G):
                    logits = torch.tensor([float(q[t, h].double() @ k[j, g].double()) / math.sqrt(D)
                                           for j in range(s0, t + 1)], dtype=torch.float64)
                    p += torch.softmax(logits, 0) / G
                local = pos // bs
                best = {b: max(p[j].item() for j in range(b * bs, min((b + 1) * bs, pos + 1))) for b in range(local)}
                ranked = sorted(best, key=lambda b: -best[b])[:K - 1]
                out[(t, g)] = set(ranked) | {local}
    return out


@pytest.mark.parametrize("lens,bs,K", [([70, 45], 16, 3), ([37], 16, 4), ([20, 20, 9], 8, 2), ([50], 16, 8)])
def test_oracle_selects_the_blocks_of_the_true_attention(lens, bs, K):
    T = sum(lens) + 5  # a padding run at the end: a document of its own
    layout = _layout(lens, T)
    Hq, H, D = 4, 2, 16
    g = torch.Generator().manual_seed(sum(lens) + K)
    # a scale that gives peaked attention, so blocks differ clearly in mass
    q = torch.randn(T, Hq, D, generator=g) * 2
    k = torch.randn(T, H, D, generator=g) * 2
    got = oracle_select(q, k, layout, bs, K)
    assert got.shape == (T, H, K) and got.dtype == torch.int32
    want = _brute_selection(q, k, layout, bs, K)
    pos = layout.pos_N
    for t in range(sum(lens)):
        for h in range(H):
            chosen = [int(x) for x in got[t, h]]
            valid = [x for x in chosen if x >= 0]
            n_visible = int(pos[t]) // bs + 1
            assert len(valid) == min(K, n_visible)
            assert chosen[len(valid):] == [-1] * (K - len(valid))  # padding only at the end
            assert valid[-1] == int(pos[t]) // bs  # the local block in the last valid slot
            assert set(valid) == want[(t, h)], (t, h)


def test_oracle_ignores_autocast_and_input_dtype():
    layout = _layout([96], 96)
    q = torch.randn(96, 4, 16)
    k = torch.randn(96, 2, 16)
    ref = oracle_select(q, k, layout, 16, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(oracle_select(q, k, layout, 16, 3), ref)


def test_oracle_mode_of_the_model():
    cfg = small_config(msa=dict(topk=3, block_size=16))
    model = MultimodalTransformer(cfg, img_patch_id=4).eval()
    batch = build_batch(cfg, [[120, 60], [200]], T=200, images_per_row=[1, 0])
    with torch.no_grad():
        model.set_mode("dense")
        dense = model(batch, return_logits=True)
        model.set_mode("oracle")
        out = model(batch, return_logits=True, compute_stats=True)
    assert "kl_index" not in out.losses  # the index branch does not run
    assert 0.3 < out.stats["sparsity"] < 1.0
    assert 0.0 < out.stats["score_recall"] <= 1.0 + 1e-6
    assert not torch.allclose(out.logits, dense.logits, atol=1e-4)  # it really is sparse

    # with a top-k that covers every block, the oracle attends to everything: dense output exactly
    full = small_config(msa=dict(topk=16, block_size=16))
    model_full = MultimodalTransformer(full, img_patch_id=4).eval()
    model_full.load_state_dict(model.state_dict())
    with torch.no_grad():
        model_full.set_mode("oracle")
        o = model_full(batch, return_logits=True)
    assert o.stats["sparsity"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(o.logits, dense.logits, atol=2e-4, rtol=1e-4)


def test_a_dense_model_cannot_run_the_oracle():
    model = MultimodalTransformer(small_config(msa=dict(enabled=False)), img_patch_id=4)
    with pytest.raises(ValueError, match="index branch"):
        model.set_mode("oracle")
