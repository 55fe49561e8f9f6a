"""The debug hooks for recovery tests and benchmarks. debug.trace_data: which pieces of which documents
each step trained on, per worker, and the checks that read it back (every step trained, no piece
twice). debug.pause_at_step: one worker stops after a step and writes its pid, and `Killer` kills it
from outside with SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig


def pause_marker(run_dir: Path, rank: int, step: int) -> Path:
    """Where the paused worker writes its pid."""
    return run_dir / ".debug" / f"paused-rank{rank}-step{step}"


def pause_once(cfg: RunConfig, run_dir: Path, rank: int, step: int) -> None:
    """debug.pause_at_step: one worker stops after a step, once, and waits to be killed (kill -9) from
    outside by the pid it writes; it goes on by itself after debug.pause_timeout_s."""
    if cfg.debug.pause_at_step != step or rank != cfg.debug.pause_rank:
        return
    marker = pause_marker(run_dir, rank, step)
    if marker.exists():  # paused (and killed) once already: a restarted worker trains on
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    print(f"[debug] rank {rank} (pid {os.getpid()}) paused after step {step}", flush=True)
    deadline = time.monotonic() + cfg.debug.pause_timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)


class Killer(threading.Thread):
    """Waits for a paused worker's pid file under `runs_root` (<output_dir>/ray: any run in it), then
    kills that process with SIGKILL. `killed` is its pid once done; set `stop` to give up."""

    def __init__(self, runs_root: Path, rank: int, step: int):
        super().__init__(daemon=True)
        self.runs_root = runs_root
        self.pattern = str(pause_marker(Path("*"), rank, step))
        self.killed: int | None = None
        self.stop = False

    def run(self):
        while not self.stop:
            for marker in self.runs_root.glob(self.pattern):
                pid = int(marker.read_text())
                os.kill(pid, signal.SIGKILL)
                self.killed = pid
                return
            time.sleep(0.2)


class DataTrace:
    """Appends the piece ids of every step's rows to <run dir>/.debug/data_trace_rank<r>.jsonl."""

    def __init__(self, cfg: RunConfig, run_dir: Path, rank: int, attempt: float):
        self.path = run_dir / ".debug" / f"data_trace_rank{rank}.jsonl" if cfg.debug.trace_data else None
        self.attempt = attempt
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, plan_idx_R: np.ndarray, piece_ids_RP: np.ndarray) -> None:
        if not self.path:
            return
        ids = {str(int(e)): [int(x) for x in piece_ids_RP[plan_idx_R == e].ravel() if x]
               for e in np.unique(plan_idx_R)}
        with open(self.path, "a") as f:
            f.write(json.dumps({"attempt": self.attempt, "step": step, "ids": ids}) + "\n")


def trained_timeline(run_dir: Path) -> dict[int, list[tuple[int, int]]]:
    """step -> the (plan entry, piece id) pairs trained at that step over all workers, from the last
    attempt that ran the step (a killed attempt's steps after its checkpoint were trained again by the
    next attempt, and only that one counts)."""
    by_step: dict[int, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for f in (run_dir / ".debug").glob("data_trace_rank*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            by_step[r["step"]][r["attempt"]] += [(int(e), i) for e, ids in r["ids"].items() for i in ids]
    return {s: attempts[max(attempts)] for s, attempts in by_step.items()}


def exactly_once_problems(run_dir: Path, max_steps: int) -> list[str]:
    """What contradicts "every step 1..max_steps trained, and no piece of a document trained twice"
    in a traced run; empty when both hold."""
    timeline = trained_timeline(run_dir)
    problems = []
    missing = sorted(set(range(1, max_steps + 1)) - set(timeline))
    if missing:
        problems.append(f"steps never trained: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    extra = sorted(set(timeline) - set(range(1, max_steps + 1)))
    if extra:
        problems.append(f"steps beyond max_steps: {extra[:10]}")
    seen: dict[tuple[int, int], int] = {}
    for step, pairs in sorted(timeline.items()):
        for pair in pairs:
            if pair in seen:
                problems.append(f"piece {pair} trained at step {seen[pair]} and again at step {step}")
            seen[pair] = step
    return problems
