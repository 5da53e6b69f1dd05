#!/usr/bin/env bash
# One device call after a change to the verify or draft step: the CUDA, engine and kernel tests, a kernel profile of
# the split verify forward (1 and 64 nodes at 16k), the quick engine benchmark (steps at 1k and 16k, forced 3.5), and
# the phases of one `generate` call with and without a kept round. Usage (device tool, carry [".whl"]):
# bash benchmarks/run_steps_gpu.sh
set -uo pipefail
source benchmarks/_gpu_env.sh
print_gpus
# faulthandler: a test that hangs prints its stack after 300 s instead of eating the device call.
python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=300 \
  tests/test_gpu.py tests/test_engine.py tests/test_triton_kernels.py 2>&1 | tee "$OUT/pytest_steps_gpu.log" | tail -4
cd benchmarks
python3 profile_split_verify.py --context 16384 --nodes 1 64 --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/profile.log"
python3 engine_gpu.py --quick --quick-contexts 16384 --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/engine_gpu_quick.log" | tail -6
python3 profile_generate_call.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/profile_generate_call.log"
