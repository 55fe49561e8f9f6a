#!/usr/bin/env bash
# The pipeline's GPU figures (docs/perf/pipeline_h100.md records what they gave on H100s).
#   bash scripts/pipeline_gpu_runs.sh bench    # 1 GPU: model step time dense/warmup/sparse at 8K and 32K
#   bash scripts/pipeline_gpu_runs.sh single   # bench, then msa-train `small` on 1 GPU: native MSA, and dense
#   bash scripts/pipeline_gpu_runs.sh multi    # 2 GPUs: msa-train `small` over DDP (NCCL), then FSDP2
#   bash scripts/pipeline_gpu_runs.sh all      # the 1-GPU and 2-GPU runs, no bench (a machine with 2 GPUs)
#   bash scripts/pipeline_gpu_runs.sh long     # 1 GPU: step time with activations recomputed, dense and
#                                              # sparse-s at 64K and 128K (what fits 128K on one card)
#   bash scripts/pipeline_gpu_runs.sh steps    # 1 GPU: the step work of docs/perf/steps_h200.md: the kernels
#                                              # at 8K-128K, then the step at 8K-64K (dense, warmup-s,
#                                              # sparse-s) with a profile at 32K, then one MSA layer
#                                              # against one dense layer. Knobs: SKIP_KERNELS=1,
#                                              # CONTEXTS, MODES, PROFILE (0: none), TAG (file suffix),
#                                              # STEPS_ARGS (e.g. --eager-ops, --msa-set index_lse=select)
#   bash scripts/pipeline_gpu_runs.sh budgets  # 1 GPU: the selection budgets: kernel rows at 64K, step
#                                              # time at 32K, and msa-train `small` with top_p and ratio
#                                              # (budgets-bench, budgets-train: the two halves alone)
#   bash scripts/pipeline_gpu_runs.sh study    # every GPU of the host: the corpora of configs/study-gpu.toml
#                                              # (once), then msa-study with one seed per GPU at once
#   bash scripts/pipeline_gpu_runs.sh select   # 1 GPU: `small` trained at 32K, then what FP8 index scores
#                                              # change in its selection (benchmarks.select_precision)
#   bash scripts/pipeline_gpu_runs.sh scaling  # every GPU of the host: benchmarks.scaling (1 GPU, DDP and
#                                              # FSDP2 on all GPUs (FSDP2 with its defaults and with its
#                                              # measured settings), at CONTEXTS), then the kill test
# Needs the project installed (`pip install -e .`), or SITE_ARCHIVE (scripts/README.md).
# Knobs: OUT (default runs/gpu/pipeline: the log, steps.json, mlflow.db), RUN_LIMIT_S (stop each
# msa-train run after this many seconds; 0, the default, means no limit), PYTHON.
set -uo pipefail
what=${1:?bench|single|multi|all|long|steps|budgets|budgets-bench|budgets-train|study|scaling|select|corpora}
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
OUT=${OUT:-$PWD/runs/gpu/pipeline}
mkdir -p "$OUT"
export RAY_DEDUP_LOGS=0
log=$OUT/$what.log
# Ray's and Ray Data's chatter in the printed logs (blank lines too, also a study lane's "[s0] " ones)
noise='^(\[s[0-9,]+\] )?\s*$|ray\.data|Ray Data|WARNING|INFO|PlacementGroupCleaner|logging\.cc|^\s+@|core_worker\.cc|exclude_resources|socket\.cpp'
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$log"
if [ "$what" = scaling ]; then
  # documents up to 32K tokens (so a 32K row holds long documents, where MSA is sparse), images of
  # 258 tokens as in the `small` preset; made once per machine
  data=$PWD/runs/scaling/data
  [ -f "$data/tokenizer.json" ] || $PY -m data_prep.cli demo --output "$data" --documents 600 --doc-tokens 32768 \
    --image-tokens 258 --vocab-size 8192 --workers "${PREP_WORKERS:-16}" --quiet 2>&1 | tee -a "$log"
  ngpu=$(nvidia-smi -L | wc -l)
  gpus="1 $ngpu"; [ "$ngpu" -lt 2 ] && gpus=1  # a dry run on one GPU: the one-GPU rows, no kill test
  # FSDP2 twice, with its defaults and with the settings that met the target on 2 x H200
  # (docs/perf/scaling_h200.md); DDP once. A --variant or --parallel in SCALING_ARGS drops these two.
  variants=(--variant defaults --variant "tuned ray.fsdp_param_dtype='bf16' ray.fsdp_reshard_after_forward=false \
ray.fsdp_unit_blocks=4 ray.fsdp_prefetch=2")
  [[ "${SCALING_ARGS:-}" == *--variant* || "${SCALING_ARGS:-}" == *--parallel* ]] && variants=()
  # SCALING_ARGS: e.g. "--contexts 8192" or "--kill-only" to split the work over calls
  # shellcheck disable=SC2086  # word splitting of the knobs is wanted
  $PY -m benchmarks.scaling --gpus $gpus --contexts ${CONTEXTS:-8192 32768} --out "$OUT/scaling" \
    --set "data.shards=['$data']" --set "data.eval_shards=''" "${variants[@]}" ${SCALING_ARGS:-} 2>&1 | tee -a "$log"
  echo "=== done ===" | tee -a "$log"
  exit 0
