"""The training step replayed as CUDA graphs (`train.cuda_graphs`: one GPU, or DDP).

At 8K tokens a step of the `small` preset is bound by the host: Python issues a few thousand small
launches (norms, RoPE, routing, the MSA kernels' tables, AdamW) and the GPU waits for them. Captured
once as a CUDA graph (forward, backward, clipping and the fused AdamW), a step is one launch; the
host is free at once for the next batch.

A graph replays fixed shapes on fixed memory, and a packed row's shapes follow its contents (how
many documents, how many images). So the batch is first laid out in fixed shapes
(`Batch.fixed_shapes`: every image slot through the encoder, the documents padded with empty ones up
to a power of two; the forward's results are the same), then copied into one set of device buffers
that every graph reads. One graph per layout key (attention mode, document slots, whether every row
is one document); all of them share one memory pool, so together they hold about one step's
activations. The first batch of a key runs eagerly (it compiles and tunes what its shapes need and
creates the optimizer's state), the second is captured and replayed, every later one is replayed.

What stays eager: the steps that compute the recall statistics and the sampled warm-up KL (both
read the host). The bookkeeping after a step (the window's sums, the record of skipped steps) runs
eagerly on the graph's outputs, before the next replay can overwrite them.

Every step, eager or captured, runs on one side stream (`streamed`): autograd remembers for each
parameter the stream its first backward ran on, and a capture on another stream (the default one is
the usual culprit) would have to wait on it, which a capture cannot. A capture that fails leaves the
CUDA state unusable for the process (its allocator pool and RNG mid-capture), so it is an error that
names the cause, not a silent fallback.

Under DDP the step's gradient all-reduces are captured with it (NCCL collectives can be captured,
and PyTorch keeps captured ones out of its NCCL watchdog). What that takes: DDP built on the graphs'
stream (the loop wraps the model inside `streamed`), `DDP_HOST_STEPS` steps on the host before the
first capture, and DDP's timing samples off (`quiet_ddp_timing`). The ranks decide together, every
step, whether it replays, is captured or runs eagerly: NCCL pairs a captured collective with captured
ones (it may set up their buffers across ranks at capture), not with eager ones. So the layout key is
global: each rank's batch is padded to the document slots of the rank that needs the most, and the
dense layers take plain causal attention only when every rank's rows are one document each; the
ranks swap these few ints on the host over a gloo group (`host_gather`) each step, and meet before a
capture. The graphs are dropped before the process group is destroyed (`release`; NCCL >= 2.26
waits for graphs that hold its collectives). A captured all-reduce is not watched by NCCL's
watchdog. When a worker dies, its peers fail at the next step's exchange of layouts (gloo sees the
peer gone), or, if it died inside a step, wait in the replayed all-reduce until Ray Train stops the
worker group; either way the group restarts from the last checkpoint as it does without graphs.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from model.batch import Batch, pinned

MAX_GRAPHS = 32  # layouts captured at most; later new ones run eagerly (said once)
# DDP's reducer times its first 10 iterations (and every sample-rate-th one) with CUDA events that
# the next forward reads back on the host, which a capture cannot hold: the 12th forward is the first
# that reads nothing (the loop also sets the sample rate out of reach: `quiet_ddp_timing`)
DDP_HOST_STEPS = 11


class CaptureError(RuntimeError):
    pass


def host_gather(group) -> Callable[[list[int]], list[list[int]]]:
    """StepGraphs' `gather` over a gloo process group: a few ints from every rank, on the host (no
    GPU work and no wait on it; the ints are the same count on every rank at a given call)."""
    import torch.distributed as dist

    def gather(values: list[int]) -> list[list[int]]:
        mine = torch.tensor(values, dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        return [t.tolist() for t in every]
    return gather


def quiet_ddp_timing(model: torch.nn.Module) -> None:
    """DDP samples an iteration's timing every 100 iterations with CUDA events that the next forward
    reads back on the host; under graphs no sample may fall on a captured step, so none falls at all
    (the first 10 iterations are sampled regardless: `DDP_HOST_STEPS`)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model._set_ddp_runtime_logging_sample_rate(2**31 - 1)


