"""`msa-train`: launch a training run on the current Ray cluster, or on a local Ray it starts.

    msa-train --config configs/tiny.toml --set train.max_steps=50
    msa-train --config configs/tiny.toml --address auto          # join a running cluster
    msa-train --config configs/tiny.toml --resume                # continue the newest run of output_dir

A run lives in `<output_dir>/ray/<run name>/`: Ray Train's checkpoints plus `run_info.json` (the
resolved config, the data plan and the MLflow run id), which is what `--resume` continues from: the
same config (plus any `--set` given now), the same data plan, the same MLflow run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from model.config import ConfigError
from pipeline.config import RunConfig, apply_overrides, config_from_dict, flatten, load_config
from pipeline.plan import DataPlan, build_plan
from pipeline.tracking import close_run, git_commit, open_run, resolve_tracking_uri

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


def _tokenizer_path(cfg: RunConfig) -> str:
    return cfg.data.tokenizer or str(Path(cfg.data.shards[0]) / "tokenizer.json")


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
    n = cfg.ray.local_num_cpus or int(cfg.ray.num_workers * cfg.ray.cpus_per_worker + cfg.data.pack_actors + 1)
    # the dashboard is started too: Ray Train's controller and `ray job submit` rely on it
    ray.init(num_cpus=n, log_to_driver=True)
    return True


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
    start_docs_done: list[int] | None = None  # a continued retrofit: the dense checkpoint's data position


def _continued_dense_run(cfg: RunConfig) -> tuple[DataPlan, list[int]]:
    """schedule.retrofit_continue: the dense run's data plan and its checkpoint's data position, after
    checking that the two runs step through the same schedule (same steps, same tokens per step)."""
    ckpt = Path(cfg.schedule.retrofit_from)
    info_path, state_path = ckpt.parent / RUN_INFO, ckpt / "data_state.json"
    for p in (info_path, state_path):
        if not p.exists():
            raise ConfigError("schedule.retrofit_continue", f"needs {p} (the dense run's plan and data position)")
    info = json.loads(info_path.read_text())
    dense = config_from_dict(info["config"])
    for name, mine, theirs in (("train.max_steps", cfg.train.max_steps, dense.train.max_steps),
                               ("tokens per step", cfg.tokens_per_step, dense.tokens_per_step)):
        if mine != theirs:
            raise ConfigError("schedule.retrofit_continue", f"{name} {mine} differs from the dense run's {theirs}")
    body = json.loads(state_path.read_text())
    if body["step"] >= cfg.train.max_steps:
        raise ConfigError("schedule.retrofit_from", f"the checkpoint is at step {body['step']}, "
                                                    f"not before train.max_steps={cfg.train.max_steps}")
    return DataPlan.from_json(info["plan"]), body["docs_done"]


def prepare(args: argparse.Namespace) -> Launch:
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        run_dir = find_run(cfg.output_dir, args.resume)
        info = json.loads((run_dir / RUN_INFO).read_text())
        # the run's own config, with what this command line overrides
        cfg = config_from_dict(apply_overrides(info["config"], args.overrides))
        uri = resolve_tracking_uri(args.tracking_uri, info["tracking_uri"])
        start = _continued_dense_run(cfg)[1] if cfg.schedule.retrofit_continue else None
        return Launch(cfg, run_dir.name, run_dir, DataPlan.from_json(info["plan"]), info["mlflow_run_id"], uri,
                      start)
    run_name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / "ray" / run_name
    if run_dir.exists():
        raise ConfigError("tracking.run_name", f"{run_dir} exists already; use --resume to continue it")
    tokens_needed = cfg.train.max_steps * cfg.train.batch_size * cfg.ray.num_workers * cfg.seq_len
    if cfg.schedule.retrofit_continue:
        plan, start = _continued_dense_run(cfg)
        return Launch(cfg, run_name, run_dir, plan, None, resolve_tracking_uri(args.tracking_uri, cfg.tracking_uri),
                      start)
    plan = build_plan(cfg.data.shards, cfg.data.weights, tokens_needed, cfg.model.image_tokens, cfg.train.seed)
    return Launch(cfg, run_name, run_dir, plan, None, resolve_tracking_uri(args.tracking_uri, cfg.tracking_uri))


def run(launch: Launch, address: str) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.data import DatasetFactory
    from pipeline.loop import train_loop_per_worker

    cfg = launch.cfg
    tok_path = _tokenizer_path(cfg)
    _check_tokenizer(cfg, tok_path)
    started = _start_ray(cfg, address)
    run_id, status = launch.run_id, "FAILED"
    try:
        if run_id is None:
            run_id = open_run(launch.tracking_uri, cfg.tracking.experiment, launch.run_name, flatten(cfg),
                              tags={"mode": cfg.schedule.mode, "git_commit": git_commit(), "config_name": cfg.name,
                                    **({"mlflow.parentRunId": cfg.tracking.parent_run_id}
                                       if cfg.tracking.parent_run_id else {})})
            launch.run_dir.mkdir(parents=True)
            (launch.run_dir / RUN_INFO).write_text(json.dumps({
                "config": dataclasses.asdict(cfg), "plan": launch.plan.to_json(), "mlflow_run_id": run_id,
                "tracking_uri": launch.tracking_uri}))
        else:
            open_run(launch.tracking_uri, cfg.tracking.experiment, launch.run_name, {}, {}, run_id=run_id)
        print(f"[msa-train] run {launch.run_name}: MLflow run {run_id} in experiment "
              f"'{cfg.tracking.experiment}' at {launch.tracking_uri}", flush=True)
        datasets = DatasetFactory(launch.plan, str(launch.run_dir), tok_path, cfg.seq_len, cfg.model.image_size,
                                  cfg.model.patch_size, cfg.data.pack_docs, cfg.data.pack_actors,
                                  start_docs_done=launch.start_docs_done)
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
                storage_path=str(launch.run_dir.parent),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
                # Train's own per-report INFO lines would drown the progress lines
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                # keep `print` a plain print in the workers (Train's patch echoes every line twice)
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            ),
            datasets={"train": datasets},
        )
        result = trainer.fit()
        status = "FINISHED"
        return {"run_id": run_id, "run_name": launch.run_name, "tracking_uri": launch.tracking_uri,
                "experiment": cfg.tracking.experiment,
                "checkpoint": result.checkpoint.path if result.checkpoint else None}
    finally:
        if run_id:
            close_run(launch.tracking_uri, run_id, status)
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        launch = prepare(args)
        address = launch.cfg.ray.address if args.address is None else args.address
        out = run(launch, address)
    except (ConfigError, FileNotFoundError) as e:
        print(f"msa-train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        print(f"msa-train: error: training failed: {e}\n[msa-train] continue it from its last checkpoint "
              f"with: msa-train --config {args.config} --resume {launch.run_name}", file=sys.stderr)
        return 1
    uri = out["tracking_uri"]
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    mlflow_cmd = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    ui = f"{mlflow_cmd} ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    print(f"\n[msa-train] done. Run {out['run_name']} (MLflow run {out['run_id']}, experiment "
          f"'{out['experiment']}').")
    print(f"[msa-train] to look at it:  {ui}   then open http://127.0.0.1:5000")
    if out["checkpoint"]:
        print(f"[msa-train] last checkpoint: {out['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
