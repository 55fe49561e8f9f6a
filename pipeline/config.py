"""Run configuration: nested typed dataclasses loaded from TOML, with dotted `--set` overrides.

    cfg = load_config("configs/tiny.toml", ["train.max_steps=20", "model.n_layers=2"])

Unknown keys, wrong types and impossible combinations fail here, at start-up, with a message that
names the field (`train.lr: must be positive, got -1.0`).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.schema import IMG_PATCH, SPECIAL_TOKENS
from model.config import ConfigError, ModelConfig
from model.presets import get_preset
from model.transformer import MultimodalTransformer


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # shard directories (each with manifest.json)
    weights: list[float] = field(default_factory=list)  # mixing weights of `shards` (default: equal)
    tokenizer: str = ""  # tokenizer.json; default: the one beside the first shard directory
    eval_shards: str = ""  # held-out shard directory for eval/lm_loss and eval/retrieval_acc
    seq_len: int = 0  # tokens per packed row; 0 means model.max_seq_len
    pack_docs: int = 64  # documents packed together (one Ray Data batch)
    pack_actors: int = 1  # CPU actors that decode, tokenize and pack (a few GiB each at 16K+ rows)
    prefetch_batches: int = 2

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("data.shards", "at least one shard directory is required")
        if self.weights and len(self.weights) != len(self.shards):
            raise ConfigError("data.weights", f"{len(self.weights)} weights for {len(self.shards)} shard directories")
        if any(w <= 0 for w in self.weights):
            raise ConfigError("data.weights", "weights must be positive")
        for name in ("pack_docs", "pack_actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}", "must be at least 1")
        if self.seq_len < 0:
            raise ConfigError("data.seq_len", "must be >= 0")


@dataclass
class TrainConfig:
    max_steps: int = 100
    batch_size: int = 4  # rows per worker per step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "float32"  # "float32" | "bfloat16" (autocast; GPUs)
    log_every: int = 5
    checkpoint_every: int = 50
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or gradient
    #                         (they never update the weights; checked at the next logging step)
    index_lr: float = 0.0  # learning rate of the index branch (its own optimizer group); 0: train.lr
    expert_lr_scale: float = 1.0  # routed experts' learning rate = lr * expert_lr_scale
    stats_every: int = 0  # score/block recall (needs dense attention) every this many steps; 0: log_every
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: from the GPU's name (none on CPU: no MFU)
    keep_checkpoints: int = 3  # the newest this many checkpoints are kept; 0 keeps every one
    # false: no checkpoint at the last step unless checkpoint_every falls on it (throughput runs, whose
    # end state nobody evaluates or continues; the `small` preset's full state is ~9 GB)
    final_checkpoint: bool = True
    eval_every: int = 0  # held-out evaluation (data.eval_shards) every this many steps, on rank 0; 0: off
    eval_documents: int = 200  # held-out documents per periodic evaluation
    seed: int = 0
    # one GPU or DDP: each step replayed as a CUDA graph, one per batch layout (pipeline/graphs.py);
    # for steps bound by the host's launches (8K-token rows of `small`). The graphs keep one step's
    # activations reserved, and the steps that stay eager (statistics, a layout's first) need their
    # own: up to twice the eager loop's activation memory at such a step
    cuda_graphs: bool = False

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "log_every", "checkpoint_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("train.lr", f"must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps", "must be >= 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("train.dtype", f"must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ConfigError("train.beta1", "betas must be in [0, 1)")
        if self.index_lr < 0 or self.expert_lr_scale < 0 or self.stats_every < 0 or self.peak_tflops < 0:
            raise ConfigError("train.index_lr", "index_lr, expert_lr_scale, stats_every and peak_tflops must be >= 0")
        if self.keep_checkpoints < 0:
            raise ConfigError("train.keep_checkpoints", f"must be >= 0 (0 keeps all), got {self.keep_checkpoints}")
        if self.eval_every < 0 or self.eval_documents < 1:
            raise ConfigError("train.eval_every", "eval_every must be >= 0 and eval_documents >= 1")
        if self.grad_clip < 0:
            raise ConfigError("train.grad_clip", "must be >= 0 (0 disables clipping)")


@dataclass
class RayConfig:
    address: str = ""  # "" starts a local Ray; "auto" or ray://HOST:PORT joins a cluster
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    local_num_cpus: int = 0  # logical CPUs of a local Ray; 0: enough for the workers and the data actors
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    parallel: str = "ddp"  # "ddp" | "fsdp" (FSDP2: parameters, gradients and optimizer state sharded)
    # DDP's gradient all-reduce: the bucket size in MiB (torch's default, 25: larger buckets are fewer,
    # larger collectives, started later in the backward), and the dtype the gradients travel in:
    # "fp32", or "bf16" (half the bytes; each bucket is rounded to bf16 before the average and the
    # result cast back, an approximation of the fp32 average, torch's bf16_compress_hook)
    ddp_bucket_mb: float = 25.0
    ddp_grad_dtype: str = "fp32"
    # FSDP2: true frees each block's gathered weights after its forward and gathers them again for its
    # backward (least memory); false keeps them from the forward to the backward (one all-gather per
    # block and step instead of two, a block's full weights held per block until its backward)
    fsdp_reshard_after_forward: bool = True
    # FSDP2: units (of `fsdp_unit_blocks` blocks) whose weights are gathered ahead of the one
    # computing, in the forward and the backward (explicit prefetch, so the gather overlaps compute
    # even when the host issues the kernels just in time); 0 leaves it to FSDP2's implicit prefetch
    fsdp_prefetch: int = 1
    # FSDP2: the dtype each block's weights are gathered and computed in. "fp32": the weights as they
    # are, cast by autocast op by op (what DDP does); "bf16": FSDP2's mixed precision, gathered in bf16
    # (half the bytes, no per-op casts of the weights) while the sharded master weights, the optimizer,
    # the gradients' reduce-scatter and the residual stream stay fp32. Not the same arithmetic: the
    # ops autocast keeps in fp32 (norms, the MoE router, the patch encoder's position table, ...) then
    # read bf16-rounded weights
    fsdp_param_dtype: str = "fp32"
    # FSDP2: consecutive transformer blocks per FSDP unit (one all-gather and one reduce-scatter per
    # unit and step, and their hooks): 1 (each block its own unit, the least memory) or more, fewer
    # and larger collectives and fewer per-unit hooks on the host, for steps bound by the host
    fsdp_unit_blocks: int = 1

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("ray.num_workers", "must be at least 1")
        if self.max_failures < 0:
            raise ConfigError("ray.max_failures", "must be >= 0")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError("ray.parallel", f"must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("ray.cpus_per_worker", "must be positive")
        if not (isinstance(self.ddp_bucket_mb, (int, float)) and self.ddp_bucket_mb > 0):
            raise ConfigError("ray.ddp_bucket_mb", f"must be a positive number of MiB, got {self.ddp_bucket_mb!r}")
        if self.ddp_grad_dtype not in ("fp32", "bf16"):
            raise ConfigError("ray.ddp_grad_dtype", f"must be 'fp32' or 'bf16', got {self.ddp_grad_dtype!r}")
        if not isinstance(self.fsdp_reshard_after_forward, bool):
            raise ConfigError("ray.fsdp_reshard_after_forward", f"must be true or false, got {self.fsdp_reshard_after_forward!r}")
        if not _whole(self.fsdp_prefetch, 0):
            raise ConfigError("ray.fsdp_prefetch", f"must be a whole number of units >= 0, got {self.fsdp_prefetch!r}")
        if self.fsdp_param_dtype not in ("fp32", "bf16"):
            raise ConfigError("ray.fsdp_param_dtype", f"must be 'fp32' or 'bf16', got {self.fsdp_param_dtype!r}")
        if not _whole(self.fsdp_unit_blocks, 1):
            raise ConfigError("ray.fsdp_unit_blocks", f"must be a whole number of blocks >= 1, got {self.fsdp_unit_blocks!r}")


@dataclass
class TrackingConfig:
    experiment: str = "msa-pretrain"
    uri: str = ""  # "" means sqlite:///<output_dir>/mlflow.db
    run_name: str = ""
    parent_run_id: str = ""  # an MLflow run to nest this run under (tag mlflow.parentRunId; msa-study)
    # MLflow's system metrics (system/*: CPU, memory, disk, network, and GPU utilisation and memory
    # through NVML) sampled on rank 0's node: "gpu" when training on GPUs, "always", or "off"
    system_metrics: str = "gpu"
    system_metrics_interval_s: float = 10.0

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment", "must not be empty")
        if self.system_metrics not in ("gpu", "always", "off"):
            raise ConfigError("tracking.system_metrics", f"must be 'gpu', 'always' or 'off', got {self.system_metrics!r}")
        if not self.system_metrics_interval_s > 0:
            raise ConfigError("tracking.system_metrics_interval_s", f"must be positive, got {self.system_metrics_interval_s}")


MODES = ("dense", "msa", "retrofit")


@dataclass
class ScheduleConfig:
    """Which run this is (the `mode` tag in MLflow) and when attention goes sparse.

    dense     the GQA baseline: the model is built without an index branch (model.msa.enabled=false)
    msa       native MSA: dense warm-up for `warmup_tokens` (both branches dense, the index branch learns
              from the dense-support KL), then sparse
    retrofit  MSA-CPT: start from a dense run's checkpoint, add fresh index projections, warm them up
              for `retrofit_warmup_tokens` (backbone frozen unless told otherwise), then sparse
    Tokens are counted as row capacity: steps * batch_size * num_workers * seq_len.
    """

    mode: str = "msa"
    warmup_tokens: int = 0
    retrofit_from: str = ""  # a dense run's checkpoint directory, or its run directory (newest checkpoint)
    retrofit_warmup_tokens: int = 0
    freeze_backbone_in_warmup: bool = True  # retrofit only: the warm-up trains the index branch alone
    # retrofit only: continue the dense run at its checkpoint (its step, so the learning-rate schedule
    # and token count go on, and its data plan and position, so the rest of the data comes in the
    # same order) up to train.max_steps, instead of a new run from step 0; msa-study's retrofit arm
    retrofit_continue: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("schedule.mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.warmup_tokens < 0 or self.retrofit_warmup_tokens < 0:
            raise ConfigError("schedule.warmup_tokens", "must be >= 0")
        if self.mode == "retrofit" and not self.retrofit_from:
            raise ConfigError("schedule.retrofit_from", "mode 'retrofit' needs the checkpoint of a dense run")
        if self.mode != "retrofit" and self.retrofit_from:
            raise ConfigError("schedule.retrofit_from", f"is only used with mode 'retrofit', not {self.mode!r}")
        if self.mode != "retrofit" and self.retrofit_continue:
            raise ConfigError("schedule.retrofit_continue", f"is only used with mode 'retrofit', not {self.mode!r}")


@dataclass
class DebugConfig:
    """Diagnostics, and hooks for testing recovery and the data position; off by default."""

    pause_at_step: int = 0  # one worker stops after this optimizer step, once, to be killed from outside
    pause_rank: int = 1  # ... this one; it writes its pid to <run dir>/.debug/paused-rank<r>-step<s>
    pause_timeout_s: float = 300.0  # and goes on by itself if nobody killed it in this time
    trace_data: bool = False  # every worker appends the piece ids of each step's rows to <run dir>/.debug/
    # [first, last]: every worker profiles steps first .. last - 1 (torch.profiler) and writes where their
    # time went to <run dir>/profile/rank<r>.json, logged to MLflow (pipeline/profiling.py); [] = off
    profile_steps: list[int] = field(default_factory=list)

    def validate(self) -> None:
        p = self.profile_steps
        if p and not (len(p) == 2 and 0 <= p[0] < p[1]):
            raise ConfigError("debug.profile_steps", f"must be [first, last] with 0 <= first < last (steps), or [], "
                                                     f"got {p!r}")
        if self.pause_at_step < 0:
            raise ConfigError("debug.pause_at_step", "must be >= 0")
        if self.pause_timeout_s <= 0:
            raise ConfigError("debug.pause_timeout_s", "must be positive")


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"  # checkpoints and, by default, the MLflow store
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.max_seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.ray.num_workers * self.seq_len

    @property
    def tokenizer_path(self) -> str:
        """data.tokenizer, else the tokenizer.json that msa-prep wrote beside the first shard directory."""
        return self.data.tokenizer or str(Path(self.data.shards[0]) / "tokenizer.json")

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.output_dir) / 'mlflow.db'}"

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("name", "must not be empty")
        self.model.validate()
        for part in (self.data, self.train, self.ray, self.tracking, self.schedule, self.debug):
            part.validate()
        if self.schedule.mode == "dense" and self.model.msa.enabled:
            # the dense baseline is the same model without an index branch: say so, then build it
            print("[config] schedule.mode = 'dense': building the model without the index branch "
                  "(model.msa.enabled = false)")
            self.model.msa.enabled = False
        if self.schedule.mode in ("msa", "retrofit") and not self.model.msa.enabled:
            raise ConfigError("model.msa.enabled", f"schedule.mode {self.schedule.mode!r} needs the index branch")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError("data.seq_len", f"{self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.train.eval_every and not self.data.eval_shards:
            raise ConfigError("data.eval_shards", "train.eval_every is set but there are no held-out shards")
        if self.debug.profile_steps and self.debug.profile_steps[1] > self.train.max_steps:
            raise ConfigError("debug.profile_steps", f"ends after train.max_steps={self.train.max_steps}: "
                                                     f"{self.debug.profile_steps}")
        if self.debug.pause_at_step and not 0 <= self.debug.pause_rank < self.ray.num_workers:
            raise ConfigError("debug.pause_rank", f"must name one of the {self.ray.num_workers} workers")
        if self.ray.parallel == "fsdp" and self.ray.fsdp_param_dtype == "bf16" and self.train.dtype != "bfloat16":
            raise ConfigError("ray.fsdp_param_dtype", "'bf16' computes with bf16 weights on the fp32 residual stream, "
                                                      "which needs train.dtype = 'bfloat16' (autocast)")
        if self.model.dense_impl == "varlen" and (not self.ray.use_gpu or self.train.dtype != "bfloat16"):
            raise ConfigError("model.dense_impl", "'varlen' is flash attention: it needs a GPU (ray.use_gpu = true) "
                                                  "and bf16 activations (train.dtype = 'bfloat16')")
        if self.train.cuda_graphs:
            self._check_cuda_graphs()
        if self.model.image_tokens > self.seq_len:
            raise ConfigError("data.seq_len", f"one image takes {self.model.image_tokens} tokens, more than a row")

    def _check_cuda_graphs(self) -> None:
        """What a captured step cannot be: it replays fixed work on each GPU's fixed memory."""
        why = []
        if not self.ray.use_gpu:
            why.append("it needs a GPU (ray.use_gpu = true)")
        if self.ray.num_workers > 1 and self.ray.ddp_grad_dtype != "fp32":
            why.append(f"DDP's bf16 all-reduce (ray.ddp_grad_dtype = {self.ray.ddp_grad_dtype!r}) runs as a "
                       f"communication hook; only DDP's own fp32 all-reduce is captured")
        if self.ray.parallel != "ddp":
            why.append(f"FSDP2 (ray.parallel = {self.ray.parallel!r}) gathers and frees its parameters in hooks "
                       f"around every block")
        if self.model.msa.enabled and self.model.msa.backend != "triton":
            why.append(f"the {self.model.msa.backend!r} MSA kernels read the document boundaries on the host "
                       f"(model.msa.backend = 'triton' does not)")
        moe = self.model.moe
        if moe.enabled and moe.dispatch != "grouped_mm":
            why.append(f"the MoE dispatch {moe.dispatch!r} sizes its buffer on the host each step (model.moe.dispatch "
                       f"= 'grouped_mm' does not)")
        if self.model.activation_checkpointing:
            why.append("the recomputation of model.activation_checkpointing restores the RNG state on the host")
        if self.model.msa.budget != "static":
            why.append(f"an adaptive budget (model.msa.budget = {self.model.msa.budget!r}) is adjusted from "
                       f"the host between steps")
        if self.debug.profile_steps:
            why.append("debug.profile_steps profiles eager steps")
        if why:
            raise ConfigError("train.cuda_graphs", "; ".join(why))


