"""What `msa-train` prints: clean progress lines from rank 0, read by the driver from a file in the
run directory (so they carry none of Ray's worker prefixes or colour codes, also in log files), and
a summary at the end.

    rank 0 (a Ray Train worker)          ProgressLog(run_dir).say("[train] step 10/120 ...")
    the driver (msa-train)               with ProgressTail(run_dir): trainer.fit()   # prints new lines

Known-harmless framework warnings are silenced at their source, in every Ray worker process
(`quiet_ray_workers`, a worker_process_setup_hook).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

PROGRESS_FILE = "progress.log"

# Loggers of Ray components whose routine messages would drown the progress lines. Errors still pass.
NOISY_LOGGERS = (
    # "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable":
    # a liveness poll of the dashboard's state API that times out under load and is retried anyway
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    # every ray.train.report at INFO (all metrics, every rank); the progress line says it once
    "ray.train.v2._internal.execution.context",
)


def quiet_ray_workers() -> None:
    """worker_process_setup_hook: raise the noisy loggers to ERROR in a Ray worker process, and tell
    it the address of its own cluster.

    Ray's state API (which Ray Train's placement-group cleaner polls) finds "the" local Ray from
    RAY_ADDRESS or, without it, by looking for running GCS processes; with two local Rays on one host
    (msa-study --parallel: one per lane) it finds both and raises "Found multiple active Ray
    instances". A worker knows which one it belongs to, so it says so.
    """
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        try:
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # not connected (the hook run outside a worker): nothing to say
            pass


class ProgressLog:
    """Rank 0's side: append one line per event to <run dir>/progress.log (and nothing to stdout)."""

    def __init__(self, run_dir: Path | None, quiet: bool = False):
        self.path = Path(run_dir) / PROGRESS_FILE if run_dir else None
        self.quiet = quiet  # the other ranks: nothing to say

    def say(self, line: str) -> None:
        if self.quiet:
            return
        if self.path is None:  # not inside a run (tests, tools): plain print
            print(line, flush=True)
            return
        with open(self.path, "a") as f:
            f.write(line.rstrip("\n") + "\n")


class ProgressTail:
    """The driver's side: print the lines rank 0 appends to progress.log while training runs."""

    def __init__(self, run_dir: Path, out=None, poll_s: float = 0.5):
        self.path = Path(run_dir) / PROGRESS_FILE
        self.out = out or sys.stdout
        self.poll_s = poll_s
        # a resumed run appends to the same file: print only what comes from now on
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProgressTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        # only whole lines; a line being written is printed on the next poll
        complete = chunk[: chunk.rfind("\n") + 1]
        if complete:
            self.out.write(complete)
            self.out.flush()
            self.offset += len(complete.encode())


def duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(step: int, max_steps: int, m: dict[str, float], elapsed_s: float, eta_s: float,
                  step_s: float, gpu_gib: float | None) -> str:
    """One progress line: step, loss, KL, sparsity, throughput, step time, MFU, data wait, memory,
    elapsed, ETA (what the window since the last line measured, over all workers)."""
    parts = [f"step {step:>6}/{max_steps}", f"loss {m['train/lm_loss']:.4f}"]
    if "train/kl_index_loss" in m:
        parts.append(f"kl {m['train/kl_index_loss']:.4f}")
    if "train/sparsity" in m:
        parts.append(f"sparsity {m['train/sparsity']:.1%}")
    if "train/blocks_per_token" in m:
        parts.append(f"blocks {m['train/blocks_per_token']:.2f}")
    parts.append(f"tok/s {m['train/tokens_per_s']:,.0f}")
    parts.append(f"step {step_s * 1e3:,.0f} ms")
    if "train/mfu" in m:
        parts.append(f"mfu {m['train/mfu']:.1%}")
    parts.append(f"wait {m['train/data_wait_frac_max']:.0%}")  # the worst-fed worker
    if gpu_gib is not None:
        parts.append(f"mem {gpu_gib:.1f} GiB")
    parts.append(f"elapsed {duration(elapsed_s)}")
    parts.append(f"eta {duration(eta_s)}")
    return "[train] " + "  ".join(parts)
