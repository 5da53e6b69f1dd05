#!/usr/bin/env bash
# One device call on a 2-GPU machine (kind nvidia-h200-x2, carry [".whl"]): `glide-hf train` on 1 GPU, then under
# `accelerate launch` with DDP on 2 GPUs at the same global batch (per-GPU batch halved), in fp32 and in bf16; then
# the FSDP2 config, and the DeepSpeed ZeRO-2/3 configs when .whl/deepspeed/ holds DeepSpeed's wheels, each against
# the 1-GPU bf16 curve. Target: a random Llama (hidden 1024, 8 layers); data: Python's standard library sources
# (benchmarks/multi_gpu_loss_curve.py). Prints each pair of curves and its largest difference; writes
# multi_gpu_loss_curve.json and multi_gpu_loss_curve.log under $OUT. Exit status 1 if a run failed its tolerance.
#   bash benchmarks/multi_gpu_loss_curve.sh              # STEPS=40 by default, about 4 minutes
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source benchmarks/_gpu_env.sh
LOG="$OUT/multi_gpu_loss_curve.log"
WORK=${WORK:-/tmp/glide_multi_gpu}
STEPS=${STEPS:-40}; GLOBAL_BATCH=16; NUM_GPUS=2; RUN_TIMEOUT_S=150
source benchmarks/_multi_gpu_env.sh

common=(
  --target "$WORK/target" --data "$WORK/data.jsonl" --data-cache-dir "$WORK/cache" --max-length 512 --packing
  --max-steps "$STEPS" --learning-rate 5e-4 --logging-steps 1 --save-strategy no --report-to none
  --disable-tqdm true --seed 0 --dataloader-num-workers 0 --ddp-find-unused-parameters false
)
single() {  # NAME FLAGS...: one GPU, the whole global batch
  local name=$1; shift
  echo "== $name: 1 GPU, batch $GLOBAL_BATCH" | tee -a "$LOG"
  CUDA_VISIBLE_DEVICES=0 timeout "$RUN_TIMEOUT_S" python3 -m glide_hf.cli train "${common[@]}" \
    --output-dir "$WORK/$name" --per-device-train-batch-size "$GLOBAL_BATCH" "$@" >>"$LOG" 2>&1
  echo "   exit status $?" | tee -a "$LOG"
}
launched() {  # NAME CONFIG FLAGS...: accelerate launch with examples/accelerate/CONFIG.yaml on NUM_GPUS GPUs
  local name=$1 config=$2; shift 2
  echo "== $name: $config on $NUM_GPUS GPUs, batch $((GLOBAL_BATCH / NUM_GPUS)) per GPU" | tee -a "$LOG"
  timeout "$RUN_TIMEOUT_S" python3 -m accelerate.commands.launch --config_file "examples/accelerate/$config.yaml" \
    --num_processes "$NUM_GPUS" -m glide_hf.cli train "${common[@]}" --output-dir "$WORK/$name" \
    --per-device-train-batch-size "$((GLOBAL_BATCH / NUM_GPUS))" "$@" >>"$LOG" 2>&1
  echo "   exit status $?" | tee -a "$LOG"
}

single single_fp32 --target-dtype float32
launched ddp_fp32 ddp --target-dtype float32
single single_bf16 --bf16
launched ddp_bf16 ddp --bf16
pairs=(ddp_fp32=single_fp32 ddp_bf16=single_bf16)
launched fsdp2_bf16 fsdp --bf16
pairs+=(fsdp2_bf16=single_bf16)
if [ "$HAVE_DEEPSPEED" = 1 ]; then
  launched zero2_bf16 zero2 --bf16
  launched zero3_bf16 zero3 --bf16
  pairs+=(zero2_bf16=single_bf16 zero3_bf16=single_bf16)
else
  echo "== DeepSpeed ZeRO-2/3 skipped: no wheels in .whl/deepspeed/" | tee -a "$LOG"
fi
python3 benchmarks/multi_gpu_loss_curve.py compare "$WORK" "$OUT" "${pairs[@]}" 2>&1 | tee -a "$LOG"
