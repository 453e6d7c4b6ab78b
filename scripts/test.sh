#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite. Triton kernels run on CPU tensors in the
# Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Extra pytest arguments
# are passed through, e.g. `bash scripts/test.sh -k attention_kl`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,triton
# shellcheck disable=SC1091
. .venv/bin/activate
# The C++ backend must be there: without it the cpu tests would only be skipped.
python -c "import seekr_kernels._C" || { echo "seekr_kernels._C failed to build" >&2; exit 1; }
exec python -m pytest -n 2 -q "$@" tests
