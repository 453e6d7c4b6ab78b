"""End-to-end trainer runs on a tiny Llama and tiny data: every method, teacher alignment,
resume == uninterrupted, replay memory persistence."""
import json
import os

import pytest
import torch

from seekr_kernels.run.config import from_dict
from seekr_kernels.seekr.memory import ReplayMemory, ReplayMemoryError
from seekr_kernels.run.steps import TrainSteps
from seekr_kernels.run.trainer import ContinualTrainer
from seekr_kernels.seekr.selection import select_heads


from tiny_runs import TASKS, read_log, tiny_config, tiny_tasks  # noqa: E402,F401  (tests/tiny_runs.py)


@pytest.mark.parametrize("method", ["sft", "replay", "replay+logits", "seekr"])
def test_each_method_on_defaults(tmp_path, method):
    """Every default a user gets (padding multiple 8, query budget 100, replay ratio 1%,
    budgets from the model, ...): only the data is made small. Regression for the crash at
    the first replay step of task 2 (issue 10)."""
    paths = tiny_tasks(tmp_path / "data", n_train=20, n_test=4)
    cfg = from_dict({"method": method, "output_dir": str(tmp_path / "run"),
                     "tasks": [{"path": p} for p in paths]})
    res = ContinualTrainer(cfg, quiet=True).run()
    assert res["complete"] and len(res["matrix"]) == 3
    replay = [r for r in read_log(tmp_path / "run") if r["kind"] == "replay"]
    assert (len(replay) > 0) == (method != "sft")


@pytest.mark.parametrize("method", ["sft", "replay", "replay+logits", "seekr"])
def test_each_method_end_to_end(tmp_path, method):
    paths = tiny_tasks(tmp_path / "data")
    out = tmp_path / "run"
    res = ContinualTrainer(tiny_config(out, paths, method), quiet=True).run()
    assert res["complete"] and res["tasks"] == list(TASKS)
    m = res["matrix"]
    assert len(m) == 3 and m[0][1] is None and all(0 <= v <= 1 for v in m[2])
    assert -1 <= res["BWT"] <= 1 and 0 <= res["OP"] <= 1
    assert os.path.isfile(out / "results.json") and os.path.isfile(out / "heatmap.png")
    st = json.loads((out / "state.json").read_text())
    assert st["completed"] == 3 and os.path.isdir(out / st["checkpoint"])
    assert sorted(os.listdir(out / "checkpoints")) == ["task-002"]          # keep_checkpoints: last
    log = read_log(out)
    replay = [r for r in log if r["kind"] == "replay"]
    train = [r for r in log if r["kind"] == "train"]
    # 24 samples / batch 8 = 3 batches per epoch; memory of 6 (and then 12) samples in
    # batches of 8 -> 1 (then 2) replay batches: cycle 3 (then 1) as in the published code.
    assert len(train) == 9
    if method == "sft":
        assert not replay and not os.path.exists(out / "memory")
    else:
        assert len(replay) == 1 + 3
        assert sorted(os.listdir(out / "memory")) == ["memory.json", "task-000", "task-001", "task-002"]
        keys = {"replay": {"ce"}, "replay+logits": {"ce", "logits_kl"},
                "seekr": {"ce", "logits_kl", "attn_kl"}}[method]
        for r in replay:
            assert keys <= set(r) and all(r[k] >= 0 and r[k] == r[k] for k in keys)
    if method == "seekr":
        heads = [r for r in log if r["kind"] == "heads"]
        assert len(heads) == 3
        assert sum(len(h) for h in heads[-1]["heads"].values()) == 3


def test_teacher_is_aligned_with_the_batch(tmp_path):
    """Right after capture, the model is its own teacher: logits equal, attention KL ~ 0."""
    from seekr_kernels.seekr.losses import logits_kl_mean
    from seekr_kernels.llama import distill_attention
    paths = tiny_tasks(tmp_path / "data")[:1]
    tr = ContinualTrainer(tiny_config(tmp_path / "run", paths, "seekr"), quiet=True)
    tr.run()
    keys = tr.memory.keys()
    b = tr.memory.batch(keys, tr.tokenizer.pad_token_id)
    model = tr.base.eval()
    with torch.no_grad(), distill_attention(model, b["heads"], b["queries"], b["teacher_attention"],
                                            b["attention_mask"], backend="torch") as d:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    position_ids=b["position_ids"], use_cache=False)
    assert float(d.loss()) < 1e-5
    sel = torch.zeros_like(b["labels"], dtype=torch.bool)
    sel[:, :-1] = b["labels"][:, 1:] != -100
    torch.testing.assert_close(out.logits[sel], b["teacher_logits"][sel], atol=1e-4, rtol=1e-4)
    assert not b["teacher_logits"][~sel].any()
    # logits KL against itself = the entropy of its own predictions (its minimum)
    lkl = logits_kl_mean(out.logits, b["teacher_logits"], b["labels"])
    p = torch.log_softmax(out.logits[sel], -1)
    torch.testing.assert_close(lkl, -(p.exp() * p).sum(-1).mean(), atol=1e-5, rtol=1e-5)


class _Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, n_steps):
    orig = TrainSteps.train_step
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > n_steps:
            raise _Crash("killed")
        return orig(self, *a, **k)

    monkeypatch.setattr(TrainSteps, "train_step", step)


