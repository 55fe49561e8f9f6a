"""Where the selection budget goes: the profile behind selection/blocks_per_token.json and
plots/budget.png, against counts worked out by hand.

    pytest -q tests/pipeline/test_plots.py
"""
import numpy as np

from pipeline.plots import blocks_profile, budget_plot


def test_blocks_profile_counts_by_position_and_overall(tmp_path):
    # 2 documents of 5 and 3 tokens, then 2 padding tokens; block size 2, 2 groups, 3 slots
    pos = np.array([0, 1, 2, 3, 4, 0, 1, 2, 0, 0])
    valid = np.array([True] * 8 + [False] * 2)
    idx = np.full((10, 2, 3), -1)
    counts = np.array([[1, 1], [1, 1], [2, 1], [2, 2], [3, 1], [1, 1], [1, 1], [2, 2], [3, 3], [3, 3]])
    for n in range(10):
        for g in range(2):
            idx[n, g, :counts[n, g]] = np.arange(counts[n, g])
    prof = blocks_profile({3: idx, 1: idx[:, :1]}, pos, valid, block_size=2)
    # layer 3: 16 real (token, group) pairs, ten with 1 block, five with 2, one with 3; padding
    # never counted. Layer 1 (group 0 only): 1,1,2,2,3,1,1,2
    assert prof["hist"] == {"1": 10 + 4, "2": 5 + 3, "3": 1 + 1}
    l3 = prof["by_layer"]["3"]
    assert l3["position_block"] == [0, 1, 2]
    # block 0: positions 0,1 of both documents -> all 1; block 1: positions 2,3 (doc 1) and 2 (doc 2):
    # means over groups 1.5, 2, 2 -> 11/6; block 2: position 4 -> (3 + 1) / 2
    np.testing.assert_allclose(l3["mean_blocks"], [1.0, round(11 / 6, 4), 2.0])
    assert list(prof["by_layer"]) == ["1", "3"]
    out = budget_plot(prof, 2, 3, tmp_path / "budget.png", "test")
    assert out.stat().st_size > 1000
