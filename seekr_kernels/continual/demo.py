"""The built-in demo: four methods on a made-up task stream that forgets visibly.

Tasks share their inputs (strings of letters) and differ only in the rule that maps an
input to its answer, announced by a tag at the start of the prompt::

    rev:cadbe=  -> ebdac      reverse
    rot:cadbe=  -> dbeca      rotate left by two
    swp:cadbe=  -> acbde      swap neighbouring pairs
    ilv:cadbe=  -> cdeab      interleave: even positions, then odd ones

Learning a new rule on the same inputs overwrites the old ones (sequential fine-tuning
forgets almost everything), which is what replay and SEEKR are there to prevent. Every
rule is a permutation of the input: which letter to copy next is decided by attention,
the kind of knowledge SEEKR's attention distillation keeps. (``nxt``, the next letter,
changes the output mapping instead; it is available to ``make_stream`` but not in the
default stream.)

``seekr demo`` builds a small Llama from a config (no downloads), runs sft, replay with
1% and 10% memories and SEEKR with a 1% memory on the same stream from the same
initial weights, prints OP/BWT and writes ``results.json`` and heatmaps to ``--out``.
"""
from __future__ import annotations

import os
import random
import shutil
import string
import time

from . import metrics as M
from .config import from_dict
from .data import Example, write_records

RULES = {
    "rev": lambda x: x[::-1],
    "rot": lambda x: x[2:] + x[:2],
    "swp": lambda x: "".join(x[i + 1] + x[i] if i + 1 < len(x) else x[i] for i in range(0, len(x), 2)),
    "nxt": lambda x: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in x),
    "ilv": lambda x: x[0::2] + x[1::2],
}
TASK_ORDER = ("rev", "rot", "swp", "ilv")
LETTERS = "abcdefgh"

METHODS = {                      # name -> (method, replay ratio)
    "sft": ("sft", 0.01),
    "replay-1%": ("replay", 0.01),
    "replay-10%": ("replay", 0.10),
    "seekr-1%": ("seekr", 0.01),
}

#: The demo's settings; ``--quick`` shrinks them for a test-sized run. Losses, weights
#: (a = 0.5, b = 1e3) and the replay cycle (train batches per epoch // replay batches) are
#: the published defaults; the head budget is half of this small model's 16 heads.
FULL = dict(n_train=1000, n_test=200, length=5, epochs=5, first_epochs=8, batch_size=32, lr=1e-3,
            replay_batch_size=4,
            arch=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64),
            layer_budget=4, head_budget=8, tasks=TASK_ORDER)
QUICK = dict(n_train=200, n_test=40, length=4, epochs=1, first_epochs=2, batch_size=20, lr=3e-3,
             replay_batch_size=4,
             arch=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=32),
             layer_budget=2, head_budget=2, tasks=TASK_ORDER[:3])


def make_stream(n_train: int, n_test: int, length: int, tasks=TASK_ORDER, seed: int = 0) -> dict:
    """{task: {"train": [Example], "test": [Example]}}: the same inputs under every rule."""
    rng = random.Random(seed)
    seen, inputs = set(), []
    while len(inputs) < n_train + n_test:
        x = "".join(rng.choice(LETTERS) for _ in range(length))
        if x not in seen:
            seen.add(x)
            inputs.append(x)
    train_x, test_x = inputs[:n_train], inputs[n_train:]
    out = {}
    for name in tasks:
        rule = RULES[name]
        out[name] = {"train": [Example(f"{name}:{x}=", rule(x)) for x in train_x],
                     "test": [Example(f"{name}:{x}=", rule(x)) for x in test_x]}
    return out


def write_stream(stream: dict, root: str) -> list:
    """Write the stream in the TRACE layout (one directory per task); returns the paths."""
    paths = []
    for name, splits in stream.items():
        d = os.path.join(root, name)
        for split, exs in splits.items():
            write_records(os.path.join(d, f"{split}.json"), exs)
        paths.append(d)
    return paths


