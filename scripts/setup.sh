#!/usr/bin/env bash
# Set up seekr-kernels in ./.venv: PyTorch, the package in editable mode (this builds the
# C++ extension seekr_kernels._C, and seekr_kernels._C_cuda when nvcc is found) and extras.
#
#   bash scripts/setup.sh [EXTRAS]        EXTRAS defaults to "triton"; e.g. "test,triton"
#
# PyTorch: an existing install in the venv is kept. Otherwise SEEKR_TORCH_SPEC is installed,
# by default torch==2.13.0, which on this project's machines is the CPU build on local disk;
# on a GPU machine set SEEKR_TORCH_SPEC=torch (or pre-install the build you want).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-triton}
py=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${SEEKR_TORCH_SPEC:-torch==2.13.0}"
fi
# Build tools first, then an editable install without build isolation, so the build reuses
# them (isolation would fetch them again on every install).
python -m pip install -q "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.18" ninja
python -m pip install -q --no-build-isolation -e ".[${extras}]"
seekr --version
