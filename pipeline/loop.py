"""The per-worker training loop that Ray Train runs on every worker.

It builds the model, wraps it for data parallelism (DDP over gloo on CPU, NCCL on GPU), streams its
share of the packed rows, runs the MSA schedule (pipeline/schedule.py), steps the optimizer, reports
metrics and checkpoints through `ray.train.report`, and logs to MLflow on rank 0 only (through a
tracker with a no-op twin).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.batch import Batch
from pipeline.checkpoint import (check_shapes, latest_checkpoint, load_checkpoint,
                                 prune_checkpoints, remove_stale_temporaries, resolve_checkpoint, restore_rng,
                                 rng_state, write_checkpoint)
from pipeline.config import RayConfig, RunConfig, build_model, config_from_dict
from pipeline.data import BOOKKEEPING, DROP_REASONS
from pipeline.evaluate import evaluate
from pipeline.flops import StepFlops, device_peak_tflops
from pipeline.console import ProgressLog, progress_line
from pipeline.metrics import Window, reduce_window
from pipeline.trace import DataTrace, pause_once
from pipeline.optim import build_optimizer, group_params, lr_at, prepare_for_graphs, set_lr
from pipeline.parallel import load_states, model_state, optimizer_state, wrap
from pipeline.plan import DataPlan, DataState
from pipeline.profiling import StepProfiler
from pipeline.schedule import BudgetMatch, attention_mode, frozen_groups, warmup_steps
from pipeline.tracking import make_tracker, start_system_metrics

log = logging.getLogger(__name__)
# rank 0's messages go to <run dir>/progress.log, which the driver prints (pipeline/console.py)
_progress = ProgressLog(None)


def say(line: str) -> None:
    _progress.say(line)


class TooManyBadSteps(RuntimeError):
    pass


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    # the two above as the device sees them between logging steps (record_bad_step, check_bad_steps):
    # [steps skipped in a row as of the last step, the longest such run, steps skipped] since the last check
    bad_steps: torch.Tensor | None = None
    skipped_samples: dict[str, int] = field(default_factory=dict)  # reason -> documents, since the run began
    start_step: int = 0  # where this run's own schedule starts (a continued retrofit: the dense checkpoint's step)
    budget_match: BudgetMatch | None = None  # the adaptive budget's parameter under model.msa.budget_match_topk


def _init_model(cfg: RunConfig, rank: int):
    """A fresh model: random, or for a retrofit the dense checkpoint plus fresh index projections.
    Returns (model, start): start is (LoopState, DataState) where a continued retrofit picks up the
    dense run (schedule.retrofit_continue), else None."""
    model = build_model(cfg)
    start = None
    if cfg.schedule.mode == "retrofit":
        from model.retrofit import load_dense_checkpoint

        source = resolve_checkpoint(Path(cfg.schedule.retrofit_from))
        dense_state, dense_data, _ = load_checkpoint(source)
        fresh = load_dense_checkpoint(model, dense_state["model"])
        if rank == 0:
            say(f"[train] retrofit: loaded the dense checkpoint {source}; {len(fresh)} fresh index tensors")
        if cfg.schedule.retrofit_continue:
            # the optimizer starts fresh (the index branch is new); step, tokens and data go on
            step = dense_state["step"]
            start = (LoopState(step=step, tokens_seen=dense_state["tokens_seen"], start_step=step),
                     DataState.from_json(dense_data))
            if rank == 0:
                say(f"[train] retrofit: continuing the dense run at step {step} "
                    f"({dense_state['tokens_seen']:,} tokens seen)")
    return model, start


def _quiet_report_logging() -> None:
    """Ray Train logs every report (all metrics) at INFO from the worker context, on a logger outside
    the `ray.train` tree that LoggingConfig does not reach; the progress line says it once, better."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray version: its own logging, nothing to quiet
        pass


