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
initial weights, for several seeds (each seed draws its own inputs and initial
weights), two runs at a time in worker processes. It prints OP/BWT per seed and as mean
[min, max] over the seeds, and writes ``results.json`` and heatmaps to ``--out`` (the
mean, and each seed under ``seed-<s>/``). One seed's numbers are not a finding: at this
size they move by tens of points from seed to seed, and with the library versions.
"""
from __future__ import annotations

import os
import random
import shutil
import string
import time

from . import metrics
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

#: Seeds a demo runs by default (each draws its own task inputs and initial weights).
DEFAULT_SEEDS = 3

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


def run_config(config: dict, threads: int | None = 1, quiet: bool = True) -> dict:
    """Train one demo run from its config dict; returns OP, BWT, matrix, wall and CPU seconds.

    A module-level function of plain data so that a worker process can run it; ``threads``
    as in :func:`run_demo`. CPU seconds are this process's (user + system): with one torch
    thread they are what the run costs an idle core, whatever else the machine runs.
    """
    import warnings

    import torch

    from .trainer import ContinualTrainer

    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cfg = from_dict(config)
        shutil.rmtree(cfg.output_dir, ignore_errors=True)     # a demo run always starts fresh
        t0, c0 = time.time(), time.process_time()
        with warnings.catch_warnings():
            # No C++ extension built: the kernels fall back to plain PyTorch (fine at demo size).
            warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
            r = ContinualTrainer(cfg, quiet=quiet).run()
        return {"OP": r["OP"], "BWT": r["BWT"], "matrix": r["matrix"], "tasks": r["tasks"],
                "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
    finally:
        torch.set_num_threads(prev)


def _worker_init(threads):
    import torch
    if threads is not None:
        torch.set_num_threads(threads)


def run_configs(configs: dict, jobs: int = 2, threads: int | None = 1, on_result=None,
                quiet: bool = True) -> dict:
    """Run {key: config dict} with :func:`run_config`, ``jobs`` processes at a time.

    ``jobs`` 1 runs them here, in order; more starts that many worker processes (spawned:
    a forked copy of a process that already ran torch may inherit locked OpenMP state),
    each with ``threads`` torch threads, and hands them the configs in the given order —
    put the longest first. ``on_result(key, result)`` is called as each one finishes.
    A failed run raises its exception after the others are cancelled. Returns {key: result}.
    """
    out = {}
    if jobs <= 1:
        for key, cfg in configs.items():
            out[key] = run_config(cfg, threads, quiet=quiet)
            if on_result:
                on_result(key, out[key])
        return out
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=min(jobs, len(configs)) or 1, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as ex:
        futs = {ex.submit(run_config, cfg, threads, True): key for key, cfg in configs.items()}
        pending = set(futs)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    out[futs[f]] = f.result()         # raises the worker's exception
                    if on_result:
                        on_result(futs[f], out[futs[f]])
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return {key: out[key] for key in configs}


def makespan(seconds, jobs: int) -> float:
    """Wall time of running jobs of these durations, in this order, on ``jobs`` workers that
    each take the next one when free (what :func:`run_configs` does)."""
    free = [0.0] * max(1, jobs)
    for s in seconds:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += s
    return max(free)


def versions() -> dict:
    """The library versions and CPU a demo result was taken with."""
    import platform

    import torch
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    v["cpu"] = cpu
    v["cpu_cores"] = os.cpu_count()
    # The vector ISA ATen dispatches to (AVX2 / AVX512 / DEFAULT; ATEN_CPU_CAPABILITY caps it):
    # the demo's numbers move with it by tens of points (README), the CPU's name does not say it.
    v["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return v


def format_versions(v: dict) -> str:
    cap = f", {v['cpu_capability']}" if v.get("cpu_capability") else ""
    return (f"torch {v['torch']}, transformers {v['transformers']}, triton {v['triton'] or 'none'}, "
            f"python {v['python']}, {v['cpu']} ({v['cpu_cores']} cores{cap})")


def spread(values) -> dict:
    """mean, min, max and sample standard deviation of a list of numbers."""
    vals = [float(x) for x in values]
    n = len(vals)
    mean = sum(vals) / n
    std = (sum((x - mean) ** 2 for x in vals) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "min": min(vals), "max": max(vals), "std": std, "n": n}


def _pct(s: dict, signed: bool) -> str:
    f = "+.1f" if signed else ".1f"
    if s["n"] == 1:
        return f"{100 * s['mean']:{f}}%"
    return f"{100 * s['mean']:{f}}% [{100 * s['min']:{f}}, {100 * s['max']:{f}}]"


#: The header of the table the demo prints (and README.md shows): mean [min, max] over seeds.
TABLE_HEADER = "| method | OP, mean [min, max] | BWT, mean [min, max] |"


def format_summary_table(summary: dict) -> str:
    """The demo's table: one row per method, OP and BWT as mean [min, max] over the seeds
    in percent (Markdown, the same lines README.md shows)."""
    lines = [TABLE_HEADER, "| --- | --- | --- |"]
    for n, s in summary.items():
        lines.append(f"| {n} | {_pct(s['OP'], False)} | {_pct(s['BWT'], True)} |")
    return "\n".join(lines)


def format_per_seed(per_seed: dict, names) -> str:
    """OP / BWT of every method on every seed (percent), one row per method."""
    seeds = list(per_seed)
    w = max(len(n) for n in names)
    lines = [f"{'per seed, OP / BWT':<{w}}  " + "  ".join(f"{'seed ' + str(s):>13}" for s in seeds)]
    for n in names:
        cells = [f"{100 * per_seed[s][n]['OP']:5.1f} / {100 * per_seed[s][n]['BWT']:+6.1f}" for s in seeds]
        lines.append(f"{n:<{w}}  " + "  ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def seed_wins(per_seed: dict, a: str, b: str, key: str = "OP") -> int:
    """On how many seeds method ``a`` scores strictly higher than ``b`` on ``key``."""
    return sum(per_seed[s][a][key] > per_seed[s][b][key] for s in per_seed)


def _seed_list(seeds) -> list:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds: need at least 1 seed, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds: the seed list is empty")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: a seed appears twice in {out}")
    return out


def run_demo(out: str = "seekr-demo", quick: bool = False, methods=None, seeds=DEFAULT_SEEDS, jobs: int = 2,
             quiet: bool = False, progress: bool = True, threads: int | None = 1) -> dict:
    """Run the demo over several seeds; returns the summary written to ``out/results.json``.

    ``seeds``: a number N (seeds 0 .. N-1) or a list of seeds. Each seed draws its own task
    inputs and initial weights. ``jobs``: processes running (seed, method) runs at once
    (default 2: one per core of a 2-core machine); 1 runs everything in this process.
    ``threads``: torch intra-op threads per process (default 1: at this model size a second
    thread gains little, and on a busy machine oversubscribed threads are many times
    slower); None leaves torch's setting alone.

    Writes ``out/seed-<s>/results.json`` and heatmaps per seed, and ``out/results.json``
    (per method mean, min, max and std of OP and BWT over the seeds, every seed's numbers,
    the library versions, wall and CPU seconds) with heatmaps of the mean matrices.
    """
    s = QUICK if quick else FULL
    names = list(methods or METHODS)
    for n in names:
        if n not in METHODS:
            raise ValueError(f"methods: unknown demo method {n!r} (known: {list(METHODS)})")
    seed_list = _seed_list(seeds)
    if jobs < 1:
        raise ValueError(f"jobs: must be >= 1, got {jobs}")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    os.makedirs(out, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    configs = {}
    # Longest runs first, so that the last ones to start are short (SEEKR's statistics and
    # replay make it the slowest, replay-10% next).
    order = sorted(names, key=lambda n: -_COST.get(n, 0))
    for seed in seed_list:
        data_dir = os.path.join(out, "data", f"seed-{seed}")
        write_stream(make_stream(s["n_train"], s["n_test"], s["length"], s["tasks"], seed=seed), data_dir)
    for n in order:
        for seed in seed_list:
            method, ratio = METHODS[n]
            cfg = demo_config(method, ratio, os.path.join(out, f"seed-{seed}", "runs", n),
                              os.path.join(out, "data", f"seed-{seed}"), s, seed)
            cfg["log"]["progress"] = progress and not quiet and jobs == 1
            configs[(seed, n)] = cfg
    say(f"seekr demo: {len(s['tasks'])} tasks ({', '.join(s['tasks'])}), {s['n_train']} training samples "
        f"each, methods {', '.join(names)}, seeds {', '.join(map(str, seed_list))}, {jobs} process"
        f"{'es' if jobs > 1 else ''} x {threads or 'default'} torch thread{'s' if threads != 1 else ''}"
        f"{' [quick]' if quick else ''}")

    per_seed = {seed: {} for seed in seed_list}
    t_all = time.time()

    def done(key, r):
        seed, n = key
        per_seed[seed][n] = r
        say(f"  seed {seed}  {n:<11} OP {100 * r['OP']:5.1f}%  BWT {100 * r['BWT']:+6.1f}%  "
            f"({r['seconds']:.0f} s, {r['cpu_seconds']:.0f} s CPU)")
        if len(per_seed[seed]) == len(names):
            _write_seed(out, seed, {m: per_seed[seed][m] for m in names}, s, quick)

    run_configs(configs, jobs=jobs, threads=threads, on_result=done, quiet=quiet or jobs > 1)
    wall = time.time() - t_all
    per_seed = {seed: {m: per_seed[seed][m] for m in names} for seed in seed_list}
    tasks = list(s["tasks"])
    summary = {}
    for n in names:
        runs = [per_seed[seed][n] for seed in seed_list]
        T = len(tasks)
        mean_matrix = [[None if runs[0]["matrix"][i][j] is None else
                        sum(r["matrix"][i][j] for r in runs) / len(runs) for j in range(T)] for i in range(T)]
        summary[n] = {"OP": spread(r["OP"] for r in runs), "BWT": spread(r["BWT"] for r in runs),
                      "matrix": mean_matrix}
        metrics.plot_heatmap(mean_matrix, os.path.join(out, f"heatmap-{n.replace('%', 'pct')}.png"), tasks,
                       title=f"{n}, mean of {len(runs)} seed{'s' if len(runs) > 1 else ''}: "
                             f"OP {100 * summary[n]['OP']['mean']:.1f}%")
    cpu = [per_seed[k[0]][k[1]]["cpu_seconds"] for k in configs]
    result = {
        "methods": summary, "per_seed": {str(k): v for k, v in per_seed.items()}, "seeds": seed_list,
        "tasks": tasks, "quick": quick, "spread": "min-max over seeds (std also given)",
        "versions": versions(), "jobs": jobs, "threads": threads,
        "seconds": round(wall, 1), "cpu_seconds": round(sum(cpu), 1),
        # what the same runs take on `jobs` idle cores: their CPU times scheduled as run_configs does
        "idle_seconds_estimate": round(makespan(cpu, jobs), 1), "load_average": load,
        "settings": {k: v for k, v in s.items() if k != "tasks"},
    }
    metrics.write_json(os.path.join(out, "results.json"), result)
    say("")
    say(format_per_seed(per_seed, names))
    say("")
    say(f"{len(seed_list)} seed{'s' if len(seed_list) > 1 else ''}; {format_versions(result['versions'])}")
    say(format_summary_table(summary))
    if "seekr-1%" in names and len(seed_list) > 1:
        for other in (n for n in names if n != "seekr-1%"):
            say(f"seekr-1% vs {other}: higher OP on {seed_wins(per_seed, 'seekr-1%', other)} of "
                f"{len(seed_list)} seeds, higher BWT on {seed_wins(per_seed, 'seekr-1%', other, 'BWT')}")
    say("OP: mean accuracy over all tasks at the end; BWT: mean change of each earlier task's accuracy "
        "from when it was learned to the end (negative = forgetting). [min, max]: over the seeds.")
    say(f"\nresults: {os.path.join(out, 'results.json')}, heatmaps: {os.path.join(out, 'heatmap-*.png')}, "
        f"per seed: {os.path.join(out, 'seed-*')}")
    say(f"time: {wall:.0f} s wall (load average {load:.1f} at the start), {sum(cpu):.0f} s CPU in the runs; "
        f"on {jobs} idle core{'s' if jobs > 1 else ''} about {result['idle_seconds_estimate']:.0f} s")
    return result


#: Relative cost of the methods, to start the longest runs first.
_COST = {"seekr-1%": 3, "replay-10%": 2, "replay-1%": 1, "sft": 0}


def _write_seed(out: str, seed: int, results: dict, s: dict, quick: bool) -> None:
    d = os.path.join(out, f"seed-{seed}")
    tasks = list(s["tasks"])
    for n, r in results.items():
        metrics.plot_heatmap(r["matrix"], os.path.join(d, f"heatmap-{n.replace('%', 'pct')}.png"), tasks,
                       title=f"{n}, seed {seed}: OP {100 * r['OP']:.1f}%, BWT {100 * r['BWT']:+.1f}%")
    metrics.write_json(os.path.join(d, "results.json"),
                 {"methods": results, "tasks": tasks, "quick": quick, "seed": seed,
                  "settings": {k: v for k, v in s.items() if k != "tasks"}})
