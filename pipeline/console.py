"""What `msa-train` prints: clean progress lines from rank 0, read by the driver from a file in the
run directory (so they carry none of Ray's worker prefixes or colour codes, also in log files), and
a summary at the end.

    rank 0 (a Ray Train worker)          ProgressLog(run_dir).say("[train] step 10/120 ...")
    the driver (msa-train)               with ProgressTail(run_dir): trainer.fit()   # prints new lines

Known-harmless framework warnings are silenced at their source, in every Ray worker process
(`quiet_ray_workers`, a worker_process_setup_hook; Ray Data's repeating high-memory warning where
pipeline/data.py sets the DataContext), or filtered from the driver's stderr while a run trains
(`without_known_harmless_lines`).
"""
from __future__ import annotations

import contextlib
import io
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


# Lines that Ray forwards from its own processes and that report nothing a user can act on; dropped
# from the driver's stderr while a run trains (matched as substrings of a whole line).
KNOWN_HARMLESS_LINES = (
    # Ray Train's PreemptionWatcher and Ray Data's MapWorker actors are restartable and get their
    # constructor arguments by reference; Ray's core worker says so at ERROR level each time one
    # starts (ray-project/ray#53727), in every run
    "has constructor arguments in the object store and max_restarts > 0",
)


class LineFilter(io.TextIOBase):
    """A text stream that passes whole lines to `stream`, except those containing one of `drop`.
    A line is held until its newline arrives (or the filter is closed)."""

    def __init__(self, stream, drop: tuple[str, ...] = KNOWN_HARMLESS_LINES):
        self.stream, self.drop, self._buf = stream, drop, ""
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            if "\n" in self._buf:
                done, self._buf = self._buf.rsplit("\n", 1)
                kept = [line for line in done.split("\n") if not any(d in line for d in self.drop)]
                if kept:
                    self.stream.write("\n".join(kept) + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:  # the rest of an unfinished line is not lost
        with self._lock:
            if self._buf and not any(d in self._buf for d in self.drop):
                self.stream.write(self._buf)
            self._buf = ""
        self.stream.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()


@contextlib.contextmanager
def without_known_harmless_lines():
    """sys.stderr filtered by LineFilter for the duration (where Ray's log monitor prints the lines
    it forwards from worker processes)."""
    original = sys.stderr
    filtered = LineFilter(original)
    sys.stderr = filtered
    try:
        yield filtered
    finally:
        sys.stderr = original
        filtered.close()


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
