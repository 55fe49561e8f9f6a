"""Named model shapes. `tiny` runs the CPU demo and the tests."""
from __future__ import annotations

from model.config import ModelConfig


def _tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
        ffn_hidden=384, max_seq_len=1024, image_size=32, patch_size=8,
    )


PRESETS = {"tiny": _tiny}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
