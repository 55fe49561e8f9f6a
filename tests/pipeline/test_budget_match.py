"""Equal compute with static top-k for an adaptive budget (model.msa.budget_match_topk): the
controller of pipeline/schedule.py on the `ratio` budget's exact count function. Its run on the real
model (top_p, whose counts follow the index branch) is in tests/model/test_msa.py."""
import math

import numpy as np
import pytest
import torch

from kernels.select.budget import ratio_counts
from pipeline.schedule import BudgetMatch


def _positions(seed: int = 0) -> torch.Tensor:
    """Token positions of rows packed with document pieces of many lengths (positions restart at 0)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 8192, size=300)
    return torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))


@pytest.mark.parametrize("start", [0.9, 0.01])
def test_ratio_reaches_static_top_k_compute_on_the_same_tokens(start):
    block, k_static, k_max, k_min = 64, 16, 32, 2
    visible = _positions() // block + 1
    target = float(torch.clamp(visible, max=k_static).float().mean())
    match = BudgetMatch("ratio", start)
    for _ in range(8):
        measured = float(ratio_counts(visible, k_min, k_max, match.param).float().mean())
        match.update(measured, target)
    measured = float(ratio_counts(visible, k_min, k_max, match.param).float().mean())
    assert abs(measured / target - 1) < 0.02, (match.param, measured, target)


def test_steps_are_bounded_and_bad_measurements_change_nothing():
    match = BudgetMatch("top_p", 0.5)
    match.update(measured=100.0, target=1.0)  # far too many blocks: p must fall, by at most 1 in logit
    assert 1 / (1 + math.exp(1.0)) - 1e-9 <= match.param < 0.5
    for measured in (0.0, float("nan"), float("inf")):
        before = match.to_json()
        assert match.update(measured, 4.0) == before["param"] and match.to_json() == before
    ratio = BudgetMatch("ratio", 0.5)
    assert ratio.update(measured=1.0, target=100.0) == pytest.approx(min(1.0, 0.5 * math.e))
    assert BudgetMatch("top_p", 1.0).update(4.0, 4.0) < 1.0  # p = 1 is a legal start, kept inside (0, 1)


def test_the_state_survives_a_checkpoint():
    match = BudgetMatch("top_p", 0.8)
    match.update(5.0, 4.0)
    match.update(4.5, 4.0)  # now with a slope estimated from two windows
    back = BudgetMatch.from_json(match.to_json())
    assert back == match
    assert back.update(4.2, 4.0) == match.update(4.2, 4.0)
