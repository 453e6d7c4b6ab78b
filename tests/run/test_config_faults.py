"""Config and run faults (issue 15): each bad config, file or run directory makes `seekr`
exit 2 with one line naming the key, file or path, before any training (a guard fails the
test if a task starts); warnings for what trains but not as the config reads."""
import json
import os
import warnings

import pytest
import torch
import yaml

from seekr_kernels.cli import main
from seekr_kernels.run import runlog
from seekr_kernels.seekr.config import ConfigError
from seekr_kernels.run.config import from_dict, load_config, set_dotted
from seekr_kernels.run.preflight import RunWarning
from seekr_kernels.run.rundir import RunStateError, read_run_state
from seekr_kernels.run.trainer import ContinualTrainer

from tiny_runs import TASKS, tiny_tasks  # noqa: E402

NAN, INF = float("nan"), float("inf")


def base():
    return {
        "method": "replay", "output_dir": "run", "seed": 3, "device": "cpu",
        "model": {"arch": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32},
                  "alphabet": "abcdefghnorstvwxpilw:="},
        "tasks": [{"name": n, "path": f"data/{n}"} for n in TASKS[:2]],
        "train": {"batch_size": 8, "lr": 3e-3, "max_prompt_len": 12, "max_answer_len": 6, "pad_to_multiple_of": 1},
        "replay": {"ratio": 0.25},
        "distill": {"layer_budget": 1, "head_budget": 2, "backend": "torch"},
        "log": {"progress": False},
    }


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    tiny_tasks(root / "data", n_train=24, n_test=4)
    return root


def _write(root, d, text=None):
    p = root / "run.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(d))
    return str(p)


def _hf_dir(path, config=True):
    os.makedirs(path, exist_ok=True)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 32}))
    return str(path)


def _set(key, value):
    def f(d, root, mp):
        set_dotted(d, key, value)
    return f


def _seekr(backend):
    def f(d, root, mp):
        d["method"], d["distill"]["backend"] = "seekr", backend
        mp.delenv("TRITON_INTERPRET", raising=False)
    return f


def _file(rel, content: bytes):
    def f(d, root, mp):
        p = root / rel
        os.makedirs(p.parent, exist_ok=True)
        p.write_bytes(content)
    return f


