#!/usr/bin/env bash
# One device call on a 2-GPU machine (kind nvidia-h200-x2, carry [".whl"]): checkpoints and resume of `glide-hf train`
# under `accelerate launch` with the DDP, FSDP2 and DeepSpeed ZeRO-2/3 example configs (ZeRO only when .whl/deepspeed/
# holds DeepSpeed's wheels). For each: an uninterrupted run of STEPS steps that checkpoints every STEPS/2 steps, then
# a second run that resumes from a copy of the middle checkpoint (`--resume`). `multi_gpu_loss_curve.py resume-check`
# compares the two loss curves and opens every file of the middle checkpoint and of the final output: no tensor of
# the frozen target may be in any of them. Same target and data as multi_gpu_loss_curve.sh. Writes
# multi_gpu_resume.json and multi_gpu_resume.log under $OUT; exit status 1 if a check failed.
#   bash benchmarks/multi_gpu_resume.sh              # STEPS=20 by default, about 4 minutes
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source benchmarks/_gpu_env.sh
LOG="$OUT/multi_gpu_resume.log"
WORK=${WORK:-/tmp/glide_multi_gpu_resume}
STEPS=${STEPS:-20}; SAVE_STEPS=$((STEPS / 2)); GLOBAL_BATCH=16; NUM_GPUS=2; RUN_TIMEOUT_S=150
source benchmarks/_multi_gpu_env.sh

common=(
  --target "$WORK/target" --data "$WORK/data.jsonl" --data-cache-dir "$WORK/cache" --max-length 512 --packing
  --max-steps "$STEPS" --save-steps "$SAVE_STEPS" --learning-rate 5e-4 --logging-steps 1 --report-to none
  --disable-tqdm true --seed 0 --dataloader-num-workers 0 --ddp-find-unused-parameters false --bf16
  --per-device-train-batch-size "$((GLOBAL_BATCH / NUM_GPUS))"
)
launched() {  # OUTPUT_DIR CONFIG FLAGS...: accelerate launch with examples/accelerate/CONFIG.yaml on NUM_GPUS GPUs
  local output_dir=$1 config=$2; shift 2
  timeout "$RUN_TIMEOUT_S" python3 -m accelerate.commands.launch --config_file "examples/accelerate/$config.yaml" \
    --num_processes "$NUM_GPUS" -m glide_hf.cli train "${common[@]}" --output-dir "$output_dir" "$@" >>"$LOG" 2>&1
  echo "   exit status $?" | tee -a "$LOG"
}
configs=(ddp fsdp)
if [ "$HAVE_DEEPSPEED" = 1 ]; then configs+=(zero2 zero3); else echo "== DeepSpeed skipped: no wheels" | tee -a "$LOG"; fi
for config in "${configs[@]}"; do
  echo "== $config: $STEPS steps, checkpoint every $SAVE_STEPS" | tee -a "$LOG"
  launched "$WORK/$config/uninterrupted" "$config"
  mkdir -p "$WORK/$config/resumed"
  cp -r "$WORK/$config/uninterrupted/checkpoint-$SAVE_STEPS" "$WORK/$config/resumed/"
  echo "== $config: resumed from checkpoint-$SAVE_STEPS" | tee -a "$LOG"
  launched "$WORK/$config/resumed" "$config" --resume
done
python3 benchmarks/multi_gpu_loss_curve.py resume-check "$WORK" "$OUT" "$SAVE_STEPS" "${configs[@]}" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
