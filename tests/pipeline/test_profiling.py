"""pipeline/profiling.py: the step profile's arithmetic on known kernel intervals, and a real window."""
import json

import torch

from pipeline.profiling import COMM, MATMULS, MSA, StepProfiler, group_of, summarize


def test_busy_idle_and_exposed_communication_from_kernel_intervals():
    # 2 steps in 100 ms; kernels (name, start us, end us): a matmul 0-30 ms, an MSA kernel 20-40 ms
    # overlapping it, an all-reduce 35-60 ms (5 ms of it under the MSA kernel), nothing 60-100 ms
    kernels = [("sm90_xmma_gemm_bf16", 0, 30_000), ("attn_fwd_split_kernel", 20_000, 40_000),
               ("ncclDevKernel_AllReduce_Sum_f32", 35_000, 60_000)]
    s = summarize(kernels, wall_s=0.100, steps=2)
    assert s["wall_ms_per_step"] == 50.0
    assert s["gpu_busy_ms_per_step"] == 30.0  # union 0-60 ms over 2 steps
    assert abs(s["gpu_idle_frac"] - 0.4) < 1e-12
    assert s["comm_ms_per_step"] == 12.5 and s["comm_exposed_ms_per_step"] == 10.0  # 40-60 ms alone
    assert s["groups_ms_per_step"] == {MATMULS: 15.0, COMM: 12.5, MSA: 10.0}
    assert s["top_kernels_ms_per_step"][0] == ["sm90_xmma_gemm_bf16", 15.0]


def test_kernel_groups():
    assert group_of("ncclDevKernel_ReduceScatter") == COMM
    assert group_of("kl_bwd_split_kernel") == MSA
    assert group_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") != MSA


def test_a_window_on_cpu_writes_the_rank_file(tmp_path):
    prof = StepProfiler([1, 3], tmp_path, rank=1, device=torch.device("cpu"))
    x = torch.randn(64, 64)
    for step in range(4):
        prof.at(step)
        x = x @ x.T / 64
    assert prof.written == tmp_path / "profile" / "rank1.json"
    out = json.loads(prof.written.read_text())
    assert out["rank"] == 1 and out["first_step"] == 1 and out["last_step"] == 3 and out["steps"] == 2
    assert out["wall_ms_per_step"] > 0 and out["gpu_idle_frac"] is None  # no device kernels on CPU
