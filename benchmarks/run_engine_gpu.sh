#!/usr/bin/env bash
# One device call for the engine: CUDA tests, then the engine benchmark. Usage (device tool, carry [".whl"]):
#   bash benchmarks/run_engine_gpu.sh
set -uo pipefail
source benchmarks/_gpu_env.sh
print_gpus
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py tests/test_triton_kernels.py 2>&1 | tee "$OUT/pytest_engine_gpu.log" | tail -6
python3 benchmarks/engine_gpu.py --out "$OUT" "$@" 2>&1 | grep -v Warning | tee "$OUT/engine_gpu.log" | tail -22
