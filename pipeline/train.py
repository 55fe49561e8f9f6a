"""`msa-train`: launch a training run on the current Ray cluster, or on a local Ray it starts.

    msa-train --config configs/tiny.toml --set train.max_steps=50
    msa-train --config configs/tiny.toml --address auto          # join a running cluster
    msa-train --config configs/tiny.toml --resume                # continue the newest run of output_dir

A run lives in `<output_dir>/ray/<run name>/`: its checkpoints (`checkpoint_000120/`, see
pipeline/checkpoint.py) plus `run_info.json` (the resolved config, the data plan and the MLflow run
id), which is what `--resume` continues from: the same config (plus any `--set` given now), the same
data plan (extended if `train.max_steps` grew), the same MLflow run.

The MLflow run's status is the truth about the run: FINISHED once every step is trained and logged
(also if something fails after that, e.g. the final checkpoint's write; the run is then tagged with
what failed), FAILED with the reason in the tag `failure_reason` when training died, KILLED when the
driver was interrupted, RUNNING again when resumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path

from model.config import ConfigError
from pipeline.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, read_data_state, read_manifest,
                                 resolve_checkpoint)
from model.flops import count_parameters
from pipeline.config import RunConfig, apply_overrides, config_from_dict, load_config, resolved_params
from pipeline.plan import DataPlan, DataState, build_plan
from pipeline.console import ProgressTail, duration, without_known_harmless_lines
from pipeline.tracking import (DESCRIPTION_TAG, close_run, final_metrics, git_commit, log_dict_artifact, open_run,
                               resolve_tracking_uri, run_completed, run_page_url, set_description, source_tags)

RUN_INFO = "run_info.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-train", description="Train the multimodal MSA model on Ray.")
    p.add_argument("--config", required=True, help="a TOML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=20 (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: ray.address of the config; "
                   "empty starts a local Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else tracking.uri of the config, else a SQLite file in output_dir)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_NAME",
                   help="continue a run of output_dir from its last checkpoint (default: the newest run)")
    return p


def _check_tokenizer(cfg: RunConfig, path: str) -> None:
    from data_prep.tokenizer import load_tokenizer

    vocab = load_tokenizer(Path(path)).get_vocab_size()
    if vocab > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's {vocab} "
                                              f"tokens ({path})")


def _start_ray(cfg: RunConfig, address: str) -> bool:
    """Connect to `address` or start a local Ray; returns True if this process started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # logical CPUs: the training workers plus the packing actors plus one for reading; a local Ray is a
    # development set-up, so oversubscribing a small machine's cores is intended
    start_local_ray(cfg.ray.local_num_cpus or
                    int(cfg.ray.num_workers * cfg.ray.cpus_per_worker + cfg.data.pack_actors + 1))
    return True


