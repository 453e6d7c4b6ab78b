"""RunLogger: train.report_to (tensorboard, wandb offline, mlflow file store), read back from
what each backend wrote; steps never duplicated after a rewind (a resume); eval scores,
matrix, OP/BWT and heatmap; missing packages are config errors."""
import glob
import json
import os
import struct

import pytest

from seekr_kernels.run import metrics as M
from seekr_kernels.run import runlog
from seekr_kernels.seekr.config import ConfigError
from seekr_kernels.run.config import from_dict
from seekr_kernels.run.runlog import RunLogger, read_jsonl, resolve_report_to

from tiny_runs import TASKS, tiny_config, tiny_tasks  # noqa: E402

NAMES = ["a", "b"]


def _session(out, backends, steps, value, rewind=None):
    """One process's share of a run: optionally rewind, then log `steps` (loss = value / s)."""
    lg = RunLogger(str(out), backends, run_name="t", config={"train": {"lr": 0.1}, "tasks": [{"path": "x"}]})
    if rewind is not None:
        lg.rewind(rewind)
    for s in steps:
        lg.log("train", s, loss=value / s, step=s % 3, epoch=0)   # a field may be called step
    return lg


def _three_sessions(out, backends):
    """Run 1 logs 1..10 and dies; run 2 resumes from step 6, logs 7..8 and dies; run 3
    resumes from step 6 again and logs 7..14 with an eval at 14."""
    _session(out, backends, range(1, 11), 1.0).close()
    _session(out, backends, range(7, 9), 2.0, rewind=6).close()
    lg = _session(out, backends, range(7, 15), 3.0, rewind=6)
    m = [[0.5, None], [0.25, 0.75]]
    png = M.plot_heatmap(m, os.path.join(out, "heatmap.png"), NAMES)
    lg.log_eval(1, 14, names=NAMES, row=[0.25, 0.75], matrix=m, op=0.5, bwt=-0.25, heatmap=png, loglik=[-1, -2])
    lg.close()


def _expected(first_kept):
    """step -> loss a backend must hold: run 1's values up to `first_kept`, run 3's after."""
    return {s: (1.0 if s <= first_kept else 3.0) / s for s in range(1, 15)}


def test_resolve_report_to(monkeypatch):
    assert resolve_report_to("none") == [] and resolve_report_to(None) == [] and resolve_report_to([]) == []
    assert resolve_report_to("tensorboard") == ["tensorboard"]
    assert resolve_report_to(["TensorBoard", "none", "tensorboard", "jsonl"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"train.report_to: unknown backend 'comet'"):
        resolve_report_to(["comet"])
    with pytest.raises(ConfigError, match="train.report_to: expected a name or a list"):
        resolve_report_to(3)
    # a missing package: the error names the key and the package, at config validation
    monkeypatch.setattr(runlog, "installed", lambda b: b != "wandb")
    assert "wandb" not in resolve_report_to("all") and "tensorboard" in resolve_report_to("all")
    with pytest.raises(ConfigError, match=r"train.report_to: wandb needs the 'wandb' package"):
        from_dict({"tasks": ["x"], "train": {"report_to": ["tensorboard", "wandb"]}})


def test_log_tensorboard_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="log.tensorboard is deprecated: use train.report_to"):
        cfg = from_dict({"tasks": ["x"], "log": {"tensorboard": True}})
    assert cfg.train.report_to == ["tensorboard"] and cfg.log.tensorboard is False
    assert from_dict({"tasks": ["x"]}).train.report_to == []          # default: none (log.jsonl only)


def test_jsonl_rewind_drops_later_records_and_a_torn_line(tmp_path):
    _session(tmp_path, "none", range(1, 11), 1.0).close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "global_st')                 # a write cut by a kill
    lg = _session(tmp_path, [], range(7, 13), 2.0, rewind=6)
    lg.log("resume", lg.step, completed=1)
    lg.close()
    recs = read_jsonl(tmp_path / "log.jsonl")
    steps = [r["global_step"] for r in recs if r["kind"] == "train"]
    assert steps == list(range(1, 13))
    assert [r["loss"] for r in recs if r["kind"] == "train"] == [1.0 / s if s <= 6 else 2.0 / s for s in steps]
    assert recs[-1]["kind"] == "resume" and recs[-1]["global_step"] == 12
    assert all(r["step"] == r["global_step"] % 3 for r in recs if r["kind"] == "train")


def test_non_main_rank_writes_nothing(tmp_path):
    lg = RunLogger(str(tmp_path / "r"), ["tensorboard"], run_name="t", main=False)
    lg.log("train", 1, loss=1.0)
    lg.log_eval(0, 1, names=["a"], row=[1.0], matrix=[[1.0]])
    lg.rewind(0)
    lg.close()
    assert not os.path.exists(tmp_path / "r")


def _check_jsonl_eval(out):
    ev = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if r["kind"] == "eval"]
    assert len(ev) == 1 and ev[0]["matrix"] == [[0.5, None], [0.25, 0.75]]
    assert ev[0]["OP"] == 0.5 and ev[0]["BWT"] == -0.25 and ev[0]["loglik"] == [-1, -2]


