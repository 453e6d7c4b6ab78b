#!/usr/bin/env bash
# Set up seekr-kernels in ./.venv: PyTorch, the package in editable mode (this builds the
# C++ extension seekr_kernels._C, and seekr_kernels._C_cuda when nvcc is found) and extras.
#
#   bash scripts/setup.sh [EXTRAS]        EXTRAS defaults to "triton"; e.g. "test,triton"
#
# Versions: every install goes through scripts/constraints.txt (pip -c), which pins what the
# demo's numbers depend on (torch, transformers) to the versions README's table is recorded
# with. SEEKR_CONSTRAINTS=FILE uses another file; SEEKR_CONSTRAINTS= (empty) none.
#
# PyTorch: an existing install in the venv is kept. Otherwise SEEKR_TORCH_SPEC is installed,
# by default the constraints file's torch (2.13.0, which on this project's machines is the
# CPU build on local disk); on a GPU machine set SEEKR_TORCH_SPEC=torch (or pre-install the
# build you want). A kept or requested torch of another version lifts the torch pin, with a
# note that the demo's numbers will differ from README's.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-triton}
py=${PYTHON:-python3}
constraints=${SEEKR_CONSTRAINTS-scripts/constraints.txt}
if [ -n "$constraints" ] && [ ! -f "$constraints" ]; then
  echo "setup.sh: SEEKR_CONSTRAINTS=$constraints: no such file" >&2
  exit 1
fi
# The version a constraints line NAME==X pins (empty: none).
pinned() { [ -n "$constraints" ] && sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$constraints" | head -n 1; }
torch_pin=$(pinned torch || true)

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${SEEKR_TORCH_SPEC:-}" ]; then
    python -m pip install -q "$SEEKR_TORCH_SPEC"
  else
    python -m pip install -q "torch${torch_pin:+==$torch_pin}"
  fi
fi
cflags=()
if [ -n "$constraints" ]; then
  have=$(python -c "import torch; print(torch.__version__)")
  have=${have%%+*}                       # 2.13.0+cpu satisfies ==2.13.0
  if [ -n "$torch_pin" ] && [ "$have" != "$torch_pin" ]; then
    # Keep this torch: the install below must not replace it, so its pin goes.
    echo "setup.sh: torch $have is not $torch_pin, the version seekr demo's table in README.md" \
         "is recorded with: the demo's numbers will differ from it" >&2
    grep -v '^torch==' "$constraints" > .venv/seekr-constraints.txt
  else
    cp "$constraints" .venv/seekr-constraints.txt
  fi
  cflags=(-c .venv/seekr-constraints.txt)
fi
# Build tools first, then an editable install without build isolation, so the build reuses
# them (isolation would fetch them again on every install).
python -m pip install -q "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.18" ninja
python -m pip install -q --no-build-isolation ${cflags[@]+"${cflags[@]}"} -e ".[${extras}]"
seekr --version