def _checkpoint_to_resume(run_dir: Path, rank: int, device) -> tuple[Path | None, float]:
    """The newest complete checkpoint of the run, chosen by rank 0 for every rank (its data position
    is the one the dataset factory resumed the stream from: both take the newest), and the start
    time of this attempt (the same on every rank)."""
    choice = [None, time.time()]
    if rank == 0:
        for stale in remove_stale_temporaries(run_dir):
            say(f"[train] removed an unfinished checkpoint write: {stale.name}")
        newest = latest_checkpoint(run_dir)
        choice[0] = str(newest) if newest else None
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0, device=device if device.type == "cuda" else None)
    return (Path(choice[0]) if choice[0] else None), choice[1]


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
    # the data first: its pipeline starts while the model is built, restored and wrapped
    shard = ray.train.get_dataset_shard("train")
    # the rows stay on the host (pinned for the copy): the bookkeeping columns and the batch's counts
    # are read there, and the copy to the device is queued behind the previous step instead of
    # waiting for it (a step without a host sync: apply_gradients, model/batch.py)
    batches = FirstBatchAhead(shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True,
                                                       prefetch_batches=cfg.data.prefetch_batches,
                                                       device="cpu", pin_memory=device.type == "cuda"))

    global _progress
    _progress = ProgressLog(run_dir) if rank == 0 else ProgressLog(None, quiet=True)
    resume_from, attempt = _checkpoint_to_resume(run_dir, rank, device)
    raw, start = (build_model(cfg), None) if resume_from else _init_model(cfg, rank)
    st, data_state = start if start else (LoopState(), DataState.empty(plan))
    if resume_from:
        saved, data_json, manifest = load_checkpoint(resume_from)  # verified: sizes, hashes
        check_shapes(manifest, raw.state_dict(), resume_from)
    graphs = None
    if cfg.train.cuda_graphs:
        from pipeline.graphs import DDP_HOST_STEPS, StepGraphs, host_gather, quiet_ddp_timing

        # several workers: the ranks agree on each step's layout over a gloo group, on the host
        graphs = StepGraphs(device, say if rank == 0 else (lambda _: None),
                            min_host_steps=DDP_HOST_STEPS if world > 1 else 0,
                            gather=host_gather(torch.distributed.new_group(backend="gloo")) if world > 1 else None)
    # under graphs, DDP is built on the graphs' stream, where it will run (pipeline/graphs.py)
    with graphs.streamed() if graphs is not None else contextlib.nullcontext():
        model = wrap(raw, cfg.ray, device)
    if graphs is not None:
        quiet_ddp_timing(model)
    ddp_set = (cfg.ray.ddp_bucket_mb, cfg.ray.ddp_grad_dtype)
    if rank == 0 and world > 1 and cfg.ray.parallel == "ddp" and ddp_set != (RayConfig.ddp_bucket_mb,
                                                                           RayConfig.ddp_grad_dtype):
        mb, dtype = ddp_set  # not the defaults: say so
        say(f"[train] DDP: gradients all-reduced in {dtype}{' (bf16 compress hook)' if dtype == 'bf16' else ''}, "
            f"buckets of {mb:g} MiB")
    if rank == 0 and cfg.ray.parallel == "fsdp" and cfg.ray.fsdp_param_dtype == "bf16":
        say("[train] FSDP2: weights gathered and computed in bf16 (fp32 master weights, optimizer and reductions)")
    optimizer = build_optimizer(raw, cfg.train)  # after wrapping: FSDP replaces the parameters
    if resume_from:
        load_states(model, optimizer, saved)
        st = LoopState(step=saved["step"], tokens_seen=saved["tokens_seen"], skipped_steps=saved["skipped_steps"],
                       skipped_samples=dict(saved.get("skipped_samples", {})), start_step=saved.get("start_step", 0))
        if saved.get("budget_match") and cfg.model.msa.budget_match_topk:
            st.budget_match = BudgetMatch.from_json(saved["budget_match"])  # where the adjustment had got to
        data_state = DataState.from_json(data_json)
        restore_rng(saved["rng"])
        del saved
        if rank == 0:
            say(f"[train] resumed at step {st.step} ({st.tokens_seen:,} tokens seen) from {resume_from.name}")
    # a captured step reads its learning rate from the device; otherwise plain floats (also what a
    # graphed run's checkpoint is restored to)
    prepare_for_graphs(optimizer, device if cfg.train.cuda_graphs else None)
    msa = cfg.model.msa
    if msa.budget_match_topk and raw.has_index_branch and st.budget_match is None:
        st.budget_match = BudgetMatch(msa.budget, getattr(msa, msa.budget_param_name))
    if st.budget_match is not None:
        raw.set_budget_param(st.budget_match.param)
    tracker = make_tracker(rank, loop_config["tracking_uri"], loop_config["run_id"])
    sysmon = None
    want = cfg.tracking.system_metrics
    if hasattr(tracker, "client") and (want == "always" or (want == "gpu" and device.type == "cuda")):
        sysmon, line = start_system_metrics(loop_config["tracking_uri"], loop_config["run_id"],
                                            cfg.tracking.system_metrics_interval_s)
        say(f"[train] {line}")
    # (no cast cache under CUDA graphs: a captured step must cast the weights it reads each replay)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not cfg.train.cuda_graphs)
                if cfg.train.dtype == "bfloat16" else contextlib.nullcontext())
    step_flops = StepFlops(cfg.model)
    peak = device_peak_tflops(cfg.train.peak_tflops)
    stats_every = cfg.train.stats_every or cfg.train.log_every
    has_index = bool(group_params(optimizer, {"index"}))
    trace = DataTrace(cfg, run_dir, rank, attempt)

    consumed = Consumed(len(plan.entries))  # what this worker trained on since the last checkpoint
    win = Window()
    selection = None
    t_start, step_start = time.perf_counter(), st.step
    profiler = StepProfiler(cfg.debug.profile_steps, run_dir, rank, device)
    # every step on the graphs' stream (pipeline/graphs.py: StepGraphs.streamed)
    with graphs.streamed() if graphs is not None else contextlib.nullcontext():
        while st.step < cfg.train.max_steps:
            _profile_at(profiler, st.step, tracker, world)
            t_wait = time.perf_counter()
            cols = batches.next()
            if cols is None:
                raise RuntimeError(f"the data plan ran out at step {st.step} before train.max_steps="
                                   f"{cfg.train.max_steps}; the plan is sized from the manifests' token estimates")
            win.data_wait_s += time.perf_counter() - t_wait
            book = {k: cols[k].numpy() for k in ("segment_ids", *BOOKKEEPING)}
            host_batch = Batch.from_dict(cols, raw.img_patch_id)

            mode = attention_mode(cfg, st.step - st.start_step)
            if mode != raw.mode:
                raw.set_mode(mode)
                if rank == 0:
                    say(f"[train] step {st.step}: attention mode -> {mode}")
            lr = lr_at(st.step, cfg.train)
            set_lr(optimizer, lr, frozen_groups(cfg, mode))
            compute_stats = (st.step + 1) % stats_every == 0 and raw.has_index_branch

            def step(batch: Batch):
                return train_step(model, raw, batch, optimizer, autocast, compute_stats, cfg.train.grad_clip, has_index)

            if graphs is None:
                out, grad_norm, index_norm, ok = step(host_batch.to(device, non_blocking=True))
            else:
                # eager where the step reads the host: statistics, the sampled warm-up KL's draw
                capturable = not compute_stats and not (mode == "warmup" and cfg.model.msa.warmup_kl_sample < 1)
                out, grad_norm, index_norm, ok = graphs.run(host_batch, (mode,) if capturable else None, step)
            record_bad_step(st, ok)
            # summed on the device, read at logging; a skipped step (non-finite) adds nothing to the means
            step_values = {f"train/{k}_loss": v for k, v in out.losses.items()}
            step_values["train/grad_norm"] = grad_norm
            if has_index:
                step_values["train/index_grad_norm"] = index_norm
            step_values.update({k if k.startswith("layer/") else f"train/{k}": v for k, v in out.stats.items()
                                if k not in ("kl_index_loss", "moe_aux_loss")})  # those two are in the losses
            win.add_step(step_values, ok)
            if out.selection:
                selection = (out.selection, host_batch.segment_ids_BT, host_batch.positions_BT, raw.budget_param)
            st.step += 1
            win.steps += 1
            # counted on the host copy: no device round trip for bookkeeping
            win.tokens += int((book["segment_ids"] != 0).sum())
            win.flops += step_flops(torch.from_numpy(book["segment_ids"]), mode)
            if out.attended_pairs is not None:  # an adaptive budget: the sparse work as selected
                win.flops = win.flops + step_flops.attended_flops(out.attended_pairs.detach())
            # the rows of this step are trained on (a skipped step too: its rows are not read again)
            consumed.add(book)
            for reason in DROP_REASONS:
                win.count(f"dropped_{reason}", int(book[f"dropped_{reason}"].sum()))
            trace.write(st.step, book["plan_idx"], book["piece_ids"])
            pause_once(cfg, run_dir, rank, st.step)

            final = st.step == cfg.train.max_steps
            checkpoint = st.step % cfg.train.checkpoint_every == 0 or (final and cfg.train.final_checkpoint)
            evaluate_now = bool(cfg.train.eval_every) and st.step % cfg.train.eval_every == 0
            # a checkpoint or an evaluation also logs the window, whatever train.log_every says, so both
            # happen on the step they name and every checkpoint has its metrics in the run
            if st.step % cfg.train.log_every == 0 or final or checkpoint or evaluate_now:
                check_bad_steps(st, cfg.train.max_bad_steps)
                metrics = _window_metrics(win, device, lr, st, peak, world)
                step_s = win.elapsed_s / max(win.steps, 1)  # (the device's time, not the host's)
                # under FSDP every rank must take part in the forward passes; rank 0 logs the result
                if evaluate_now and (rank == 0 or cfg.ray.parallel == "fsdp"):
                    metrics.update(_evaluate(cfg, raw, device, autocast, verbose=rank == 0))
                if st.budget_match is not None:
                    _match_budget(st.budget_match, raw, metrics, cfg)
                tracker.log_metrics(metrics, st.step)
                if final:
                    # every step is trained and logged: the run is complete, whatever happens from here on
                    tracker.set_tags({"training_complete": "true"})
                if rank == 0:
                    elapsed = time.perf_counter() - t_start
                    eta = elapsed / max(st.step - step_start, 1) * (cfg.train.max_steps - st.step)
                    gib = metrics.get("train/peak_allocated_gib")  # (the worker that holds the most)
                    say(progress_line(st.step, cfg.train.max_steps, metrics, elapsed, eta, step_s, gib))
                if checkpoint:
                    _log_plots(tracker, cfg, selection, st.step, st.start_step)
                    _checkpoint(cfg, st, model, optimizer, plan, data_state, consumed, run_dir, rank, tracker, final)
                ray.train.report({k.replace("/", "_"): v for k, v in metrics.items()} | {"step": st.step})
                win = Window()
    _profile_at(profiler, st.step, tracker, world)  # a window that ends with the run
    if graphs is not None:
        if rank == 0:
            say(f"[train] {graphs.summary()}")
        graphs.release()  # before Ray Train destroys the process group (pipeline/graphs.py)
    if sysmon is not None:
        sysmon.finish()