def test_tensorboard_steps_after_rewind(tmp_path):
    pytest.importorskip("tensorboard", reason="report_to tensorboard needs the tensorboard package (test extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _three_sessions(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    ev = acc.Scalars("train/loss")
    steps = [e.step for e in ev]
    assert steps == list(range(1, 15))                           # purge_step: run 3 replaced 7..
    exp = _expected(6)
    assert all(e.value == pytest.approx(exp[e.step]) for e in ev)
    assert "train/step" not in acc.Tags()["scalars"]             # coordinates are not scalars
    assert [e.value for e in acc.Scalars("eval/b")] == [0.75] and acc.Scalars("eval/OP")[0].step == 14
    assert acc.Scalars("eval/BWT")[0].value == -0.25
    img = acc.Images("eval/heatmap")
    assert len(img) == 1 and img[0].step == 14 and img[0].encoded_image_string[:4] == b"\x89PNG"
    assert "eval/matrix/text_summary" in acc.Tags()["tensors"]
    _check_jsonl_eval(tmp_path)


def _wandb_history(out, timeout=60.0):
    """[(step, {key: value})] of every offline W&B run file under out/wandb, in order, and
    the run ids (the .wandb file is a LevelDB-style log of protobuf records). W&B's service
    process writes the file after `finish` returns: wait for each file's exit record."""
    import time
    deadline = time.time() + timeout
    while True:
        rows, ids, done = _wandb_records(out)
        if done or time.time() > deadline:
            return rows, ids
        time.sleep(0.5)


def _wandb_records(out):
    from wandb.proto import wandb_internal_pb2 as pb
    rows, ids, done = [], set(), True
    # by last write: the sessions run one after another, and two started in the same second
    # have names (offline-run-<time>-<id>) that sort by their random ids
    for f in sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb")), key=os.path.getmtime):
        exited = False
        data = open(f, "rb").read()
        assert data[:4] == b":W&B"
        pos, buf = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, n, typ = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
            if typ in (2, 3):
                buf = (buf if typ == 3 else b"") + chunk
                continue
            r = pb.Record()
            r.ParseFromString(buf + chunk if typ == 4 else chunk)
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
            elif kind == "history":
                rows.append((r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                  for i in r.history.item}))
            exited = exited or kind == "exit"
        done = done and exited
    return rows, ids, done


def test_wandb_offline_steps_after_rewind(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="report_to wandb needs the wandb package (test extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    _three_sessions(tmp_path, ["wandb"])
    rows, ids = _wandb_history(str(tmp_path))
    state = json.loads((tmp_path / "runlog.json").read_text())
    assert ids == {state["wandb_id"]}                            # one W&B run, resumed
    steps = [s for s, _ in rows]
    assert steps == sorted(set(steps)) == list(range(1, 15))    # monotonic, never twice
    exp = _expected(10)                                          # W&B cannot step back: 7..10 kept from run 1
    loss = {s: r["train/loss"] for s, r in rows if "train/loss" in r}
    assert loss == pytest.approx(exp)
    last = rows[-1][1]
    assert last["eval/a"] == 0.25 and last["eval/OP"] == 0.5 and last["eval/matrix/_type"] == "table-file"
    assert last["eval/heatmap/_type"] == "image-file"
    _check_jsonl_eval(tmp_path)


def test_mlflow_file_store_steps_after_rewind(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="report_to mlflow needs the mlflow(-skinny) package (test extra)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _three_sessions(tmp_path, ["mlflow"])
    from mlflow.tracking import MlflowClient
    state = json.loads((tmp_path / "runlog.json").read_text())
    assert state["mlflow_tracking_uri"] == (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]     # one run, resumed
    hist = sorted(client.get_metric_history(state["mlflow_run_id"], "train/loss"), key=lambda m: m.timestamp)
    steps = [m.step for m in hist]
    assert steps == list(range(1, 15))                           # monotonic, never twice
    assert {m.step: m.value for m in hist} == pytest.approx(_expected(10))
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.params["train.lr"] == "0.1" and run.data.metrics["eval/BWT"] == -0.25
    arts = {a.path for a in client.list_artifacts(state["mlflow_run_id"], "eval")}
    assert {"eval/heatmap-after-task-001.png", "eval/matrix-after-task-001.json"} <= arts
    _check_jsonl_eval(tmp_path)


def test_trainer_logs_eval_matrix_and_heatmap_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="report_to tensorboard needs the tensorboard package (test extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from seekr_kernels.run.trainer import ContinualTrainer
    paths = tiny_tasks(tmp_path / "data", n_train=16, n_test=4)[:2]
    out = tmp_path / "run"
    res = ContinualTrainer(tiny_config(out, paths, "sft", **{"train.report_to": "tensorboard"}), quiet=True).run()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars(f"eval/{TASKS[0]}")] == pytest.approx([r[0] for r in res["matrix"]])
    assert [e.value for e in acc.Scalars(f"eval/{TASKS[1]}")] == pytest.approx([res["matrix"][1][1]])
    assert acc.Scalars("eval/OP")[0].value == pytest.approx(res["OP"])
    assert acc.Scalars("eval/BWT")[0].value == pytest.approx(res["BWT"])
    assert len(acc.Images("eval/heatmap")) == 2 and acc.Scalars("train/loss")
    ev = [r for r in read_jsonl(out / "log.jsonl") if r["kind"] == "eval"]
    assert [r["task"] for r in ev] == [0, 1] and ev[-1]["matrix"] == res["matrix"] and ev[-1]["OP"] == res["OP"]
    assert "OP" not in ev[0]
    steps = [r["global_step"] for r in ev]
    assert steps == sorted(steps)
