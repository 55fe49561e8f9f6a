#!/usr/bin/env bash
# A closer look at the MSA kernels on one GPU: the gather-bandwidth probe (the attention's memory
# ceiling), the attention with wider query tiles on the per-token selection, and an ncu profile
# (duration, L2 hit rate, L2/DRAM traffic, pipe utilisation, occupancy) of every MSA kernel at 64K.
#
#   bash scripts/kernels_gpu_profile.sh
# Knobs: OUT (default runs/gpu/kernels_profile), NCU_TIMEOUT_S (default 600), PYTHON, SITE_ARCHIVE.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
OUT=${OUT:-$PWD/runs/gpu/kernels_profile}
mkdir -p "$OUT"
$PY -m benchmarks.msa_kernels --seqlens 8192,65536 --no-dense --no-flex --tm-variants 2,4,8 --l2-probe --out "$OUT" \
  > "$OUT/bench_extra.log" 2>&1
grep -v "^|" "$OUT/bench_extra.log" | grep -v "^Selection" | tail -45
timeout "${NCU_TIMEOUT_S:-600}" ncu --profile-from-start off --clock-control none -k "regex:select_kernel|attn_|kl_" \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section LaunchStats --section Occupancy \
  $PY -m benchmarks.msa_kernels --profile 65536 > "$OUT/ncu.txt" 2>&1
echo "ncu exit $?"
grep -E "^  [a-z_]+kernel|^    (Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|L2 Hit Rate|Mem Busy|Max Bandwidth|Registers Per Thread|Achieved Occupancy|Executed Ipc Active|Dynamic Shared Memory Per Block)" "$OUT/ncu.txt" | head -120
