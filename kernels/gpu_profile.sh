#!/usr/bin/env bash
# Second device call for kernels/PERF.md: gather-bandwidth probe (the attention's memory ceiling),
# our attention with wider query tiles on the per-token selection, and an ncu profile (duration,
# L2 hit rate, L2/DRAM traffic, pipe utilisation, occupancy) of every MSA kernel at T=64K.
#
# Run on the GPU machine from the repo root:   bash kernels/gpu_profile.sh   (results in $OUT)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
$PY -m kernels.bench --seqlens 8192,65536 --no-dense --no-flex --tm-variants 2,4,8 --l2-probe --out "$OUT" \
  > "$OUT/bench_extra.log" 2>&1
grep -v "^|" "$OUT/bench_extra.log" | grep -v "^Selection" | tail -45
timeout "${NCU_TIMEOUT_S:-200}" ncu --profile-from-start off --clock-control none -k "regex:select_kernel|attn_|kl_" \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section LaunchStats --section Occupancy \
  $PY -m kernels.bench --profile 65536 > "$OUT/ncu.txt" 2>&1
echo "ncu exit $?"
grep -E "^  [a-z_]+kernel|^    (Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|L2 Hit Rate|Mem Busy|Max Bandwidth|Registers Per Thread|Achieved Occupancy|Executed Ipc Active|Dynamic Shared Memory Per Block)" "$OUT/ncu.txt" | head -120
