"""The per-worker training loop that Ray Train runs on every worker.

It builds the model, wraps it for data parallelism (DDP over gloo on CPU, NCCL on GPU), streams its
share of the packed rows, steps the optimizer, reports metrics and checkpoints through
`ray.train.report`, and logs to MLflow on rank 0 only (through a tracker with a no-op twin).
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.schema import IMG_PATCH, SPECIAL_TOKENS
from model.batch import Batch
from model.transformer import MultimodalTransformer
from pipeline.checkpoint import load_state, restore_rng, save_state, unwrap
from pipeline.config import RunConfig, config_from_dict
from pipeline.data import DROP_REASONS
from pipeline.optim import build_optimizer, lr_at, set_lr
from pipeline.tracking import make_tracker


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    data_wait: float = 0.0
    grad_norm_sum: float = 0.0
    t0: float = field(default_factory=time.perf_counter)
    dropped: dict[str, int] = field(default_factory=dict)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    # Train logs every report at INFO from the worker context; the progress line says it once, better
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    cfg: RunConfig = config_from_dict(loop_config["config"])
    run_id: str | None = loop_config.get("run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()

    model = MultimodalTransformer(cfg.model, img_patch_id=SPECIAL_TOKENS.index(IMG_PATCH))
    optimizer = build_optimizer(model, cfg.train)
    step, tokens_seen = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_state(Path(d))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        run_id = state.get("mlflow_run_id") or run_id
        restore_rng(state["rng"])
        if rank == 0:
            print(f"[train] resumed from step {step} ({tokens_seen} tokens seen)", flush=True)
    model = ray.train.torch.prepare_model(model)
    tracker = make_tracker(rank, loop_config["tracking_uri"], run_id)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bfloat16"
                else contextlib.nullcontext())

    shard = ray.train.get_dataset_shard("train")
    win = Window()
    t_start, step_start = time.perf_counter(), step
    while step < cfg.train.max_steps:
        it = iter(shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True,
                                           prefetch_batches=cfg.data.prefetch_batches))
        n_batches = 0
        while step < cfg.train.max_steps:
            t_wait = time.perf_counter()
            try:
                cols = next(it)
            except StopIteration:
                break
            win.data_wait += time.perf_counter() - t_wait
            n_batches += 1
            for reason in DROP_REASONS:
                win.dropped[reason] = win.dropped.get(reason, 0) + int(cols[f"dropped_{reason}"].sum())
            batch = Batch.from_dict(cols).to(device)

            lr = lr_at(step, cfg.train)
            set_lr(optimizer, lr)
            with autocast:
                out = model(batch)
            loss = out.losses["lm"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            step += 1

            n_tokens = int((batch.segment_ids_BT != 0).sum())
            win.steps += 1
            win.loss_sum += float(loss.detach())
            win.grad_norm_sum += float(grad_norm)
            win.tokens += n_tokens

            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                tokens_seen = _log(cfg, win, step, lr, tokens_seen, tracker, rank, world, device,
                                   t_start, step_start, checkpoint=(step % cfg.train.checkpoint_every == 0
                                                                     or step == cfg.train.max_steps),
                                   model=model, optimizer=optimizer, run_id=run_id)
                win = Window()
        if n_batches == 0:
            raise RuntimeError("the training dataset produced no batch of train.batch_size rows; "
                               "is data.shards empty or the batch size larger than the data?")


def _log(cfg, win: Window, step, lr, tokens_seen, tracker, rank, world, device, t_start, step_start,
         checkpoint, model, optimizer, run_id) -> int:
    import ray.train

    elapsed = time.perf_counter() - win.t0
    loss_sum, tokens, wait = _all_reduce_sum([win.loss_sum, float(win.tokens), win.data_wait], device)
    dropped = _all_reduce_sum([float(win.dropped.get(r, 0)) for r in DROP_REASONS], device)
    tokens_seen += int(tokens)
    metrics = {
        "train/lm_loss": loss_sum / (win.steps * world),
        "train/tokens_per_s": tokens / elapsed,
        "train/lr": lr,
        "train/grad_norm": win.grad_norm_sum / win.steps,
        "train/data_wait_frac": wait / (elapsed * world),
        "train/tokens_seen": float(tokens_seen),
    }
    for reason, n in zip(DROP_REASONS, dropped):
        if n:
            metrics[f"data/dropped_{reason}"] = n
    tracker.log_metrics(metrics, step)
    if rank == 0:
        done = step - step_start
        eta = (time.perf_counter() - t_start) / max(done, 1) * (cfg.train.max_steps - step)
        print(f"[train] step {step:>6}/{cfg.train.max_steps}  loss {metrics['train/lm_loss']:.4f}  "
              f"lr {lr:.2e}  gnorm {metrics['train/grad_norm']:.2f}  tok/s {metrics['train/tokens_per_s']:,.0f}  "
              f"data-wait {metrics['train/data_wait_frac']:.0%}  eta {eta:,.0f}s", flush=True)
    report = {k.replace("/", "_"): v for k, v in metrics.items()} | {"step": step}
    if checkpoint:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_state(Path(d), model, optimizer, step,
                           {"tokens_seen": tokens_seen, "mlflow_run_id": run_id, "config_name": cfg.name})
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
    else:
        ray.train.report(report)
    return tokens_seen


__all__ = ["train_loop_per_worker", "unwrap"]
