"""The data trace's checks (every step trained once, no piece twice) on traces written by DataTrace."""
import numpy as np

from pipeline.config import RunConfig
from pipeline.trace import DataTrace, exactly_once_problems, trained_timeline


def _trace(run_dir, rank, attempt, steps):
    cfg = RunConfig()
    cfg.debug.trace_data = True
    t = DataTrace(cfg, run_dir, rank, attempt)
    for step, (entries, pieces) in steps.items():
        t.write(step, np.array(entries), np.array(pieces))


def test_a_retried_step_counts_once_from_its_last_attempt(tmp_path):
    # rank 0 and 1, attempt 1 trained steps 1-3 and was killed; attempt 2 resumed from step 2's checkpoint
    _trace(tmp_path, 0, 1.0, {1: ([0], [[1, 2, 0]]), 2: ([0], [[3, 0, 0]]), 3: ([0], [[4, 0, 0]])})
    _trace(tmp_path, 1, 1.0, {1: ([1], [[1, 0, 0]]), 2: ([1], [[2, 0, 0]]), 3: ([1], [[3, 0, 0]])})
    _trace(tmp_path, 0, 2.0, {3: ([0], [[4, 5, 0]]), 4: ([0], [[6, 0, 0]])})
    _trace(tmp_path, 1, 2.0, {3: ([1], [[3, 0, 0]]), 4: ([1, 2], [[4, 0, 0], [1, 0, 0]])})
    timeline = trained_timeline(tmp_path)
    assert sorted(timeline) == [1, 2, 3, 4]
    assert sorted(timeline[3]) == [(0, 4), (0, 5), (1, 3)]  # attempt 2's step 3 only; padding (0) dropped
    assert sorted(timeline[4]) == [(0, 6), (1, 4), (2, 1)]
    assert exactly_once_problems(tmp_path, 4) == []
    assert exactly_once_problems(tmp_path, 5) == ["steps never trained: [5]"]
    assert exactly_once_problems(tmp_path, 3) == ["steps beyond max_steps: [4]"]


def test_a_piece_trained_twice_is_named(tmp_path):
    _trace(tmp_path, 0, 1.0, {1: ([0], [[1, 2]]), 2: ([0], [[2, 3]])})
    assert exactly_once_problems(tmp_path, 2) == ["piece (0, 2) trained at step 1 and again at step 2"]


def test_a_paused_worker_is_killed_by_its_pid(tmp_path):
    import subprocess
    import sys

    from pipeline.trace import Killer, pause_marker

    run_dir = tmp_path / "ray" / "run-a"
    code = ("import sys; from pathlib import Path; from pipeline.config import RunConfig; "
            "from pipeline.trace import pause_once; cfg = RunConfig(); cfg.debug.pause_at_step = 3; "
            "cfg.debug.pause_rank = 1; cfg.debug.pause_timeout_s = 60; "
            "pause_once(cfg, Path(sys.argv[1]), 1, 2); pause_once(cfg, Path(sys.argv[1]), 0, 3); "
            "pause_once(cfg, Path(sys.argv[1]), 1, 3)")  # only rank 1 after step 3 pauses
    killer = Killer(tmp_path / "ray", rank=1, step=3)
    killer.start()
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)])
    try:
        assert proc.wait(timeout=60) == -9  # SIGKILL, long before the pause's own timeout
    finally:
        killer.stop = True
        proc.kill()
    killer.join(5)
    assert killer.killed == proc.pid
    assert pause_marker(run_dir, 1, 3).read_text() == str(proc.pid)
