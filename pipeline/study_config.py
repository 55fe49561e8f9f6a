"""The study configuration (`msa-study --config configs/study-tiny.toml`): typed, validated at start-up,
errors naming the field (`retrofit_fraction: must be in (0, 1), got 1.5`).

A study names a base run config (an msa-train TOML) and runs every arm over every seed on it with
the same token budget; each arm is a name, a schedule mode and `--set`-style overrides of the base:

    dense          mode "dense": the GQA baseline, no index branch
    native         mode "msa": MSA from the start (dense warm-up of schedule.warmup_tokens, then sparse)
    retrofit       mode "retrofit": the dense arm's run of the same seed up to retrofit_fraction of the
                   budget, then index warm-up (schedule.warmup_tokens) and sparse training for the rest,
                   the whole model training (freeze_backbone_in_warmup = false, so every arm trains
                   its backbone on every token)
    dense-patched  mode "dense-patched": no training; each dense checkpoint evaluated with the oracle
                   selector (model/oracle.py) at the base config's block size and top-k
Further arms come as `[[extra_arms]]` tables (name, mode, overrides), e.g. a native arm with another
top-k, or a future `model.msa.budget` arm.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from model.config import ConfigError

ARM_MODES = ("dense", "msa", "retrofit", "dense-patched")
BUILTIN_ARMS = {
    "dense": ("dense", []),
    "native": ("msa", []),
    "retrofit": ("retrofit", ["schedule.freeze_backbone_in_warmup=false"]),
    "dense-patched": ("dense-patched", []),
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ArmConfig:
    name: str = ""
    mode: str = ""  # dense | msa | retrofit | dense-patched
    overrides: list[str] = field(default_factory=list)  # "--set" items applied on top of the study's

    @property
    def trains(self) -> bool:
        return self.mode != "dense-patched"

    def validate(self, where: str) -> None:
        if not NAME_RE.match(self.name):
            raise ConfigError(f"{where}.name", f"must be a name of letters, digits, '_', '-', '.', got {self.name!r}")
        if self.mode not in ARM_MODES:
            raise ConfigError(f"{where}.mode", f"must be one of {', '.join(ARM_MODES)}, got {self.mode!r}")
        for i, o in enumerate(self.overrides):
            if "=" not in o:
                raise ConfigError(f"{where}.overrides[{i}]", f"must look like key.sub=value, got {o!r}")
            if o.split("=", 1)[0].strip() == "schedule.mode":
                raise ConfigError(f"{where}.overrides[{i}]", "the arm's mode field sets schedule.mode")


@dataclass
class StudyEvalConfig:
    shards: str = ""  # held-out shard directory; "" = data.eval_shards of the base config
    documents: int = 200  # the first documents of the shards, the same for every arm
    batch_size: int = 4
    stats_batches: int = 2  # LM batches on which sparsity and recalls are measured (MSA arms)

    def validate(self) -> None:
        if self.documents < 1:
            raise ConfigError("eval.documents", f"must be at least 1, got {self.documents}")
        if self.batch_size < 1:
            raise ConfigError("eval.batch_size", f"must be at least 1, got {self.batch_size}")
        if self.stats_batches < 0:
            raise ConfigError("eval.stats_batches", f"must be >= 0, got {self.stats_batches}")


@dataclass
class StudyTrackingConfig:
    uri: str = ""  # "" = sqlite:///<output_dir>/mlflow.db
    experiment: str = "msa-study"

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment", "must not be empty")


@dataclass
class StudyConfig:
    name: str = "study"
    base_config: str = ""  # an msa-train run config (TOML), relative to the working directory
    output_dir: str = "runs/study"  # the study directory: runs, records, results.json, report.md, figures
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # seeds trained at once, each in its own process with its own local Ray and, on a GPU host, its
    # own GPU (so at most one per visible GPU); 1 = one seed after another in this process
    parallel: int = 1
    tokens: int = 0  # training tokens per arm and seed (row capacity: steps x batch x workers x seq_len)
    retrofit_fraction: float = 0.75  # share of the budget the retrofit arm spends dense
    arms: list[str] = field(default_factory=lambda: list(BUILTIN_ARMS))  # built-in arms to run, in order
    extra_arms: list[ArmConfig] = field(default_factory=list)
    train_shards: list[str] = field(default_factory=list)  # training shard directories; [] = the base config's
    overrides: list[str] = field(default_factory=list)  # "--set" items applied to the base config of every run
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)
    tracking: StudyTrackingConfig = field(default_factory=StudyTrackingConfig)

    def validate(self) -> None:
        if not NAME_RE.match(self.name):
            raise ConfigError("name", f"must be a name of letters, digits, '_', '-', '.', got {self.name!r}")
        if not self.base_config:
            raise ConfigError("base_config", "must name an msa-train run config (TOML)")
        if not self.output_dir:
            raise ConfigError("output_dir", "must not be empty")
        if not self.seeds:
            raise ConfigError("seeds", "at least one seed is required")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError("seeds", f"must be distinct integers >= 0, got {self.seeds}")
        if self.parallel < 1:
            raise ConfigError("parallel", f"must be at least 1 (seeds trained at once), got {self.parallel}")
        if self.tokens < 1:
            raise ConfigError("tokens", f"must be a positive number of training tokens per arm and seed, got {self.tokens}")
        if not 0 < self.retrofit_fraction < 1:
            raise ConfigError("retrofit_fraction", f"must be in (0, 1), got {self.retrofit_fraction}")
        if not self.arms and not self.extra_arms:
            raise ConfigError("arms", "no arm to run")
        for i, a in enumerate(self.arms):
            if a not in BUILTIN_ARMS:
                raise ConfigError(f"arms[{i}]", f"unknown built-in arm {a!r}; built-ins: {', '.join(BUILTIN_ARMS)} "
                                               f"(further arms go in [[extra_arms]])")
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError("arms", f"an arm is listed twice: {self.arms}")
        names = set(self.arms)
        for i, arm in enumerate(self.extra_arms):
            arm.validate(f"extra_arms[{i}]")
            if arm.name in BUILTIN_ARMS or arm.name in names:
                raise ConfigError(f"extra_arms[{i}].name", f"{arm.name!r} is taken (built-in or listed twice)")
            names.add(arm.name)
        needs_dense = [a.name for a in self.all_arms() if a.mode in ("retrofit", "dense-patched")]
        if needs_dense and "dense" not in self.arms:
            raise ConfigError("arms", f"{', '.join(needs_dense)} start from the dense arm's checkpoints: "
                                      f"list 'dense' too")
        for i, o in enumerate(self.overrides):
            if "=" not in o:
                raise ConfigError(f"overrides[{i}]", f"must look like key.sub=value, got {o!r}")
        self.eval.validate()
        self.tracking.validate()

    @property
    def run_overrides(self) -> list[str]:
        """What every run sets on top of its base config: the training shards, then the overrides."""
        shards = [f"data.shards={self.train_shards!r}"] if self.train_shards else []
        return shards + list(self.overrides)

    def all_arms(self) -> list[ArmConfig]:
        """The built-in arms listed in `arms`, then the extra ones, as ArmConfigs."""
        out = [ArmConfig(a, BUILTIN_ARMS[a][0], list(BUILTIN_ARMS[a][1])) for a in self.arms]
        return out + list(self.extra_arms)

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.output_dir) / 'mlflow.db'}"


def load_study_config(path: str | Path, overrides: list[str] | None = None, base_dir: Path | None = None) -> StudyConfig:
    """Load, override (`--set seeds=[0,1,2]`), validate, and make the paths absolute (relative to
    base_dir, the working directory by default, as msa-train's are)."""
    from pipeline.config import _build, read_toml

    cfg = _build(StudyConfig, read_toml(path, overrides), "")
    cfg.validate()
    base = Path(base_dir or Path.cwd())

    def absolute(p: str) -> str:
        return str((base / Path(p).expanduser()).resolve()) if p else p

    cfg.base_config = absolute(cfg.base_config)
    cfg.output_dir = absolute(cfg.output_dir)
    cfg.eval.shards = absolute(cfg.eval.shards)
    cfg.train_shards = [absolute(p) for p in cfg.train_shards]
    for i, p in enumerate(cfg.train_shards):
        if not (Path(p) / "manifest.json").exists():
            raise ConfigError(f"train_shards[{i}]", f"{p} is not a shard directory (no manifest.json)")
    if not Path(cfg.base_config).exists():
        raise ConfigError("base_config", f"{cfg.base_config} does not exist")
    return cfg
