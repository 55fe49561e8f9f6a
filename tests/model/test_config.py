"""Bad model configs fail at construction with a message naming the dotted field.

    pytest -q tests/model/test_config.py
"""
import dataclasses

import pytest

from model.config import ConfigError, ModelConfig, MoEConfig, MSAConfig
from model.presets import get_preset


def _tiny(**top):
    d = dataclasses.asdict(get_preset("tiny"))
    for k, v in top.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("over, field, words", [
    (dict(n_heads=5), "model.n_heads", "not divisible"),
    (dict(n_heads=6, n_kv_heads=2), "model.n_heads", "power-of-two group size"),
    (dict(head_dim=24, d_model=96), "model.head_dim", "power of two"),
    (dict(dense_impl="flash"), "model.dense_impl", "one of"),
    (dict(msa=dict(topk=33)), "model.msa.topk", "[1, 32]"),
    (dict(msa=dict(topk=0)), "model.msa.topk", "[1, 32]"),
    (dict(msa=dict(topk=8, block_size=256)), "model.msa.topk", "only 4 blocks"),
    (dict(msa=dict(block_size=48)), "model.msa.block_size", "power of two"),
    (dict(msa=dict(index_dim=24)), "model.msa.index_dim", "power of two"),
    (dict(msa=dict(index_dim=16)), "model.msa.index_dim", "rotary dims"),
    (dict(msa=dict(backend="cuda")), "model.msa.backend", "reference, triton"),
    (dict(msa=dict(n_dense_layers=4)), "model.msa.n_dense_layers", "no MSA layer"),
    (dict(msa=dict(kl_weight=-1.0)), "model.msa.kl_weight", ">= 0"),
    (dict(moe=dict(top_k=9)), "model.moe.top_k", "more than the n_experts"),
    (dict(moe=dict(n_experts=0)), "model.moe.n_experts", "positive integer"),
    (dict(moe=dict(dispatch="loop")), "model.moe.dispatch", "one of"),
    (dict(moe=dict(n_dense_layers=4)), "model.moe.n_dense_layers", "no MoE layer"),
    (dict(moe=dict(aux_weight=-0.1)), "model.moe.aux_weight", ">= 0"),
    (dict(msa=dict(index_lse="attention")), "model.msa.index_lse", "kl, select"),
    (dict(msa=dict(select_fp8=1)), "model.msa.select_fp8", "true or false"),
    (dict(msa=dict(select_fp8=True, budget="top_p")), "model.msa.select_fp8", "static budget"),
    (dict(msa=dict(select_fp8=True, index_lse="select")), "model.msa.select_fp8", "index_lse = 'kl'"),
    (dict(compile_ops="yes"), "model.compile_ops", "true or false"),
])
def test_bad_config_names_the_field(over, field, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**_tiny(**over))
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ") and words in str(e.value)


def test_dense_baseline_has_no_msa_shape_constraints():
    # a dense GQA model may use shapes the MSA kernels cannot (here: 3 heads per group)
    cfg = ModelConfig(**_tiny(n_heads=6, n_kv_heads=2, msa=dict(enabled=False)))
    assert cfg.msa_layers == []


def test_sub_configs_validate_alone():
    with pytest.raises(ConfigError, match=r"^model\.msa\.topk: "):
        MSAConfig(topk=64)
    with pytest.raises(ConfigError, match=r"^model\.moe\.top_k: "):
        MoEConfig(n_experts=2, top_k=3)


def test_run_config_overrides_reach_nested_fields():
    # the pipeline's loader: preset deep-merged with given keys, dotted --set overrides
    from pipeline.config import apply_overrides, config_from_dict

    data = apply_overrides({"data": {"shards": ["x"]}, "model": {"preset": "tiny", "msa": {"block_size": 64}}},
                           ["model.msa.topk=8", "model.moe.n_experts=4"])
    cfg = config_from_dict(data)
    assert (cfg.model.msa.block_size, cfg.model.msa.topk, cfg.model.moe.n_experts) == (64, 8, 4)
    assert cfg.model.msa.index_dim == get_preset("tiny").msa.index_dim  # the rest from the preset
    with pytest.raises(ConfigError) as e:
        config_from_dict(apply_overrides({"data": {"shards": ["x"]}, "model": {"preset": "tiny"}},
                                         ["model.msa.topk=99"]))
    assert e.value.field == "model.msa.topk"
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"shards": ["x"]}, "model": {"preset": "tiny", "msa": {"top_k": 4}}})
    assert e.value.field == "model.msa.top_k" and "unknown key" in str(e.value)
