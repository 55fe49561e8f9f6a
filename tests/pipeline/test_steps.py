"""The optimizer step: non-finite gradients never reach the weights, the index branch is clipped on
its own, and the parameter groups carry their learning rates (no Ray: the loop's own functions)."""
import math

import pytest
import torch

from model.presets import get_preset
from model.transformer import MultimodalTransformer
from pipeline.config import TrainConfig
from pipeline.loop import LoopState, TooManyBadSteps, apply_gradients
from pipeline.optim import build_optimizer, group_params, set_lr


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return MultimodalTransformer(get_preset("tiny"), img_patch_id=4)


def _fill_grads(model, value_backbone, value_index):
    index = set(model.index_parameter_names())
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, value_index if name in index else value_backbone)


def test_non_finite_gradients_skip_the_step_and_stop_after_max(model):
    opt = build_optimizer(model, TrainConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = LoopState()
    _fill_grads(model, float("nan"), 0.1)
    assert apply_gradients(opt, 1.0, 3, st, has_index=True) is None
    assert st.skipped_steps == 1 and st.bad_in_a_row == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights untouched
    assert all(p.grad is None for p in model.parameters())  # the bad gradients are dropped
    # a finite step in between resets the run of bad steps
    _fill_grads(model, 0.01, 0.01)
    assert apply_gradients(opt, 1.0, 3, st, has_index=True) is not None
    assert st.bad_in_a_row == 0 and st.skipped_steps == 1
    _fill_grads(model, 0.01, float("inf"))  # an infinite index gradient counts as well
    assert apply_gradients(opt, 1.0, 3, st, has_index=True) is None
    _fill_grads(model, float("nan"), 0.0)
    assert apply_gradients(opt, 1.0, 3, st, has_index=True) is None
    _fill_grads(model, float("nan"), 0.0)
    with pytest.raises(TooManyBadSteps, match="3 steps in a row"):
        apply_gradients(opt, 1.0, 3, st, has_index=True)


def test_index_branch_is_clipped_apart_from_the_backbone(model):
    opt = build_optimizer(model, TrainConfig())
    _fill_grads(model, 1.0, 100.0)
    n_backbone = sum(p.numel() for p in group_params(opt, {"backbone", "experts"}))
    n_index = sum(p.numel() for p in group_params(opt, {"index"}))
    norms = apply_gradients(opt, 1.0, 3, LoopState(), has_index=True)
    assert norms[0] == pytest.approx(math.sqrt(n_backbone), rel=1e-4)  # norms before clipping
    assert norms[1] == pytest.approx(100 * math.sqrt(n_index), rel=1e-4)


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