def start_local_ray(num_cpus: int) -> None:
    """A local Ray the way msa-train starts one (token auth on, Ray's default), in this process.

    The dashboard is started too: Ray Train's controller and `ray job submit` rely on it; every worker
    process silences the known-harmless framework warnings at their source (pipeline/console.py). A
    process that trains several times (the end-to-end tests) starts it once: later runs reuse it."""
    import ray

    ray.init(num_cpus=num_cpus, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": "pipeline.console.quiet_ray_workers"})


def find_run(output_dir: str, name: str) -> Path:
    root = Path(output_dir) / "ray"
    if name != "latest":
        run = root / name
        if not (run / RUN_INFO).exists():
            raise FileNotFoundError(f"--resume: no run {name!r} in {root}")
        return run
    runs = sorted(root.glob(f"*/{RUN_INFO}"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"--resume: no run to resume in {root}")
    return runs[-1].parent


@dataclasses.dataclass
class Launch:
    cfg: RunConfig
    run_name: str
    run_dir: Path
    plan: DataPlan
    run_id: str | None  # MLflow run to continue, or None for a new run
    tracking_uri: str
    start_state: DataState | None = None  # a continued retrofit: the dense checkpoint's data position


def _continued_dense_run(cfg: RunConfig) -> tuple[DataPlan, DataState]:
    """schedule.retrofit_continue: the dense run's data plan and its checkpoint's data position, after
    checking that the two runs step through the same schedule (same steps, same tokens per step)."""
    ckpt = resolve_checkpoint(Path(cfg.schedule.retrofit_from))
    info_path = ckpt.parent / RUN_INFO
    if not info_path.exists():
        raise ConfigError("schedule.retrofit_continue", f"needs {info_path} (the dense run's plan)")
    info = json.loads(info_path.read_text())
    dense = config_from_dict(info["config"])
    for name, mine, theirs in (("train.max_steps", cfg.train.max_steps, dense.train.max_steps),
                               ("tokens per step", cfg.tokens_per_step, dense.tokens_per_step)):
        if mine != theirs:
            raise ConfigError("schedule.retrofit_continue", f"{name} {mine} differs from the dense run's {theirs}")
    step = read_manifest(ckpt)["step"]
    if step >= cfg.train.max_steps:
        raise ConfigError("schedule.retrofit_from", f"the checkpoint is at step {step}, "
                                                    f"not before train.max_steps={cfg.train.max_steps}")
    return DataPlan.from_json(info["plan"]), read_data_state(ckpt)


def _plan(cfg: RunConfig) -> DataPlan:
    tokens_needed = cfg.train.max_steps * cfg.tokens_per_step
    return build_plan(cfg.data.shards, cfg.data.weights, tokens_needed, cfg.model.image_tokens, cfg.train.seed)


def _extended_plan(cfg: RunConfig, old: DataPlan) -> DataPlan:
    """The plan of a resumed run whose max_steps grew: the same entries first, more epochs after."""
    new = _plan(cfg)
    if len(new.entries) <= len(old.entries):
        return old
    if new.shards != old.shards or new.entries[:len(old.entries)] != old.entries:
        raise ConfigError("data.shards", "the shards changed since the run started (their manifests differ): "
                                         "the data plan cannot be extended; start a new run")
    return new


def prepare(args: argparse.Namespace) -> Launch:
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        run_dir = find_run(cfg.output_dir, args.resume)
        info = json.loads((run_dir / RUN_INFO).read_text())
        # the run's own config, with what this command line overrides
        cfg = config_from_dict(apply_overrides(info["config"], args.overrides))
        uri = resolve_tracking_uri(args.tracking_uri, info["tracking_uri"])
        if cfg.schedule.retrofit_continue:  # its plan is the dense run's
            return Launch(cfg, run_dir.name, run_dir, DataPlan.from_json(info["plan"]), info["mlflow_run_id"], uri,
                          _continued_dense_run(cfg)[1])
        plan = _extended_plan(cfg, DataPlan.from_json(info["plan"]))
        return Launch(cfg, run_dir.name, run_dir, plan, info["mlflow_run_id"], uri)
    run_name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / "ray" / run_name
    if run_dir.exists():
        raise ConfigError("tracking.run_name", f"{run_dir} exists already; use --resume to continue it")
    uri = resolve_tracking_uri(args.tracking_uri, cfg.tracking_uri)
    if cfg.schedule.retrofit_continue:
        plan, start = _continued_dense_run(cfg)
        return Launch(cfg, run_name, run_dir, plan, None, uri, start)
    return Launch(cfg, run_name, run_dir, _plan(cfg), None, uri)


def _write_run_info(launch: Launch, run_id: str) -> None:
    (launch.run_dir / RUN_INFO).write_text(json.dumps({
        "config": dataclasses.asdict(launch.cfg), "plan": launch.plan.to_json(), "mlflow_run_id": run_id,
        "tracking_uri": launch.tracking_uri}))


def run(launch: Launch, address: str) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.data import DatasetFactory, ingest_config
    from pipeline.loop import train_loop_per_worker

    cfg = launch.cfg
    _check_tokenizer(cfg, cfg.tokenizer_path)
    done = list_checkpoints(launch.run_dir)
    if launch.run_id and done and done[-1][0] >= cfg.train.max_steps:
        print(f"[msa-train] run {launch.run_name} is complete at step {done[-1][0]} (train.max_steps="
              f"{cfg.train.max_steps}); to train on, raise it: --set train.max_steps=N", flush=True)
        return {"run_id": launch.run_id, "run_name": launch.run_name, "tracking_uri": launch.tracking_uri,
                "experiment": cfg.tracking.experiment, "checkpoint": str(done[-1][1])}
    t_begin = time.time()
    started = _start_ray(cfg, address)
    run_id = launch.run_id
    try:
        if run_id is None:
            counts = count_parameters(cfg.model)
            params = resolved_params(cfg) | {
                "params.total": counts["params_total"], "params.active": counts["params_active"],
                "params.index_branch": counts["params_index_branch"], "params.embedding": counts["params_embedding"],
                "train.tokens_per_step": cfg.tokens_per_step}
            run_id = open_run(launch.tracking_uri, cfg.tracking.experiment, launch.run_name, params,
                              tags={"mode": cfg.schedule.mode, "git_commit": git_commit(), "config_name": cfg.name,
                                    DESCRIPTION_TAG: describe(cfg, counts), **source_tags("msa-train"),
                                    **({"mlflow.parentRunId": cfg.tracking.parent_run_id}
                                       if cfg.tracking.parent_run_id else {})})
            launch.run_dir.mkdir(parents=True)
            _write_run_info(launch, run_id)
            log_dict_artifact(launch.tracking_uri, run_id, dataclasses.asdict(cfg), "config.json")
            log_dict_artifact(launch.tracking_uri, run_id, launch.plan.to_json(), "data/plan.json")
            for i, d in enumerate(cfg.data.shards):  # the shard sets' manifests: what the run trained on
                log_dict_artifact(launch.tracking_uri, run_id, json.loads((Path(d) / "manifest.json").read_text()),
                                  f"data/manifest_{i}.json")
        else:
            open_run(launch.tracking_uri, cfg.tracking.experiment, launch.run_name, {}, {}, run_id=run_id)
            _write_run_info(launch, run_id)  # the resumed config and (possibly extended) plan
        print(f"[msa-train] run {launch.run_name}: MLflow run {run_id} in experiment "
              f"'{cfg.tracking.experiment}' at {launch.tracking_uri}", flush=True)
        datasets = DatasetFactory(launch.plan, str(launch.run_dir), cfg.tokenizer_path, cfg.seq_len,
                                  cfg.model.image_size, cfg.model.patch_size, cfg.data.pack_docs, cfg.data.pack_actors,
                                  start_state=launch.start_state)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": dataclasses.asdict(cfg), "run_id": run_id,
                               "tracking_uri": launch.tracking_uri, "plan": launch.plan.to_json(),
                               "run_dir": str(launch.run_dir)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=launch.run_name,
                # Ray Train's own run state; the checkpoints are written by the loop itself, atomically,
                # into the run directory (pipeline/checkpoint.py), so none is handed to Ray
                storage_path=str(launch.run_dir.parent),
                failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
                # Train's own per-report INFO lines would drown the progress lines
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                # keep `print` a plain print in the workers (Train's patch echoes every line twice)
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            ),
            datasets={"train": datasets},
            dataset_config=ingest_config(),  # the rows in plan order on every worker
        )
        # rank 0's progress lines, without Ray's worker prefixes; Ray's known-harmless lines dropped
        with ProgressTail(launch.run_dir), without_known_harmless_lines():
            trainer.fit()
        after_error = None
    except BaseException as e:
        if not (run_id and _close_after_error(launch.tracking_uri, run_id, e)):
            raise
        after_error = f"{type(e).__name__}: {e}"
    else:
        close_run(launch.tracking_uri, run_id, "FINISHED")
    finally:
        if run_id:
            _finish_description(launch, run_id)
        if started:
            ray.shutdown()
    newest = latest_checkpoint(launch.run_dir)
    return {"run_id": run_id, "run_name": launch.run_name, "tracking_uri": launch.tracking_uri,
            "experiment": cfg.tracking.experiment, "checkpoint": str(newest) if newest else None,
            "after_error": after_error, "run_dir": str(launch.run_dir), "elapsed_s": time.time() - t_begin}