fi
if [ "$what" = study ]; then
  # the corpora named at the top of configs/study-gpu.toml, made once per machine
  data=$PWD/runs/study-gpu/data
  w=${PREP_WORKERS:-$(nproc)}
  [ -f "$data/train/manifest.json" ] || $PY -m data_prep.cli demo --output "$data/train" --documents 1500 \
    --doc-tokens 16384 --image-tokens 258 --vocab-size 8192 --workers "$w" --quiet 2>&1 | tee -a "$log"
  [ -f "$data/heldout/manifest.json" ] || $PY -m data_prep.cli demo --output "$data/heldout" --documents 64 \
    --doc-tokens 16384 --image-tokens 258 --seed 1 --retrieval-frac 0.6 --vocab-size 0 --workers "$w" \
    --quiet 2>&1 | tee -a "$log"
  ngpu=$(nvidia-smi -L | wc -l)
  # STUDY_ARGS: e.g. "--set 'seeds=[0]'"; seeds go one per GPU at once (at most 2 GPUs: 2 seeds)
  eval "$PY -m pipeline.study --config configs/study-gpu.toml --parallel $(( ngpu < 2 ? 1 : 2 )) ${STUDY_ARGS:-}" 2>&1 \
    | grep --line-buffered -vE "$noise" | tee -a "$log"
  echo "=== done ===" | tee -a "$log"
  exit 0
fi
if [ "$what" = steps ]; then
  if [ -z "${SKIP_KERNELS:-}" ]; then
    echo "=== kernels ===" | tee -a "$log"
    $PY -m benchmarks.msa_kernels --seqlens 8192,32768,65536,131072 --no-flex --out "$OUT/kernels" 2>&1 | tee -a "$log"
  fi
  echo "=== model step time ${STEPS_ARGS:-} ===" | tee -a "$log"
  # shellcheck disable=SC2086  # word splitting of the knobs is wanted
  $PY -m benchmarks.train_steps --preset small --contexts ${CONTEXTS:-8192 32768 65536} \
    --modes ${MODES:-dense warmup-s sparse-s} --skip 8192:warmup-s 65536:warmup-s --iters 3 --warmup 1 \
    --profile "${PROFILE:-32768}" --commit "${GIT_COMMIT:-}" --out "$OUT/steps${TAG:-}.json" ${STEPS_ARGS:-} 2>&1 \
    | tee -a "$log"
  echo "=== one MSA layer against one dense layer: the work outside the kernels ===" | tee -a "$log"
  $PY -m benchmarks.msa_layer --contexts 8192 32768 --commit "${GIT_COMMIT:-}" --out "$OUT/layer${TAG:-}.json" 2>&1 \
    | tee -a "$log"
  echo "=== done ===" | tee -a "$log"
  exit 0
fi
if [ "$what" = long ]; then
  echo "=== model step time, activations recomputed ===" | tee -a "$log"
  $PY -m benchmarks.train_steps --preset small --contexts 65536 131072 --modes dense sparse-s --iters 3 --warmup 1 \
    --activation-checkpointing --commit "${GIT_COMMIT:-}" --out "$OUT/steps_long.json" 2>&1 | tee -a "$log"
  echo "=== done ===" | tee -a "$log"
  exit 0
fi
# the demo corpora, made once per machine (two halves of `budgets` may start at once, after they exist)
[ -f runs/demo/shards/manifest.json ] || $PY -m data_prep.cli demo --output runs/demo/shards --documents 3000 \
  --max-chars 2000 --quiet 2>&1 | tee -a "$log"
[ -f runs/demo/heldout/manifest.json ] || $PY -m data_prep.cli demo --output runs/demo/heldout --documents 300 \
  --max-chars 2000 --seed 1 --vocab-size 0 --quiet 2>&1 | tee -a "$log"
