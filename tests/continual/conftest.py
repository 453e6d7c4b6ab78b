import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is as fast, and tests run two workers on two cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
        yield
    torch.set_num_threads(n)