MODE_WORDS = {
    "dense": "Dense GQA baseline (no index branch)",
    "msa": "Native MSA: dense warm-up of {warmup:,} tokens (the index branch learns from the KL), then sparse",
    "retrofit": "Retrofit: a dense checkpoint + fresh index branch, warm-up of {warmup:,} tokens, then sparse",
}
HEADLINE = ("train/lm_loss", "train/kl_index_loss", "train/sparsity", "train/score_recall", "eval/lm_loss",
            "eval/retrieval_acc", "train/tokens_per_s", "train/mfu", "train/tokens_seen", "train/skipped_samples")


def describe(cfg: RunConfig, counts: dict) -> str:
    """The run's description (Markdown, the MLflow UI's "Description"): what was trained on what."""
    m, s = cfg.model, cfg.schedule
    warmup = s.warmup_tokens if s.mode == "msa" else s.retrofit_warmup_tokens
    attn = (f"{m.n_layers} layers: {m.msa.n_dense_layers} dense + {m.n_layers - m.msa.n_dense_layers} MSA "
            f"(blocks of {m.msa.block_size}, top-{m.msa.topk})" if m.msa.enabled else f"{m.n_layers} dense layers")
    moe = f", MoE {m.moe.n_experts} experts top-{m.moe.top_k}" if m.moe.enabled else ""
    lines = [f"**{MODE_WORDS[s.mode].format(warmup=warmup)}**", "",
             f"- model `{cfg.name}`: d_model {m.d_model}, {attn}{moe}; {counts['params_total'] / 1e6:,.1f}M "
             f"parameters ({counts['params_active'] / 1e6:,.1f}M active, index branch "
             f"{counts['params_index_branch'] / 1e6:,.2f}M)",
             f"- data: {', '.join(cfg.data.shards)}; rows of {cfg.seq_len:,} tokens, "
             f"{cfg.tokens_per_step:,} tokens per step, {cfg.train.max_steps:,} steps",
             f"- {cfg.ray.num_workers} workers ({cfg.ray.parallel}), {cfg.train.dtype}"]
    if s.mode == "retrofit":
        lines.append(f"- retrofitted from `{s.retrofit_from}`")
    return "\n".join(lines)


