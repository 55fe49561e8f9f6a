#!/usr/bin/env bash
# The pipeline's GPU figures in one device call (docs/perf.md records what came back).
#   bash pipeline/gpu_runs.sh bench    # 1 GPU: model step time dense/warmup/sparse at 8K and 32K
#   bash pipeline/gpu_runs.sh single   # bench, then msa-train `small` on 1 GPU: native MSA, and dense
#   bash pipeline/gpu_runs.sh multi    # 2 GPUs: msa-train `small` over DDP (NCCL), then FSDP2
#   bash pipeline/gpu_runs.sh all      # the 1-GPU and 2-GPU runs, no bench (a machine with 2 GPUs)
# Needs .devbundle (../shared/device/make-bundle.sh) beside the working tree; writes to $OUT.
set -uo pipefail
what=${1:?bench|single|multi|all}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" .site
tar xJf .devbundle/site.tar.xz -C .site
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0
log=$OUT/$what.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$log"
python -m data_prep.cli demo --output runs/demo/shards --documents 3000 --max-chars 2000 --quiet 2>&1 | tee -a "$log"
python -m data_prep.cli demo --output runs/demo/heldout --documents 300 --max-chars 2000 --seed 1 --vocab-size 0 --quiet 2>&1 | tee -a "$log"
uri=sqlite:///$OUT/mlflow.db
train() {  # name, timeout, overrides...
  local name=$1 limit=$2; shift 2
  echo "=== msa-train $name ===" | tee -a "$log"
  timeout "$limit" python -m pipeline.train --config configs/small.toml --tracking-uri "$uri" \
    --set tracking.run_name="'$name'" --set train.log_every=10 --set train.stats_every=30 \
    --set train.eval_documents=50 "$@" 2>&1 | grep -vE "^\s*$|ray\.data|Ray Data|WARNING|INFO|PlacementGroupCleaner|logging\.cc|^\s+@|core_worker\.cc|exclude_resources|socket\.cpp" | tee -a "$log"
}
if [ "$what" = bench ] || [ "$what" = single ]; then
  echo "=== model step time ===" | tee -a "$log"
  timeout 200 python -m pipeline.bench_steps --preset small --contexts 8192 32768 --iters 5 --warmup 2 \
    --out "$OUT/steps.json" 2>&1 | tee -a "$log"
fi
if [ "$what" = single ] || [ "$what" = all ]; then
  train msa-1gpu 170 --set train.max_steps=50 --set train.checkpoint_every=50 --set train.eval_every=50 \
    --set schedule.warmup_tokens=81920
  train dense-1gpu 120 --set schedule.mode=dense --set train.max_steps=30 --set train.checkpoint_every=30 \
    --set train.eval_every=0
fi
if [ "$what" = multi ] || [ "$what" = all ]; then
  train msa-2gpu-ddp 170 --set ray.num_workers=2 --set train.max_steps=50 --set train.checkpoint_every=50 \
    --set train.eval_every=50 --set schedule.warmup_tokens=163840
  train msa-2gpu-fsdp 140 --set ray.num_workers=2 --set ray.parallel=fsdp --set train.max_steps=30 \
    --set train.checkpoint_every=30 --set train.eval_every=0 --set schedule.warmup_tokens=163840
fi
echo "=== done ===" | tee -a "$log"
