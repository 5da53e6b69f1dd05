#!/usr/bin/env bash
# Issue 5's benchmark in one device call (about 8.5 minutes on an H200 with the defaults). Usage, from the repository
# root with the wheels in .whl/ (transformers 5.24, liger-kernel, datasets, dill, multiprocess):
#   bash benchmarks/selftrained/run_gpu.sh [run.py flags]          (device tool: carry [".whl"])
# Results (results.json, results.md, results.png, run.log, stdout.log) go to $OUT; models and data to /tmp/selftrained.
set -uo pipefail
source benchmarks/_gpu_env.sh
export HF_DATASETS_OFFLINE=1
print_gpus
python3 benchmarks/selftrained/run.py --out "$OUT" --work-dir /tmp/selftrained "$@" 2>&1 | tee "$OUT/stdout.log"
