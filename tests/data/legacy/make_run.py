"""Writes tests/data/legacy/run_28f1659: a seekr run killed in the middle of its second
task by train.max_steps, written by the code before issue 19's move (commit 28f1659, when
the package was seekr_kernels.continual). Run with that commit's package on the path:

    git worktree add /tmp/old 28f1659 && cp seekr_kernels/*.so /tmp/old/seekr_kernels/
    PYTHONPATH=/tmp/old python tests/data/legacy/make_run.py

Its task data lives at LEGACY_ROOT/data (absolute paths are saved in the run's config);
tests/run/test_legacy_run.py writes the same data there again before resuming.
"""
import os
import shutil
import sys

import torch

from seekr_kernels.continual.config import from_dict
from seekr_kernels.continual.demo import make_stream, write_stream
from seekr_kernels.continual.trainer import ContinualTrainer

LEGACY_ROOT = "/tmp/seekr-legacy-run-28f1659"
HERE = os.path.dirname(os.path.abspath(__file__))


def config(out, paths, **over):
    d = {"method": "seekr", "output_dir": out, "seed": 5, "device": "cpu",
         "model": {"arch": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32},
                   "alphabet": "abcdefghnorstvwxpw:="},
         "tasks": [{"name": os.path.basename(p), "path": p} for p in paths],
         "train": {"batch_size": 8, "lr": 3e-3, "max_prompt_len": 12, "max_answer_len": 6, "pad_to_multiple_of": 1,
                   "warmup_steps": 1, "schedule": "linear", "save_steps": 2, "max_steps": 5},
         "replay": {"ratio": 0.25},
         "distill": {"layer_budget": 2, "head_budget": 3, "query_budget": 4, "backend": "torch"},
         "eval": {"batch_size": 16}, "log": {"progress": False}}
    d.update(over)
    return from_dict(d)


if __name__ == "__main__":
    torch.set_num_threads(1)
    shutil.rmtree(LEGACY_ROOT, ignore_errors=True)
    paths = write_stream(make_stream(24, 6, 3, ("rev", "rot", "swp"), seed=1), os.path.join(LEGACY_ROOT, "data"))
    out = os.path.join(LEGACY_ROOT, "run")
    res = ContinualTrainer(config(out, paths), quiet=True).run()
    assert not res["complete"], res
    dst = os.path.join(HERE, "run_28f1659")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(out, dst)
    print("wrote", dst, "global_step", res["global_step"], file=sys.stderr)
