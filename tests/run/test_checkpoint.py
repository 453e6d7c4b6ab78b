"""Checkpoints and resume: mid-task checkpoints that resume bit-identical, sharded model
files, every file verified, explicit resume/overwrite, a config change named, damaged run
state refused, leftovers cleaned, max_steps, fp16, one global step in the log."""
import json
import os
import shutil

import pytest
import torch

from seekr_kernels.run import checkpoint as ck
from seekr_kernels.run.checkpoint import CheckpointError, ResumeError
from seekr_kernels.seekr.config import ConfigError
from seekr_kernels.utils import store
from seekr_kernels.run.steps import TrainSteps, lr_lambda
from seekr_kernels.run.trainer import ContinualTrainer

from tiny_runs import read_log, tiny_config, tiny_tasks  # noqa: E402


class _Crash(RuntimeError):
    pass


def crash_at(mp, step):
    """Raise inside the optimiser step that would make global step ``step`` (weights of
    steps < ``step`` are on the model, gradients of ``step`` are lost: a kill). For runs
    that start at step 0."""
    orig = TrainSteps.optimizer_step
    done = {"n": 0}

    def f(self, opt, sched):
        if done["n"] + 1 == step:
            raise _Crash(f"killed before step {step}")
        done["n"] += 1
        return orig(self, opt, sched)
    mp.setattr(TrainSteps, "optimizer_step", f)


def same_weights(a, b):
    sa, sb = a.base.state_dict(), b.base.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def records(out, kinds=("train", "replay", "heads", "eval", "samples")):
    return [{k: v for k, v in r.items() if k not in ("time", "train_seconds")} for r in read_log(out)
            if r["kind"] in kinds]


