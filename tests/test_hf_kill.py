"""SIGKILL during a SEEKR sequence in the Hugging Face Trainer (seekr_kernels.hf): a job
killed at random moments (mid-step, mid-checkpoint, during end_task, the task's final
save or the scoring) and run again with ``train_tasks(..., resume=True)`` until it finishes
ends byte-identical to the uninterrupted run: final weights, recipe state (importance,
heads, replay memory with its teachers), history and score rows.

A zygote process imports torch, transformers and seekr_kernels once, then forks one child
per run (what a requeued job runs, without paying the imports per run). The kill times
are drawn (seeded) uniformly over the uninterrupted run's duration. SEEKR_FUZZ=long runs
more kills; SEEKR_FUZZ_REPORT=file appends the figures.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers", reason="seekr_kernels.hf needs transformers")

from seekr_kernels.utils import store  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = os.environ.get("SEEKR_FUZZ", "") == "long"
KILLS = 30 if LONG else 10
TASKS = ["a", "b"]

ZYGOTE = r"""
import json, os, sys, warnings
import torch
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
from transformers import LlamaConfig, LlamaForCausalLM
from seekr_kernels.hf import SeekrConfig, SeekrDataCollator, SeekrTrainer
import safetensors.torch  # noqa: imported once, before forking
from accelerate.utils import extract_model_from_parallel
extract_model_from_parallel(torch.nn.Linear(1, 1))   # imports DeepSpeed when installed (seconds), once
TASKS = ["a", "b"]


def rows(t, n=8):
    g = torch.Generator().manual_seed(t)
    out = []
    for _ in range(n):
        p = torch.randint(3, 40, (3,), generator=g).tolist()
        out.append({"prompt_ids": [1, t + 3] + p, "answer_ids": [(x * (t + 2)) % 37 + 3 for x in p[:2]] + [2]})
    return out


def run(out):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=40,
                                         max_position_embeddings=32, pad_token_id=0, attention_dropout=0.1))
    args = SeekrConfig(output_dir=out, per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
                       save_strategy="steps", save_steps=1, save_total_limit=2, use_cpu=True, report_to=[],
                       disable_tqdm=True, replay_ratio=4, replay_cycle=2, query_budget=3, layer_budget=2,
                       head_budget=3, seekr_backend="torch", replay_pad_to_multiple_of=1, seed=1)
    tr = SeekrTrainer(model=model, args=args)
    tasks = [(n, rows(i)) for i, n in enumerate(TASKS)]

    def score(t, name):
        batch = SeekrDataCollator(0, 1)(rows(TASKS.index(name))[:4])
        t.model.eval()
        with torch.no_grad():
            loss = t.model(**batch).loss
        t.model.train()
        return -float(loss)
    res = tr.train_tasks(tasks, score=score, resume=True)
    d = os.path.join(out, "result")
    os.makedirs(d, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tr.model.state_dict().items()},
                                os.path.join(d, "model.safetensors"))
    tr.recipe.save(os.path.join(d, "recipe"))
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump({"result": res, "history": tr.seekr_history}, f, sort_keys=True)


print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            run(line.strip())
            code = 0
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
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(errfile, "w"), text=True, env=env)
        for line in self.p.stdout:          # libraries may print while importing
            if line.strip() == "ready":
                break
        else:
            raise AssertionError(self.err())

    def err(self):
        return open(self.errfile).read()[-3000:]

    def start(self, out) -> int:
        self.p.stdin.write(f"{out}\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline().split()[1])

    def wait(self) -> int:
        line = self.p.stdout.readline()
        assert line.startswith("exit"), self.err()
        return int(line.split()[1])

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.txt")
    yield z
    z.close()


def _tree(d):
    return {rel: open(os.path.join(d, rel), "rb").read() for rel in store.list_files(d)}


def _finish(z, out):
    t0 = time.monotonic()
    z.start(out)
    assert z.wait() == 0, z.err()
    return time.monotonic() - t0


def _manifest(d):
    return os.path.exists(os.path.join(d, "seekr_recipe", "manifest.json"))


def _progress(out, steps):
    """Optimiser steps of the sequence saved so far (complete task ends and checkpoints)."""
    done = 0
    for t, n in steps.items():
        if _manifest(out / t / "final"):
            done += n
            continue
        saved = [int(c.name.split("-")[1]) for c in (out / t).glob("checkpoint-*") if _manifest(c)]
        return done + max(saved, default=0)
    return done


def _run_killed(z, out, steps, target, delay, timeout=300):
    """Run the sequence in a child; SIGKILL it once ``target`` steps are saved, plus
    ``delay`` s. Returns True if it was killed, False if it finished first."""
    pid = z.start(str(out))
    t0 = time.monotonic()
    while _progress(out, steps) < target:
        assert time.monotonic() - t0 < timeout, "no progress"
        try:
            os.kill(pid, 0)             # the zygote's child: gone once it finished and was reaped
        except ProcessLookupError:
            break
        time.sleep(0.005)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    code = z.wait()
    assert code in (0, -signal.SIGKILL), f"exit {code}: {z.err()}"
    return code == -signal.SIGKILL


def _where(out):
    """What the kill interrupted: a save (a checkpoint or task end without its manifest),
    or else a task in progress, or the moment between two tasks."""
    saves = [c for t in TASKS for c in [*(out / t).glob("checkpoint-*"), out / t / "final"]
             if c.exists() and not _manifest(c)]
    if saves:
        return "mid-save"
    current = next((t for t in TASKS if not _manifest(out / t / "final")), None)
    if current and any(_manifest(c) for c in (out / current).glob("checkpoint-*")):
        return "mid-task"
    return "before the task's first save"


def test_kill_hf_sequence_at_random_moments(zygote, tmp_path):
    t_start = time.monotonic()
    ref = tmp_path / "ref"
    duration = _finish(zygote, str(ref))
    want = _tree(ref / "result")
    assert json.loads(want["result.json"])["result"]["tasks"] == TASKS
    steps = {t: json.loads((ref / t / "final" / "seekr_recipe" / "manifest.json").read_text())["global_step"]
             for t in TASKS}
    total = sum(steps.values())
    rng = random.Random("kill-hf")
    kills = identical = runs = 0
    where = {"mid-save": 0, "mid-task": 0, "before the task's first save": 0}
    while kills < KILLS:
        assert runs < 3 * KILLS, "the runs keep finishing before the kill"
        out = tmp_path / f"trial-{runs}"
        runs += 1
        # two kills per trial: the second lands in a resumed run
        for _ in range(2):
            target = rng.randrange(min(_progress(out, steps), total - 1), total)   # past what is saved
            if kills < KILLS and _run_killed(zygote, out, steps, target,
                                             rng.uniform(0, 2 * duration / total)):
                kills += 1
                where[_where(out)] += 1
        _finish(zygote, str(out))
        got = _tree(out / "result")
        assert got.keys() == want.keys(), f"trial {runs}: {sorted(got)}"
        for rel in want:
            assert got[rel] == want[rel], f"trial {runs}: {rel} differs from the uninterrupted run"
        identical += 1
    wall = time.monotonic() - t_start
    print(f"kill-hf: {kills} kills in {runs} runs ({where}), {identical}/{runs} resumed runs identical, "
          f"uninterrupted run {duration:.1f} s, campaign {wall:.1f} s")
    path = os.environ.get("SEEKR_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"campaign": "kill-hf", "kills": kills, "runs": runs, "identical": identical,
                                "where": where, "wall_s": round(wall, 1)}) + "\n")
    assert identical == runs and kills == KILLS