class StepGraphs:
    """Runs a training step on a host batch: replayed from a graph where one is captured for the
    batch's layout key, else eagerly. The step must not synchronise with the host (pipeline/loop.py:
    train_step); its outputs are valid until the next `run`."""

    def __init__(self, device: torch.device, say: Callable[[str], None] = print, min_host_steps: int = 0,
                 gather: Callable[[list[int]], list[list[int]]] | None = None):
        """min_host_steps: steps the host runs (eager or captured) before the first capture; under
        DDP, `DDP_HOST_STEPS`. gather: under DDP, every rank's list of ints to every rank (on the
        host: `host_gather`), so that the ranks take each step's decision together."""
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.device, self.say, self.min_host_steps, self.gather = device, say, min_host_steps, gather
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.seen: set[tuple] = set()
        self.refused: dict[tuple, str] = {}
        self.static: Batch | None = None  # the device buffers every graph reads
        self.counts = {"replayed": 0, "captured": 0, "eager": 0}

    @contextlib.contextmanager
    def streamed(self):
        """Run the training (every step, and what reads or writes the weights between them) on the
        graphs' stream, ordered after what the default stream did before and before what it does after.
        An error inside drops the graphs without waiting for them (`release`): the process group may
        be destroyed next."""
        outer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(outer)
        try:
            with torch.cuda.stream(self.stream):
                yield
        except BaseException:
            self.release(wait=False)
            raise
        finally:
            outer.wait_stream(self.stream)

    def run(self, host: Batch, key: tuple | None, step: Callable[[Batch], Any]) -> Any:
        """`step(batch)` on `host` (a CPU batch with its counts), where `key` names what the step
        does besides the batch's layout (the same key must always mean the same step). key None:
        eager on a plain device copy (statistics steps, the sampled warm-up KL). Returns the step's
        outputs."""
        if key is None:
            self.counts["eager"] += 1
            return step(host.to(self.device, non_blocking=True))
        fixed = host.fixed_shapes()
        one_doc = fixed.n_docs == fixed.tokens_BT.shape[0]  # plain causal attention in the dense layers
        if self.gather is None:
            key = (*key, fixed.doc_slots, one_doc)
        else:
            # the same key on every rank (what must agree is whether this step replays, is captured
            # or runs eagerly): the document slots of the rank that needs the most, and plain causal
            # attention only where every rank's rows are one document each (else the document mask
            # on every rank: the same result), so a mode has as many keys as on one GPU
            ranks = self.gather([fixed.doc_slots, int(one_doc)])
            every_one_doc = all(r[1] for r in ranks)
            fixed = host.fixed_shapes(doc_slots=max(r[0] for r in ranks), document_mask=not every_one_doc)
            key = (*key, fixed.doc_slots, every_one_doc)
        batch = self._stage(fixed)
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            self.counts["replayed"] += 1
            return out
        # captured the second time a key comes, once the host has run enough steps
        host_steps = self.counts["eager"] + self.counts["captured"]
        capture = key in self.seen and key not in self.refused and host_steps >= self.min_host_steps
        if capture and len(self.graphs) >= MAX_GRAPHS:
            self.refused[key] = f"{MAX_GRAPHS} layouts are captured already"
            self.say(f"[train] CUDA graphs: layout {key} runs eagerly ({self.refused[key]})")
            capture = False
        if not capture:
            self.seen.add(key)
            self.counts["eager"] += 1
            return step(batch)
        return self._capture(key, batch, step)

    def _stage(self, fixed: Batch) -> Batch:
        """The batch's tensors copied (without blocking: pinned host memory) into the buffers the
        graphs read; its host-side counts kept as they are."""
        tensors = {f.name: getattr(fixed, f.name) for f in dataclasses.fields(fixed)
                   if torch.is_tensor(getattr(fixed, f.name))}
        if self.static is None:
            self.static = dataclasses.replace(fixed, **{k: torch.empty_like(v, device=self.device)
                                                        for k, v in tensors.items()})
        for name, src in tensors.items():
            dst = getattr(self.static, name)
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(f"CUDA graphs: batch field {name} is {tuple(src.shape)} {src.dtype}, the captured "
                                 f"steps read {tuple(dst.shape)} {dst.dtype} (a fixed row length and image slots)")
            dst.copy_(pinned(src), non_blocking=True)
        counts = {f.name: getattr(fixed, f.name) for f in dataclasses.fields(fixed) if f.name not in tensors}
        return dataclasses.replace(self.static, **counts)

    def _capture(self, key: tuple, batch: Batch, step: Callable[[Batch], Any]) -> Any:
        if torch.cuda.current_stream(self.device) != self.stream:
            raise CaptureError("CUDA graphs: the steps must run on the graphs' stream (StepGraphs.streamed)")
        if self.gather is not None:
            self.gather([0])  # every rank at its capture before any begins (NCCL sets up captured collectives together)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: Ray Data's threads pin host memory for the next batches meanwhile
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                out = step(batch)
        except Exception as e:
            raise CaptureError(f"train.cuda_graphs: the training step of layout {key} could not be captured as a "
                               f"CUDA graph ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"something in it waits for the GPU or changes with the batch. Run without "
                               f"train.cuda_graphs.") from e
        self.graphs[key] = (graph, out)
        self.counts["captured"] += 1
        graph.replay()  # the capture recorded the step; this runs it
        return out

    def release(self, wait: bool = True) -> None:
        """Drop the graphs (and what they hold): a process group with captured collectives cannot be
        destroyed while their graphs live (NCCL >= 2.26 waits). wait: once the GPU has run them (not
        on an error path, where a replay may never end; a graph still running is freed when done)."""
        if wait:
            torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self.static = None

    def summary(self) -> str:
        c = self.counts
        total = max(sum(c.values()), 1)
        return (f"CUDA graphs: {len(self.graphs)} layouts captured, {c['replayed'] + c['captured']} of {total} steps "
                f"replayed ({(c['replayed'] + c['captured']) / total:.0%}), {c['eager']} eager"
                + (f"; {len(self.refused)} layouts eager (no room for more graphs)" if self.refused else ""))