# ---------------------------------------------------------------------------------------------------
# generic loading


def _whole(value: Any, least: int) -> bool:
    """A whole number (not a bool) >= least: for fields a config built in code can set to anything."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _convert(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(where, f"must be a table, got {type(value).__name__}")
        return _build(typ, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _convert(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(where, f"must be a list, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"must be a number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"must be an integer, got {value!r}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"must be true or false, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"must be a string, got {value!r}")
        return value
    raise ConfigError(where, f"unsupported field type {typ!r}")


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    data = dict(data)
    if cls is ModelConfig and "preset" in data:
        # a preset is a full model table; the keys given beside it override it, nested tables included
        preset = data.pop("preset")
        try:
            base = dataclasses.asdict(get_preset(preset))
        except KeyError as e:
            raise ConfigError(f"{where}.preset", str(e)) from None
        data = _deep_merge(base, data)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}" if where else unknown[0],
                          f"unknown key; known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e
    except (TypeError, ValueError) as e:
        raise ConfigError(where or cls.__name__, str(e)) from None


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.sub=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{p} is not a table")
        node[parts[-1]] = _parse_value(text.strip())
    return data


def in_ray_job() -> bool:
    """True in the entrypoint of a `ray job submit`: its working directory is a temporary copy of the
    uploaded files on the head node, deleted with the job."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Workers change directory: every path becomes absolute now, relative to where msa-train ran.
    Inside a Ray job a relative path would point into the job's temporary copy, which the other
    nodes do not have and which is deleted with the job: there it is an error."""
    job = in_ray_job()

    def absolute(p: str, where: str) -> str:
        if not p or "://" in p:
            return p
        p = os.path.expanduser(p)
        if job and not os.path.isabs(p):
            raise ConfigError(where, f"{p!r} is relative; inside a Ray job it would point into the job's "
                                     f"temporary working directory. Give a path on storage every node sees "
                                     f"(e.g. /mnt/shared/...)")
        return str((base / p).resolve())

    cfg.output_dir = absolute(cfg.output_dir, "output_dir")
    cfg.data.shards = [absolute(s, f"data.shards[{i}]") for i, s in enumerate(cfg.data.shards)]
    cfg.data.tokenizer = absolute(cfg.data.tokenizer, "data.tokenizer")
    cfg.data.eval_shards = absolute(cfg.data.eval_shards, "data.eval_shards")
    cfg.schedule.retrofit_from = absolute(cfg.schedule.retrofit_from, "schedule.retrofit_from")


def config_from_dict(data: dict, base_dir: Path | None = None) -> RunConfig:
    cfg = _build(RunConfig, data, "")
    cfg.validate()
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    return cfg


def read_toml(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A TOML config file as a dict, with `--set` overrides applied; errors name the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    return apply_overrides(data, overrides or [])


def load_config(path: str | Path, overrides: list[str] | None = None, base_dir: Path | None = None) -> RunConfig:
    return config_from_dict(read_toml(path, overrides), base_dir or Path.cwd())


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """The whole config as flat `a.b.c -> value` pairs (MLflow params)."""
    out: dict[str, Any] = {}
    items = dataclasses.asdict(cfg).items() if dataclasses.is_dataclass(cfg) else cfg.items()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolved_params(cfg: RunConfig) -> dict[str, Any]:
    """The config as a run's MLflow params: every value resolved (no 0 meaning "the default": the
    learning rate of the index branch, the row length), and only what applies to this run's mode
    (no index-branch fields for a dense run, no retrofit fields for a native one, no debug hooks)."""
    params = flatten(cfg)
    params["train.index_lr"] = cfg.train.index_lr or cfg.train.lr
    params["data.seq_len"] = cfg.seq_len
    params["data.tokenizer"] = cfg.tokenizer_path
    params["train.stats_every"] = cfg.train.stats_every or cfg.train.log_every
    drop = ["debug.", "tracking.uri", "tracking.parent_run_id"]
    if not cfg.model.msa.enabled:
        drop += ["model.msa.", "train.index_lr"]
        params["model.msa.enabled"] = False
    budget = cfg.model.msa.budget
    drop += [f"model.msa.{f}" for f, kinds in (("budget_k_min", ("ratio", "top_p")), ("budget_ratio", ("ratio",)),
                                                 ("budget_p", ("top_p",)), ("budget_match_topk", ("ratio", "top_p")))
             if budget not in kinds]
    if not cfg.model.moe.enabled:
        drop.append("model.moe.")
        params["model.moe.enabled"] = False
    if cfg.schedule.mode != "retrofit":
        drop += ["schedule.retrofit_", "schedule.freeze_backbone_in_warmup"]
    if cfg.schedule.mode != "msa":
        drop.append("schedule.warmup_tokens")
    if not cfg.train.eval_every:
        drop += ["train.eval_documents", "data.eval_shards"]
    if not cfg.data.weights:
        drop.append("data.weights")
    if cfg.ray.address == "":
        params["ray.address"] = "local"
    return {k: v for k, v in params.items()
            if not any(k.startswith(d) for d in drop) or k in ("model.msa.enabled", "model.moe.enabled")}


def build_model(cfg: RunConfig) -> MultimodalTransformer:
    """The model a run config describes (on the CPU, freshly initialised)."""
    return MultimodalTransformer(cfg.model, img_patch_id=SPECIAL_TOKENS.index(IMG_PATCH))
