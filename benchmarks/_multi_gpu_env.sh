# Sourced by the 2-GPU training scripts (multi_gpu_loss_curve.sh, multi_gpu_resume.sh) after _gpu_env.sh, with
# LOG and WORK set: installs DeepSpeed's wheels from .whl/deepspeed/ when there (HAVE_DEEPSPEED=1), sets the
# training environment, logs the GPUs and versions, and prepares the shared target and data in $WORK.
export PYTHONPATH=$PYTHONPATH:$PWD/tests
HAVE_DEEPSPEED=0
if compgen -G ".whl/deepspeed/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/deepspeed/*.whl && HAVE_DEEPSPEED=1
fi
export HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
: >"$LOG"
rm -rf "$WORK"; mkdir -p "$WORK"
print_gpus | tee -a "$LOG"
python3 -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers",
  transformers.__version__, "accelerate", accelerate.__version__)' | tee -a "$LOG"
python3 benchmarks/multi_gpu_loss_curve.py prepare "$WORK" 2>&1 | tee -a "$LOG" || exit 1