def demo_config(method: str, ratio: float, out_dir: str, data_dir: str, s: dict, seed: int) -> dict:
    """The run config of one demo method (a plain dict, as a YAML file would give)."""
    tasks = [{"name": n, "path": os.path.join(data_dir, n),
              "epochs": s["first_epochs"] if i == 0 else s["epochs"]} for i, n in enumerate(s["tasks"])]
    return {
        "method": method, "output_dir": out_dir, "seed": seed, "device": "cpu",
        "model": {"arch": dict(s["arch"]), "alphabet": string.ascii_lowercase + ":="},
        "tasks": tasks,
        "train": {"batch_size": s["batch_size"], "lr": s["lr"], "weight_decay": 0.0, "warmup_steps": 10,
                  "schedule": "constant", "max_prompt_len": 16, "max_answer_len": 8, "pad_to_multiple_of": 1,
                  "max_grad_norm": 1.0},
        "replay": {"ratio": ratio, "batch_size": s.get("replay_batch_size"), "cycle": s.get("replay_cycle", 0)},
        "distill": {"layer_budget": s["layer_budget"], "head_budget": s["head_budget"], "query_budget": 0,
                    "attn_weight": s.get("attn_weight", 1000.0), "logits_weight": s.get("logits_weight", 0.5),
                    "backend": "auto"},
        "eval": {"batch_size": 256, "max_new_tokens": 8, "keep_predictions": 3},
        "log": {"progress": True},
    }


def run_demo(out: str = "seekr-demo", quick: bool = False, methods=None, seed: int = 0,
             quiet: bool = False, progress: bool = True, threads: int | None = 1) -> dict:
    """Run the demo; returns {"methods": {name: {"OP", "BWT", "matrix"}}, ...}.

    ``threads``: torch intra-op threads while it runs (default 1: at this model size a
    second thread gains little, and on a busy machine oversubscribed threads are many
    times slower). None leaves torch's setting alone.
    """
    import warnings

    import torch

    if threads is not None:
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_demo(out, quick, methods, seed, quiet, progress, threads=None)
        finally:
            torch.set_num_threads(prev_threads)

    from .trainer import ContinualTrainer

    s = QUICK if quick else FULL
    names = list(methods or METHODS)
    for n in names:
        if n not in METHODS:
            raise ValueError(f"methods: unknown demo method {n!r} (known: {list(METHODS)})")
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "data")
    write_stream(make_stream(s["n_train"], s["n_test"], s["length"], s["tasks"], seed=seed), data_dir)
    results, t_all = {}, time.time()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"seekr demo: {len(s['tasks'])} tasks ({', '.join(s['tasks'])}), {s['n_train']} training samples "
        f"each, methods {', '.join(names)}{' [quick]' if quick else ''}")
    for n in names:
        method, ratio = METHODS[n]
        run_dir = os.path.join(out, "runs", n)
        shutil.rmtree(run_dir, ignore_errors=True)     # a demo always starts fresh
        cfg = from_dict(demo_config(method, ratio, run_dir, data_dir, s, seed))
        cfg.log.progress = progress and not quiet
        t0 = time.time()
        with warnings.catch_warnings():
            # No C++ extension built: the kernels fall back to plain PyTorch (fine at demo size).
            warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
            r = ContinualTrainer(cfg, quiet=quiet).run()
        results[n] = {"OP": r["OP"], "BWT": r["BWT"], "matrix": r["matrix"], "seconds": round(time.time() - t0, 1)}
        M.plot_heatmap(r["matrix"], os.path.join(out, f"heatmap-{n.replace('%', 'pct')}.png"), r["tasks"],
                       title=f"{n}: OP {100 * r['OP']:.1f}%, BWT {100 * r['BWT']:+.1f}%")
        say(f"  {n:<11} OP {100 * r['OP']:5.1f}%  BWT {100 * r['BWT']:+6.1f}%  ({time.time() - t0:.0f} s)")
    summary = {"methods": results, "tasks": list(s["tasks"]), "quick": quick, "seed": seed,
               "seconds": round(time.time() - t_all, 1),
               "settings": {k: v for k, v in s.items() if k != "tasks"}}
    M.write_json(os.path.join(out, "results.json"), summary)
    say("")
    say(M.format_table(results))
    say("OP: mean accuracy over all tasks at the end; BWT: mean change of each earlier task's accuracy "
        "from when it was learned to the end (negative = forgetting).")
    say(f"\nresults: {os.path.join(out, 'results.json')}, heatmaps: {os.path.join(out, 'heatmap-*.png')} "
        f"({summary['seconds']:.0f} s)")
    return summary
