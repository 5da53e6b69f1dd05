#!/usr/bin/env bash
# Issue 5's benchmark in one device call (about 8.5 minutes on an H200 with the defaults). Usage, from the repository
# root with the wheels in .whl/ (transformers 5.24, liger-kernel, datasets, dill, multiprocess):
#   bash benchmarks/selftrained/run_gpu.sh [run.py flags]          (device tool: carry [".whl"])
# Results (results.json, results.md, results.png, run.log, stdout.log) go to $OUT; models and data to /tmp/selftrained.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/selftrained/run.py --out "$OUT" --work-dir /tmp/selftrained "$@" 2>&1 | tee "$OUT/stdout.log"