def _profile_at(profiler: StepProfiler, step: int, tracker, world: int) -> None:
    """debug.profile_steps: start or end the profiled window; once every rank has written its file,
    rank 0 says what it found and logs the files to MLflow."""
    profiler.at(step)
    if profiler.written is None:
        return
    if world > 1:
        dist.barrier()
    if profiler.rank == 0:
        p = json.loads(profiler.written.read_text())
        idle = p["gpu_idle_frac"]
        say(f"[train] profile of steps {profiler.first}-{profiler.last - 1}, rank 0: {p['wall_ms_per_step']:,.1f} ms a step"
            + (f", GPU idle {idle:.0%}, communication {p['comm_ms_per_step']:.1f} ms "
               f"({p['comm_exposed_ms_per_step']:.1f} ms exposed)" if idle is not None else "")
            + f"; every rank's in {profiler.written.parent}")
        for f in sorted(profiler.written.parent.glob("rank*.json")):
            tracker.log_artifact(f, "profile")
    profiler.written = None


class FirstBatchAhead:
    """A worker's batch iterator whose first batch is taken in a background thread from the start.

    Ray Data starts a pipeline when its first batch is asked for: the split coordinator, the packing
    actors, the first rows read and packed, each a step after the other (half a minute on a small
    machine). Asked for at once, that start overlaps the model's construction, restore and wrapping
    and the tracker's start instead of following them. Later batches come straight from the
    iterator (Ray Data prefetches them itself). `next()` returns None at the end, and re-raises in
    the caller what the first fetch raised."""

    def __init__(self, batches):
        self._it = iter(batches)
        self._first = self._error = None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it, None)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._error = e

    def next(self):
        if self._thread is None:
            return next(self._it, None)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        first, self._first = self._first, None
        return first


