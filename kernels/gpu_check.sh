#!/usr/bin/env bash
# One device call for the MSA kernels: GPU tests (bf16/fp16 vs the fp32 reference), a launch-variant
# sweep of the attention kernels, the benchmark against dense SDPA and FlexAttention, and an ncu
# profile of one training step of the ops at 64K. Prints the short table last; full results in $OUT.
#
# Run on the GPU machine from the repo root:   bash kernels/gpu_check.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total,power.limit --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

$PY -m kernels.bench --check --sweep --out "$OUT" --budget-s "${BENCH_BUDGET_S:-420}" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
status=$?
tail -c 4000 "$OUT/bench.log" | grep -v "^|" | tail -40

if [ "${PROFILE:-1}" = "1" ] && command -v ncu >/dev/null; then
  timeout "${NCU_TIMEOUT_S:-120}" ncu --profile-from-start off --clock-control none \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    $PY -m kernels.bench --profile 65536 > "$OUT/ncu.txt" 2>&1
  echo "ncu exit $? ($(grep -c '^  [a-z_]*kernel' "$OUT/ncu.txt") kernel reports)"
  grep -E "^  [a-z_]+kernel|Duration|L2 Hit Rate|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy" "$OUT/ncu.txt" | head -80
fi
echo
cat "$OUT/bench.md" 2>/dev/null
exit $status
