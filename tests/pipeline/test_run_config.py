"""Config loading: TOML + dotted overrides, errors that name the field."""
import pytest

from model.config import ConfigError
from pipeline.config import apply_overrides, config_from_dict, flatten, load_config

BASE = {"data": {"shards": ["x"]}, "model": {"preset": "tiny"}}


def test_repo_tiny_config_loads(tmp_path):
    cfg = load_config("configs/tiny.toml", ["train.max_steps=7", "model.n_layers=2", "name=abc"])
    assert cfg.train.max_steps == 7 and cfg.model.n_layers == 2 and cfg.name == "abc"
    assert cfg.model.d_model == 128  # from the preset
    assert cfg.data.shards[0].startswith("/")  # resolved to an absolute path


@pytest.mark.parametrize("override, field, words", [
    ("train.lr=-1", "train.lr", "positive"),
    ("train.max_steps=0", "train.max_steps", "at least 1"),
    ("train.max_stepz=3", "train.max_stepz", "unknown key"),
    ("model.n_heads=5", "model.n_heads", "not divisible"),
    ("model.patch_size=5", "model.image_size", "not a multiple"),
    ("train.batch_size=\"four\"", "train.batch_size", "integer"),
    ("train.dtype=fp8", "train.dtype", "float32"),
    ("model.preset=huge", "model.preset", "unknown preset"),
    ("data.weights=[1.0, 2.0]", "data.weights", "2 weights for 1"),
    ("data.seq_len=4096", "data.seq_len", "exceeds model.max_seq_len"),
    ("model.msa.budget=\"topk\"", "model.msa.budget", "static, ratio, top_p"),
    ("model.msa.budget=\"top_p\"\nmodel.msa.budget_p=0", "model.msa.budget_p", "(0, 1]"),
    ("debug.profile_steps=[5, 5]", "debug.profile_steps", "0 <= first < last"),
    ("debug.profile_steps=[2]", "debug.profile_steps", "[first, last]"),
    ("debug.profile_steps=[2, 9999]", "debug.profile_steps", "after train.max_steps"),
])
def test_bad_values_fail_naming_the_field(override, field, words):
    data = apply_overrides({k: dict(v) for k, v in BASE.items()}, override.split("\n"))
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value).startswith(field + ":"), str(e.value)
    assert words in str(e.value)


def test_missing_shards_is_an_error():
    with pytest.raises(ConfigError, match="^data.shards"):
        config_from_dict({"model": {"preset": "tiny"}})


def test_override_values_are_parsed_as_toml():
    d = apply_overrides({}, ["a.b=3", "a.c=0.5", "a.d=true", "a.e=word", "a.f=[1, 2]", 'a.g="q=1"'])
    assert d == {"a": {"b": 3, "c": 0.5, "d": True, "e": "word", "f": [1, 2], "g": "q=1"}}


def test_malformed_override_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["justakey"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_flatten_covers_every_field():
    cfg = config_from_dict({k: dict(v) for k, v in BASE.items()})
    flat = flatten(cfg)
    assert flat["model.d_model"] == 128 and flat["train.lr"] == cfg.train.lr and flat["data.shards"] == ["x"]
    assert all("." in k or k in ("name", "output_dir") for k in flat)


@pytest.mark.parametrize("override, field", [
    (["model.msa.budget=\"ratio\"", "model.msa.budget_ratio=1.5"], "model.msa.budget_ratio"),
    (["model.msa.budget=\"ratio\"", "model.msa.budget_k_min=9"], "model.msa.budget_k_min"),
])
def test_budget_fields_are_checked_for_their_budget(override, field):
    data = apply_overrides({k: dict(v) for k, v in BASE.items()}, override)
    with pytest.raises(ConfigError, match="^" + field):
        config_from_dict(data)


@pytest.mark.parametrize("override, words", [
    (["ray.ddp_grad_dtype=\"fp16\""], "'fp32' or 'bf16'"),
    (["ray.ddp_bucket_mb=0"], "positive number of MiB"),
    (["ray.fsdp_param_dtype=\"fp16\""], "'fp32' or 'bf16'"),
    (["ray.fsdp_prefetch=-1"], "whole number of units >= 0"),
    (["ray.fsdp_unit_blocks=0"], "whole number of blocks >= 1"),
])
def test_ddp_settings_are_checked(override, words):
    data = apply_overrides({k: dict(v) for k, v in BASE.items()}, override)
    with pytest.raises(ConfigError, match="^" + override[0].split("=")[0]) as e:
        config_from_dict(data)
    assert words in str(e.value)


def test_fsdp_bf16_weights_need_autocast():
    data = apply_overrides({k: dict(v) for k, v in BASE.items()},
                           ["ray.parallel=\"fsdp\"", "ray.fsdp_param_dtype=\"bf16\""])
    with pytest.raises(ConfigError, match="^ray.fsdp_param_dtype.*train.dtype = 'bfloat16'"):
        config_from_dict(data)
    data.setdefault("train", {})["dtype"] = "bfloat16"
    assert config_from_dict(data).ray.fsdp_param_dtype == "bf16"


def test_varlen_dense_attention_needs_a_gpu_and_bf16():
    data = apply_overrides({k: dict(v) for k, v in BASE.items()}, ["model.dense_impl=\"varlen\""])
    with pytest.raises(ConfigError, match="^model.dense_impl.*ray.use_gpu = true.*train.dtype = 'bfloat16'"):
        config_from_dict(data)
    data = apply_overrides(data, ["ray.use_gpu=true", "train.dtype=\"bfloat16\""])
    assert config_from_dict(data).model.dense_impl == "varlen"
    data = apply_overrides(data, ["train.dtype=\"float32\""])
    with pytest.raises(ConfigError, match="^model.dense_impl"):
        config_from_dict(data)


def test_params_log_only_the_budget_fields_that_apply():
    from pipeline.config import resolved_params

    static = resolved_params(config_from_dict({k: dict(v) for k, v in BASE.items()}))
    assert static["model.msa.budget"] == "static" and not any(k.startswith("model.msa.budget_") for k in static)
    data = apply_overrides({k: dict(v) for k, v in BASE.items()}, ["model.msa.budget=\"top_p\""])
    top_p = resolved_params(config_from_dict(data))
    assert {k for k in top_p if k.startswith("model.msa.budget_")} == {"model.msa.budget_p", "model.msa.budget_k_min",
                                                                        "model.msa.budget_match_topk"}


@pytest.mark.parametrize("override, message", [
    (["model.msa.budget_match_topk=2"], "adaptive budget"),  # static top-k has nothing to adjust
    (["model.msa.budget=\"top_p\"", "model.msa.budget_match_topk=99"], r"\[0, topk="),
    (["model.msa.budget=\"ratio\"", "model.msa.budget_match_topk=1.5"], "integer"),
])
def test_budget_match_is_checked(override, message):
    data = apply_overrides({k: dict(v) for k, v in BASE.items()}, override)
    with pytest.raises(ConfigError, match="^model.msa.budget_match_topk.*" + message):
        config_from_dict(data)
