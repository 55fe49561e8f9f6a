"""The per-worker training loop that Ray Train runs on every worker.

It builds the model, wraps it for data parallelism (DDP over gloo on CPU, NCCL on GPU), streams its
share of the packed rows, runs the MSA schedule (pipeline/schedule.py), steps the optimizer, reports
metrics and checkpoints through `ray.train.report`, and logs to MLflow on rank 0 only (through a
tracker with a no-op twin).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.schema import IMG_PATCH, SPECIAL_TOKENS
from model.batch import Batch
from model.transformer import MultimodalTransformer
from pipeline.checkpoint import load_state, restore_rng, save_state
from pipeline.config import RunConfig, config_from_dict
from pipeline.data import DROP_REASONS
from pipeline.flops import StepFlops, device_peak_tflops
from pipeline.metrics import Window, progress_line, reduce_window
from pipeline.optim import build_optimizer, group_params, lr_at, set_lr
from pipeline.parallel import as_float, load_states, model_state, optimizer_state, wrap
from pipeline.plan import DataPlan, DataState, write_data_state
from pipeline.schedule import attention_mode, frozen_groups
from pipeline.tracking import make_tracker

log = logging.getLogger(__name__)


class TooManyBadSteps(RuntimeError):
    pass


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    start_step: int = 0  # where this run's own schedule starts (a continued retrofit: the dense checkpoint's step)


def build_model(cfg: RunConfig) -> MultimodalTransformer:
    return MultimodalTransformer(cfg.model, img_patch_id=SPECIAL_TOKENS.index(IMG_PATCH))


def _kill_once(cfg: RunConfig, run_dir: Path, rank: int, step: int) -> None:
    """Fault injection for the recovery tests: SIGKILL this worker once at the configured step."""
    marker = run_dir / f".killed-at-{step}"
    if cfg.debug.kill_worker_at_step == step and rank == cfg.debug.kill_rank and not marker.exists():
        marker.write_text("")
        print(f"[debug] killing worker rank {rank} at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _init_model(cfg: RunConfig, rank: int):
    """A fresh model: random, or for a retrofit the dense checkpoint plus fresh index projections.
    Returns (model, start): start is (LoopState, DataState) where a continued retrofit picks up the
    dense run (schedule.retrofit_continue), else None."""
    model = build_model(cfg)
    start = None
    if cfg.schedule.mode == "retrofit":
        from model.retrofit import load_dense_checkpoint

        dense_state = load_state(Path(cfg.schedule.retrofit_from))
        fresh = load_dense_checkpoint(model, dense_state["model"])
        if rank == 0:
            print(f"[train] retrofit: loaded the dense checkpoint {cfg.schedule.retrofit_from}; "
                  f"{len(fresh)} fresh index tensors", flush=True)
        if cfg.schedule.retrofit_continue:
            # the optimizer starts fresh (the index branch is new); step, tokens and data go on
            step = dense_state["step"]
            start = (LoopState(step=step, tokens_seen=dense_state["tokens_seen"], start_step=step),
                     DataState(dense_state["data_state"]["docs_done"]))
            if rank == 0:
                print(f"[train] retrofit: continuing the dense run at step {step} "
                      f"({dense_state['tokens_seen']:,} tokens seen)", flush=True)
    return model, start


def _quiet_report_logging() -> None:
    """Ray Train logs every report (all metrics) at INFO from the worker context, on a logger outside
    the `ray.train` tree that LoggingConfig does not reach; the progress line says it once, better."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray version: its own logging, nothing to quiet
        pass


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    _quiet_report_logging()
    cfg: RunConfig = config_from_dict(loop_config["config"])
    plan = DataPlan.from_json(loop_config["plan"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()

    ckpt = ray.train.get_checkpoint()
    saved = None
    if ckpt:
        with ckpt.as_directory() as d:
            saved = load_state(Path(d))
    raw, start = (build_model(cfg), None) if saved else _init_model(cfg, rank)
    model = wrap(raw, cfg.ray.parallel, device)
    optimizer = build_optimizer(raw, cfg.train)  # after wrapping: FSDP replaces the parameters
    st = LoopState()
    data_state = DataState([0] * len(plan.entries))
    if saved:
        load_states(model, optimizer, saved)
        st = LoopState(step=saved["step"], tokens_seen=saved["tokens_seen"], skipped_steps=saved["skipped_steps"],
                       start_step=saved.get("start_step", 0))
        data_state = DataState(saved["data_state"]["docs_done"]).restart(plan)
        restore_rng(saved["rng"])
        if rank == 0:
            print(f"[train] resumed at step {st.step} ({st.tokens_seen:,} tokens seen)", flush=True)
    elif start:
        st, data_state = start[0], start[1].restart(plan)
    tracker = make_tracker(rank, loop_config["tracking_uri"], loop_config["run_id"])
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bfloat16"
                else contextlib.nullcontext())
    step_flops = StepFlops(cfg.model)
    peak = device_peak_tflops(cfg.train.peak_tflops)
    stats_every = cfg.train.stats_every or cfg.train.log_every
    has_index = bool(group_params(optimizer, {"index"}))

    docs_delta = np.zeros(len(plan.entries), np.int64)  # documents consumed since the last checkpoint
    win = Window()
    selection = None
    t_start, step_start = time.perf_counter(), st.step
    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True,
                                            prefetch_batches=cfg.data.prefetch_batches))
    while st.step < cfg.train.max_steps:
        t_wait = time.perf_counter()
        cols = next(batches, None)
        if cols is None:
            raise RuntimeError(f"the data plan ran out at step {st.step} before train.max_steps="
                               f"{cfg.train.max_steps}; the plan is sized from the manifests' token estimates")
        win.data_wait_s += time.perf_counter() - t_wait
        # the bookkeeping columns arrive on the training device like the rest: one copy back for them
        book = {k: cols[k].cpu().numpy()
                for k in ("plan_idx", "docs_done", "segment_ids", *(f"dropped_{r}" for r in DROP_REASONS))}
        np.add.at(docs_delta, book["plan_idx"], book["docs_done"])
        for reason in DROP_REASONS:
            win.count(f"data/dropped_{reason}", int(book[f"dropped_{reason}"].sum()))
        batch = Batch.from_dict(cols).to(device)

        mode = attention_mode(cfg, st.step - st.start_step)
        if mode != raw.mode:
            raw.set_mode(mode)
            if rank == 0:
                print(f"[train] step {st.step}: attention mode -> {mode}", flush=True)
        lr = lr_at(st.step, cfg.train)
        set_lr(optimizer, lr, frozen_groups(cfg, mode))
        compute_stats = (st.step + 1) % stats_every == 0 and raw.has_index_branch
        with autocast:
            out = model(batch, compute_stats=compute_stats)
        weights = raw.loss_weights()
        loss = sum(weights[k] * v for k, v in out.losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms = apply_gradients(optimizer, cfg.train.grad_clip, cfg.train.max_bad_steps, st, has_index)
        if norms is None:
            win.count("skipped")
        else:
            raw.after_optimizer_step()
            for k, v in out.losses.items():
                win.add(f"train/{k}_loss", float(v.detach()))
            win.add("train/grad_norm", norms[0])
            if has_index:
                win.add("train/index_grad_norm", norms[1])
            for k, v in out.stats.items():
                if k not in ("kl_index_loss", "moe_aux_loss"):  # already in the losses
                    win.add(k if k.startswith("layer/") else f"train/{k}", v)
        if out.selection:
            selection = (out.selection, batch.segment_ids_BT[0].cpu())
        st.step += 1
        win.steps += 1
        # counted on the host copy: no device round trip for bookkeeping
        win.tokens += int((book["segment_ids"] != 0).sum())
        win.flops += step_flops(torch.from_numpy(book["segment_ids"]), mode)
        _kill_once(cfg, run_dir, rank, st.step)

        if st.step % cfg.train.log_every == 0 or st.step == cfg.train.max_steps:
            metrics = _window_metrics(win, device, lr, st, peak, world)
            # under FSDP every rank must take part in the forward passes; rank 0 logs the result
            if cfg.train.eval_every and st.step % cfg.train.eval_every == 0 and (rank == 0 or cfg.ray.parallel == "fsdp"):
                metrics.update(_evaluate(cfg, raw, device, autocast, verbose=rank == 0))
            tracker.log_metrics(metrics, st.step)
            if rank == 0:
                done = st.step - step_start
                eta = (time.perf_counter() - t_start) / max(done, 1) * (cfg.train.max_steps - st.step)
                print(progress_line(st.step, cfg.train.max_steps, metrics, eta), flush=True)
            checkpoint = st.step % cfg.train.checkpoint_every == 0 or st.step == cfg.train.max_steps
            if checkpoint:
                _log_plots(tracker, cfg, selection, st.step)
            docs_delta = _report(st, metrics, checkpoint, model, optimizer, plan, data_state, docs_delta, device,
                                 rank, loop_config["run_id"])
            win = Window()


def apply_gradients(optimizer: torch.optim.Optimizer, grad_clip: float, max_bad_steps: int, st: LoopState,
                    has_index: bool) -> tuple[float, float] | None:
    """Clip and step, or skip a step whose gradients are not finite; returns the (backbone, index)
    gradient norms, or None for a skipped step. Raises TooManyBadSteps after max_bad_steps in a row.

    The KL's gradient reaches only the index branch: it is clipped on its own, so a KL spike cannot
    shrink the backbone's update (and the reported grad norm is the backbone's). The norms are taken
    after DDP's all-reduce (FSDP's reduce-scatter), so every rank takes the same decision.
    """
    clip = grad_clip if grad_clip > 0 else math.inf
    grad_norm = as_float(torch.nn.utils.clip_grad_norm_(group_params(optimizer, {"backbone", "experts"}), clip))
    index_norm = as_float(torch.nn.utils.clip_grad_norm_(group_params(optimizer, {"index"}), clip)) if has_index else 0.0
    if math.isfinite(grad_norm) and math.isfinite(index_norm):
        optimizer.step()
        st.bad_in_a_row = 0
        return grad_norm, index_norm
    # never update the weights with non-finite values: drop this step's gradients
    optimizer.zero_grad(set_to_none=True)
    st.bad_in_a_row += 1
    st.skipped_steps += 1
    if st.bad_in_a_row >= max_bad_steps:
        raise TooManyBadSteps(f"{st.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                              f"(last at step {st.step + 1}); stopping (train.max_bad_steps)")
    return None


def _window_metrics(win: Window, device, lr: float, st: LoopState, peak: float | None, world: int) -> dict:
    # every rank holds the same keys: same config, same steps, same modes
    mean_keys = sorted(win.sums)
    count_keys = ["skipped"] + [f"data/dropped_{r}" for r in DROP_REASONS]
    m = reduce_window(win, device, mean_keys, count_keys)
    st.tokens_seen += int(m["tokens"])
    metrics = {k: m[k] for k in mean_keys if k in m}
    metrics.update({
        "train/tokens_per_s": m["tokens_per_s"],
        "train/data_wait_frac": m["data_wait_frac"],
        "train/lr": lr,
        "train/tokens_seen": float(st.tokens_seen),
        "train/skipped_steps": float(st.skipped_steps),
    })
    metrics.update({k: m[k] for k in count_keys[1:] if m[k]})
    if peak:
        metrics["train/mfu"] = m["flops_per_s"] / (peak * 1e12 * world)
    return metrics


def _evaluate(cfg: RunConfig, model, device, autocast, verbose: bool) -> dict[str, float]:
    """Held-out evaluation (DDP: on rank 0 while the others wait at the next collective)."""
    from pipeline.evaluate import evaluate

    tok = cfg.data.tokenizer or str(Path(cfg.data.shards[0]) / "tokenizer.json")
    res = evaluate(model, cfg.data.eval_shards, tok, cfg.seq_len, cfg.model.image_size, cfg.model.patch_size,
                   device, cfg.train.batch_size, cfg.train.eval_documents, autocast)
    if verbose:
        print(f"[eval] lm_loss {res.lm_loss:.4f}  retrieval_acc {res.retrieval_acc:.3f} ({res.questions} questions)",
              flush=True)
    return {k: v for k, v in res.metrics().items() if not math.isnan(v)}


def _log_plots(tracker, cfg: RunConfig, selection, step: int) -> None:
    """Training curves and one sequence's block selection, as artifacts of the run (rank 0)."""
    if not hasattr(tracker, "client"):  # the no-op twin: not rank 0, or tracking off
        return
    from pipeline.plots import selection_map, training_curves

    try:
        with tempfile.TemporaryDirectory() as d:
            curves = training_curves(tracker.client, tracker.run_id, Path(d) / "training_curves.png")
            if curves:
                tracker.log_artifact(curves, "plots")
            if selection:
                by_layer, seg_T = selection
                layer = min(by_layer)
                # the longest document of the batch's first row (row 0 starts the flat token axis)
                docs = seg_T[seg_T > 0]
                if len(docs):
                    longest = int(torch.bincount(docs).argmax())
                    where = torch.nonzero(seg_T == longest).flatten()
                    idx = by_layer[layer][0, where[0]:where[-1] + 1, 0].cpu().numpy()
                    path = selection_map(idx, cfg.model.msa.block_size, Path(d) / f"selection_layer{layer}.png",
                                         f"step {step}: layer {layer}, group 0, a document of {len(where)} tokens")
                    tracker.log_artifact(path, "plots")
    except Exception as e:  # a plot must never stop a run
        log.warning("could not log plots at step %d: %s", step, e)
        print(f"[train] warning: could not log plots at step {step}: {e}", flush=True)


def _report(st: LoopState, metrics, checkpoint, model, optimizer, plan, data_state: DataState,
            docs_delta: np.ndarray, device, rank, run_id) -> np.ndarray:
    """ray.train.report on every rank (a checkpoint from rank 0 when due); returns the new delta."""
    import ray.train

    report = {k.replace("/", "_"): v for k, v in metrics.items()} | {"step": st.step}
    if not checkpoint:
        ray.train.report(report)
        return docs_delta
    delta = torch.from_numpy(docs_delta).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(delta)
    data_state.docs_done = [a + int(b) for a, b in zip(data_state.docs_done, delta.cpu().tolist())]
    # gathering the full state is a collective under FSDP: every rank takes part, rank 0 writes
    model_sd, optim_sd = model_state(model), optimizer_state(model, optimizer)
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_state(Path(d), model_sd, optim_sd, st.step,
                       {"tokens_seen": st.tokens_seen, "skipped_steps": st.skipped_steps, "mlflow_run_id": run_id,
                        "data_state": data_state.to_json(), "start_step": st.start_step})
            write_data_state(Path(d), plan, data_state, st.step)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
    return np.zeros_like(docs_delta)