def tree_bytes(d):
    return {rel: open(os.path.join(d, rel), "rb").read() for rel in store.list_files(d)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_tasks(tmp_path_factory.mktemp("data"))


# 13 optimiser steps: task 1 = 3 train steps; task 2 = 3 + 1 replay; task 3 = 3 + 3 replays.
def kill_and_resume(tmp_path, data, monkeypatch, method, over, crash):
    """Run ``a`` uninterrupted, kill ``b`` at train step ``crash`` (after a mid-task
    checkpoint, save_steps 2), resume ``b``; check both end at the same matrix, step and
    weights. Returns (a, ra, b, rb) for the caller's further checks."""
    over = {"train.save_steps": 2, **over}
    a = ContinualTrainer(tiny_config(tmp_path / "a", data, method, **over), quiet=True)
    ra = a.run()
    with monkeypatch.context() as mp:
        crash_at(mp, crash)
        with pytest.raises(_Crash):
            ContinualTrainer(tiny_config(tmp_path / "b", data, method, **over), quiet=True).run()
    st = json.loads((tmp_path / "b" / "state.json").read_text())
    assert st["checkpoint"].startswith("checkpoints/step-") and st["global_step"] < crash
    b = ContinualTrainer(tiny_config(tmp_path / "b", data, method, **over), quiet=True)
    rb = b.run(resume=True)
    assert rb["matrix"] == ra["matrix"] and rb["global_step"] == ra["global_step"]
    same_weights(a, b)
    return a, ra, b, rb


@pytest.mark.parametrize("method,over,crash", [
    ("seekr", {}, 7),                                       # mid task 2 (resumes from step 6)
    ("replay+logits", {"train.grad_accum": 2, "replay.in_accumulation": True, "replay.batch_size": 4}, 6),
    ("replay", {"train.optimizer_scope": "run", "train.schedule": "constant"}, 12),
    # a sampled teacher (seeded per sample) and the fused lm_head in the replay steps
    ("replay+logits", {"distill.teacher_logits": "sampled", "distill.teacher_logits_k": 8,
                       "distill.backend": "auto", "distill.fused_lm_head": True}, 9),
])
def test_killed_mid_task_resumes_bit_identical(tmp_path, data, monkeypatch, method, over, crash):
    a, ra, b, rb = kill_and_resume(tmp_path, data, monkeypatch, method, over, crash)
    assert torch.equal(a.importance, b.importance)
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert tree_bytes(tmp_path / "a" / "final") == tree_bytes(tmp_path / "b" / "final")
    # One global step across tasks; after the resume no step is logged twice, and every
    # record (losses included) is the uninterrupted run's.
    ra_log, rb_log = records(tmp_path / "a"), records(tmp_path / "b")
    assert rb_log == ra_log
    steps = [r["global_step"] for r in ra_log if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and max(r["global_step"] for r in ra_log) == ra["global_step"]
    assert {r["task"] for r in ra_log if r["kind"] == "train"} == {0, 1, 2}
    kinds = [r["kind"] for r in read_log(tmp_path / "b")]
    assert kinds.count("resume") == 1


def test_checkpoint_layout_sharded_and_loadable(tmp_path, data):
    """A mid-task checkpoint is a from_pretrained folder (sharded at a tiny max_shard_size)
    with optimiser, scheduler, RNG, recipe and trainer state under a manifest; the run
    resumes from the sharded files."""
    from transformers import AutoModelForCausalLM
    over = {"train.save_steps": 2, "train.max_steps": 6, "train.max_shard_size": "20KB",
            "train.save_total_limit": 1}
    a = ContinualTrainer(tiny_config(tmp_path / "run", data[:2], "seekr", **over), quiet=True)
    r = a.run()
    assert not r["complete"] and r["global_step"] == 6 and r["stopped"] == "train.max_steps=6"
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-000006", "task-000"]
    d = tmp_path / "run" / "checkpoints" / "step-000006"
    names = set(os.listdir(d))
    assert {"config.json", "model.safetensors.index.json", "optimizer.pt", "scheduler.pt", "rng_state.json",
            "seekr", "trainer_state.json", "manifest.json", "seekr_tokenizer.json"} <= names
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 1
    man = ck.verify(str(d))
    assert set(man["files"]) >= {"optimizer.pt", "seekr/tensors.safetensors", "seekr/recipe.json", *shards}
    ts = json.loads((d / "trainer_state.json").read_text())
    assert ts["phase"] == "mid_task" and ts["global_step"] == 6 and ts["task"] == 1 and ts["task_step"] == 3
    m = AutoModelForCausalLM.from_pretrained(str(d))
    sd = a.base.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["complete"] is False and res["matrix"][0][0] is not None and res["matrix"][1][1] is None
    # Resume past max_steps (a key that does not change results) to the end == uninterrupted.
    b = ContinualTrainer(tiny_config(tmp_path / "run", data[:2], "seekr", **{**over, "train.max_steps": 0}),
                         quiet=True)
    rb = b.run(resume=True)
    ref = ContinualTrainer(tiny_config(tmp_path / "ref", data[:2], "seekr"), quiet=True)
    rr = ref.run()
    assert rb["matrix"] == rr["matrix"]
    same_weights(b, ref)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, data):
    """A seekr run stopped by max_steps in task 2 with mid-task checkpoints at 4 and 6."""
    root = tmp_path_factory.mktemp("stopped")
    over = {"train.save_steps": 2, "train.max_steps": 6, "train.max_shard_size": "20KB"}
    ContinualTrainer(tiny_config(root / "run", data, "seekr", **over), quiet=True).run()
    return root / "run", over


def _copy(stopped_run, tmp_path):
    run, over = stopped_run
    d = tmp_path / "run"
    shutil.copytree(run, d)
    return d, over


def _flip(p, at=-3):
    b = bytearray(p.read_bytes())
    b[at] ^= 0x41
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("target", ["model-00001-of-", "optimizer.pt", "scheduler.pt", "rng_state.json",
                                    "seekr/tensors.safetensors", "seekr/recipe.json", "trainer_state.json",
                                    "config.json", "manifest.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_refused_naming_the_file(stopped_run, tmp_path, data, target, damage):
    d, over = _copy(stopped_run, tmp_path)
    newest = d / "checkpoints" / "step-000006"
    p = next(newest / rel for rel in store.list_files(newest) if rel.startswith(target))
    if damage == "flip":
        _flip(p, at=len(p.read_bytes()) // 2)
    else:
        p.write_bytes(p.read_bytes()[:-7])
    tr = ContinualTrainer(tiny_config(d, data, "seekr", **over), quiet=True)
    with pytest.raises(CheckpointError) as e:
        tr.run(resume=True)
    msg = str(e.value)
    assert "newest checkpoint is damaged" in msg and str(p) in msg
    assert "step-000004" in msg and "--resume-from" in msg      # the previous good one, named
    # ... from which the run goes on when asked.
    tr = ContinualTrainer(tiny_config(d, data, "seekr", **over), quiet=True)
    assert tr.run(resume=str(d / "checkpoints" / "step-000004"))["global_step"] == 6


def test_extra_or_missing_file_and_interrupted_write(stopped_run, tmp_path, data):
    d, over = _copy(stopped_run, tmp_path)
    newest = d / "checkpoints" / "step-000006"
    (newest / "model-99999-of-99999.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="model-99999-of-99999.safetensors: not part of the checkpoint"):
        ck.verify(str(newest))
    os.unlink(newest / "model-99999-of-99999.safetensors")
    os.unlink(newest / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt: missing"):
        ck.verify(str(newest))
    os.unlink(newest / "manifest.json")
    with pytest.raises(CheckpointError, match="manifest.json: missing .an interrupted write"):
        ck.verify(str(newest))


def test_state_json_damage_detected(stopped_run, tmp_path, data):
    d, over = _copy(stopped_run, tmp_path)
    sp = d / "state.json"
    good = sp.read_text()

    def resume():
        ContinualTrainer(tiny_config(d, data, "seekr", **over), quiet=True).run(resume=True)

    sp.write_text(good[: len(good) // 2])                              # truncated
    with pytest.raises(ResumeError, match=r"state.json: unreadable run state .*newest good checkpoint is .*step-000006"):
        resume()
    st = json.loads(good)
    st["completed"] = 0                                                # edited count
    sp.write_text(json.dumps(st))
    with pytest.raises(ResumeError, match="state.json: checksum mismatch"):
        resume()
    store.seal(st)                                                     # ... even with a fixed checksum
    sp.write_text(json.dumps(st))
    with pytest.raises(ResumeError, match="completed = 0 but its checkpoint .* says 1"):
        resume()
    os.unlink(sp)
    with pytest.raises(ResumeError, match="state.json: missing, but .* holds checkpoints"):
        resume()


def test_resume_is_explicit_and_names_changed_keys(stopped_run, tmp_path, data, capsys):
    d, over = _copy(stopped_run, tmp_path)
    with pytest.raises(ResumeError, match=r"holds a seekr run \(1/3 tasks done, step 6\); continue it with "
                                          r"--resume .* --overwrite"):
        ContinualTrainer(tiny_config(d, data, "seekr", **over), quiet=True).run()
    changed = {**over, "train.lr": 1e-3, "replay.ratio": 0.5}
    with pytest.raises(ResumeError, match=r"differs from the run's in replay.ratio, train.lr \(.*0.003 -> "
                                          r"0.001.*--allow-config-change replay.ratio train.lr"):
        ContinualTrainer(tiny_config(d, data, "seekr", **changed), quiet=True).run(resume=True)
    # keys that cannot change a result may change; an allowed change takes effect from
    # the resumed step on (task 2: 4 steps, linear schedule with 1 warm-up step)
    free = {**over, "log.every": 3, "train.save_steps": 5, "train.save_total_limit": 1,
            "eval.keep_predictions": 0, "train.max_steps": 5}
    with pytest.raises(ResumeError, match="differs from the run's in train.lr"):
        ContinualTrainer(tiny_config(d, data, "seekr", **{**free, "train.lr": 1e-3}), quiet=True).run(resume=True)
    tr = ContinualTrainer(tiny_config(d, data, "seekr", **{**free, "train.lr": 1e-3}), quiet=True)
    tr.run(resume=str(d / "checkpoints" / "step-000004"), allow_config_change=["train.lr"])
    c = d / "checkpoints" / "step-000005"
    sched = torch.load(c / "scheduler.pt", weights_only=True)
    opt = torch.load(c / "optimizer.pt", weights_only=True)
    assert sched["base_lrs"] == [1e-3, 1e-3] and sched["last_epoch"] == 2
    assert opt["param_groups"][0]["lr"] == pytest.approx(1e-3 * lr_lambda("linear", 1, 4)(2))
    # the abandoned continuation (step 6) is gone; state.json names the new checkpoint
    assert not (d / "checkpoints" / "step-000006").exists()
    assert json.loads((d / "state.json").read_text())["checkpoint"] == "checkpoints/step-000005"


def test_overwrite_deletes_only_a_runs_files(stopped_run, tmp_path, data):
    d, over = _copy(stopped_run, tmp_path)
    (d / "my-notes.txt").write_text("keep me")
    r = ContinualTrainer(tiny_config(d, data[:1], "replay"), quiet=True).run(overwrite=True)
    assert r["complete"] and (d / "my-notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(d / "checkpoints")) == ["task-000"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.jsonl").write_text("not json\n")
    with pytest.raises(ResumeError, match="does not look like a seekr run"):
        ContinualTrainer(tiny_config(other, data[:1], "replay"), quiet=True).run(overwrite=True)
    assert (other / "log.jsonl").exists()
    with pytest.raises(ValueError, match="resume and overwrite"):
        ContinualTrainer(tiny_config(other, data[:1], "replay"), quiet=True).run(resume=True, overwrite=True)


def test_finished_run_rerun_with_other_lr_is_refused(tmp_path, data):
    ContinualTrainer(tiny_config(tmp_path / "run", data[:1], "sft"), quiet=True).run()
    with pytest.raises(ResumeError, match="differs from the run's in train.lr"):
        ContinualTrainer(tiny_config(tmp_path / "run", data[:1], "sft", **{"train.lr": 1e-4}),
                         quiet=True).run(resume=True)
    # the same config resumes the finished run: nothing trained, same results
    r = ContinualTrainer(tiny_config(tmp_path / "run", data[:1], "sft"), quiet=True).run(resume=True)
    assert r["complete"] and r["global_step"] == 3
    # extending the stream: the learned tasks stay, a new one is trained (when allowed)
    with pytest.raises(ResumeError, match="tasks"):
        ContinualTrainer(tiny_config(tmp_path / "run", data[:2], "sft"), quiet=True).run(resume=True)
    r = ContinualTrainer(tiny_config(tmp_path / "run", data[:2], "sft"), quiet=True).run(
        resume=True, allow_config_change=["tasks"])
    assert r["complete"] and len(r["matrix"]) == 2 and r["global_step"] == 6


def test_leftovers_of_killed_runs_are_cleaned(stopped_run, tmp_path, data):
    from seekr_kernels.utils.store import _host_tag
    d, over = _copy(stopped_run, tmp_path)
    dead = 2 ** 22 + 12345            # above pid_max on this machine: a dead writer
    left = [d / f".state.json.tmp{dead}", d / f".results.json.tmp-{_host_tag()}.{dead}-ab12",
            d / "checkpoints" / f".step-000008.tmp-{_host_tag()}.{dead}-x1", d / "checkpoints" / f".task-000.tmp-{dead}",
            d / "memory" / f".task-001.tmp-{_host_tag()}.{dead}-q"]
    for p in left:
        if "step" in p.name or "task" in p.name:
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"partial")
        else:
            p.write_text("{")
    ContinualTrainer(tiny_config(d, data, "seekr", **{**over, "train.max_steps": 7}), quiet=True).run(resume=True)
    assert not [p for p in left if p.exists()]


def test_save_total_limit_and_task_boundaries(tmp_path, data, monkeypatch):
    over = {"train.save_steps": 1, "train.save_total_limit": 2, "keep_checkpoints": "all"}
    seen = []
    orig = ck.write

    def spy(path, fill, meta=None):
        out = orig(path, fill, meta=meta)
        seen.append(sorted(os.listdir(os.path.dirname(path))))
        return out
    monkeypatch.setattr(ck, "write", spy)       # every checkpoint folder is written through it
    ContinualTrainer(tiny_config(tmp_path / "run", data[:2], "replay", **over), quiet=True).run()
    assert max(sum(n.startswith("step-") for n in s) for s in seen) <= 3     # 2 kept + the one being committed
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["task-000", "task-001"]


def test_fp16_with_gradient_scaler(tmp_path, data, monkeypatch):
    """precision fp16: autocast + GradScaler (state in the checkpoint); on this CPU build
    fp16 autocast runs, so the resume is checked bit for bit."""
    over = {"train.precision": "fp16", "train.save_steps": 2}
    a = ContinualTrainer(tiny_config(tmp_path / "a", data[:2], "replay+logits", **over), quiet=True)
    assert a.autocast == torch.float16 and a.scaler is not None
    ra = a.run()
    assert ra["complete"]
    with monkeypatch.context() as mp:
        crash_at(mp, 6)
        with pytest.raises(_Crash):
            ContinualTrainer(tiny_config(tmp_path / "b", data[:2], "replay+logits", **over), quiet=True).run()
    assert os.path.exists(tmp_path / "b" / "checkpoints" / "step-000004" / "scaler.pt")
    b = ContinualTrainer(tiny_config(tmp_path / "b", data[:2], "replay+logits", **over), quiet=True)
    rb = b.run(resume=True)
    assert rb["matrix"] == ra["matrix"]
    same_weights(a, b)
    assert a.scaler.state_dict() == b.scaler.state_dict()
    with pytest.raises(ConfigError, match="train.precision: fp16 .* needs float32 trainable weights"):
        tiny_config(tmp_path / "c", data[:1], "sft", **{"train.precision": "fp16", "model.dtype": "bfloat16"})


def test_checkpoint_keys_validated(tmp_path, data):
    for key, val, msg in [("train.save_steps", -1, "train.save_steps: must be >= 0"),
                          ("train.save_total_limit", 0, "train.save_total_limit: must be > 0"),
                          ("train.max_steps", -2, "train.max_steps: must be >= 0"),
                          ("train.max_shard_size", "lots", "train.max_shard_size: expected a size"),
                          ("train.optimizer_scope", "epoch", "train.optimizer_scope: must be one of"),
                          ("train.precision", "fp8", "train.precision: must be one of")]:
        with pytest.raises(ConfigError, match=msg):
            tiny_config(tmp_path, data[:1], "sft", **{key: val})
    with pytest.raises(ConfigError, match="train.optimizer_scope: 'run' needs train.schedule: constant"):
        tiny_config(tmp_path, data[:1], "sft", **{"train.optimizer_scope": "run"})   # tiny_config: linear


def test_run_saved_before_fused_lm_head_keeps_materialised_logits(stopped_run, tmp_path, data):
    """A checkpoint whose config predates distill.fused_lm_head trained on materialised
    logits: resuming it under the default (auto, which would fuse) is refused naming the
    key; with fused_lm_head: false it resumes."""
    d, over = _copy(stopped_run, tmp_path)
    newest = d / json.loads((d / "state.json").read_text())["checkpoint"]
    tsp = newest / ck.TRAINER_STATE
    ts = json.loads(tsp.read_text())
    del ts["config"]["distill"]["fused_lm_head"]           # as written by the older version
    tsp.write_text(json.dumps(ts))
    man = json.loads((newest / "manifest.json").read_text())   # resealed: a genuine old file
    man["files"][ck.TRAINER_STATE] = store.file_entry(tsp)
    store.seal(man)
    (newest / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ResumeError, match="distill.fused_lm_head"):
        ContinualTrainer(tiny_config(d, data, "seekr", **over), quiet=True).run(resume=True)
    res = ContinualTrainer(tiny_config(d, data, "seekr", **over, **{"distill.fused_lm_head": "false"}),
                           quiet=True).run(resume=True)
    assert res["global_step"] == 6
