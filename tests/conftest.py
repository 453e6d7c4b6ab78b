import os

# Triton kernels run on CPU tensors only in the interpreter; it must be on before triton
# compiles anything. On a GPU machine run the `gpu` tests with SEEKR_TEST_GPU=1 instead.
if not os.environ.get("SEEKR_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with SEEKR_TEST_GPU=1)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if os.environ.get("SEEKR_TEST_GPU") else "cpu")
