#!/usr/bin/env bash
# One device call for the engine: CUDA tests, then the engine benchmark. Usage (device tool, carry [".whl"]):
#   bash benchmarks/run_engine_gpu.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py 2>&1 | tee "$OUT/pytest_engine_gpu.log" | tail -6
python3 benchmarks/engine_gpu.py --out "$OUT" "$@" 2>&1 | grep -v Warning | tee "$OUT/engine_gpu.log" | tail -14
