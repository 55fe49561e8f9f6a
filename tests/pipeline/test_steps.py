"""The optimizer step: non-finite gradients never reach the weights, the index branch is clipped on
its own, and the parameter groups carry their learning rates (no Ray: the loop's own functions)."""
import math

import pytest
import torch

from model.presets import get_preset
from model.transformer import MultimodalTransformer
from pipeline.config import TrainConfig
from pipeline.loop import LoopState, TooManyBadSteps, apply_gradients, check_bad_steps, record_bad_step
from pipeline.metrics import Window, reduce_window
from pipeline.optim import build_optimizer, group_params, set_lr


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return MultimodalTransformer(get_preset("tiny"), img_patch_id=4)


def _fill_grads(model, value_backbone, value_index):
    index = set(model.index_parameter_names())
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, value_index if name in index else value_backbone)


def _step(opt, model, st, backbone, index):
    """One apply_gradients on gradients filled with these values; True if the step was taken."""
    _fill_grads(model, backbone, index)
    ok = apply_gradients(opt, 1.0, has_index=True)[2]
    record_bad_step(st, ok)
    return bool(ok)


def test_non_finite_gradients_skip_the_step_and_stop_after_max(model):
    opt = build_optimizer(model, TrainConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = LoopState()
    assert not _step(opt, model, st, float("nan"), 0.1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights untouched
    # nor the step count: the next real step is AdamW's first (its bias correction)
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    check_bad_steps(st, 3)
    assert st.skipped_steps == 1 and st.bad_in_a_row == 1
    # a finite step in between resets the run of bad steps, and it changes the weights
    assert _step(opt, model, st, 0.01, 0.01)
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    after_good = {n: p.detach().clone() for n, p in model.named_parameters()}
    check_bad_steps(st, 3)
    assert st.bad_in_a_row == 0 and st.skipped_steps == 1
    # two bad steps, then a check: a run of two is below the limit of three
    assert not _step(opt, model, st, 0.01, float("inf"))  # an infinite index gradient counts as well
    assert not _step(opt, model, st, float("nan"), 0.0)
    check_bad_steps(st, 3)
    assert st.bad_in_a_row == 2 and st.skipped_steps == 3
    assert all(torch.equal(p, after_good[n]) for n, p in model.named_parameters())
    # the run continues across the check: the third in a row stops the run at the next check
    assert not _step(opt, model, st, float("nan"), 0.0)
    with pytest.raises(TooManyBadSteps, match="3 steps in a row"):
        check_bad_steps(st, 3)


def test_an_optimizer_without_a_device_side_skip_is_refused(model):
    opt = torch.optim.AdamW(build_optimizer(model, TrainConfig()).param_groups, foreach=True)
    _fill_grads(model, 0.01, 0.01)
    with pytest.raises(ValueError, match="fused AdamW"):
        apply_gradients(opt, 1.0, has_index=True)


def test_a_run_of_bad_steps_between_two_checks_is_seen(model):
    """A run of bad steps that ended before the logging step still stops the run (the longest run
    since the last check is kept on the device, not only the current one)."""
    opt = build_optimizer(model, TrainConfig())
    st = LoopState()
    for _ in range(3):
        assert not _step(opt, model, st, float("nan"), 0.0)
    assert _step(opt, model, st, 0.01, 0.01)
    with pytest.raises(TooManyBadSteps, match="3 steps in a row"):
        check_bad_steps(st, 3)
    assert st.bad_in_a_row == 0 and st.skipped_steps == 3


def test_skipped_steps_stay_out_of_the_window_means():
    win = Window()
    steps = [({"train/lm_loss": 1.0, "train/grad_norm": 0.5}, True),
             ({"train/lm_loss": float("nan"), "train/grad_norm": float("inf")}, False),
             ({"train/lm_loss": 3.0, "train/grad_norm": 1.5, "train/score_recall": 0.25}, True),  # a stats step
             ({"train/lm_loss": 5.0, "train/grad_norm": 2.5}, True)]
    for values, keep in steps:
        win.add_step({k: torch.tensor(v, dtype=torch.bfloat16 if k == "train/grad_norm" else torch.float32)
                      for k, v in values.items()}, torch.tensor(keep))
    keys = ["train/grad_norm", "train/lm_loss", "train/score_recall"]
    assert sorted(win.totals()[0]) == keys
    m = reduce_window(win, torch.device("cpu"), keys, [])
    assert m["train/lm_loss"] == pytest.approx(3.0)  # (1 + 3 + 5) / 3
    assert m["train/grad_norm"] == pytest.approx(1.5)
    assert m["train/score_recall"] == pytest.approx(0.25)  # only where it was added


def test_index_branch_is_clipped_apart_from_the_backbone(model):
    opt = build_optimizer(model, TrainConfig())
    _fill_grads(model, 1.0, 100.0)
    n_backbone = sum(p.numel() for p in group_params(opt, {"backbone", "experts"}))
    n_index = sum(p.numel() for p in group_params(opt, {"index"}))
    grad_norm, index_norm, ok = apply_gradients(opt, 1.0, has_index=True)
    assert bool(ok)
    assert float(grad_norm) == pytest.approx(math.sqrt(n_backbone), rel=1e-4)  # norms before clipping
    assert float(index_norm) == pytest.approx(100 * math.sqrt(n_index), rel=1e-4)


def test_groups_get_their_learning_rates(model):
    cfg = TrainConfig(lr=1e-3, index_lr=5e-3, expert_lr_scale=0.5)
    opt = build_optimizer(model, cfg)
    set_lr(opt, 1e-3)
    lrs = {g["group"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": 1e-3, "experts": 5e-4, "index": 5e-3}
    set_lr(opt, 1e-3, frozenset({"backbone", "experts"}))  # a retrofit's warm-up
    assert {g["group"]: g["lr"] for g in opt.param_groups} == {"backbone": 0.0, "experts": 0.0, "index": 5e-3}
    # every trainable parameter is in exactly one group
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
