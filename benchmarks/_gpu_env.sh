# Sourced (not run) by the GPU scripts of benchmarks/, from the repository root with the wheels carried in .whl/:
# installs the wheels into /tmp/site and puts them and src/ on PYTHONPATH (the calling script exits when that
# fails), sets unbuffered output and offline Hub mode, creates $OUT (default /tmp/out), and defines `print_gpus`.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"

print_gpus() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}
