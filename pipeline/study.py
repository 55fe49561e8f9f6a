"""`msa-study`: does native MSA match dense where a retrofit falls short? Every arm of the comparison
over several seeds, at equal training tokens on the same data order, evaluated identically, with a report.

    msa-study --config configs/study-tiny.toml                # CPU, minutes (the test's study)
    msa-study --config configs/study-gpu.toml                 # one GPU
    msa-study --config configs/study-gpu.toml --set 'seeds=[0,1,2]'   # add a seed: the rest is skipped

What it does (the arms are defined in pipeline/study_config.py):
1. One msa-train run per (training arm, seed) through the real entry point (pipeline.train's
   prepare/run) on one Ray, each an MLflow child run (tag mlflow.parentRunId) of the study's parent
   run (tag `study`). Every run has the same step count, tokens per step, learning-rate schedule and
   data plan (the base config's, seeded by the seed); the retrofit run continues the dense run of the
   same seed from its checkpoint at retrofit_fraction of the budget (schedule.retrofit_continue), so
   it sees the rest of the same data in the same order.
2. The same evaluation for every arm (pipeline/evaluate.py) on the same held-out documents (a digest
   of them is recorded): LM loss overall, by position and for image/other text; retrieval by token
   distance and kind; sparsity and recalls of MSA arms; and, from the run's MLflow metrics, step time
   and tokens/s. The dense-patched arm evaluates each dense checkpoint with the oracle selector.
3. One record per (arm, seed) in `<output_dir>/records/`: a rerun of the same command skips what is
   recorded, resumes a run that stopped half-way (msa-train --resume), and accumulates.
   `parallel = N` (or --parallel N) trains N seeds at once: each in a child process of its own (a
   "lane": this command with --lane, its own local Ray, on a GPU host its own GPU), its output in
   `<output_dir>/logs/` and on the console prefixed by its seeds; the parent run and the report stay
   with this process.
4. results.json, report.md and figures/ (pipeline/report.py), logged as artifacts of the parent run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from model.config import ConfigError
from pipeline.config import RunConfig, load_config
from pipeline.study_config import ArmConfig, StudyConfig, load_study_config

STUDY_STATE = "study.json"


@dataclass
class StudyPlan:
    """What every run of the study shares, derived from the study and base configs."""

    base: RunConfig  # the base config with the study's overrides
    steps: int
    tokens_per_step: int
    retrofit_step: int  # the dense checkpoint the retrofit arm continues from
    checkpoint_every: int
    keep_checkpoints: int
    eval_shards: str
    tokenizer: str

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def plan_study(cfg: StudyConfig) -> StudyPlan:
    try:
        base = load_config(cfg.base_config, cfg.run_overrides)
    except ConfigError as e:
        raise ConfigError(f"base_config ({Path(cfg.base_config).name}) + overrides: {e.field}",
                          str(e).split(": ", 1)[1]) from None
    tps = base.tokens_per_step
    if cfg.tokens % tps:
        lo = cfg.tokens // tps * tps
        raise ConfigError("tokens", f"{cfg.tokens} is not a multiple of the base config's {tps} tokens per step "
                                    f"(train.batch_size x ray.num_workers x seq_len); {lo or tps} or {lo + tps} would do")
    steps = cfg.tokens // tps
    le = base.train.log_every
    if steps < 2 * le or steps % le:
        raise ConfigError("tokens", f"{steps} steps: need a multiple of train.log_every={le}, at least {2 * le} "
                                    f"(a retrofit starts from a checkpoint, and checkpoints fall on logging steps)")
    # the retrofit starts at a logging step (where checkpoints are written), as near the fraction as that allows
    r = min(max(le, round(cfg.retrofit_fraction * steps / le) * le), steps - le)
    if abs(r / steps - cfg.retrofit_fraction) > 1e-9:
        print(f"[msa-study] note: the retrofit starts at step {r} of {steps} ({r / steps:.3f} of the budget, "
              f"retrofit_fraction={cfg.retrofit_fraction}): the nearest logging step (train.log_every={le})")
    # checkpoints every gcd(r, checkpoint_every) steps put one at r; keep every one from r on
    ce = math.gcd(r, base.train.checkpoint_every)
    period = math.lcm(le, ce)
    after_r = (steps - r) // period + (1 if steps % period else 0)
    keep = after_r + 1
    shards = cfg.eval.shards or base.data.eval_shards
    if not shards:
        raise ConfigError("eval.shards", "no held-out shards: set eval.shards, or data.eval_shards in the base config")
    if not (Path(shards) / "manifest.json").exists():
        raise ConfigError("eval.shards", f"{shards} is not a shard directory (no manifest.json)")
    tokenizer = base.data.tokenizer or str(Path(base.data.shards[0]) / "tokenizer.json")
    return StudyPlan(base, steps, tps, r, ce, keep, shards, tokenizer)


# ---------------------------------------------------------------------------------------------------
# the study directory: parent run, records


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=False))
    os.replace(tmp, path)  # a record is there whole or not at all


def _fixed(cfg: StudyConfig, plan: StudyPlan) -> dict:
    return {"tokens": plan.tokens, "steps": plan.steps, "retrofit_step": plan.retrofit_step,
            "base_config": cfg.base_config, "overrides": cfg.run_overrides, "tracking_uri": cfg.tracking_uri,
            "experiment": cfg.tracking.experiment}


def check_same_study(cfg: StudyConfig, plan: StudyPlan, study_dir: Path) -> dict | None:
    """The study directory's state (None for a new one), after checking that this config describes the
    same study: the same budget, base, overrides and tracking, or results would not be comparable."""
    state_path = study_dir / STUDY_STATE
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    for k, v in _fixed(cfg, plan).items():
        if state[k] != v:
            field = {"steps": "tokens", "retrofit_step": "retrofit_fraction", "tracking_uri": "tracking.uri",
                     "experiment": "tracking.experiment"}.get(k, k)
            raise ConfigError(field, f"{v!r} differs from the study already in {study_dir} ({state[k]!r}); "
                                     f"its results would not be comparable: use another output_dir")
    return state


def _open_parent(cfg: StudyConfig, plan: StudyPlan, study_dir: Path) -> str:
    """The study's MLflow parent run: created on the first call, reopened by later ones, which must
    describe the same study (same budget and base), or their results would not be comparable."""
    from pipeline.config import flatten
    from pipeline.tracking import git_commit, open_run

    state_path = study_dir / STUDY_STATE
    fixed = _fixed(cfg, plan)
    state = check_same_study(cfg, plan, study_dir)
    if state:
        open_run(cfg.tracking_uri, cfg.tracking.experiment, cfg.name, {}, {}, run_id=state["parent_run_id"])
        return state["parent_run_id"]
    params = flatten(dataclasses.asdict(cfg)) | {"steps": plan.steps, "tokens_per_step": plan.tokens_per_step,
                                                 "retrofit_step": plan.retrofit_step}
    run_id = open_run(cfg.tracking_uri, cfg.tracking.experiment, cfg.name, params,
                      tags={"study": cfg.name, "git_commit": git_commit()})
    _write_json(state_path, {**fixed, "parent_run_id": run_id, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    return run_id


def record_path(study_dir: Path, arm: str, seed: int) -> Path:
    return study_dir / "records" / f"{arm}-s{seed}.json"


def load_records(study_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((study_dir / "records").glob("*.json"))]


# ---------------------------------------------------------------------------------------------------
# training


def run_overrides(cfg: StudyConfig, plan: StudyPlan, arm: ArmConfig, seed: int, study_dir: Path,
                  parent_id: str, dense_checkpoint: str | None) -> list[str]:
    o = cfg.run_overrides + [
        f"schedule.mode='{arm.mode}'", f"train.seed={seed}", f"train.max_steps={plan.steps}",
        f"train.checkpoint_every={plan.checkpoint_every}", f"train.keep_checkpoints={plan.keep_checkpoints}",
        f"output_dir='{study_dir / 'runs'}'", f"tracking.experiment='{cfg.tracking.experiment}'",
        f"tracking.run_name='{arm.name}-s{seed}'", f"tracking.parent_run_id='{parent_id}'",
    ]
    if arm.mode == "retrofit":
        o += [f"schedule.retrofit_from='{dense_checkpoint}'", "schedule.retrofit_continue=true",
              f"schedule.retrofit_warmup_tokens={plan.base.schedule.warmup_tokens}"]
    return o + list(arm.overrides)


def _newest_step(run_dir: Path) -> tuple[Path | None, int]:
    from pipeline.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    return (found[-1][1], found[-1][0]) if found else (None, -1)


def checkpoint_at(run_dir: Path, step: int) -> Path:
    from pipeline.checkpoint import list_checkpoints

    for s, d in list_checkpoints(run_dir):
        if s == step:
            return d
    raise FileNotFoundError(f"{run_dir} has no checkpoint at step {step} (the retrofit's start)")


def train_arm(cfg: StudyConfig, plan: StudyPlan, arm: ArmConfig, seed: int, study_dir: Path, parent_id: str,
              dense_checkpoint: str | None) -> tuple[Path, str]:
    """One msa-train run (resumed if it stopped half-way, skipped if it finished); returns its final
    checkpoint and MLflow run id."""
    from pipeline.train import RUN_INFO, build_parser, prepare, run

    name = f"{arm.name}-s{seed}"
    run_dir = study_dir / "runs" / "ray" / name
    argv = ["--config", cfg.base_config, "--tracking-uri", cfg.tracking_uri]
    for o in run_overrides(cfg, plan, arm, seed, study_dir, parent_id, dense_checkpoint):
        argv += ["--set", o]
    if (run_dir / RUN_INFO).exists():
        ckpt, step = _newest_step(run_dir)
        if step == plan.steps:
            print(f"[msa-study] {name}: trained already ({ckpt.name})", flush=True)
            return ckpt, json.loads((run_dir / RUN_INFO).read_text())["mlflow_run_id"]
        print(f"[msa-study] {name}: resuming at step {max(step, 0)} of {plan.steps}", flush=True)
        argv += ["--resume", name]
    elif arm.mode == "retrofit":
        print(f"[msa-study] {name}: continuing {Path(dense_checkpoint).parent.name} from step {plan.retrofit_step} "
              f"to {plan.steps}, sparse", flush=True)
    else:
        print(f"[msa-study] {name}: training {plan.steps} steps ({plan.tokens:,} tokens)", flush=True)
    launch = prepare(build_parser().parse_args(argv))
    out = run(launch, address=plan.base.ray.address)
    ckpt, step = _newest_step(run_dir)
    if step != plan.steps:
        raise RuntimeError(f"{name}: the run ended at step {step}, not {plan.steps}")
    return ckpt, out["run_id"]


# ---------------------------------------------------------------------------------------------------
# evaluation


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} logical cores"


def _patched_model(checkpoint: Path, arm: ArmConfig):
    """A dense checkpoint in the MSA-shaped model (the base config's block size and top-k, plus the
    arm's overrides), attention in oracle mode."""
    from model.retrofit import load_dense_checkpoint
    from pipeline.checkpoint import load_checkpoint
    from pipeline.config import apply_overrides, config_from_dict
    from pipeline.config import build_model

    info = json.loads((checkpoint.parent / "run_info.json").read_text())
    d = info["config"]
    d["schedule"] = {**d["schedule"], "mode": "msa"}
    d["model"]["msa"]["enabled"] = True
    cfg = config_from_dict(apply_overrides(d, arm.overrides))
    model = build_model(cfg)
    load_dense_checkpoint(model, load_checkpoint(checkpoint)[0]["model"])
    model.set_mode("oracle")
    return model, cfg


def evaluate_checkpoint(cfg: StudyConfig, plan: StudyPlan, checkpoint: Path, arm: ArmConfig):
    import contextlib

    import torch

    from pipeline.evaluate import evaluate, load_checkpoint_model

    if arm.mode == "dense-patched":
        model, rcfg = _patched_model(checkpoint, arm)
    else:
        model, rcfg, _, _ = load_checkpoint_model(checkpoint)
    device = _device()
    model.to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if rcfg.train.dtype == "bfloat16" and device.type == "cuda" else contextlib.nullcontext())
    t0 = time.perf_counter()
    res = evaluate(model, plan.eval_shards, plan.tokenizer, rcfg.seq_len, rcfg.model.image_size,
                   rcfg.model.patch_size, device, cfg.eval.batch_size, cfg.eval.documents, autocast,
                   stats_batches=cfg.eval.stats_batches)
    print(f"[msa-study] evaluated {arm.name} ({checkpoint.parent.name}) in {time.perf_counter() - t0:.0f}s: "
          f"lm_loss {res.lm_loss:.4f}, retrieval {res.retrieval_acc:.3f} ({res.questions} questions)", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def run_metrics(client, run_id: str) -> dict:
    """Training curve, step time and throughput of a run, from its MLflow metrics.

    A logging window's step time is its tokens (the difference of train/tokens_seen) over its
    tokens/s, per step; the first window of a run (start-up, compilation) is left out when there
    are others, and the median taken. step_ms_sparse: the same over windows with sparse attention.
    """
    def hist(key):
        return sorted(((m.step, m.value) for m in client.get_metric_history(run_id, key)), key=lambda x: x[0])

    loss, tps, seen, sp = (hist(k) for k in ("train/lm_loss", "train/tokens_per_s", "train/tokens_seen",
                                              "train/sparsity"))
    seen_at, tps_at, sp_at = dict(seen), dict(tps), dict(sp)
    windows = []
    steps = [s for s, _ in seen]
    for prev, cur in zip([None] + steps[:-1], steps):
        if prev is None:
            continue  # the first window's start is not known (a continued retrofit) or is start-up
        dt = (seen_at[cur] - seen_at[prev]) / max(tps_at.get(cur, float("nan")), 1e-9)
        windows.append((cur, 1000.0 * dt / (cur - prev), sp_at.get(cur, 0.0)))

    def median(xs):
        xs = sorted(xs)
        return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else None

    later_tps = [v for s, v in tps[1:]] or [v for _, v in tps]
    return {"train_curve": [[s, v] for s, v in loss],
            "step_ms": median([w[1] for w in windows]),
            "step_ms_sparse": median([w[1] for w in windows if w[2] > 0]),
            "tokens_per_s": median(later_tps),
            "tokens_seen": seen[-1][1] if seen else None,
            "train_sparsity": sp[-1][1] if sp else None}


def make_record(arm: ArmConfig, seed: int, plan: StudyPlan, res, run_id: str, checkpoint: Path,
                train: dict, eval_set: dict, source: dict | None) -> dict:
    layers: dict[str, dict] = {}
    for k, v in res.stats.items():
        if k.startswith("layer/"):
            _, i, stat = k.split("/")
            layers.setdefault(i, {})[stat] = v
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731  (JSON has no NaN)
    m = res.metrics()
    return {
        "seed": seed, "tokens": plan.tokens, "mlflow_run_id": run_id,
        "eval_lm_loss": clean(res.lm_loss), "retrieval_acc": clean(res.retrieval_acc),
        "retrieval_acc_by_distance": {b: clean(v) for b, v in res.retrieval_acc_by_distance.items()},
        # a dense model attends to everything; an MSA arm evaluated without stats batches has no measure
        "step_ms": train.get("step_ms"), "sparsity": res.stats.get("sparsity", 0.0 if arm.mode == "dense" else None),
        # further keys
        "arm": arm.name, "mode": arm.mode, "steps": plan.steps, "tokens_seen": train.get("tokens_seen"),
        "step_ms_sparse": train.get("step_ms_sparse"), "tokens_per_s": train.get("tokens_per_s"),
        "eval_lm_loss_image_text": clean(m["eval/lm_loss_image_text"]),
        "eval_lm_loss_other_text": clean(m["eval/lm_loss_other_text"]),
        "eval_lm_loss_by_position": {b: clean(v) for b, v in res.lm_loss_by_position.items()},
        "eval_lm_targets_by_position": {b: n for b, (_, n) in res.by_position.items()},
        "eval_lm_targets": res.lm_tokens, "eval_image_text_targets": res.image_text[1],
        "retrieval_n_by_distance": {b: n for b, (_, n) in res.by_bucket.items()},
        "retrieval_acc_by_kind": {k: clean(v) for k, v in res.retrieval_acc_by_kind.items()},
        "retrieval_questions": res.questions,
        "score_recall": res.stats.get("score_recall"), "block_recall": res.stats.get("block_recall"),
        # mean selected blocks per (token, group): the compute an adaptive budget spends
        "blocks_per_token": res.stats.get("blocks_per_token"),
        "per_layer": layers, "train_sparsity": train.get("train_sparsity"), "train_curve": train.get("train_curve", []),
        "checkpoint": str(checkpoint), "eval_set": eval_set, "eval_dropped": res.dropped, "source": source,
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _log_to_run(client, run_id: str, record: dict, step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    flat = {"study/eval_lm_loss": record["eval_lm_loss"], "study/retrieval_acc": record["retrieval_acc"],
            "study/eval_lm_loss_image_text": record["eval_lm_loss_image_text"],
            "study/eval_lm_loss_other_text": record["eval_lm_loss_other_text"],
            "study/sparsity": record["sparsity"], "study/score_recall": record["score_recall"],
            "study/block_recall": record["block_recall"], "study/blocks_per_token": record.get("blocks_per_token")}
    flat |= {f"study/retrieval_acc/{b}": v for b, v in record["retrieval_acc_by_distance"].items()}
    flat |= {f"study/eval_lm_loss/pos_{b}": v for b, v in record["eval_lm_loss_by_position"].items()}
    items = [Metric(k, float(v), ts, step) for k, v in sorted(flat.items())
             if isinstance(v, (int, float)) and math.isfinite(v)]
    client.log_batch(run_id, metrics=items)
    client.set_tag(run_id, "study_arm", record["arm"])
    client.set_tag(run_id, "study_seed", str(record["seed"]))


def eval_set_of(plan: StudyPlan, cfg: StudyConfig, res) -> dict:
    return {"shards": plan.eval_shards, "documents": res.documents, "sha256": res.documents_sha256,
            "seq_len": plan.base.seq_len}


# ---------------------------------------------------------------------------------------------------
# the study


def git_state() -> tuple[str, bool]:
    """The commit and whether the tree had uncommitted changes (pipeline.tracking.git_commit)."""
    from pipeline.tracking import git_commit

    commit = git_commit()
    return commit.removesuffix("-dirty"), commit.endswith("-dirty")


def run_meta(argv: list[str]) -> dict:
    """What every record and the report say about where and from what they were made."""
    commit, dirty = git_state()
    return {"command": "msa-study " + " ".join(argv), "device": device_name(),
            "commit": commit + ("+dirty" if dirty else "")}


class LaneFailed(RuntimeError):
    """A lane of a parallel study ended with an error (its log says which run and why)."""


def lane_devices(parallel: int, address: str) -> list[str | None]:
    """What each lane sees as its GPUs: one visible GPU each on a GPU host (CUDA_VISIBLE_DEVICES), None
    on a CPU host; a clear error where there are fewer GPUs than lanes or the runs go to a cluster."""
    import torch

    if address:
        raise ConfigError("parallel", f"{parallel} lanes start local Rays, one per lane; with ray.address set "
                                      f"({address!r}) the runs go to a cluster: use parallel = 1")
    if not torch.cuda.is_available():
        return [None] * parallel
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if parallel > len(ids):
        raise ConfigError("parallel", f"{parallel} lanes need a GPU each; this host shows {len(ids)}")
    return ids[:parallel]


def run_lanes(cfg: StudyConfig, argv: list[str], seeds: list[int], study_dir: Path,
              devices: list[str | None]) -> list[str]:
    """Train `seeds` in cfg.parallel child processes at once (seeds dealt out in turn); returns a line
    for each lane that failed. Each lane's output goes to its log and, prefixed, to this console."""
    import threading

    lanes = [seeds[i::cfg.parallel] for i in range(cfg.parallel) if seeds[i::cfg.parallel]]
    (study_dir / "logs").mkdir(exist_ok=True)
    procs = []
    for i, lane in enumerate(lanes):
        tag = "s" + ",".join(map(str, lane))
        env = dict(os.environ)
        if devices[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices[i]
        cmd = [sys.executable, "-m", "pipeline.study", *argv, "--set", f"seeds={lane}", "--parallel", "1", "--lane"]
        log = study_dir / "logs" / f"lane-{tag}.log"
        gpu = f" on GPU {devices[i]}" if devices[i] is not None else ""
        print(f"[msa-study] lane {tag}: seeds {lane}{gpu}; log {log}", flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

        def pump(proc=proc, log=log, tag=tag):
            with open(log, "a") as f:
                for line in proc.stdout:
                    f.write(line)
                    f.flush()
                    print(f"[{tag}] {line}", end="", flush=True)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        procs.append((tag, log, proc, t))
    failed = []
    try:
        for tag, log, proc, t in procs:
            rc = proc.wait()
            t.join()
            if rc != 0:
                failed.append(f"lane {tag} exited with status {rc} (log: {log})")
    finally:  # interrupted: stop the lanes too, by SIGINT, so that each shuts down the Ray it started
        for _, _, proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, _, proc, _ in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return failed


def run_study(cfg: StudyConfig, argv: list[str], lane: bool = False) -> Path:
    """The study; `lane`: a child of a parallel study, which trains and records its seeds only (the
    parent process owns the parent run's status and writes the report)."""
    from pipeline.report import write_outputs
    from pipeline.tracking import _client, close_run, open_run
    from pipeline.train import _start_ray

    import ray

    plan = plan_study(cfg)
    devices = lane_devices(cfg.parallel, plan.base.ray.address) if cfg.parallel > 1 and not lane else []
    study_dir = Path(cfg.output_dir)
    (study_dir / "records").mkdir(parents=True, exist_ok=True)
    if lane:  # the parallel study's process opened the parent run and owns it
        state = check_same_study(cfg, plan, study_dir)
        if state is None:
            raise ConfigError("--lane", f"no study in {study_dir}: a lane is started by msa-study --parallel")
        parent = state["parent_run_id"]
    else:
        parent = _open_parent(cfg, plan, study_dir)
    todo = [s for s in cfg.seeds if not all(record_path(study_dir, a.name, s).exists() for a in cfg.all_arms())]
    if cfg.parallel > 1 and len(todo) > 1 and not lane:
        return _run_parallel(cfg, plan, study_dir, parent, argv, todo, devices)
    client = _client(cfg.tracking_uri)
    arms = cfg.all_arms()
    # the dense arm first (the retrofit and patched arms of a seed start from its checkpoints), then the
    # evaluation-only arms (seconds each: recorded before a long run that a time limit might cut)
    arms.sort(key=lambda a: 0 if a.name == "dense" else 1 if a.mode == "dense-patched" else 2)
    retrofit = f"retrofit from step {plan.retrofit_step}; " if any(a.mode == "retrofit" for a in arms) else ""
    print(f"[msa-study] {cfg.name}: arms {', '.join(a.name for a in arms)}; seeds {cfg.seeds}; "
          f"{plan.steps} steps x {plan.tokens_per_step:,} tokens = {plan.tokens:,} tokens per run; "
          f"{retrofit}MLflow parent run {parent} at {cfg.tracking_uri}", flush=True)
    started = _start_ray(plan.base, plan.base.ray.address)
    status = "FAILED"
    meta = run_meta(argv)
    try:
        for seed in cfg.seeds:
            for arm in arms:
                rec_path = record_path(study_dir, arm.name, seed)
                if rec_path.exists():
                    print(f"[msa-study] {arm.name}-s{seed}: recorded already, skipped", flush=True)
                    continue
                dense_run = study_dir / "runs" / "ray" / f"dense-s{seed}"
                source = None
                if arm.mode == "dense-patched":
                    ckpt, _ = _newest_step(dense_run)
                    dense_rec = json.loads(record_path(study_dir, "dense", seed).read_text())
                    run_id = open_run(cfg.tracking_uri, cfg.tracking.experiment, f"{arm.name}-s{seed}",
                                      {"dense_checkpoint": str(ckpt), "overrides": arm.overrides},
                                      tags={"mode": "dense-patched", "mlflow.parentRunId": parent,
                                            "config_name": cfg.name})
                    res = evaluate_checkpoint(cfg, plan, ckpt, arm)
                    train = {"train_curve": dense_rec["train_curve"], "tokens_seen": dense_rec["tokens_seen"]}
                    source = {"dense_run": dense_rec["mlflow_run_id"], "checkpoint": str(ckpt)}
                    rec = make_record(arm, seed, plan, res, run_id, ckpt, train, eval_set_of(plan, cfg, res), source)
                    _log_to_run(client, run_id, rec, plan.steps)
                    close_run(cfg.tracking_uri, run_id, "FINISHED")
                else:
                    dense_ckpt = None
                    if arm.mode == "retrofit":
                        dense_ckpt = str(checkpoint_at(dense_run, plan.retrofit_step))
                        dense_rec = json.loads(record_path(study_dir, "dense", seed).read_text())
                        source = {"dense_run": dense_rec["mlflow_run_id"], "checkpoint": dense_ckpt,
                                  "step": plan.retrofit_step}
                    ckpt, run_id = train_arm(cfg, plan, arm, seed, study_dir, parent, dense_ckpt)
                    res = evaluate_checkpoint(cfg, plan, ckpt, arm)
                    rec = make_record(arm, seed, plan, res, run_id, ckpt, run_metrics(client, run_id),
                                      eval_set_of(plan, cfg, res), source)
                    _log_to_run(client, run_id, rec, plan.steps)
                rec["device"] = meta["device"]
                rec["commit"] = meta["commit"]
                _write_json(rec_path, rec)
            # a report after every seed: a study spread over sessions has one at every stop
            if not lane:
                write_outputs(cfg, plan, study_dir, load_records(study_dir), meta, client, parent)
        status = "FINISHED"
    finally:
        if not lane:
            close_run(cfg.tracking_uri, parent, status)
        if started:
            ray.shutdown()
    return study_dir


def _run_parallel(cfg: StudyConfig, plan: StudyPlan, study_dir: Path, parent: str, argv: list[str],
                  seeds: list[int], devices: list[str | None]) -> Path:
    from pipeline.report import write_outputs
    from pipeline.tracking import _client, close_run

    meta = run_meta(argv)
    print(f"[msa-study] {cfg.name}: seeds {seeds} in {min(cfg.parallel, len(seeds))} lanes at once; MLflow parent "
          f"run {parent} at {cfg.tracking_uri}", flush=True)
    status = "FAILED"
    try:
        failed = run_lanes(cfg, argv, seeds, study_dir, devices)
        # the report covers whatever was recorded, also when a lane failed
        write_outputs(cfg, plan, study_dir, load_records(study_dir), meta, _client(cfg.tracking_uri), parent)
        if failed:
            raise LaneFailed("; ".join(failed))
        status = "FINISHED"
    finally:
        close_run(cfg.tracking_uri, parent, status)
    return study_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-study", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a study config (TOML), e.g. configs/study-tiny.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study config field, e.g. --set 'seeds=[0,1,2]' (repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results.json, report.md and figures from the records; train nothing")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="train N seeds at once, one process (and on a GPU host one GPU) each; the config's "
                        "`parallel` otherwise")
    p.add_argument("--lane", action="store_true", help=argparse.SUPPRESS)  # a child of a parallel study
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = load_study_config(args.config, args.overrides + ([f"parallel={args.parallel}"]
                                                               if args.parallel is not None else []))
        if args.report_only:
            from pipeline.report import write_outputs

            plan = plan_study(cfg)
            study_dir = Path(cfg.output_dir)
            check_same_study(cfg, plan, study_dir)
            write_outputs(cfg, plan, study_dir, load_records(study_dir),
                          {"command": "msa-study " + " ".join(argv), "device": device_name()}, None, None)
        else:
            study_dir = run_study(cfg, [a for a in argv if a != "--lane"], lane=args.lane)
    except (ConfigError, FileNotFoundError) as e:
        print(f"msa-study: error: {e}", file=sys.stderr)
        return 2
    except LaneFailed as e:
        print(f"msa-study: error: {e}\n[msa-study] run the same command again to continue: finished runs are "
              f"skipped, a stopped one resumes from its last checkpoint", file=sys.stderr)
        return 1
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        print(f"msa-study: error: a training run failed: {e}\n[msa-study] run the same command again to "
              f"continue: finished runs are skipped, the failed one resumes from its last checkpoint",
              file=sys.stderr)
        return 1
    if args.lane:
        return 0
    print(f"\n[msa-study] done: {study_dir / 'report.md'}, {study_dir / 'results.json'}, {study_dir / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