def _state(obj, *flags):
    def f(d, root, mp):
        os.makedirs(root / "run" / "checkpoints" / "task-000", exist_ok=True)
        (root / "run" / "state.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return list(flags)
    return f


def _args(*extra):
    def f(d, root, mp):
        return list(extra)
    return f


def _no_cuda(fn):
    def f(d, root, mp):
        if torch.cuda.is_available():
            pytest.skip(reason="the case needs a machine without CUDA")
        return fn(d, root, mp)
    return f


def _missing_package(d, root, mp):
    mp.setattr(runlog, "installed", lambda b: b != "wandb")
    d["train"]["report_to"] = ["tensorboard", "wandb"]


def _foreign_output(d, root, mp):
    os.makedirs(root / "run", exist_ok=True)
    (root / "run" / "notes.txt").write_text("mine")


def _file_output(d, root, mp):
    (root / "run").write_text("not a folder")


def _model_dir(config, tokenizer=False):
    def f(d, root, mp):
        d["model"] = {"path": _hf_dir(root / "hf", config=config)}
        if tokenizer:
            d["model"]["tokenizer"] = "no-such-tokenizer"
    return f


def _only_eval_jsonl(d, root, mp):
    (root / "t.jsonl").write_text('{"prompt": "rev:ab=", "answer": "ba", "split": "test"}\n')
    d["tasks"][0]["path"] = "t.jsonl"


_NOT_UTF8 = b'[\n{"prompt": "rev:ab=", "answer": "ba"},\n{"prompt": "rev:\xff\xfe=", "answer": "x"}\n]\n'

# (id, what to break, text the one error line must contain)
TRAIN_CASES = [
    ("lr-nan", _set("train.lr", NAN), "train.lr: expected a finite number"),
    ("lr-inf", _set("train.lr", INF), "train.lr: expected a finite number"),
    ("attn-weight-neg-inf", _set("distill.attn_weight", -INF), "distill.attn_weight: expected a finite"),
    ("temperature-nan", _set("eval.temperature", NAN), "eval.temperature: expected a finite"),
    ("ratio-inf", _set("replay.ratio", INF), "replay.ratio: expected a finite"),
    ("grad-norm-inf", _set("train.max_grad_norm", INF), "train.max_grad_norm: expected a finite"),
    ("betas-nan", _set("train.betas", [NAN, 0.9]), "train.betas"),
    ("arch-eps-nan", _set("model.arch.rms_norm_eps", NAN), "model.arch.rms_norm_eps"),
    ("triton-without-cuda", _no_cuda(_seekr("triton")), "distill.backend: 'triton' cannot run here"),
    ("cuda-backend-without-cuda", _no_cuda(_seekr("cuda")), "distill.backend: 'cuda' cannot run here"),
    ("cpu-backend-seekr", _seekr("cpu"), "distill.backend: 'cpu' has no attention_sqdiff kernel"),
    ("device-cuda", _no_cuda(_set("device", "cuda")), "device: 'cuda' but no CUDA device"),
    ("device-cuda-7", _no_cuda(_set("device", "cuda:7")), "device: 'cuda:7'"),
    ("device-bad", _set("device", "gpu"), "device: must be auto, cpu, cuda or cuda:N"),
    ("model-path-missing", _set("model.path", "no/such/model"), "model.path:"),
    ("model-path-not-hf", _model_dir(config=False), "has no config.json"),
    ("model-path-no-tokenizer", _model_dir(config=True), "model.path:"),
    ("tokenizer-missing", _model_dir(config=True, tokenizer=True), "model.tokenizer:"),
    ("heads-not-dividing", _set("model.arch.num_attention_heads", 3), "model.arch.num_attention_heads: 3 heads"),
    ("kv-heads-not-dividing", lambda d, r, m: d["model"]["arch"].update(num_attention_heads=4, num_key_value_heads=3),
     "model.arch.num_key_value_heads: 3 key/value heads"),
    ("negative-size", _set("model.arch.hidden_size", -16), "model.arch.hidden_size: must be a positive integer"),
    ("float-size", _set("model.arch.num_hidden_layers", 1.5), "model.arch.num_hidden_layers"),
    ("arch-unknown", _set("model.arch.bogus", 1), "model.arch.bogus: unknown LlamaConfig field"),
    ("task-not-utf8", _file("data/rev/train.json", _NOT_UTF8), "train.json:3: not UTF-8"),
    ("task-empty-list", _file("data/rev/train.json", b"[]\n"), "train.json: no training records"),
    ("task-jsonl-no-train", _only_eval_jsonl, "t.jsonl: no training records"),
    ("task-missing", _set("tasks.0.path", "data/nope"), "data/nope"),
    ("task-bad-record", _file("data/rev/train.json", b'[{"prompt": "a"}, {"answer": 3}]'), "train.json:1"),
    ("duplicate-task-names", _set("tasks.1.name", TASKS[0]), "tasks: task names must be unique"),
    ("metric-unknown", _set("tasks.0.metric", "no_such_metric"), "tasks[0].metric"),
    ("no-tasks", _set("tasks", []), "tasks: at least one task"),
    ("unknown-key", _set("eval.batchsize", 3), "eval.batchsize: unknown key"),
    ("recipe-unknown", _set("recipe", "paper"), "recipe: must be one of ['package', 'official']"),
    ("preset-unknown", _args("--set", "preset=paper"), "preset: must be one of ['package', 'official']"),
    ("recipe-and-preset-differ", lambda d, r, m: d.update(recipe="package", preset="official"),
     "recipe: 'package' contradicts preset: 'official' (recipe is the older spelling of preset)"),
    ("output-dir-is-file", _file_output, "output_dir:"),
    ("output-dir-foreign", _foreign_output, "holds no seekr run"),
    # state.json as found on --resume (a real run's edits: tests/run/test_checkpoint.py)
    ("state-truncated", _state('{"version": 1, "completed": 1, "rows": [[0.', "--resume"),
     "state.json: unreadable run state"),
    ("state-not-object", _state("[1, 2]", "--resume"), "state.json: not a run state (expected a JSON object)"),
    ("state-foreign", _state({"completed": 2, "rows": [[0.5]], "checkpoint": "checkpoints/task-000"}, "--resume"),
     "state.json: not a seekr run state"),
    ("run-without-resume", _state({"completed": 1, "rows": [[0.5]]}), "holds a seekr run"),
    ("set-bad-index", _args("--set", "tasks.5.epochs=2"), "tasks.5.epochs: index 5 out of range"),
    ("set-bad-bracket-index", _args("--set", "tasks[9].epochs=2"), "tasks[9].epochs: index 9 out of range"),
    ("set-not-mapping", _args("--set", "train.lr.x=1"), "train.lr.x: train.lr is float"),
    ("set-unknown-task-key", _args("--set", "tasks[0].epoch=2"), "tasks[0].epoch: unknown key"),
    ("set-malformed", _args("--set", "tasks[0.epochs=2"), "tasks[0.epochs: malformed key"),
    ("set-no-value", _args("--set", "train.lr"), "--set: expected KEY=VALUE"),
    ("report-to-unknown", _set("train.report_to", "comet"), "train.report_to: unknown backend 'comet'"),
    ("report-to-missing-package", _missing_package, "train.report_to: wandb needs the 'wandb' package"),
    ("per-device-without-replay-in-accumulation",
     lambda d, r, m: (d["train"].update(batching="per_device", grad_accum=2), d["replay"].update(in_accumulation=False)),
     "train.batching: per_device (the published DeepSpeed loop) replays inside the accumulation window"),
    ("replay-batch-below-accum", lambda d, r, m: (d["train"].update(grad_accum=2), d["replay"].update(batch_size=1)),
     "replay.batch_size: replay batches of 1 samples are fewer than the 2"),
    ("replay-never", lambda d, r, m: (d["train"].update(grad_accum=2), d["replay"].update(ratio=1)),
     "replay.ratio: the replay memory never holds"),
    ("config-missing", _args("--config", "no-such.yaml"), "--config: no-such.yaml: no such file"),
    ("config-bad-yaml", _file("run.yaml", b"train: [\n"), "invalid YAML"),
    ("config-not-utf8", _file("run.yaml", b"method: \xff\n"), "not UTF-8"),
    ("config-not-mapping", _file("run.yaml", b"- 1\n"), "expected a mapping at the top level"),
]


def _error_lines(err, command="train"):
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith(f"seekr {command}: error:")]


