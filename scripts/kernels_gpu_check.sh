#!/usr/bin/env bash
# The MSA kernels on one GPU, in one go: the GPU tests (bf16/fp16 against the fp32 reference), a
# launch-variant sweep of the split schedule's kernels, the benchmark against dense SDPA and
# FlexAttention, and an ncu profile of one training step of the ops at 64K (when ncu is installed).
# Prints the short table last; the full results go to $OUT.
#
#   bash scripts/kernels_gpu_check.sh
# Knobs: OUT (default runs/gpu/kernels_check), BENCH_ARGS (extra arguments of benchmarks.msa_kernels),
# BENCH_BUDGET_S (skip sequence lengths that would start later), PROFILE=0 (no ncu),
# NCU_TIMEOUT_S (default 600), PYTHON, SITE_ARCHIVE (scripts/README.md).
# Results measured this way: docs/perf/kernels_h100.md, docs/perf/kernels_notes.md.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
OUT=${OUT:-$PWD/runs/gpu/kernels_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"

budget=()
[ -n "${BENCH_BUDGET_S:-}" ] && budget=(--budget-s "$BENCH_BUDGET_S")
$PY -m benchmarks.msa_kernels --check --sweep --out "$OUT" "${budget[@]}" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
status=$?
grep -v "^|" "$OUT/bench.log" | grep -v "^Selection" | tail -60

if [ "${PROFILE:-1}" = "1" ] && command -v ncu >/dev/null; then
  timeout "${NCU_TIMEOUT_S:-600}" ncu --profile-from-start off --clock-control none -k "regex:select_kernel|attn_|kl_" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    $PY -m benchmarks.msa_kernels --profile 65536 > "$OUT/ncu.txt" 2>&1
  echo "ncu exit $?"
  grep -E "^  [a-z_]+kernel|Duration|L2 Hit Rate|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Local Memory" "$OUT/ncu.txt" | head -70
else
  echo "ncu skipped (PROFILE=0 or ncu not installed)"
fi
echo
cat "$OUT/bench.md" 2>/dev/null
exit $status
