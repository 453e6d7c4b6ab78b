"""A run written before issue 19's move (seekr_kernels.continual, commit 28f1659) and
killed in its second task resumes under the new layout and ends as the run that was
never interrupted (tests/data/legacy/make_run.py wrote it)."""
import os
import shutil

import torch

from seekr_kernels.run.config import from_dict
from seekr_kernels.run.demo import make_stream, write_stream
from seekr_kernels.run.trainer import ContinualTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "data", "legacy", "run_28f1659")
LEGACY_ROOT = "/tmp/seekr-legacy-run-28f1659"      # where the old run's config says its data is


def _config(out, paths):
    return from_dict({
        "method": "seekr", "output_dir": str(out), "seed": 5, "device": "cpu",
        "model": {"arch": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32},
                  "alphabet": "abcdefghnorstvwxpw:="},
        "tasks": [{"name": os.path.basename(p), "path": p} for p in paths],
        "train": {"batch_size": 8, "lr": 3e-3, "max_prompt_len": 12, "max_answer_len": 6, "pad_to_multiple_of": 1,
                  "warmup_steps": 1, "schedule": "linear", "save_steps": 2},
        "replay": {"ratio": 0.25},
        "distill": {"layer_budget": 2, "head_budget": 3, "query_budget": 4, "backend": "torch"},
        "eval": {"batch_size": 16}, "log": {"progress": False}})


def test_run_written_before_the_move_resumes_bit_identical(tmp_path):
    paths = write_stream(make_stream(24, 6, 3, ("rev", "rot", "swp"), seed=1), os.path.join(LEGACY_ROOT, "data"))
    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)
    resumed = ContinualTrainer(_config(old, paths), quiet=True)
    rr = resumed.run(resume=True)
    full = ContinualTrainer(_config(tmp_path / "full", paths), quiet=True)
    rf = full.run()
    assert rr["complete"] and rr["matrix"] == rf["matrix"] and rr["global_step"] == rf["global_step"]
    sa, sb = resumed.base.state_dict(), full.base.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(resumed.importance, full.importance)