[ "$what" = corpora ] && exit 0
uri=sqlite:///$OUT/mlflow.db
train() {  # name, overrides...
  local name=$1; shift
  echo "=== msa-train $name ===" | tee -a "$log"
  timeout "${RUN_LIMIT_S:-0}" $PY -m pipeline.train --config configs/small.toml --tracking-uri "$uri" \
    --set tracking.run_name="'$name'" --set train.log_every=10 --set train.stats_every=30 \
    --set train.eval_documents=50 "$@" 2>&1 | grep --line-buffered -vE "$noise" | tee -a "$log"
}
if [ "$what" = select ]; then
  # FP8 index scores on a trained index branch (docs/perf/select_precision_cpu.md): `small` trained
  # natively on 32K-token rows of long documents, then benchmarks.select_precision on held-out rows
  # of the same kind. Knobs: SELECT_STEPS (default 200), SELECT_ROWS (default 4).
  data=$PWD/runs/scaling/data
  held=$PWD/runs/select/heldout
  [ -f "$data/tokenizer.json" ] || $PY -m data_prep.cli demo --output "$data" --documents 600 --doc-tokens 32768 \
    --image-tokens 258 --vocab-size 8192 --workers "${PREP_WORKERS:-16}" --quiet 2>&1 | tee -a "$log"
  [ -f "$held/manifest.json" ] || $PY -m data_prep.cli demo --output "$held" --documents 24 --doc-tokens 32768 \
    --image-tokens 258 --seed 1 --vocab-size 0 --workers "${PREP_WORKERS:-16}" --quiet 2>&1 | tee -a "$log"
  steps=${SELECT_STEPS:-200}
  train select-32k --set output_dir="'$OUT/select'" --set data.seq_len=32768 --set "data.shards=['$data']" \
    --set data.eval_shards="'$held'" --set train.max_steps="$steps" --set train.checkpoint_every="$steps" \
    --set train.eval_every=0 --set train.stats_every=100 --set schedule.warmup_tokens=655360
  run=$(ls -d "$OUT"/select/ray/select-32k* | tail -1)
  echo "=== FP8 index scores on the trained index branch: $run ===" | tee -a "$log"
  $PY -m benchmarks.select_precision --checkpoint "$run" --rows "${SELECT_ROWS:-4}" --out "$OUT/select_precision.json" \
    2>&1 | tee -a "$log"
  echo "=== done ===" | tee -a "$log"
  exit 0
fi
if [ "$what" = bench ] || [ "$what" = single ]; then
  echo "=== model step time ===" | tee -a "$log"
  $PY -m benchmarks.train_steps --preset small --contexts 8192 32768 --iters 5 --warmup 2 \
    --out "$OUT/steps.json" 2>&1 | tee -a "$log"
fi
if [ "$what" = single ] || [ "$what" = all ]; then
  train msa-1gpu --set train.max_steps=50 --set train.checkpoint_every=50 --set train.eval_every=50 \
    --set schedule.warmup_tokens=81920
  train dense-1gpu --set schedule.mode=dense --set train.max_steps=30 --set train.checkpoint_every=30 \
    --set train.eval_every=0
fi
if [ "$what" = multi ] || [ "$what" = all ]; then
  train msa-2gpu-ddp --set ray.num_workers=2 --set train.max_steps=50 --set train.checkpoint_every=50 \
    --set train.eval_every=50 --set schedule.warmup_tokens=163840
  train msa-2gpu-fsdp --set ray.num_workers=2 --set ray.parallel=fsdp --set train.max_steps=30 \
    --set train.checkpoint_every=30 --set train.eval_every=0 --set schedule.warmup_tokens=163840
fi
if [ "$what" = budgets ] || [ "$what" = budgets-bench ]; then
  echo "=== kernels: budgets against static top-16 at the same mean blocks per token ===" | tee -a "$log"
  $PY -m benchmarks.msa_kernels --seqlens 65536 --budget-seqlens 65536 --no-flex \
    --out "$OUT/kernels_budgets" 2>&1 | tee -a "$log"
  echo "=== model step time: budgets ===" | tee -a "$log"
  $PY -m benchmarks.train_steps --preset small --contexts 32768 --modes dense sparse-s --iters 5 --warmup 2 \
    --out "$OUT/steps_static.json" 2>&1 | tee -a "$log"
  for b in "budget=ratio budget_ratio=0.0625 budget_k_min=4" "budget=top_p budget_p=0.9 budget_k_min=4"; do
    name=${b%% *}
    $PY -m benchmarks.train_steps --preset small --contexts 32768 --modes sparse-s --iters 5 --warmup 2 \
      --msa-set topk=32 $(printf -- '--msa-set %s ' $b) --out "$OUT/steps_${name#budget=}.json" 2>&1 | tee -a "$log"
  done
fi
if [ "$what" = budgets ] || [ "$what" = budgets-train ]; then
  train msa-top_p --set train.max_steps=50 --set train.checkpoint_every=50 --set train.eval_every=50 \
    --set schedule.warmup_tokens=81920 --set model.msa.topk=32 --set model.msa.budget="'top_p'" \
    --set model.msa.budget_p=0.9 --set model.msa.budget_k_min=4
  train msa-ratio --set train.max_steps=50 --set train.checkpoint_every=50 --set train.eval_every=0 \
    --set schedule.warmup_tokens=81920 --set model.msa.topk=32 --set model.msa.budget="'ratio'" \
    --set model.msa.budget_ratio=0.0625 --set model.msa.budget_k_min=4
fi
echo "=== done ===" | tee -a "$log"
echo "MLflow: mlflow ui --backend-store-uri $uri" | tee -a "$log"
