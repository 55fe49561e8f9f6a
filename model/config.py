"""Model configuration: one typed dataclass, validated at construction.

Errors name the offending field (`model.n_heads: ...`) so that a bad TOML or `--set` fails at start-up,
not inside a training step.
"""
from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the dotted field name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4  # query heads (Hq)
    n_kv_heads: int = 2  # KV heads (Hkv); GQA group size G = n_heads / n_kv_heads
    head_dim: int = 32
    rope_dim: int = 0  # rotary dims per head (partial RoPE); 0 means head_dim
    rope_theta: float = 10000.0
    ffn_hidden: int = 384
    max_seq_len: int = 1024
    image_size: int = 32  # images are resized to image_size x image_size
    patch_size: int = 8
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        """Tokens one image takes in the sequence: begin + patches + end."""
        return self.n_patches + 2

    @property
    def effective_rope_dim(self) -> int:
        return self.rope_dim or self.head_dim

    def validate(self, prefix: str = "model") -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{prefix}.{field}", msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
                     "max_seq_len", "image_size", "patch_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        need(self.n_heads % self.n_kv_heads == 0, "n_heads",
             f"{self.n_heads} query heads are not divisible by n_kv_heads={self.n_kv_heads}")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        need(0 <= self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0, "rope_dim",
             f"must be even and in [0, head_dim={self.head_dim}], got {self.rope_dim}")
        need(self.image_size % self.patch_size == 0, "image_size",
             f"{self.image_size} is not a multiple of patch_size={self.patch_size}")
        need(self.image_tokens <= self.max_seq_len, "image_size",
             f"one image takes {self.image_tokens} tokens, more than max_seq_len={self.max_seq_len}")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
