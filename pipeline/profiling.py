"""Where a training step's time goes, measured on every worker: `debug.profile_steps = [first, last]`.

Steps `first .. last - 1` of each worker run under `torch.profiler`; each worker then writes
`<run dir>/profile/rank<r>.json` (and rank 0 logs the files to MLflow under `profile/`):

- `wall_ms_per_step`: the window's wall time per step (the device synchronised at both ends);
- `gpu_busy_ms_per_step`, `gpu_idle_frac`: the time at least one kernel ran, and the share of the
  window the device ran none (the host not launching fast enough, or waiting for data or a peer);
- `groups_ms_per_step`: kernel time by kind (the MSA Triton kernels, dense attention, matmuls,
  communication, the rest);
- `comm_ms_per_step` and `comm_exposed_ms_per_step`: the collectives' kernel time, and the part of it
  during which no other kernel ran (what data parallelism adds to the step that the backward does
  not hide);
- `top_kernels_ms_per_step`: the 25 largest kernels.

The ranks' files side by side say whether one rank waits for another (the same step, different busy
times) and whether the step is bound by the host (a large idle share) or by the exposed collectives.
On CPU the same runs (the device numbers are then empty). `group_of` is shared with
`benchmarks/train_steps.py`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

MSA, DENSE_ATTENTION, MATMULS, COMM, OTHER = ("msa triton kernels", "dense attention (cudnn/flash)", "matmuls",
                                              "communication (nccl)", "other (elementwise, norms, rope, copies, reductions)")


def group_of(kernel: str) -> str:
    n = kernel.lower()
    if "nccl" in n:
        return COMM
    # the MSA ops' kernels; the work lists' helpers (split_keys/split_pairs_kernel) count as the work
    # around them, with the index branch's projections and norms (benchmarks/msa_layer.py)
    if any(w in n for w in ("_split_kernel", "kl_", "select", "attn_fwd", "attn_bwd", "merge", "sum_slots",
                            "sum_chunks", "lse_split", "bwd_delta")) and "cudnn" not in n:
        return MSA
    if any(w in n for w in ("cudnn", "flash", "fmha", "sdpa")):
        return DENSE_ATTENTION
    if any(w in n for w in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "wgmma")):
        return MATMULS
    return OTHER


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def summarize(kernels: list[tuple[str, float, float]], wall_s: float, steps: int) -> dict:
    """kernels: (name, start_us, end_us) of every device kernel in the window."""
    per_kernel: dict[str, float] = {}
    for name, s, e in kernels:
        per_kernel[name] = per_kernel.get(name, 0.0) + (e - s)
    groups: dict[str, float] = {}
    for name, us in per_kernel.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + us
    busy = _union_us([(s, e) for _, s, e in kernels])
    compute = _union_us([(s, e) for name, s, e in kernels if group_of(name) != COMM])
    ms = 1e-3 / steps  # microseconds in the window -> milliseconds per step
    wall_ms = wall_s * 1e3 / steps
    return {
        "steps": steps, "wall_ms_per_step": wall_ms, "gpu_busy_ms_per_step": busy * ms,
        "gpu_idle_frac": (1 - busy * ms / wall_ms) if kernels and wall_ms > 0 else None,
        "groups_ms_per_step": {k: v * ms for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "comm_ms_per_step": groups.get(COMM, 0.0) * ms, "comm_exposed_ms_per_step": (busy - compute) * ms,
        "top_kernels_ms_per_step": [[k, v * ms] for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]],
    }


class StepProfiler:
    """`at(step)` at the top of every loop iteration (`step`: optimizer steps done so far)."""

    def __init__(self, steps: list[int], run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = (steps[0], steps[1]) if steps else (-1, -1)
        self.run_dir, self.rank, self.device = run_dir, rank, device
        self._prof = None
        self._t0 = 0.0
        self.written: Path | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def at(self, step: int) -> None:
        if step == self.first and self._prof is None:
            from torch.profiler import ProfilerActivity, profile

            # CUDA activity only on a GPU: tracing every CPU op would slow a host-bound step down
            acts = [ProfilerActivity.CUDA] if self.device.type == "cuda" else [ProfilerActivity.CPU]
            self._sync()
            self._prof = profile(activities=acts)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        elif step == self.last and self._prof is not None:
            self._sync()
            wall = time.perf_counter() - self._t0
            self._prof.__exit__(None, None, None)
            self.written = self._write(wall)
            self._prof = None

    def _write(self, wall_s: float) -> Path:
        from torch.autograd import DeviceType

        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in self._prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
        out = {"rank": self.rank, "first_step": self.first, "last_step": self.last,
               "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
               **summarize(kernels, wall_s, self.last - self.first)}
        path = self.run_dir / "profile" / f"rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        return path
