"""The logging window's reduction over workers: two real processes over gloo, no Ray."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from model_helpers import leave_worker  # noqa: E402

from pipeline.metrics import Window, reduce_window  # noqa: E402


def _worker(rank: int, world: int, store_path: str, out_path: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        win = Window(t0=time.perf_counter() - 2.0)  # a 2-second window
        win.tokens = 1000 * (rank + 1)
        win.data_wait_s = [0.1, 1.0][rank]  # rank 1 waited half of the window for its data
        win.add_step({"train/lm_loss": torch.tensor(2.0 + rank)}, torch.tensor(True))
        win.add_step({"train/lm_loss": torch.tensor(4.0 + rank)}, torch.tensor(True))
        win.add_step({"train/lm_loss": torch.tensor(float("nan"))}, torch.tensor(False))  # a skipped step
        win.count("skipped", rank)
        m = reduce_window(win, torch.device("cpu"), ["train/lm_loss"], ["skipped"],
                          memory_gib=[(10.0, 12.0), (11.0, 11.5)][rank])
        with open(f"{out_path}.{rank}", "w") as f:
            json.dump(m, f)
    finally:
        dist.destroy_process_group()
    leave_worker()


def test_reduce_window_over_two_workers(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "m")), nprocs=2)
    m0, m1 = (json.loads((tmp_path / f"m.{r}").read_text()) for r in (0, 1))
    assert m0 == pytest.approx(m1, rel=0.05)  # every rank ends with the same metrics (up to its clock)
    assert m0["train/lm_loss"] == pytest.approx((2 + 4 + 3 + 5) / 4)  # mean over every value added
    assert m0["skipped"] == 1 and m0["tokens"] == 3000
    # mean wait over workers (0.05 + 0.5) / 2, the worst-fed worker's alone 0.5
    assert m0["data_wait_frac"] == pytest.approx(0.275, rel=0.05)
    assert m0["data_wait_frac_max"] == pytest.approx(0.5, rel=0.05)
    assert m0["tokens_per_s"] == pytest.approx(1500, rel=0.05)
    # the peak memory of the rank that holds the most, allocated and reserved (not one rank's pair)
    assert (m0["peak_allocated_gib"], m0["peak_reserved_gib"]) == (11.0, 12.0)


def test_reduce_window_one_process():
    win = Window(t0=time.perf_counter() - 1.0)
    win.data_wait_s = 0.25
    m = reduce_window(win, torch.device("cpu"), [], [])
    assert m["data_wait_frac"] == pytest.approx(0.25, rel=0.05)
    assert m["data_wait_frac_max"] == m["data_wait_frac"]
    assert win.elapsed_s == pytest.approx(1.0, rel=0.05)  # what the progress line divides by its steps
    assert "peak_allocated_gib" not in m  # no memory given (a CPU run): no memory metric


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host running ahead of the GPU is a CUDA matter")
def test_a_window_ends_when_the_gpu_has_run_its_steps():
    """The host queues a window's steps and reaches the logging step long before the GPU has run them
    (replayed CUDA graphs cost the host almost nothing): the window's time, its tokens/s and the
    progress line's step time are the GPU's."""
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    win = Window()
    t_host = time.perf_counter()
    for _ in range(50):
        a = torch.tanh(a @ a)  # queued, not waited for
    t_host = time.perf_counter() - t_host
    win.tokens = 1000
    m = reduce_window(win, torch.device("cuda"), [], [])
    gpu_busy = win.elapsed_s
    assert gpu_busy > 2 * t_host
    assert m["tokens_per_s"] == pytest.approx(1000 / gpu_busy, rel=1e-3)