class Consumed:
    """The rows one worker trained on since the last checkpoint: documents completed per plan entry,
    and the ids of their pieces (and of the documents dropped before them)."""

    def __init__(self, n_entries: int):
        self.docs = np.zeros(n_entries, np.int64)
        self.ids: dict[int, list[np.ndarray]] = {}

    def add(self, book: dict[str, np.ndarray]) -> None:
        np.add.at(self.docs, book["plan_idx"], book["docs_done"])
        for e in np.unique(book["plan_idx"]):
            ids = book["piece_ids"][book["plan_idx"] == e].ravel()
            self.ids.setdefault(int(e), []).append(ids[ids != 0])

    def gather(self) -> tuple[list[int], dict[int, set[int]]]:
        """Every worker's consumption, summed (a collective: every rank calls it), and reset."""
        mine = (self.docs.tolist(), {e: np.concatenate(v).tolist() for e, v in self.ids.items()})
        parts = [mine]
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        docs = np.sum([p[0] for p in parts], axis=0).tolist()
        ids: dict[int, set[int]] = {}
        for _, part_ids in parts:
            for e, v in part_ids.items():
                ids.setdefault(int(e), set()).update(v)
        self.docs[:] = 0
        self.ids = {}
        return docs, ids


def _checkpoint(cfg: RunConfig, st: LoopState, model, optimizer, plan: DataPlan, data_state: DataState,
                consumed: Consumed, run_dir: Path, rank: int, tracker, final: bool) -> None:
    """Fold every worker's consumption into the data position, gather the full state (collectives
    under FSDP: every rank takes part) and write the checkpoint on rank 0, atomically.

    A checkpoint that cannot be written does not stop the run: the error is printed and tagged on the
    MLflow run, training goes on (a mid-run one), or the run ends complete (the final one).
    """
    docs, ids = consumed.gather()
    data_state.add(plan, docs, ids)
    model_sd, optim_sd = model_state(model), optimizer_state(model, optimizer)
    if rank != 0:
        return
    try:
        path = write_checkpoint(run_dir, st.step, {
            "model": model_sd, "optimizer": optim_sd, "tokens_seen": st.tokens_seen,
            "skipped_steps": st.skipped_steps, "skipped_samples": dict(st.skipped_samples), "rng": rng_state(),
            "start_step": st.start_step, "budget_match": st.budget_match.to_json() if st.budget_match else None,
        }, data_state.to_json(plan), dataclasses.asdict(cfg.model))
        prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
        say(f"[train] checkpoint {path.name} written")
    except (OSError, RuntimeError) as e:
        what = "final_checkpoint_error" if final else "checkpoint_error"
        say(f"[train] error: checkpoint at step {st.step} could not be written: {type(e).__name__}: {e}")
        tracker.set_tags({what: f"step {st.step}: {type(e).__name__}: {e}"[:5000]})


