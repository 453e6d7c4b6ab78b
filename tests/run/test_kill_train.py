"""SIGKILL during `seekr train`: a run killed at random moments (mid-step, mid-checkpoint,
mid-task) and restarted with `--resume` until it finishes ends byte-identical to an
uninterrupted run (final model folder, results.json) and logs no step twice.

A zygote process imports torch and seekr_kernels once, then forks one child per run that
calls the `seekr` command's own ``main(["train", "--config", ..., "--resume"])`` (what the
console script runs, without paying the imports per run). The test SIGKILLs the child once
its log reaches a random (seeded) step plus a random delay, then resumes. CI runs one trial
of each setting; SEEKR_FUZZ=long runs more (SEEKR_FUZZ_REPORT=file appends the figures).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_checkpoint import records, tree_bytes  # noqa: E402  (same folder)
from tiny_runs import tiny_config, tiny_tasks  # noqa: E402

LONG = os.environ.get("SEEKR_FUZZ", "") == "long"
TRIALS = 5 if LONG else 1
KILLS = 3 if LONG else 2

ZYGOTE = r"""
import os, sys
import torch
torch.set_num_threads(1)
from seekr_kernels.cli import main
import seekr_kernels.run.trainer, transformers, safetensors.torch  # noqa: imported once, before forking
try:
    import peft  # noqa
except ImportError:
    pass
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            code = main(["train", "--config", line.strip(), "--resume"])
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stderr.flush()
        os._exit(code)
    print("pid", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("exit", os.waitstatus_to_exitcode(status), flush=True)
"""


class Zygote:
    def __init__(self, errfile):
        self.errfile = errfile
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(errfile, "w"), text=True, env=env)
        assert self.p.stdout.readline().strip() == "ready", self.err()

    def err(self):
        return open(self.errfile).read()[-3000:]

    def start(self, cfg) -> int:
        self.p.stdin.write(f"{cfg}\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline().split()[1])

    def wait(self) -> int:
        line = self.p.stdout.readline()
        assert line.startswith("exit"), self.err()
        return int(line.split()[1])

    def close(self):
        self.p.stdin.close()
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # Cleanup, not a check: every test has already asserted its own run's exit code. The
            # zygote has nothing left to do here, but interpreter shutdown with torch loaded can
            # take over 30 s on a starved machine (seen under a niced suite beside two trainings).
            self.p.kill()
            self.p.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.txt")
    yield z
    z.close()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _last_step(out):
    try:
        with open(os.path.join(out, "log.jsonl"), encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return 0
    step = 0
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") in ("train", "replay"):
            step = max(step, int(r["global_step"]))
    return step


def _run_killed(z, cfg, out, target, delay, timeout=240):
    """Run `seekr train --resume` in a child; SIGKILL it once its log passes step
    ``target`` (plus ``delay`` s). Returns True if it was killed, False if it finished."""
    pid = z.start(cfg)
    t0 = time.monotonic()
    while _alive(pid) and _last_step(out) < target:
        assert time.monotonic() - t0 < timeout, "seekr train made no progress"
        time.sleep(0.01)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    code = z.wait()
    assert code in (0, -signal.SIGKILL), f"exit {code}: {z.err()}"
    return code == -signal.SIGKILL


def _finish(z, cfg):
    z.start(cfg)
    assert z.wait() == 0, z.err()


def _leftovers(out):
    return [n for root, ds, fs in os.walk(out) for n in ds + fs if ".tmp" in n or ".old-" in n]


def _write(cfg_dict, path):
    path.write_text(json.dumps(cfg_dict))        # JSON is YAML
    return path


def _campaign(z, tmp_path, cfg_dict, name, total, max_delay=0.3):
    ref = tmp_path / "ref"
    _finish(z, _write({**cfg_dict, "output_dir": str(ref)}, tmp_path / "ref.yaml"))
    want_final, want_res = tree_bytes(ref / "final"), (ref / "results.json").read_bytes()
    want_log = records(ref)
    rng = random.Random(f"kill-train-{name}")
    kills = mid_task = mid_write = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        cfg = _write({**cfg_dict, "output_dir": str(out)}, tmp_path / f"trial-{trial}.yaml")
        targets = sorted(rng.sample(range(1, total), min(KILLS, total - 1)))
        for target in targets:
            if _run_killed(z, cfg, out, target, rng.uniform(0.0, max_delay)):
                kills += 1
                st = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
                mid_task += str(st.get("checkpoint", "")).startswith("checkpoints/step-")
                mid_write += bool(_leftovers(out))
        _finish(z, cfg)
        assert tree_bytes(out / "final") == want_final, f"trial {trial}: final model differs"
        assert (out / "results.json").read_bytes() == want_res, f"trial {trial}: results differ"
        assert records(out) == want_log, f"trial {trial}: log differs (a step logged twice or missing)"
        assert not _leftovers(out), _leftovers(out)
    print(f"kill-train-{name}: {TRIALS} runs, {kills} kills ({mid_write} mid-write), {mid_task} resumed from "
          f"a mid-task checkpoint, all byte-identical")
    path = os.environ.get("SEEKR_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"campaign": f"kill-train-{name}", "runs": TRIALS, "kills": kills,
                                "mid_task": mid_task, "mid_write": mid_write, "identical": TRIALS}) + "\n")
    return kills


def test_kill_seekr_train_full_model(zygote, tmp_path):
    paths = tiny_tasks(tmp_path / "data")[:2]
    d = tiny_config(tmp_path / "x", paths, "seekr", **{"train.save_steps": 1, "train.save_total_limit": 1}).to_dict()
    assert _campaign(zygote, tmp_path, d, "seekr", total=7) >= 1


def _hf_dir(path, texts):
    """A tiny Llama and a BPE tokenizer trained here on the task texts, as a local folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_kill_lora_train_on_local_hf_model(zygote, tmp_path):
    """The issue's case: a replay+logits LoRA run on a local HF model folder with a locally
    trained tokenizer, killed mid-task, resumes to the uninterrupted run's numbers."""
    pytest.importorskip("peft", reason="peft is needed for the LoRA path")
    paths = tiny_tasks(tmp_path / "data")[:2]
    texts = []
    for p in paths:
        for rec in json.loads(open(os.path.join(p, "train.json")).read()):
            texts.append(rec["prompt"] + rec["answer"])
    mdir = _hf_dir(tmp_path / "hf", texts)
    d = tiny_config(tmp_path / "x", paths, "replay+logits", **{
        "train.save_steps": 2, "train.lr": 1e-2, "train.max_prompt_len": 24, "train.max_answer_len": 12,
        "model.lora": {"r": 4, "alpha": 8, "dropout": 0.1, "save": "adapter"}}).to_dict()
    d["model"] = {"path": mdir, "lora": d["model"]["lora"]}
    # LoRA steps of this tiny model take milliseconds: a short delay, or the run ends first
    assert _campaign(zygote, tmp_path, d, "lora", total=7, max_delay=0.05) >= 1
