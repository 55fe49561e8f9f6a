"""The KL on sampled query tokens inside the MSA layer (model.msa.kl_sample, warmup_kl_sample): an
unbiased estimate of the exact KL in both phases, gradients into the index branch only, and the
attention output untouched."""
import pytest
import torch

from model.attention import AttnContext, DenseMask, DocLayout
from model.layers import rope_cos_sin
from model.msa import MSAAttention
from model_helpers import build_batch, small_config


def _layer_and_ctx(mode, **msa):
    cfg = small_config(msa=dict(block_size=16, topk=2, **msa), max_seq_len=128)
    batch = build_batch(cfg, [[50, 78], [128]], 128)
    layout = DocLayout.from_segments(batch.segment_ids_BT)
    ctx = AttnContext(layout=layout, mask=DenseMask(layout, cfg.dense_impl),
                      rope=rope_cos_sin(batch.positions_BT, cfg.effective_rope_dim, cfg.rope_theta),
                      mode=mode, compute_stats=False)
    torch.manual_seed(0)
    layer = MSAAttention(cfg)
    x = torch.randn(2, 128, cfg.d_model)
    return layer, x, ctx


@pytest.mark.parametrize("mode, field", [("sparse", "kl_sample"), ("warmup", "warmup_kl_sample")])
def test_sampled_kl_is_an_unbiased_estimate_and_leaves_the_output(mode, field):
    layer, x, ctx = _layer_and_ctx(mode)
    with torch.no_grad():
        o_exact, extras = layer(x, ctx)
    exact = float(extras["kl"])
    layer.cfg.msa.__dict__[field] = 0.25  # the same weights, sampled KL
    draws = []
    with torch.no_grad():
        for seed in range(100):
            torch.manual_seed(seed)
            o, extras = layer(x, ctx)
            draws.append(float(extras["kl"]))
    torch.testing.assert_close(o, o_exact)  # only the KL is sampled, never the attention
    draws = torch.tensor(draws)
    assert draws.std() > 0  # it really samples
    assert abs(draws.mean() - exact) < 4 * draws.std() / 100 ** 0.5, (float(draws.mean()), exact)


@pytest.mark.parametrize("mode, field", [("sparse", "kl_sample"), ("warmup", "warmup_kl_sample")])
def test_sampled_kl_trains_only_the_index_branch(mode, field):
    layer, x, ctx = _layer_and_ctx(mode, **{field: 0.5})
    torch.manual_seed(1)
    _, extras = layer(x.requires_grad_(), ctx)
    extras["kl"].backward()
    grads = {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("index_") for n in grads), grads
    assert x.grad is None or x.grad.abs().sum() == 0  # the index branch's input is detached


def test_fractions_are_validated():
    from model.config import ConfigError

    with pytest.raises(ConfigError, match="model.msa.kl_sample"):
        small_config(msa=dict(kl_sample=0.0))
    with pytest.raises(ConfigError, match="model.msa.warmup_kl_sample"):
        small_config(msa=dict(warmup_kl_sample=1.5))
