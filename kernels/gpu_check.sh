#!/usr/bin/env bash
# One device call for the MSA kernels: GPU tests (bf16/fp16 vs the fp32 reference), a launch-variant
# sweep of the attention kernels, the benchmark against dense SDPA and FlexAttention, and (if time
# is left) an ncu profile of one training step of the ops at 64K. Prints the short table last;
# full results in $OUT.
#
# Run on the GPU machine from the repo root:   bash kernels/gpu_check.sh
# Knobs: BENCH_ARGS (extra args of kernels.bench), BENCH_BUDGET_S, PROFILE=0|1, LIMIT_S (whole script).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-580}
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"

$PY -m kernels.bench --check --sweep --out "$OUT" --budget-s "${BENCH_BUDGET_S:-400}" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
status=$?
grep -v "^|" "$OUT/bench.log" | grep -v "^Selection" | tail -60

left=$(( LIMIT_S - ($(date +%s) - start) ))
if [ "${PROFILE:-1}" = "1" ] && command -v ncu >/dev/null && [ $left -gt 60 ]; then
  t=$(( left - 20 < 150 ? left - 20 : 150 ))
  timeout $t ncu --profile-from-start off --clock-control none -k "regex:select_kernel|attn_|kl_" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    $PY -m kernels.bench --profile 65536 > "$OUT/ncu.txt" 2>&1
  echo "ncu exit $? (timeout ${t}s)"
  grep -E "^  [a-z_]+kernel|Duration|L2 Hit Rate|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Local Memory" "$OUT/ncu.txt" | head -70
else
  echo "ncu skipped (${left}s left)"
fi
echo
cat "$OUT/bench.md" 2>/dev/null
exit $status