def train_step(model, raw, batch: Batch, optimizer: torch.optim.Optimizer, autocast, compute_stats: bool,
               grad_clip: float, has_index: bool):
    """One batch's forward, backward and optimizer step, with nothing read on the host (so that it
    can also be captured as a CUDA graph: pipeline/graphs.py). `model` is the wrapped model, `raw`
    the model itself. Returns (the model's output, backbone and index gradient norms, whether the
    step was taken), all on the device."""
    with autocast:
        out = model(batch, compute_stats=compute_stats)
    weights = raw.loss_weights()
    loss = sum(weights[k] * v for k, v in out.losses.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return (out, *apply_gradients(optimizer, grad_clip, has_index))


def apply_gradients(optimizer: torch.optim.Optimizer, grad_clip: float,
                    has_index: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip and step, or skip a step whose gradients are not finite, without reading anything on the
    host: returns the (backbone, index) gradient norms before clipping and whether the step was
    taken, as 0-dim device tensors (the loop records the last with `record_bad_step`, and
    `check_bad_steps` reads the record at the next logging step).

    The KL's gradient reaches only the index branch: it is clipped on its own, so a KL spike cannot
    shrink the backbone's update (and the reported grad norm is the backbone's). The norms are taken
    after DDP's all-reduce (FSDP's reduce-scatter), so every rank takes the same decision.

    A host read of the norms here would make the host wait for the GPU at every step; under DDP that
    wait is the tail of the gradient all-reduce, which the next step's host work could otherwise hide.
    The fused AdamW (`build_optimizer`) takes the decision on the device instead (`found_inf`: the
    update of every parameter, its moments and its step count are skipped when it is 1).
    """
    if not optimizer.defaults.get("fused"):
        raise ValueError("apply_gradients skips a bad step on the device: it needs the fused AdamW "
                         "(pipeline/optim.py: build_optimizer)")
    clip = grad_clip if grad_clip > 0 else math.inf
    grad_norm = _local(torch.nn.utils.clip_grad_norm_(group_params(optimizer, {"backbone", "experts"}), clip))
    index_norm = (_local(torch.nn.utils.clip_grad_norm_(group_params(optimizer, {"index"}), clip)) if has_index
                  else torch.zeros_like(grad_norm))
    if index_norm.device != grad_norm.device:  # no index gradient this step (dense mode): torch's CPU zero
        index_norm = torch.zeros_like(grad_norm)
    ok = torch.isfinite(grad_norm) & torch.isfinite(index_norm)
    optimizer.found_inf = (~ok).float()
    optimizer.step()
    # a skipped step's gradients are dropped by the next step's zero_grad; they never reach the weights
    return grad_norm, index_norm, ok


def record_bad_step(st: LoopState, ok: torch.Tensor) -> None:
    """Add a step (taken or skipped: `ok`) to the device's record of skipped steps, without a host read."""
    bad = (~ok).long()
    if st.bad_steps is None:
        st.bad_steps = torch.tensor([st.bad_in_a_row, st.bad_in_a_row, 0], device=ok.device)
    run = (st.bad_steps[0] + 1) * bad
    st.bad_steps = torch.stack([run, torch.maximum(st.bad_steps[1], run), st.bad_steps[2] + bad])


