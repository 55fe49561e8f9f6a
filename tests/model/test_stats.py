"""Sparsity and recall against brute-force definitions (model/README.md).

    pytest -q tests/model/test_stats.py
"""
import math

import pytest
import torch

from model import fused, stats
from model.attention import DocLayout


def _segments(lens, T):
    seg = torch.zeros(1, T, dtype=torch.int32)
    t = 0
    for i, L in enumerate(lens):
        seg[0, t:t + L] = i + 1
        t += L
    return seg


def _layout(lens, T):
    return DocLayout.from_segments(_segments(lens, T))


def _random_selection(layout, H, K, bs, g):
    """A valid selection: local block in the last valid slot, other visible blocks at random, -1 padding."""
    N = layout.pos_N.numel()
    b = torch.full((N, H, K), -1, dtype=torch.int32)
    for n in range(N):
        local = int(layout.pos_N[n]) // bs
        for h in range(H):
            others = torch.randperm(local, generator=g)[:K - 1].tolist() if local else []
            sel = others + [local]
            b[n, h, :len(sel)] = torch.tensor(sel, dtype=torch.int32)
    return b


def _brute(q, k, b, layout, bs):
    """Per (token, group) loops straight from the definitions."""
    N, Hq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    cu = layout.cu_seqlens.tolist()
    sp, sr, br, nb, n = 0.0, 0.0, 0.0, 0, 0
    for s0, e0 in zip(cu[:-1], cu[1:]):
        if not bool(layout.valid_N[s0]):
            continue
        for t in range(s0, e0):
            pos = t - s0
            keys = list(range(s0, t + 1))
            for h in range(H):
                chosen = [int(x) for x in b[t, h] if x >= 0]
                inside = [j for j in keys if (j - s0) // bs in chosen]
                sp += 1 - len(inside) / (pos + 1)
                nb += len(chosen)
                p = torch.zeros(len(keys))
                for gi in range(G):
                    s = torch.stack([q[t, h * G + gi] @ k[j, h] for j in keys]) / math.sqrt(D)
                    p += torch.softmax(s, 0) / G
                sr += float(sum(p[j - s0] for j in inside))
                mass = {}
                for j in keys:
                    mass[(j - s0) // bs] = mass.get((j - s0) // bs, 0.0) + float(p[j - s0])
                top = sorted(mass, key=lambda m: -mass[m])[:len(chosen)]
                br += len(set(top) & set(chosen)) / len(chosen)
                n += 1
    return sp / n, sr / n, br / n, nb / n


@pytest.mark.parametrize("device", [
    "cpu",
    # on CUDA the sparsity and blocks per token are one compiled kernel (model/fused.py)
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="the compiled form runs on CUDA only")]),
])
def test_against_brute_force(device, monkeypatch):
    monkeypatch.setattr(fused, "_enabled", True)
    g = torch.Generator().manual_seed(0)
    bs, K, H, G, D = 16, 3, 2, 2, 8
    lens, T = [70, 40], 120  # 10 tokens of padding at the end
    lay = _layout(lens, T)
    q = torch.randn(T, H * G, D, generator=g)
    k = torch.randn(T, H, D, generator=g)
    b = _random_selection(lay, H, K, bs, g)
    sp, sr, br, nb = _brute(q, k, b, lay, bs)
    on = _layout(lens, T) if device == "cpu" else DocLayout.from_segments(_segments(lens, T).to(device))
    sparsity, blocks = stats.selection_means(b[None].to(device), on, bs)
    assert sparsity.device.type == device
    torch.testing.assert_close(sparsity.cpu(), torch.tensor(sp), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocks.cpu(), torch.tensor(nb, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert 1 < float(blocks) < K  # the documents' first blocks select fewer than K
    score_recall, block_recall = stats.recalls(q, k, b, lay, bs)
    torch.testing.assert_close(score_recall, torch.tensor(sr), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_recall, torch.tensor(br), atol=1e-5, rtol=1e-5)


def test_full_selection_recalls_one_sparsity_zero():
    bs, H = 16, 2
    lay = _layout([64], 64)
    b = torch.full((64, H, 4), -1, dtype=torch.int32)
    for n in range(64):
        local = n // bs
        b[n, :, :local + 1] = torch.arange(local + 1, dtype=torch.int32)
    q, k = torch.randn(64, 4, 8), torch.randn(64, H, 8)
    sparsity, blocks = stats.selection_means(b, lay, bs)
    assert float(sparsity) == 0.0 and float(blocks) == (1 + 2 + 3 + 4) / 4
    sr, br = stats.recalls(q, k, b, lay, bs)
    assert abs(float(sr) - 1) < 1e-5 and float(br) == 1.0
