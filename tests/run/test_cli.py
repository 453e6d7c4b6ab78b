"""The `seekr` command: help, train from YAML (with resume), eval, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from seekr_kernels.cli import main

from tiny_runs import TASKS, tiny_tasks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "eval"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "seekr_kernels", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 0 and "seekr" in r.stdout and "demo" in r.stdout


YAML = """
method: {method}
output_dir: {out}
seed: 3
device: cpu
model:
  arch: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
          num_key_value_heads: 1, max_position_embeddings: 32}}
  alphabet: "abcdefghnorstvwxpilw:="
tasks:
{tasks}
train: {{batch_size: 8, lr: 3.0e-3, max_prompt_len: 12, max_answer_len: 6, pad_to_multiple_of: 1}}
replay: {{ratio: 0.25}}
distill: {{layer_budget: 1, head_budget: 2, backend: torch}}
log: {{progress: false}}
"""


def _yaml(tmp_path, method="seekr", extra=""):
    paths = tiny_tasks(tmp_path / "data")[:2]
    tasks = "\n".join(f"  - {{name: {os.path.basename(p)}, path: data/{os.path.basename(p)}}}" for p in paths)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(YAML.format(method=method, out=tmp_path / "run", tasks=tasks) + extra)
    return str(cfg)


def test_train_then_eval(tmp_path, capsys):
    cfg = _yaml(tmp_path)
    assert main(["train", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "seekr" in out and "OP" in out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["complete"] and res["tasks"] == list(TASKS[:2])
    # Running again is refused without a flag; --resume resumes the finished run:
    # nothing retrained, same numbers.
    assert main(["train", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "holds a seekr run" in err and "--resume" in err and "--overwrite" in err
    assert main(["train", "--config", cfg, "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["matrix"] == res["matrix"]
    # Evaluate the run's checkpoint on its tasks, and a checkpoint directory on one task.
    assert main(["eval", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["tasks"][TASKS[0]]["score"] == pytest.approx(res["matrix"][-1][0])
    ck = os.path.join(tmp_path / "run", json.loads((tmp_path / "run" / "state.json").read_text())["checkpoint"])
    assert main(["eval", "--model", ck, "--task", str(tmp_path / "data" / TASKS[1]), "--max-answer-len", "6",
                 "--max-prompt-len", "12"]) == 0
    assert TASKS[1] in capsys.readouterr().out


def test_config_error_names_key(tmp_path, capsys):
    cfg = _yaml(tmp_path, extra="eval: {batchsize: 3}\n")
    assert main(["train", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "eval.batchsize: unknown key" in err


def test_data_error_reported(tmp_path, capsys):
    cfg = _yaml(tmp_path)
    with open(tmp_path / "data" / TASKS[0] / "train.json", "a") as f:
        f.write("oops")
    assert main(["train", "--config", cfg]) == 2
    assert "train.json" in capsys.readouterr().err


def test_set_overrides(tmp_path):
    cfg = _yaml(tmp_path, method="sft")
    assert main(["train", "--config", cfg, "--set", "train.epochs=2", "--output-dir", str(tmp_path / "o2")]) == 0
    st = json.loads((tmp_path / "o2" / "state.json").read_text())
    assert st["config"]["train"]["epochs"] == 2 and st["method"] == "sft"


def _hf_model_dir(path):
    """A tiny Llama + fast tokenizer saved as a local Hugging Face directory (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    chars = "abcdefghnorstvwxpil:="
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_train_from_local_hf_directory(tmp_path, capsys):
    from seekr_kernels.run.data import HFTokenizer, load_tokenizer
    mdir = _hf_model_dir(tmp_path / "hf")
    tok = load_tokenizer(mdir)
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("rev:ab=")) == "rev:ab="
    cfg = _yaml(tmp_path, method="replay+logits")
    text = open(cfg).read().replace("model:\n", f"model:\n  path: {mdir}\n", 1)
    text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith(("arch:", "num_key_value_heads",
                                                                              "alphabet:")))
    open(cfg, "w").write(text)
    assert main(["train", "--config", cfg]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["complete"]
    ck = os.path.join(tmp_path / "run", json.loads((tmp_path / "run" / "state.json").read_text())["checkpoint"])
    assert isinstance(load_tokenizer(ck), HFTokenizer)     # the checkpoint is a loadable HF directory
    assert main(["eval", "--model", ck, "--task", str(tmp_path / "data" / TASKS[0]), "--max-answer-len", "6"]) == 0


def test_paths_resolve_against_the_config_and_eval_runs_from_anywhere(tmp_path, monkeypatch, capsys):
    """Task, model and output paths resolve against the config's folder and are saved
    absolute; `--set` reaches list items; `seekr eval --run` from another directory uses the
    run's settings (lengths, eval section, metrics, tokenizer)."""
    proj = tmp_path / "proj"
    cfg = _yaml(proj, method="replay")
    text = open(cfg).read().replace(f"output_dir: {proj / 'run'}", "output_dir: runs/x")
    open(cfg, "w").write(text + "eval: {batch_size: 5}\n")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--config", os.path.relpath(cfg), "--set", "tasks.0.epochs=2", "--set",
                 f"tasks[1].name={TASKS[1]}"]) == 0
    run = proj / "runs" / "x"
    assert not os.path.exists(tmp_path / "a" / "runs")
    err = capsys.readouterr().err
    assert "seekr: warning: replay.batch_size: replay batches of 8 samples" in err and "RunWarning" not in err
    st = json.loads((run / "state.json").read_text())
    c = st["config"]
    assert c["output_dir"] == str(run) and c["tasks"][0]["epochs"] == 2 and c["tasks"][1]["epochs"] is None
    assert [t["path"] for t in c["tasks"]] == [str(proj / "data" / n) for n in TASKS[:2]]
    assert {r["epoch"] for r in map(json.loads, open(run / "log.jsonl")) if r["kind"] == "train" and r["task"] == 0} \
        == {0, 1}
    res = json.loads((run / "results.json").read_text())
    monkeypatch.chdir(tmp_path / "b")
    assert main(["eval", "--run", os.path.relpath(run), "--out", "ev.json"]) == 0
    ev = json.loads((tmp_path / "b" / "ev.json").read_text())
    # the run's lengths (12/6) and metric: the same scores and log-likelihoods as the run's last row
    assert [ev["tasks"][n]["score"] for n in TASKS[:2]] == res["matrix"][-1]
    assert [ev["tasks"][n]["loglik"] for n in TASKS[:2]] == pytest.approx(res["loglik"][-1], abs=1e-6)
    assert ev["model"] == str(run / "checkpoints" / "task-001")
    # a flag overrides the run's setting
    assert main(["eval", "--run", str(run), "--max-answer-len", "2", "--out", "short.json"]) == 0
    short = json.loads((tmp_path / "b" / "short.json").read_text())
    assert short["tasks"][TASKS[0]]["loglik"] != pytest.approx(ev["tasks"][TASKS[0]]["loglik"], abs=1e-6)


