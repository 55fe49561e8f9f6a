"""`msa-train`: launch a training run on the current Ray cluster, or on a local Ray it starts.

    msa-train --config configs/tiny.toml --set train.max_steps=50
    msa-train --config configs/tiny.toml --address auto          # join a running cluster
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from model.config import ConfigError
from pipeline.config import RunConfig, flatten, load_config
from pipeline.tracking import close_run, git_commit, open_run, resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-train", description="Train the multimodal MSA model on Ray.")
    p.add_argument("--config", required=True, help="a TOML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=20 (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: ray.address of the config; "
                   "empty starts a local Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else tracking.uri of the config, else a SQLite file in output_dir)")
    return p


def _tokenizer_path(cfg: RunConfig) -> str:
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    return str(Path(cfg.data.shards[0]) / "tokenizer.json")


def _check_tokenizer(cfg: RunConfig, path: str) -> None:
    from data_prep.tokenizer import load_tokenizer

    vocab = load_tokenizer(Path(path)).get_vocab_size()
    if vocab > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens "
                                              f"({path})")


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


def run(cfg: RunConfig, address: str, tracking_uri: str) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.data import build_dataset
    from pipeline.loop import train_loop_per_worker

    tok_path = _tokenizer_path(cfg)
    _check_tokenizer(cfg, tok_path)
    started = _start_ray(cfg, address)
    run_id = None
    status = "FAILED"
    try:
        ds = build_dataset(cfg.data.shards, tok_path, cfg.seq_len, cfg.model.image_size, cfg.model.patch_size,
                           cfg.data.pack_docs, cfg.data.pack_actors)
        run_name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = open_run(tracking_uri, cfg.tracking.experiment, run_name, flatten(cfg),
                          tags={"mode": "dense", "git_commit": git_commit(), "config_name": cfg.name})
        print(f"[msa-train] MLflow run {run_id} in experiment '{cfg.tracking.experiment}' at {tracking_uri}",
              flush=True)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": dataclasses.asdict(cfg), "run_id": run_id, "tracking_uri": tracking_uri},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=str(Path(cfg.output_dir) / "ray"),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                # Train's own per-report INFO lines would drown the progress lines
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                # keep `print` a plain print in the workers (Train's patch echoes every line twice)
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            ),
            datasets={"train": ds},
        )
        result = trainer.fit()
        status = "FINISHED"
        return {"run_id": run_id, "tracking_uri": tracking_uri, "experiment": cfg.tracking.experiment,
                "checkpoint": result.checkpoint.path if result.checkpoint else None,
                "metrics": result.metrics}
    finally:
        if run_id:
            close_run(tracking_uri, run_id, status)
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        address = cfg.ray.address if args.address is None else args.address
        tracking_uri = resolve_tracking_uri(args.tracking_uri, cfg.tracking_uri)
        out = run(cfg, address, tracking_uri)
    except (ConfigError, FileNotFoundError) as e:
        print(f"msa-train: error: {e}", file=sys.stderr)
        return 2
    uri = out["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    print(f"\n[msa-train] done. Run {out['run_id']} in experiment '{out['experiment']}'.")
    print(f"[msa-train] to look at it:  {ui}   then open http://127.0.0.1:5000")
    if out["checkpoint"]:
        print(f"[msa-train] last checkpoint: {out['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
