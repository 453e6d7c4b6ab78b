#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (it has no package registry):
#   bash benchmarks/gpu_check.sh OUT_DIR
# installs the package without dependencies, runs the `gpu` tests, runs the benchmarks on
# CUDA, and writes logs and CSVs into OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
{
  nvidia-smi || true
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$out/env.log" 2>&1

# The extensions need pybind11 + cmake; if the machine lacks them the Triton and torch
# backends still run from the source tree.
if ! python -m pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1; then
  echo "install failed (see install.log); running from the source tree" >> "$out/install.log"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

SEEKR_TEST_GPU=1 python -m pytest -q -m gpu tests > "$out/gpu_tests.log" 2>&1
echo "gpu tests exit $?" >> "$out/gpu_tests.log"

run_bench() {   # name, then the script's arguments
  local name=$1; shift
  timeout 1200 python "benchmarks/$name.py" "$@" > "$out/$name.log" 2>&1
  echo "$name exit $?" >> "$out/$name.log"
}
run_bench bench_attention_kl --gpu --out "$out"
run_bench bench_llama_step --gpu --out "$out"
run_bench bench_importance --gpu --out "$out"
run_bench bench_logits_kl --gpu
run_bench bench_teacher --section capture --device cuda --lengths 1024 2048 4096 8192
cp benchmarks/results/*.csv benchmarks/results/*.png "$out/" 2>/dev/null || true
ls -la "$out"