def test_only_the_packages_warnings_carry_its_name(monkeypatch, capsys, tmp_path):
    """A library's warning (PEFT's FutureWarning about is_gradient_checkpointing) prints as
    Python prints it; the package's own (a RunWarning, a warning from its code) as
    `seekr: warning: ...`."""
    import warnings

    import seekr_kernels
    from seekr_kernels import cli
    from seekr_kernels.run.preflight import RunWarning
    pkg = os.path.dirname(seekr_kernels.__file__)

    def fake_eval(args):
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning,
                               "/venv/site-packages/peft/peft_model.py", 12)
        warnings.warn_explicit("log.tensorboard is deprecated", FutureWarning, os.path.join(pkg, "run", "config.py"),
                               3)
        warnings.warn_explicit("replay.batch_size: larger than the memory", RunWarning, "/somewhere/else.py", 4)
        warnings.warn_explicit("seekr_kernels: the cpu backend is not built", UserWarning,
                               os.path.join(pkg, "_backend.py"), 5)
        return 0
    monkeypatch.setattr(cli, "cmd_eval", fake_eval)
    python = []           # what Python's own display (here pytest's) receives
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, *a, **k: python.append(
            (str(message), category, filename))
        assert main(["eval", "--model", str(tmp_path), "--task", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["seekr: warning: log.tensorboard is deprecated",
                   "seekr: warning: replay.batch_size: larger than the memory",
                   "seekr: warning: the cpu backend is not built"]
    assert python == [("`is_gradient_checkpointing` is deprecated", FutureWarning,
                       "/venv/site-packages/peft/peft_model.py")]
