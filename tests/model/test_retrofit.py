"""Retrofit: a dense checkpoint loads into an MSA model of the same shape with fresh index
projections, computes what the dense model computes, and trains on (warm-up, then sparse).

    pytest -q tests/model/test_retrofit.py
"""
import pytest
import torch

from model.retrofit import load_dense_checkpoint
from model.transformer import MultimodalTransformer
from model_helpers import IMG_PATCH, build_batch, small_config


def _train(model, batch, steps, lr=3e-3):
    groups = model.param_groups()
    opt = torch.optim.AdamW([{"params": groups["backbone"] + groups["experts"], "lr": lr},
                             {"params": groups["index"], "lr": 1e-2}])
    w = model.loss_weights()
    hist = []
    for _ in range(steps):
        out = model(batch)
        loss = sum(w[k] * v for k, v in out.losses.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append({k: float(v.detach()) for k, v in out.losses.items()})
    return hist


def test_retrofit_loads_dense_checkpoint_and_trains_on():
    dense_cfg = small_config(msa=dict(enabled=False))
    msa_cfg = small_config()
    batch = build_batch(msa_cfg, [[60, 68], [128]], 128, images_per_row=[1, 0])
    torch.manual_seed(1)
    dense = MultimodalTransformer(dense_cfg, IMG_PATCH)
    _train(dense, batch, 3)  # a "finished" dense model
    state = {f"module.{k}": v for k, v in dense.state_dict().items()}  # as saved from DDP

    torch.manual_seed(2)
    model = MultimodalTransformer(msa_cfg, IMG_PATCH)
    fresh = load_dense_checkpoint(model, state)
    assert fresh == sorted(model.index_parameter_names()) and len(fresh) == 4 * len(msa_cfg.msa_layers)
    assert model.mode == "warmup"
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)

    with torch.no_grad():  # the retrofitted model in dense mode is the dense model
        model.set_mode("dense")
        torch.testing.assert_close(model(batch).losses["lm"], dense(batch).losses["lm"])
        model.set_mode("warmup")

    warm = _train(model, batch, 5)  # warm-up: dense attention, the index branch learns from the KL
    assert warm[-1]["kl_index"] < warm[0]["kl_index"]
    model.set_mode("sparse")
    sparse = _train(model, batch, 5)
    assert sparse[-1]["lm"] < sparse[0]["lm"]


@pytest.mark.parametrize("change, words", [
    (dict(d_model=96), "checkpoint shape"),
    (dict(moe=dict(n_experts=8)), "checkpoint shape"),
    (dict(n_layers=4), "tensors the MSA model does not have"),
    (dict(moe=dict(enabled=False)), "tensors"),
])
def test_retrofit_refuses_other_architectures(change, words):
    msa = dict(enabled=False)
    other = MultimodalTransformer(small_config(msa=msa, **change), IMG_PATCH)
    model = MultimodalTransformer(small_config(), IMG_PATCH)
    with pytest.raises(ValueError, match=words):
        load_dense_checkpoint(model, other.state_dict())


def test_retrofit_needs_an_index_branch():
    dense = MultimodalTransformer(small_config(msa=dict(enabled=False)), IMG_PATCH)
    with pytest.raises(ValueError, match="no index branch"):
        load_dense_checkpoint(dense, dense.state_dict())