@pytest.fixture
def no_training(monkeypatch):
    def guard(*a, **k):
        raise AssertionError("training started: the fault was not caught before the first task")
    monkeypatch.setattr(ContinualTrainer, "_run_task", guard)
    monkeypatch.setattr(ContinualTrainer, "_prepare_model", guard)


@pytest.mark.parametrize("case,needle", [(c[1], c[2]) for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_fault_is_one_line_before_training(case, needle, data_tree, tmp_path, monkeypatch, capsys,
                                                  no_training):
    import shutil
    root = tmp_path / "w"
    shutil.copytree(data_tree, root)
    monkeypatch.chdir(root)
    d = base()
    extra = case(d, root, monkeypatch)
    extra = extra if isinstance(extra, list) else []
    cfg = str(root / "run.yaml")
    if not os.path.exists(cfg):
        _write(root, d)
    argv = ["train", "--config", cfg] + extra
    if "--config" in extra:
        argv = ["train"] + extra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunWarning)
        assert main(argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert needle in lines[0], lines[0]


def test_debug_shows_the_traceback(data_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(data_tree)
    d = base()
    d["train"]["lr"] = NAN
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**d, "tasks": [{"name": n, "path": str(data_tree / "data" / n)} for n in TASKS[:2]]}))
    assert main(["--debug", "train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "train.lr: expected a finite number" in err.splitlines()[-1]
    assert main(["train", "--config", str(p), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


EVAL_CASES = [
    ("run-missing", ["--run", "no-such-run"], "--run: no-such-run is not a directory"),
    ("run-not-a-run", ["--run", "data"], "state.json: missing"),
    ("matrix-without-run", ["--matrix", "--model", "x"], "--matrix: needs --run"),
    ("no-model", ["--task", "data/rev"], "--model: give --model DIR or --run"),
    ("model-without-tokenizer", ["--model", "hf", "--task", "data/rev"], "--tokenizer:"),
    ("bad-top-p", ["--model", "hf", "--task", "data/rev", "--top-p", "2"], "--top-p: must lie in (0, 1]"),
    ("bad-batch-size", ["--model", "hf", "--task", "data/rev", "--batch-size", "0"], "--batch-size: must be > 0"),
    ("greedy-repeats", ["--model", "hf", "--task", "data/rev", "--num-repeats", "2"], "--num-repeats"),
]


@pytest.mark.parametrize("args,needle", [(c[1], c[2]) for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_eval_fault_is_one_line(args, needle, data_tree, monkeypatch, capsys):
    monkeypatch.chdir(data_tree)
    _hf_dir(data_tree / "hf")
    assert main(["eval"] + args) == 2
    lines = _error_lines(capsys.readouterr().err, "eval")
    assert len(lines) == 1 and needle in lines[0], lines


def test_eval_matrix_needs_every_task_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints" / "task-001")
    cfg = from_dict({**base(), "output_dir": str(run),
                     "tasks": [{"name": n, "path": str(tmp_path / n)} for n in TASKS[:2]]}, validate=False)
    (run / "state.json").write_text(json.dumps({"completed": 2, "rows": [[0.1], [0.2, 0.3]],
                                                "checkpoint": "checkpoints/task-001", "config": cfg.to_dict()}))
    for n in TASKS[:2]:
        os.makedirs(tmp_path / n)
    assert main(["eval", "--run", str(run), "--matrix"]) == 2
    lines = _error_lines(capsys.readouterr().err, "eval")
    assert len(lines) == 1 and "task-000 is missing" in lines[0] and "keep_checkpoints: all" in lines[0]


def test_read_run_state(tmp_path):
    assert read_run_state(str(tmp_path)) is None
    (tmp_path / "state.json").write_text('{"completed": 0, "rows": []}')
    assert read_run_state(str(tmp_path), ["a"])["completed"] == 0
    (tmp_path / "state.json").write_text('{"completed": 1, "rows": [[0.1, 0.2]], "checkpoint": "."}')
    with pytest.raises(RunStateError, match="evaluation row 0 should hold 1 score"):
        read_run_state(str(tmp_path))
    (tmp_path / "state.json").write_bytes(b'{"completed": 1\xff}')
    with pytest.raises(RunStateError, match="state.json: damaged"):
        read_run_state(str(tmp_path))


# ----------------------------------------------------------------------------- warnings

def _trainer_warnings(d, root):
    """RunWarning messages of building a trainer (data, tokenizer, tiny model; no training)."""
    d["tasks"] = [{"name": t["name"], "path": str(root / t["path"])} for t in d["tasks"]]
    d["output_dir"] = str(root / "out")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ContinualTrainer(from_dict(d), quiet=True)
    return [str(x.message) for x in w if issubclass(x.category, RunWarning)]


def test_warns_batch_larger_than_task(data_tree):
    d = base()
    d["train"]["batch_size"] = 32
    d["replay"]["batch_size"] = 6
    msgs = _trainer_warnings(d, data_tree)
    assert any(m.startswith("train.batch_size: tasks[0] (rev) has 24 training sample(s), fewer than "
                            "train.batch_size=32") for m in msgs), msgs


def test_warns_missing_test_split(data_tree, tmp_path):
    import shutil
    root = tmp_path / "w"
    shutil.copytree(data_tree, root)
    os.remove(root / "data" / TASKS[1] / "test.json")
    msgs = _trainer_warnings(base(), root)
    assert any("tasks[1] (rot): no 'test' split (eval.split); evaluation uses its training data" in m
               for m in msgs), msgs


def test_warns_sequences_longer_than_max_positions(data_tree):
    d = base()
    d["model"]["arch"]["max_position_embeddings"] = 10
    msgs = _trainer_warnings(d, data_tree)
    assert any(m.startswith("train.max_prompt_len/max_answer_len: ") and "max_position_embeddings=10" in m
               for m in msgs), msgs
    d = base()     # 12 + 6 <= 32: nothing to say
    assert not [m for m in _trainer_warnings(d, data_tree) if "max_position" in m]


def test_warns_replay_batch_larger_than_memory(data_tree):
    d = base()
    d["replay"]["batch_size"] = 10       # the memory holds 6 (25% of 24) before task 2
    msgs = _trainer_warnings(d, data_tree)
    assert any(m.startswith("replay.batch_size: replay batches of 10 samples, but the replay memory holds only 6 "
                            "before task rot") for m in msgs), msgs
    d["replay"]["batch_size"] = 6
    assert not [m for m in _trainer_warnings(d, data_tree) if m.startswith("replay.")]


# ----------------------------------------------------------------------------- --set and paths

def test_set_reaches_list_items(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**base(), "tasks": ["data/rev", {"name": "rot", "path": "data/rot"}]}))
    for key in ("tasks.0.epochs", "tasks[0].epochs"):
        cfg = load_config(str(p), {key: 2, "tasks[1].name": "second", "train.report_to": "none"})
        assert cfg.tasks[0].epochs == 2 and cfg.tasks[0].path == str(tmp_path / "data" / "rev")
        assert cfg.tasks[1].name == "second" and cfg.tasks[1].epochs is None
    d = {"tasks": [{"path": "a"}]}
    set_dotted(d, "tasks[-1].metric", "prefix")
    set_dotted(d, "replay.cycle", 3)            # a missing section is created
    assert d == {"tasks": [{"path": "a", "metric": "prefix"}], "replay": {"cycle": 3}}
    with pytest.raises(ConfigError, match=r"^model\[0\]: model is not set, so it has no index 0"):
        set_dotted({}, "model[0]", 1)
    with pytest.raises(ConfigError, match=r"^train\.lr\[0\]: train\.lr is int 1, not a mapping or list"):
        set_dotted({"train": {"lr": 1}}, "train.lr[0]", 1)


def test_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    p = tmp_path / "cfg" / "c.yaml"
    p.write_text(yaml.safe_dump({**base(), "output_dir": "runs/x",
                                 "model": {"tokenizer": "../tok", "path": "~/m"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = from_dict(yaml.safe_load(p.read_text()), validate=False)   # Python: the working directory
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    from seekr_kernels.run.config import resolve_paths
    cfg = from_dict(yaml.safe_load(p.read_text()), validate=False, base_dir=str(tmp_path / "cfg"))
    assert resolve_paths(cfg, "/elsewhere") is cfg and cfg.output_dir == str(tmp_path / "cfg" / "runs" / "x")
    assert cfg.output_dir == str(tmp_path / "cfg" / "runs" / "x")
    assert cfg.model.tokenizer == str(tmp_path / "tok") and cfg.model.path == str(tmp_path / "home" / "m")
    assert cfg.tasks[0].path == str(tmp_path / "cfg" / "data" / TASKS[0])


def _llama(vocab=40):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=32, pad_token_id=0))


def _rows(n=8):
    return [{"prompt_ids": [1, 3 + i % 5, 4], "answer_ids": [5 + i % 7, 2]} for i in range(n)]


def _recipe(model, method="seekr", **distill):
    from seekr_kernels.seekr.config import recipe_from_dict
    from seekr_kernels.seekr.recipe import SeekrRecipe
    cfg = recipe_from_dict({"method": method, "batch_size": 4, "replay": {"ratio": 4},
                            "distill": {"layer_budget": 1, "head_budget": 2, "backend": "torch", **distill}})
    return SeekrRecipe(cfg, model=model, pad_token_id=0)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_teacher_logits_k_above_the_vocabulary_is_clamped_with_a_warning(kind):
    """The vocabulary is known once the recipe meets the model (begin_task): a k above it
    is clamped, saying so and naming the key; a k within it says nothing."""
    from seekr_kernels.hf import task_samples
    model = _llama(vocab=40)
    rc = _recipe(model, teacher_logits=kind, teacher_logits_k=500)
    with pytest.warns(UserWarning, match=r"^distill\.teacher_logits_k: 500 is more than the model's vocabulary "
                                         r"\(40 tokens\); clamped to 40"):
        rc.begin_task(model, task_samples(_rows()), name="a")
    rc.end_task(model)
    t = rc.memory.tasks[0].samples[0].logits
    assert t.k == 40
    rc = _recipe(model, teacher_logits=kind, teacher_logits_k=40)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*teacher_logits_k")
        rc.begin_task(model, task_samples(_rows()), name="a")


def test_replay_with_fused_lm_head_fuses_the_replay_ce(monkeypatch):
    """method replay with fused_lm_head: true is accepted: the replay CE runs fused (no
    [B, L, V] logits), with the materialised loss up to float rounding."""
    import seekr_kernels.ops.linear_logits_kl as fused
    from seekr_kernels.hf import task_samples
    calls = []
    orig = fused.linear_logits_kl
    monkeypatch.setattr(fused, "linear_logits_kl", lambda *a, **k: calls.append(1) or orig(*a, **k))
    losses = {}
    for mode in ("true", "false"):
        model = _llama()
        rc = _recipe(model, method="replay", fused_lm_head=mode, backend="cpu")
        rc.begin_task(model, task_samples(_rows()), name="a")
        rc.end_task(model)
        calls.clear()
        losses[mode] = float(rc.replay_loss(model, rc.batch(rc.memory.keys()[:4]))[0].detach())
        assert len(calls) == (mode == "true"), mode
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_existing_run_is_refused_before_the_model_is_built(data_tree, tmp_path, monkeypatch, capsys):
    """A folder that holds a run, without --resume or --overwrite: refused at once (the
    model took about 15 s to build before the refusal)."""
    import shutil

    import seekr_kernels.run.trainer as trainer_mod
    root = tmp_path / "w"
    shutil.copytree(data_tree, root)
    monkeypatch.chdir(root)
    os.makedirs(root / "run")
    (root / "run" / "log.jsonl").write_text("")           # a run that logged, killed before its first save

    def guard(*a, **k):
        raise AssertionError("the model was built before the refusal")
    monkeypatch.setattr(trainer_mod, "build_model", guard)
    monkeypatch.setattr(trainer_mod, "build_tokenizer", guard)
    assert main(["train", "--config", _write(root, base())]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "holds a seekr run" in lines[0] and "--resume" in lines[0], lines


def test_num_threads(monkeypatch):
    """train.num_threads: a number as given; null: torch's count on a GPU or under
    OMP_NUM_THREADS, else this process's share of the cores, 1 on a busy machine."""
    from seekr_kernels.run.preflight import num_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert num_threads(3)[0] == 3
    assert num_threads(None, "cuda")[0] == 8
    assert num_threads(None)[0] == 8
    assert num_threads(None, local_processes=2)[0] == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert num_threads(None)[0] == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    n, why = num_threads(None)
    assert n == 1 and "busy" in why and "9.0" in why
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert num_threads(None)[0] == 8
    with pytest.raises(ConfigError, match="train.num_threads: must be > 0"):
        from_dict({**base(), "train": {**base()["train"], "num_threads": 0}})
    with pytest.raises(ConfigError, match="train.num_threads: expected an integer"):
        from_dict({**base(), "train": {**base()["train"], "num_threads": 1.5}})


def test_threads_flag_and_key_set_the_trainers_threads(data_tree, tmp_path, monkeypatch, capsys):
    """--threads N is train.num_threads; the trainer sets it when it is built."""
    import shutil

    import seekr_kernels.run.trainer as trainer_mod
    root = tmp_path / "w"
    shutil.copytree(data_tree, root)
    monkeypatch.chdir(root)
    seen = []

    class Stop(Exception):
        pass

    def fake_build_model(*a, **k):          # the threads are set by then
        seen.append(torch.get_num_threads())
        raise Stop()
    monkeypatch.setattr(trainer_mod, "build_model", fake_build_model)
    with pytest.raises(Stop):
        main(["train", "--config", _write(root, base()), "--threads", "3"])
    with pytest.raises(Stop):
        main(["train", "--config", _write(root, {**base(), "train": {**base()["train"], "num_threads": 2}})])
    assert seen == [3, 2]
