"""Model configuration: typed dataclasses (`ModelConfig` with nested `MSAConfig` and `MoEConfig`),
validated at construction.

Errors name the offending dotted field (`model.msa.topk: ...`) so that a bad TOML or `--set` fails at
start-up, not inside a training step. The defaults are the `tiny` preset's values.

    python -c "from model.config import ModelConfig; print(ModelConfig())"
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kernels.select.budget import BUDGETS, Budget
from model.tokens import image_patches, image_tokens  # noqa: F401 (part of this module's API)

ATTENTION_MODES = ("dense", "warmup", "sparse", "oracle")  # of the MSA layers, see model/README.md (run modes:
#                                                            pipeline/config.py); "oracle": evaluation only (model/oracle.py)
INDEX_LSE_AT = ("kl", "select")  # where the sparse KL's student log-sum-exp is computed (msa.index_lse)
MSA_BACKENDS = ("reference", "triton")  # kernels' backends; chosen explicitly, never by fallback
DENSE_IMPLS = ("sdpa", "flex", "varlen")  # how full (document-causal) attention is computed
MOE_DISPATCH = ("bmm", "grouped_mm")


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the dotted field name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _need(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(field, msg)


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _pow2(v: int) -> bool:
    return _pos_int(v) and v & (v - 1) == 0


@dataclass
class MSAConfig:
    """MiniMax Sparse Attention layers (docs/msa.md). `enabled=false` is the dense GQA baseline."""

    enabled: bool = True  # layers >= n_dense_layers get an index branch and can run sparse
    n_dense_layers: int = 1  # the first layers always use full attention (paper: 3)
    block_size: int = 32  # keys per block, B (paper: 128)
    topk: int = 4  # blocks per (token, group), local block included, k (paper: 16); k_max of an adaptive budget
    # How many blocks each (token, group) attends to (kernels/select/budget.py, model/README.md):
    # "static" top-k; "ratio": clamp(ceil(budget_ratio * visible blocks), budget_k_min, topk);
    # "top_p": the fewest blocks (local included) whose index-branch block probability reaches budget_p
    budget: str = "static"
    budget_k_min: int = 1  # ratio, top_p: at least this many blocks (fewer only where fewer are visible)
    budget_ratio: float = 0.25  # ratio: the fraction of the visible blocks
    budget_p: float = 0.9  # top_p: the probability mass to cover
    # Equal compute with static top-k (0: off): during training the adaptive budget's free parameter
    # (budget_ratio or budget_p, whose config value is the starting point) is adjusted after every
    # logged window so that the mean blocks per (token, group) matches what static top-k selects on
    # the same tokens (pipeline/schedule.py, budget_param_step); the value in use is logged and
    # checkpointed. What the study's budget arms use to compare quality at the same attention work.
    budget_match_topk: int = 0
    index_dim: int = 32  # dI (paper: 128)
    kl_weight: float = 1.0  # lambda; the index branch is isolated, so this only rescales its gradient
    # The KL on a random sample of query tokens (each kept with this probability; the loss is divided
    # by it): an unbiased estimate of the KL and of its gradient into the index projections, at that
    # fraction of the cost. 1.0 is the exact KL. Sparse phase, and the (dense-support) warm-up.
    kl_sample: float = 1.0
    warmup_kl_sample: float = 1.0
    # Where the sparse KL's student log-sum-exp (over each token's selected keys) is computed, a
    # question of speed only (the same value either way): "kl", in the KL for the tokens it covers
    # (with kl_sample < 1, a fraction of them), which spares the selection's scan one exp2 per
    # index score; "select", during the selection's scan, for every token. An adaptive budget
    # computes it in the selection regardless (it needs the blocks' sums to cut).
    index_lse: str = "kl"
    # Rank the blocks on FP8 (e4m3) index scores: the selection's products at twice the bf16 rate on
    # Hopper's tensor cores (kernels/select/op.py). It changes which blocks win only where the
    # rounding reorders close pooled scores; how often is measured in docs/perf/kernels_h200.md. The
    # KL and the attention are unchanged (they never see these scores). Static top-k with
    # index_lse = "kl" only.
    select_fp8: bool = False
    backend: str = "reference"  # kernels backend: "reference" (PyTorch fp32) | "triton"

    def __post_init__(self) -> None:
        self.validate()

    def selection_budget(self, topk: int | None = None, param: float | None = None):
        """The kernels' Budget for this config (topk: the k_max in use when capped below msa.topk;
        param: the adaptive budget's ratio or p in place of the config's, see budget_match_topk)."""
        k_max = self.topk if topk is None else topk
        ratio, p = self.budget_ratio, self.budget_p
        if param is not None and self.budget == "ratio":
            ratio = param
        elif param is not None and self.budget == "top_p":
            p = param
        return Budget(self.budget, min(self.budget_k_min, k_max), ratio, p)

    @property
    def budget_param_name(self) -> str | None:
        """The adaptive budget's free parameter (what budget_match_topk adjusts), or None."""
        return {"ratio": "budget_ratio", "top_p": "budget_p"}.get(self.budget)

    def validate(self, prefix: str = "model.msa") -> None:
        _need(isinstance(self.enabled, bool), f"{prefix}.enabled", f"must be true or false, got {self.enabled!r}")
        _need(isinstance(self.n_dense_layers, int) and self.n_dense_layers >= 0, f"{prefix}.n_dense_layers",
              f"must be an integer >= 0, got {self.n_dense_layers!r}")
        # the kernels' constraints, checked here so they fail at start-up and name the field
        _need(_pow2(self.block_size) and self.block_size >= 16, f"{prefix}.block_size",
              f"must be a power of two >= 16 (kernel tiles), got {self.block_size!r}")
        _need(_pos_int(self.topk) and self.topk <= 32, f"{prefix}.topk",
              f"must be an integer in [1, 32] (the kernels keep the top-k in registers), got {self.topk!r}")
        _need(self.budget in BUDGETS, f"{prefix}.budget", f"must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.budget != "static":
            _need(_pos_int(self.budget_k_min) and self.budget_k_min <= self.topk, f"{prefix}.budget_k_min",
                  f"must be an integer in [1, topk={self.topk}], got {self.budget_k_min!r}")
        if self.budget == "ratio":
            v = self.budget_ratio
            _need(isinstance(v, (int, float)) and 0 < v <= 1, f"{prefix}.budget_ratio", f"must be in (0, 1], got {v!r}")
        if self.budget == "top_p":
            v = self.budget_p
            _need(isinstance(v, (int, float)) and 0 < v <= 1, f"{prefix}.budget_p", f"must be in (0, 1], got {v!r}")
        m = self.budget_match_topk
        _need(isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= self.topk, f"{prefix}.budget_match_topk",
              f"must be an integer in [0, topk={self.topk}] (0: off), got {m!r}")
        _need(m == 0 or self.budget != "static", f"{prefix}.budget_match_topk",
              "applies to an adaptive budget (budget = 'ratio' or 'top_p'), not to 'static'")
        _need(_pow2(self.index_dim) and 16 <= self.index_dim <= 256, f"{prefix}.index_dim",
              f"must be a power of two in [16, 256], got {self.index_dim!r}")
        _need(isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0, f"{prefix}.kl_weight",
              f"must be >= 0, got {self.kl_weight!r}")
        for name in ("kl_sample", "warmup_kl_sample"):
            v = getattr(self, name)
            _need(isinstance(v, (int, float)) and 0 < v <= 1, f"{prefix}.{name}", f"must be in (0, 1], got {v!r}")
        _need(self.index_lse in INDEX_LSE_AT, f"{prefix}.index_lse",
              f"must be one of {', '.join(INDEX_LSE_AT)}, got {self.index_lse!r}")
        _need(isinstance(self.select_fp8, bool), f"{prefix}.select_fp8",
              f"must be true or false, got {self.select_fp8!r}")
        if self.select_fp8:
            _need(self.budget == "static", f"{prefix}.select_fp8",
                  f"needs the static budget (rounded scores would move an adaptive budget's cut), "
                  f"got budget = {self.budget!r}")
            _need(self.index_lse == "kl", f"{prefix}.select_fp8",
                  "needs index_lse = 'kl' (the student's log-sum-exp must come from the KL's own scores)")
        _need(self.backend in MSA_BACKENDS, f"{prefix}.backend",
              f"must be one of {', '.join(MSA_BACKENDS)}, got {self.backend!r}")


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward: top-k token-choice routing over routed experts plus shared ones."""

    enabled: bool = True  # layers >= n_dense_layers use MoE; false: every layer a dense SwiGLU
    n_dense_layers: int = 1  # the first layers keep a dense FFN of width model.ffn_hidden (paper: 3)
    n_experts: int = 8  # routed experts
    top_k: int = 2  # routed experts per token
    expert_hidden: int = 128  # SwiGLU width of one expert (routed and shared)
    n_shared_experts: int = 1  # always-on experts, fused into one SwiGLU of n * expert_hidden
    aux_weight: float = 0.01  # weight of the load-balancing loss `moe_aux` (see model/moe.py)
    dispatch: str = "bmm"  # "bmm" (padded batched matmul, any device) | "grouped_mm" (CUDA bf16)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "model.moe") -> None:
        _need(isinstance(self.enabled, bool), f"{prefix}.enabled", f"must be true or false, got {self.enabled!r}")
        _need(isinstance(self.n_dense_layers, int) and self.n_dense_layers >= 0, f"{prefix}.n_dense_layers",
              f"must be an integer >= 0, got {self.n_dense_layers!r}")
        for name in ("n_experts", "top_k", "expert_hidden"):
            v = getattr(self, name)
            _need(_pos_int(v), f"{prefix}.{name}", f"must be a positive integer, got {v!r}")
        _need(self.top_k <= self.n_experts, f"{prefix}.top_k",
              f"{self.top_k} is more than the n_experts={self.n_experts} routed experts")
        _need(isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0, f"{prefix}.n_shared_experts",
              f"must be an integer >= 0, got {self.n_shared_experts!r}")
        _need(isinstance(self.aux_weight, (int, float)) and self.aux_weight >= 0, f"{prefix}.aux_weight",
              f"must be >= 0, got {self.aux_weight!r}")
        _need(self.dispatch in MOE_DISPATCH, f"{prefix}.dispatch",
              f"must be one of {', '.join(MOE_DISPATCH)}, got {self.dispatch!r}")


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
    ffn_hidden: int = 384  # width of the dense SwiGLU layers (all layers when moe.enabled is false)
    max_seq_len: int = 1024
    image_size: int = 32  # images are resized to image_size x image_size
    patch_size: int = 8
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    # full attention on packed rows: "sdpa" (boolean [T, T] mask; CPU, short rows) | "flex" (FlexAttention)
    # | "varlen" (flash attention over the packed documents; CUDA, bf16/fp16); model/attention.py
    dense_impl: str = "sdpa"
    # recompute each block's activations in the backward instead of keeping them (about one more
    # forward of compute for the memory of one block's activations; longer rows fit); not an
    # architecture: a checkpoint trained either way loads into the other
    activation_checkpointing: bool = False
    # on CUDA, torch.compile the small elementwise ops (RMSNorm, RoPE, the SwiGLU gate, the MoE's
    # weighted combine; model/fused.py) into fused kernels; the same math, fewer passes over memory.
    # CPU runs are always eager. Not an architecture: a checkpoint loads either way
    compile_ops: bool = True
    msa: MSAConfig = field(default_factory=MSAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        # a config built from a plain dict (e.g. dataclasses.asdict round trip) may carry dict sub-tables
        if isinstance(self.msa, dict):
            self.msa = MSAConfig(**self.msa)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        self.validate()

    @property
    def n_patches(self) -> int:
        return image_patches(self.image_size, self.patch_size)

    @property
    def image_tokens(self) -> int:
        """Tokens one image takes in the sequence: begin + patches + end."""
        return image_tokens(self.image_size, self.patch_size)

    @property
    def effective_rope_dim(self) -> int:
        return self.rope_dim or self.head_dim

    def is_msa_layer(self, i: int) -> bool:
        return self.msa.enabled and i >= self.msa.n_dense_layers

    def is_moe_layer(self, i: int) -> bool:
        return self.moe.enabled and i >= self.moe.n_dense_layers

    @property
    def msa_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_msa_layer(i)]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def validate(self, prefix: str = "model") -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            _need(cond, f"{prefix}.{field}", msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
                     "max_seq_len", "image_size", "patch_size"):
            v = getattr(self, name)
            need(_pos_int(v), name, f"must be a positive integer, got {v!r}")
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
        need(self.dense_impl in DENSE_IMPLS, "dense_impl",
             f"must be one of {', '.join(DENSE_IMPLS)}, got {self.dense_impl!r}")
        need(isinstance(self.activation_checkpointing, bool), "activation_checkpointing",
             f"must be true or false, got {self.activation_checkpointing!r}")
        need(isinstance(self.compile_ops, bool), "compile_ops", f"must be true or false, got {self.compile_ops!r}")
        need(isinstance(self.msa, MSAConfig), "msa", "must be a table")
        need(isinstance(self.moe, MoEConfig), "moe", "must be a table")
        self.msa.validate(f"{prefix}.msa")
        self.moe.validate(f"{prefix}.moe")

        msa = self.msa
        if msa.enabled:
            p = f"{prefix}.msa"
            _need(msa.n_dense_layers < self.n_layers, f"{p}.n_dense_layers",
                  f"{msa.n_dense_layers} dense layers of n_layers={self.n_layers} leave no MSA layer; "
                  f"set msa.enabled = false for a dense model")
            # the MSA kernels' shape constraints, which dense GQA does not have
            need(_pow2(self.head_dim) and 16 <= self.head_dim <= 256, "head_dim",
                 f"MSA kernels need a power of two in [16, 256], got {self.head_dim}")
            g = self.n_heads // self.n_kv_heads
            need(_pow2(g), "n_heads", f"MSA kernels need a power-of-two group size n_heads/n_kv_heads, got {g}")
            # the index branch gets the main branch's RoPE on its first rope dims
            _need(msa.index_dim >= self.effective_rope_dim, f"{p}.index_dim",
                  f"{msa.index_dim} is smaller than the rotary dims ({self.effective_rope_dim}) it must carry")
            n_blocks = -(-self.max_seq_len // msa.block_size)
            _need(msa.topk <= n_blocks, f"{p}.topk",
                  f"{msa.topk} blocks per token but a row of max_seq_len={self.max_seq_len} has only {n_blocks} "
                  f"blocks of block_size={msa.block_size}")
        moe = self.moe
        if moe.enabled:
            _need(moe.n_dense_layers < self.n_layers, f"{prefix}.moe.n_dense_layers",
                  f"{moe.n_dense_layers} dense layers of n_layers={self.n_layers} leave no MoE layer; "
                  f"set moe.enabled = false for a dense model")