def _local(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP returns a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def check_bad_steps(st: LoopState, max_bad_steps: int) -> None:
    """At a logging step: bring the device's record of skipped steps to the host (one read) and
    raise TooManyBadSteps if max_bad_steps or more steps in a row were skipped since the last check.
    (The weights never saw those steps; the run stops at the logging step after the run of bad steps.)"""
    if st.bad_steps is None:
        return
    run, longest, skipped = st.bad_steps.tolist()
    st.bad_in_a_row, st.skipped_steps = run, st.skipped_steps + skipped
    st.bad_steps = torch.tensor([run, run, 0], device=st.bad_steps.device)
    if longest >= max_bad_steps:
        raise TooManyBadSteps(f"{longest} steps in a row had a non-finite loss or gradient (by step {st.step}); "
                              f"stopping (train.max_bad_steps)")


def _window_metrics(win: Window, device, lr: float, st: LoopState, peak: float | None, world: int) -> dict:
    # every rank holds the same keys: same config, same steps, same modes
    mean_keys = sorted(win.totals()[0])
    count_keys = [f"dropped_{r}" for r in DROP_REASONS]
    # the device's peak memory since the start (the caching allocator's, CUDA graphs' pools included
    # in what it reserves): the largest over the workers
    mem = ((torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30)
           if device.type == "cuda" else None)
    m = reduce_window(win, device, mean_keys, count_keys, mem)
    st.tokens_seen += int(m["tokens"])
    for r in DROP_REASONS:
        if m[f"dropped_{r}"]:
            st.skipped_samples[r] = st.skipped_samples.get(r, 0) + int(m[f"dropped_{r}"])
    metrics = {k: m[k] for k in mean_keys if k in m}
    metrics.update({
        "train/tokens_per_s": m["tokens_per_s"],
        "train/data_wait_frac": m["data_wait_frac"],  # mean over workers
        "train/data_wait_frac_max": m["data_wait_frac_max"],  # the worst-fed worker's
        "train/lr": lr,
        "train/tokens_seen": float(st.tokens_seen),
        "train/skipped_steps": float(st.skipped_steps),
        # documents the ingest could not use since the run began, in all and by reason
        "train/skipped_samples": float(sum(st.skipped_samples.values())),
    })
    metrics.update({f"train/skipped_samples/{r}": float(n) for r, n in st.skipped_samples.items()})
    if peak:
        metrics["train/mfu"] = m["flops_per_s"] / (peak * 1e12 * world)
    if "peak_allocated_gib" in m:
        metrics["train/peak_allocated_gib"] = m["peak_allocated_gib"]
        metrics["train/peak_reserved_gib"] = m["peak_reserved_gib"]
    return metrics


def _match_budget(match: BudgetMatch, raw, metrics: dict, cfg: RunConfig) -> None:
    """Log the budget parameter this window used and move it toward equal compute with static top-k
    (model.msa.budget_match_topk) for the next one. The window's counts are reduced over every rank,
    so every rank takes the same step."""
    name = cfg.model.msa.budget_param_name
    metrics[f"train/{name}"] = match.param
    measured, target = metrics.get("train/blocks_per_token"), metrics.get("train/blocks_per_token_static")
    if measured is not None and target is not None:
        raw.set_budget_param(match.update(measured, target))


def _evaluate(cfg: RunConfig, model, device, autocast, verbose: bool) -> dict[str, float]:
    """Held-out evaluation (DDP: on rank 0 while the others wait at the next collective)."""
    res = evaluate(model, cfg.data.eval_shards, cfg.tokenizer_path, cfg.seq_len, cfg.model.image_size, cfg.model.patch_size,
                   device, cfg.train.batch_size, cfg.train.eval_documents, autocast)
    if verbose:
        say(f"[eval] lm_loss {res.lm_loss:.4f}  retrieval_acc {res.retrieval_acc:.3f} ({res.questions} questions)")
    return {k: v for k, v in res.metrics().items() if not math.isnan(v)}


def _log_selection(tracker, cfg: RunConfig, selection, step: int, d: Path) -> None:
    """The picture of one document's selection, and where the budget goes over the whole batch
    (`selection/blocks_per_token.json`, which `msa-flops --counts` reads; `plots/budget.png`)."""
    from pipeline.plots import blocks_profile, budget_plot, selection_map

    by_layer, seg_BT, pos_BT, param = selection
    msa = cfg.model.msa
    seg_T = seg_BT[0]
    # the longest document of the batch's first row (row 0 starts the flat token axis)
    docs = seg_T[seg_T > 0]
    if len(docs):
        longest = int(torch.bincount(docs).argmax())
        where = torch.nonzero(seg_T == longest).flatten()
        picked = {layer: idx[0, where[0]:where[-1] + 1].cpu().numpy()
                  for layer, idx in sorted(by_layer.items())[:4]}
        path = selection_map(picked, msa.block_size, d / "selection.png",
                             f"step {step}: the blocks each token of a {len(where)}-token document attends to")
        tracker.log_artifact(path, "plots")
    profile = blocks_profile({layer: idx[0].cpu().numpy() for layer, idx in by_layer.items()},
                             pos_BT.flatten().numpy(), (seg_BT.flatten() > 0).numpy(), msa.block_size)
    profile.update(step=step, budget=msa.budget, block_size=msa.block_size, k_max=msa.topk)
    if msa.budget != "static":  # the parameter this selection used (adjusted under budget_match_topk)
        profile.update({msa.budget_param_name: param if param is not None else getattr(msa, msa.budget_param_name),
                        "budget_k_min": msa.budget_k_min})
    (d / "blocks_per_token.json").write_text(json.dumps(profile))
    tracker.log_artifact(d / "blocks_per_token.json", "selection")
    if msa.budget != "static":
        path = budget_plot(profile, msa.block_size, msa.topk, d / "budget.png",
                           f"step {step}: where the {msa.budget} budget goes")
        tracker.log_artifact(path, "plots")


def _log_plots(tracker, cfg: RunConfig, selection, step: int, start_step: int = 0) -> None:
    """Training curves and one document's block selection, as artifacts of the run (rank 0)."""
    if not hasattr(tracker, "client"):  # the no-op twin: not rank 0, or tracking off
        return
    from pipeline.plots import training_curves

    try:
        with tempfile.TemporaryDirectory() as d:
            switch = start_step + warmup_steps(cfg) if cfg.schedule.mode != "dense" else None
            curves = training_curves(tracker.client, tracker.run_id, Path(d) / "training_curves.png", switch)
            if curves:
                tracker.log_artifact(curves, "plots")
            if selection:
                _log_selection(tracker, cfg, selection, step, Path(d))
    except Exception as e:  # a plot must never stop a run
        log.warning("could not log plots at step %d: %s", step, e)
        say(f"[train] warning: could not log plots at step {step}: {e}")
