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


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is as fast, and tests run two workers on two cores;
    the torch-backend fallback warning is expected there."""
    import warnings
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
        yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread_for_training(request):
    """Every test of the method and the runner (tests/seekr, tests/run) runs on one thread."""
    parts = request.node.path.parts
    if "seekr" in parts[-2:-1] or "run" in parts[-2:-1]:
        request.getfixturevalue("one_thread")
    yield


@pytest.fixture
def own_replay_grads(monkeypatch):
    """``run(trainer, keys) -> (grads, record)``: the ContinualTrainer's replay step on
    ``keys``, with its parameter gradients captured just before the optimiser step."""
    from seekr_kernels.run.steps import TrainSteps

    def run(tr, keys):
        grads = {}

        def capture(self, opt, sched):
            grads.update({n: p.grad.clone() for n, p in self.base.named_parameters()})
            self.model.zero_grad(set_to_none=True)
        monkeypatch.setattr(TrainSteps, "optimizer_step", capture)
        return grads, tr.steps.replay_step(keys, None, None)
    return run
