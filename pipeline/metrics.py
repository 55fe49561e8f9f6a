"""What the loop measures between two log lines (the progress line itself: pipeline/console.py)."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Window:
    """Sums over the steps since the last log line (this worker's view)."""

    steps: int = 0
    tokens: int = 0
    flops: float = 0.0
    data_wait_s: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # event counters
    t0: float = field(default_factory=time.perf_counter)
    elapsed_s: float | None = None  # from t0 to when the device finished the window's steps (reduce_window)
    # the steps' metrics: one sum vector per set of names (and the steps kept), on the device
    steps_sums: dict[tuple[str, ...], list[torch.Tensor]] = field(default_factory=dict)

    def add_step(self, values: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        """One step's 0-dim tensors, summed on their device until the window is reduced: a handful of
        launches for the lot, not a few per value (the loop adds about fifty a step, and at 8K the
        step is bound by the host's launches). `keep`, a 0-dim bool on their device, leaves the step
        out (a skipped step's values) without a host read."""
        names = tuple(values)
        vec = torch.where(keep, torch.stack([v.detach() for v in values.values()]).double(), 0.0)
        kept = keep.double()
        acc = self.steps_sums.get(names)
        self.steps_sums[names] = [vec, kept] if acc is None else [acc[0] + vec, acc[1] + kept]

    def totals(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(sum, steps that added it) per metric name."""
        sums: dict[str, torch.Tensor] = {}
        ns: dict[str, torch.Tensor] = {}
        for names, (vec, n) in self.steps_sums.items():
            for i, name in enumerate(names):
                sums[name] = sums[name] + vec[i] if name in sums else vec[i]
                ns[name] = ns[name] + n if name in ns else n
        return sums, ns

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += int(n)


def all_reduce_sum(values: list, device: torch.device) -> list[float]:
    """Sum a few numbers (floats or 0-dim device tensors) over all workers: one small collective and
    one device-to-host copy, only at logging steps."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def reduce_window(win: Window, device: torch.device, mean_keys: list[str], count_keys: list[str],
                  memory_gib: tuple[float, float] | None = None) -> dict[str, float]:
    """Window -> global metrics: each mean over the values all workers added, counters summed,
    throughput over all workers, and the data wait of the worst-fed worker (one input-starved rank
    stalls every other rank at the next collective, so the mean over ranks would hide it). Every rank
    must pass the same keys (they are collective), and memory_gib (this rank's peak allocated and
    reserved device memory since its start) on every rank or on none: then the largest of each."""
    if device.type == "cuda":
        # the window ends when the GPU has run its steps: the host is ahead of it (by a whole window
        # when the steps are replayed CUDA graphs, whose launches take the host almost no time)
        torch.cuda.synchronize(device)
    elapsed = win.elapsed_s = time.perf_counter() - win.t0
    # maxima over ranks, carried through the same sum: each value a rank takes the max of (its wait
    # fraction, and its peak memory when given) has a slot per rank; the max of the summed slots is
    # the max over ranks
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world_size > 1 else 0
    mine = [win.data_wait_s / max(elapsed, 1e-9), *(memory_gib or ())]
    slots = [0.0] * (len(mine) * world_size)
    for i, v in enumerate(mine):
        slots[i * world_size + rank] = v
    sums, ns = win.totals()
    local = ([sums.get(k, 0.0) for k in mean_keys] + [ns.get(k, 0) for k in mean_keys]
             + [win.counts.get(k, 0) for k in count_keys] + slots
             + [float(win.tokens), win.flops, win.data_wait_s, 1.0])
    total = all_reduce_sum(local, device)
    n = len(mean_keys)
    summed = total[2 * n + len(count_keys):][:len(slots)]
    maxima = [max(summed[i * world_size:(i + 1) * world_size]) for i in range(len(mine))]
    out = {k: total[i] / total[n + i] for i, k in enumerate(mean_keys) if total[n + i] > 0}
    out.update({k: total[2 * n + i] for i, k in enumerate(count_keys)})
    tokens, flops, wait, world = total[-4:]
    out["tokens"] = tokens
    out["tokens_per_s"] = tokens / max(elapsed, 1e-9)
    out["flops_per_s"] = flops / max(elapsed, 1e-9)
    out["data_wait_frac"] = wait / max(elapsed * world, 1e-9)
    out["data_wait_frac_max"] = maxima[0]
    if memory_gib is not None:
        out["peak_allocated_gib"], out["peak_reserved_gib"] = maxima[1:]
    return out
