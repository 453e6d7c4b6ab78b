"""A run written before issue 19's move (seekr_kernels.continual, commit 28f1659) and
killed in its second task resumes under the new layout and ends as the run that was
never interrupted (tests/data/legacy/make_run.py wrote it)."""
import os
import shutil

import torch
from safetensors.torch import load_file

from seekr_kernels.run.config import from_dict
from seekr_kernels.run.demo import make_stream, write_stream
from seekr_kernels.run.trainer import ContinualTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "data", "legacy", "run_28f1659")
LEGACY_ROOT = "/tmp/seekr-legacy-run-28f1659"      # where the old run's config says its data is
KILL_STEP = 5                                      # make_run.py's train.max_steps


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


def _data():
    """The old run's task files, written again where its config says they are."""
    return write_stream(make_stream(24, 6, 3, ("rev", "rot", "swp"), seed=1), os.path.join(LEGACY_ROOT, "data"))


def _kill_step(tmp_path, paths):
    """This machine's own run of the fixture's steps (killed where the fixture was), and
    whether its weights there equal the fixture's bit for bit."""
    cfg = _config(tmp_path / "here", paths)
    cfg.train.max_steps = KILL_STEP
    ContinualTrainer(cfg, quiet=True).run()
    name = os.path.join("checkpoints", f"step-{KILL_STEP:06d}", "model.safetensors")
    a, b = load_file(str(tmp_path / "here" / name)), load_file(os.path.join(FIXTURE, name))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_written_before_the_move_loads_exactly(tmp_path):
    """Resumed at its own kill step, the old run holds the fixture's weights bit for bit (any machine)."""
    paths = _data()
    shutil.copytree(FIXTURE, tmp_path / "old")
    cfg = _config(tmp_path / "old", paths)
    cfg.train.max_steps = KILL_STEP
    t = ContinualTrainer(cfg, quiet=True)
    r = t.run(resume=True)
    assert not r["complete"] and r["global_step"] == KILL_STEP
    saved = load_file(os.path.join(FIXTURE, "checkpoints", f"step-{KILL_STEP:06d}", "model.safetensors"))
    sd = t.base.state_dict()
    assert all(torch.equal(sd[k], saved[k]) for k in saved)


def test_run_written_before_the_move_resumes_as_the_uninterrupted_run(tmp_path):
    """Bit-identical to the uninterrupted run where this machine's float kernels reproduce the
    fixture's first steps. The fixture was written on an AVX2 x86; an AVX-512 one rounds those
    steps differently (2e-6 at the kill step, 4e-5 at the end), so there the final weights are
    compared within 5e-4: a resume that dropped the optimiser state lands 2e-2 away."""
    paths = _data()
    same_kernels = _kill_step(tmp_path, paths)
    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)
    resumed = ContinualTrainer(_config(old, paths), quiet=True)
    rr = resumed.run(resume=True)
    full = ContinualTrainer(_config(tmp_path / "full", paths), quiet=True)
    rf = full.run()
    assert rr["complete"] and rr["matrix"] == rf["matrix"] and rr["global_step"] == rf["global_step"]
    sa, sb = resumed.base.state_dict(), full.base.state_dict()
    assert sa.keys() == sb.keys()
    if same_kernels:
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert torch.equal(resumed.importance, full.importance)
    else:
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=5e-4, msg=k)
        torch.testing.assert_close(resumed.importance, full.importance, rtol=1e-2, atol=0)
