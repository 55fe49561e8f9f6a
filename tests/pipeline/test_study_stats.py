"""The study's statistics: summaries over seeds, paired differences and their t-intervals.

    pytest -q tests/pipeline/test_study_stats.py
"""
import math

import pytest

from pipeline.study_stats import paired_difference, summarize, t_quantile, verdict


@pytest.mark.parametrize("df,q", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


def test_summarize_uses_the_sample_std_and_skips_missing_values():
    s = summarize([1.0, 2.0, 4.0, float("nan"), None])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert summarize([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert summarize([]) == {"mean": None, "std": None, "n": 0}


def test_paired_difference_pairs_by_seed():
    arm = {0: 3.0, 1: 5.0, 2: 9.0, 7: 100.0}  # seed 7 has no baseline: not paired
    base = {0: 2.0, 1: 3.0, 2: 6.0, 3: 1.0}
    d = paired_difference(arm, base)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3
    assert d["diff_mean"] == pytest.approx(2.0) and d["diff_std"] == pytest.approx(1.0)
    half = 4.302653 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-5)
    assert verdict(d, lower_is_better=True) == "within noise"


def test_pairing_removes_shared_seed_noise():
    # the seeds differ a lot, the arm is always 0.1 above: unpaired this would be noise, paired it is not
    base = {0: 1.0, 1: 5.0, 2: 9.0}
    arm = {s: v + 0.1 + 0.01 * s for s, v in base.items()}
    d = paired_difference(arm, base)
    assert d["ci95"][0] > 0.05
    assert verdict(d, lower_is_better=True) == "worse"
    assert verdict(d, lower_is_better=False) == "better"


def test_one_pair_gives_no_interval():
    d = paired_difference({0: 2.0, 1: float("nan")}, {0: 1.5, 1: 1.0})
    assert d["n"] == 1 and d["diff_mean"] == pytest.approx(0.5)
    assert d["ci95"] is None and "undefined" in d["note"]
    assert verdict(d, lower_is_better=True) == "undefined"
    none = paired_difference({1: 1.0}, {0: 1.0})
    assert none["n"] == 0 and none["diff_mean"] is None and none["ci95"] is None
