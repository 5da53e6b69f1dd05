#!/usr/bin/env bash
# One device call: install the carried wheels (transformers as in CI, liger-kernel), run the CUDA tests, then the
# core GPU benchmark. Usage (device tool, carry [".whl"]): bash benchmarks/run_gpu_core.sh
set -uo pipefail
source benchmarks/_gpu_env.sh
print_gpus
python3 -c 'import torch, transformers, liger_kernel; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_loss.py tests/test_modeling.py tests/test_assisted.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
python3 benchmarks/gpu_core.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/gpu_core.log" | tail -12