def _finish_description(launch: Launch, run_id: str) -> None:
    """Append the final metrics to the run's description (best effort: never fails the run)."""
    try:
        metrics = final_metrics(launch.tracking_uri, run_id, HEADLINE)
        if not metrics:
            return
        table = ["", "| final | value |", "|---|---|"] + [f"| `{k}` | {v:,.4g} |" for k, v in metrics.items()]
        set_description(launch.tracking_uri, run_id, describe(launch.cfg, count_parameters(launch.cfg.model))
                        + "\n" + "\n".join(table))
    except Exception as e:  # the tracking server may be what failed
        print(f"[msa-train] warning: could not update the run's description: {e}", file=sys.stderr)


class Terminated(BaseException):
    """The driver got SIGTERM (a scheduler's time limit, `ray job stop`): end the run's record cleanly."""


def _raise_terminated(signum, frame):
    raise Terminated(f"msa-train received signal {signal.Signals(signum).name}")


def _close_after_error(uri: str, run_id: str, e: BaseException) -> bool:
    """FINISHED if every step was trained and logged before the error (tagged with it; returns True),
    else FAILED (or KILLED for an interrupted or terminated driver) with the reason (returns False)."""
    reason = f"{type(e).__name__}: {e}"[:5000]
    interrupted = isinstance(e, (KeyboardInterrupt, Terminated))
    try:
        if run_completed(uri, run_id):
            close_run(uri, run_id, "FINISHED", tags={"post_training_error": reason})
            return not interrupted
        close_run(uri, run_id, "KILLED" if interrupted else "FAILED", tags={"failure_reason": reason})
    except Exception as tracking_error:  # the tracking server itself may be what failed
        print(f"[msa-train] warning: could not record the run's end in MLflow: {tracking_error}", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(args)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary(out: dict) -> None:
    """What a user needs at the end: the final metrics, where the run, its checkpoint and its MLflow
    UI are."""
    uri = out["tracking_uri"]
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    mlflow_cmd = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    ui = f"{mlflow_cmd} ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    if out.get("after_error"):
        print(f"[msa-train] warning: every step was trained and logged, but then: {out['after_error']}",
              file=sys.stderr)
    print(f"\n[msa-train] done: run {out['run_name']} (MLflow run {out['run_id']}, experiment "
          f"'{out['experiment']}') in {duration(out.get('elapsed_s', 0))}")
    try:
        metrics = final_metrics(uri, out["run_id"], HEADLINE)
    except Exception:
        metrics = {}
    if metrics:
        # train/* by their short names; eval/lm_loss keeps its prefix (train/lm_loss is there too)
        print("[msa-train] final:  " + "  ".join(f"{k.removeprefix('train/')} {v:,.4g}" for k, v in metrics.items()))
    if out.get("run_dir"):
        print(f"[msa-train] run directory:  {out['run_dir']}")
    if out["checkpoint"]:
        print(f"[msa-train] last checkpoint: {out['checkpoint']}")
        print(f"[msa-train] evaluate it with:  msa-eval --checkpoint {Path(out['checkpoint']).parent}")
    try:
        page = run_page_url(uri, out["run_id"])
    except Exception:
        page = "http://127.0.0.1:5000"
    if uri.startswith("sqlite"):
        print(f"[msa-train] to look at it:  {ui}   then open {page}")
    else:
        print(f"[msa-train] the run in the MLflow UI:  {page}")


def _main(args: argparse.Namespace) -> int:
    try:
        launch = prepare(args)
        address = launch.cfg.ray.address if args.address is None else args.address
        out = run(launch, address)
    except (ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"msa-train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        print(f"msa-train: error: training failed: {e}\n[msa-train] continue it from its last checkpoint "
              f"with: msa-train --config {args.config} --resume {launch.run_name}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        print(f"msa-train: stopped ({e or 'interrupted'}); continue it with: msa-train --config {args.config} "
              f"--resume {launch.run_name}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    _summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