@pytest.mark.parametrize("method", ["seekr", "replay+logits"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, method):
    paths = tiny_tasks(tmp_path / "data")
    a = ContinualTrainer(tiny_config(tmp_path / "a", paths, method), quiet=True)
    ra = a.run()
    # Killed in the middle of task 2 (two tasks complete, one step into the third).
    with monkeypatch.context() as mp:
        _crash_after(mp, 3 + 3 + 1)
        with pytest.raises(_Crash):
            ContinualTrainer(tiny_config(tmp_path / "b", paths, method), quiet=True).run()
    assert json.loads((tmp_path / "b" / "state.json").read_text())["completed"] == 2
    b = ContinualTrainer(tiny_config(tmp_path / "b", paths, method), quiet=True)
    rb = b.run(resume=True)
    assert rb["matrix"] == ra["matrix"] and rb["loglik"] == ra["loglik"]
    sa, sb = a.base.state_dict(), b.base.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.importance, b.importance)
    assert any(json.loads(x)["kind"] == "resume" for x in open(tmp_path / "b" / "log.jsonl"))
    # A finished run resumes to the same results without training again.
    rc = ContinualTrainer(tiny_config(tmp_path / "b", paths, method), quiet=True).run(resume=True)
    assert rc["matrix"] == ra["matrix"]


def test_resume_refuses_another_run(tmp_path):
    paths = tiny_tasks(tmp_path / "data")[:1]
    ContinualTrainer(tiny_config(tmp_path / "run", paths, "replay"), quiet=True).run()
    with pytest.raises(RuntimeError, match="differs from the run's in method "):
        ContinualTrainer(tiny_config(tmp_path / "run", paths, "seekr"), quiet=True).run(resume=True)


def test_memory_on_disk_and_corruption_refused(tmp_path):
    paths = tiny_tasks(tmp_path / "data")[:2]
    tr = ContinualTrainer(tiny_config(tmp_path / "run", paths, "seekr"), quiet=True)
    tr.run()
    mem = ReplayMemory.load(str(tmp_path / "run" / "memory"), list(TASKS[:2]))
    assert len(mem) == len(tr.memory) == 12
    for a, b in zip(tr.memory.tasks, mem.tasks):
        assert a.heads.keys() == b.heads.keys()
        for sa, sb in zip(a.samples, b.samples):
            assert torch.equal(sa.input_ids, sb.input_ids) and torch.equal(sa.logits, sb.logits)
            assert all(torch.equal(sa.attention[l], sb.attention[l]) for l in sa.attention)
    # A damaged memory is refused on resume, not silently used.
    p = tmp_path / "run" / "memory" / "task-000" / "data.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ReplayMemoryError, match="checksum"):
        ContinualTrainer(tiny_config(tmp_path / "run", paths, "seekr"), quiet=True).run(resume=True)


def test_select_heads_published_rule():
    imp = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.05]])
    # layer sums 1.0, 1.5, 0.05 -> layers {0, 1}; top 3 heads among them: (0,1), then ties 0.5
    heads = select_heads(imp, 2, 3)
    assert {l: h.tolist() for l, h in heads.items()} == {0: [1], 1: [0, 1]}


def test_gradient_checkpointing_same_result(tmp_path):
    """Checkpointed layers recompute in backward: losses (attention KL included) count once."""
    paths = tiny_tasks(tmp_path / "data")[:2]
    a = ContinualTrainer(tiny_config(tmp_path / "a", paths, "seekr"), quiet=True)
    ra = a.run()
    cfg = tiny_config(tmp_path / "b", paths, "seekr")
    cfg.train.gradient_checkpointing = True
    b = ContinualTrainer(cfg, quiet=True)
    rb = b.run()
    sa, sb = a.base.state_dict(), b.base.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-4)
    la = [r for r in read_log(tmp_path / "a") if r["kind"] == "replay"]
    lb = [r for r in read_log(tmp_path / "b") if r["kind"] == "replay"]
    assert la and [round(r["attn_kl"], 5) for r in la] == [round(r["attn_kl"], 5) for r in lb]
    assert rb["matrix"] == ra["matrix"]


def test_topk_teacher_logits(tmp_path):
    """A compact (top-k) teacher for the logits: stored as TopK, replayed through logits_kl."""
    from seekr_kernels import TopK
    paths = tiny_tasks(tmp_path / "data")[:2]
    cfg = tiny_config(tmp_path / "run", paths, "replay+logits")
    cfg.distill.teacher_logits_topk = 5
    tr = ContinualTrainer(cfg, quiet=True)
    res = tr.run()
    assert res["complete"]
    assert isinstance(tr.memory.sample((0, 0)).logits, TopK) and tr.memory.sample((0, 0)).logits.k == 5
    rec = [r for r in read_log(tmp_path / "run") if r["kind"] == "replay"]
    assert rec and all(r["logits_kl"] > 0 for r in rec)


def test_task_with_auto_metric_through_the_api(tmp_path):
    """A Task passed to the trainer with metric="auto" is scored by the metric its name picks."""
    from seekr_kernels.run.data import load_task
    from seekr_kernels.run.evaluate import resolve_metric_name
    paths = tiny_tasks(tmp_path / "data")[:1]
    task = load_task(paths[0], "rev", "auto")
    tr = ContinualTrainer(tiny_config(tmp_path / "run", paths, "sft"), tasks=[task], quiet=True)
    assert tr.tasks[0].metric == resolve_metric_name("auto", "rev") != "auto"
