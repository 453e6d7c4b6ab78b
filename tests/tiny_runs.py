"""Tiny continual runs shared by the tests of the method (tests/seekr) and the runner
(tests/run): three generated tasks and a two-layer Llama config that trains in seconds."""
import json
import os

from seekr_kernels.run.config import from_dict
from seekr_kernels.run.demo import make_stream, write_stream

TASKS = ("rev", "rot", "swp")


def tiny_tasks(root, n_train=24, n_test=6):
    return write_stream(make_stream(n_train, n_test, 3, TASKS, seed=1), str(root))


def tiny_config(out, paths, method="seekr", **over):
    d = {
        "method": method, "output_dir": str(out), "seed": 5, "device": "cpu",
        "model": {"arch": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2,
                           "max_position_embeddings": 32},
                  "alphabet": "abcdefghnorstvwxpw:="},
        "tasks": [{"name": os.path.basename(p), "path": p} for p in paths],
        "train": {"batch_size": 8, "lr": 3e-3, "max_prompt_len": 12, "max_answer_len": 6,
                  "pad_to_multiple_of": 1, "warmup_steps": 1, "schedule": "linear"},
        "replay": {"ratio": 0.25},
        "distill": {"layer_budget": 2, "head_budget": 3, "query_budget": 4, "backend": "torch"},
        "eval": {"batch_size": 16},
        "log": {"progress": False},
    }
    for k, v in over.items():
        sec, _, key = k.partition(".")
        if key:
            d.setdefault(sec, {})[key] = v
        else:
            d[sec] = v
    return from_dict(d)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(x) for x in f]


def shift_weights(model, scale=0.2, seed=1):
    """Add seeded Gaussian noise (std ``scale``) to every parameter in place: a "later"
    model whose attention has drifted from a captured teacher."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model
