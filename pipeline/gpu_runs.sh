#!/usr/bin/env bash
# The pipeline's GPU figures in one device call (docs/perf.md records what came back).
#   bash pipeline/gpu_runs.sh single   # 1 GPU: model step time dense/warmup/sparse at 8K and 32K,
#                                      #        then msa-train `small` (native MSA) and a dense run
#   bash pipeline/gpu_runs.sh multi    # 2 GPUs: msa-train `small` over DDP (NCCL), then FSDP2
# Needs .devbundle (../shared/device/make-bundle.sh) beside the working tree; writes to $OUT.
set -uo pipefail
what=${1:?single|multi}
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
    --set train.eval_documents=50 "$@" 2>&1 | grep -vE "^\s*$|ray\.data|Ray Data|WARNING|INFO" | tee -a "$log"
}
if [ "$what" = single ]; then
  echo "=== model step time ===" | tee -a "$log"
  timeout 200 python -m pipeline.bench_steps --preset small --contexts 8192 32768 --iters 5 --warmup 2 \
    --out "$OUT/steps.json" 2>&1 | tee -a "$log"
  train msa-1gpu 190 --set train.max_steps=60 --set train.checkpoint_every=60 --set train.eval_every=60 \
    --set schedule.warmup_tokens=81920
  train dense-1gpu 130 --set schedule.mode=dense --set train.max_steps=40 --set train.checkpoint_every=40 \
    --set train.eval_every=0
else
  train msa-2gpu-ddp 220 --set ray.num_workers=2 --set train.max_steps=60 --set train.checkpoint_every=60 \
    --set train.eval_every=60 --set schedule.warmup_tokens=163840
  train msa-2gpu-fsdp 180 --set ray.num_workers=2 --set ray.parallel=fsdp --set train.max_steps=40 \
    --set train.checkpoint_every=40 --set train.eval_every=0 --set schedule.warmup_tokens=163840
fi
echo "=== done ===" | tee -a "$log"
