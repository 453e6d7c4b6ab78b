"""Why SEEKR-1% falls short of replay-10% on the demo: one factor at a time, over seeds.

    python -m benchmarks.studies.bench_demo_factors                      # every factor, seeds 0 1 2
    python -m benchmarks.studies.bench_demo_factors --factors baseline "replay.cycle: 1" --seeds 5
    python -m benchmarks.studies.bench_demo_factors --reuse-demo seekr-demo --ref-seeds 5 --factors ...
    python -m benchmarks.studies.bench_demo_factors --quick --out /tmp/f  # smoke run

Each factor is the demo's SEEKR-1% run (``seekr demo``'s settings, ``demo.FULL``) with one
thing changed; the references are the demo's replay-1% and replay-10% runs, and a
replay-1% run with the changed factor where that separates the cause (more replay steps
vs distillation). Every (factor, seed) run is one process of ``demo.run_configs`` (1 torch
thread, ``--jobs`` at a time); finished runs are appended to ``OUT/demo_factor_runs.jsonl``
and reused by a later invocation with the same settings, so an interrupted study resumes.
``--reuse-demo DIR`` takes the baseline and reference runs from a ``seekr demo --out DIR``
run with the same settings (the same configs: a run on CPU with one thread repeats to the
last digit). ``--ref-seeds N`` runs the baseline and replay-10% on N seeds (more than the
factors' ``--seeds``), to see how far the baseline itself moves.

Prints and writes (``OUT/demo_factors.csv``, one row per factor): OP and BWT as mean [min,
max] over the factor's seeds, the mean paired OP difference to the baseline on the same
seeds, and on how many seeds the factor beats the baseline and replay-10%.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time

from benchmarks import common
from seekr_kernels.run import demo
from seekr_kernels.run.config import set_dotted

#: name -> (demo method, config overrides). "baseline" is the demo's seekr-1% run.
FACTORS = {
    "baseline (seekr-1%)": ("seekr-1%", {}),
    "replay-1% (reference)": ("replay-1%", {}),
    "replay-10% (reference)": ("replay-10%", {}),
    # changes the numbers of the run but not what it does: how far a run moves for nothing
    "train.warmup_steps: 11 (a null change)": ("seekr-1%", {"train.warmup_steps": 11}),
    "recipe: official": ("seekr-1%", {"recipe": "official"}),
    "recipe: official, train.grad_accum: 1": ("seekr-1%", {"recipe": "official", "train.grad_accum": 1}),
    "distill.logits_weight: 0": ("seekr-1%", {"distill.logits_weight": 0.0}),
    "distill.logits_weight: 1": ("seekr-1%", {"distill.logits_weight": 1.0}),
    "distill.attn_weight: 0 (replay+logits)": ("seekr-1%", {"distill.attn_weight": 0.0}),
    "distill.attn_weight: 100": ("seekr-1%", {"distill.attn_weight": 100.0}),
    "distill.attn_weight: 1e4": ("seekr-1%", {"distill.attn_weight": 1e4}),
    "distill.head_budget: 2 (1/8, package default)": ("seekr-1%", {"distill.head_budget": 2}),
    "distill.head_budget: 16 (all)": ("seekr-1%", {"distill.head_budget": 16}),
    "distill.layer_budget: 3 (3/4, package default)": ("seekr-1%", {"distill.layer_budget": 3}),
    "distill.layer_budget: 2": ("seekr-1%", {"distill.layer_budget": 2}),
    "distill.query_budget: 4": ("seekr-1%", {"distill.query_budget": 4}),
    "replay.cycle: 1": ("seekr-1%", {"replay.cycle": 1}),
    "replay.cycle: 1, replay-1%": ("replay-1%", {"replay.cycle": 1}),
    "replay.batch_size: 32 (package default)": ("seekr-1%", {"replay.batch_size": 32}),
    "train.max_grad_norm: 0": ("seekr-1%", {"train.max_grad_norm": 0.0}),
    "train.max_grad_norm: 0, replay-10%": ("replay-10%", {"train.max_grad_norm": 0.0}),
    "replay.ratio: 0.1 (seekr-10%)": ("seekr-1%", {"replay.ratio": 0.1}),
}
QUICK_FACTORS = ["baseline (seekr-1%)", "replay-10% (reference)", "recipe: official", "replay.cycle: 1"]
#: Factors that run on ``--ref-seeds`` seeds; and the demo method each reference repeats.
REFERENCES = ("baseline (seekr-1%)", "replay-10% (reference)")
DEMO_RUNS = {"seekr-1%": "baseline (seekr-1%)", "replay-1%": "replay-1% (reference)",
             "replay-10%": "replay-10% (reference)"}


def factor_config(name: str, seed: int, s: dict, root: str) -> dict:
    """The run config of one factor on one seed (data under root/data/seed-<seed>)."""
    method_name, over = FACTORS[name]
    method, ratio = demo.METHODS[method_name]
    tag = hashlib.sha1(name.encode()).hexdigest()[:8]
    d = demo.demo_config(method, ratio, os.path.join(root, "runs", f"{tag}-{seed}"),
                         os.path.join(root, "data", f"seed-{seed}"), s, seed)
    d["log"] = {"progress": False}
    over = dict(over)
    if over.pop("recipe", None) == "official":
        # The published recipe; what is tied to the demo's model and data size stays (lr,
        # head and layer budgets, sequence lengths). Batch 128 would leave 1000 samples 7
        # steps per epoch: the demo's batch of 32 with the published accumulation
        # structure scaled down (4 micro-steps, replay inside the window).
        d["recipe"] = "official"
        for sec in ("replay", "distill"):
            d[sec] = {k: v for k, v in d[sec].items() if k in ("layer_budget", "head_budget", "ratio")}
        d["train"] = {k: d["train"][k] for k in ("lr", "max_prompt_len", "max_answer_len")}
        d["train"].update(batch_size=s["batch_size"], grad_accum=4)
    for k, v in over.items():
        set_dotted(d, k, v)
    return d


def settings_key(s: dict) -> str:
    return hashlib.sha1(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_done(path: str, key: str) -> dict:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:      # a line cut by a kill: run it again
                    continue
                if r.get("settings") == key and r.get("factor") in FACTORS:
                    done[(r["factor"], r["seed"])] = r
    return done


def reuse_demo(demo_dir: str, s: dict, quick: bool, seeds, names, skey: str, done: dict, log_path: str) -> int:
    """Add the baseline and reference runs of a ``seekr demo`` result to ``done`` (and the
    log); returns how many. A demo with other settings is an error, not silently mixed in."""
    path = os.path.join(demo_dir, "results.json")
    with open(path) as f:
        res = json.load(f)
    want = json.loads(json.dumps({k: v for k, v in s.items() if k != "tasks"}))
    if res.get("quick") != quick or res.get("settings") != want or res.get("tasks") != list(s["tasks"]):
        raise SystemExit(f"--reuse-demo: {path} was run with other settings than this study's")
    n = 0
    with open(log_path, "a") as f:
        for seed_s, runs in res["per_seed"].items():
            for method, r in runs.items():
                key = (DEMO_RUNS.get(method), int(seed_s))
                if key[0] in names and key[1] in seeds and key not in done:
                    rec = {"factor": key[0], "seed": key[1], "settings": skey, "source": path,
                           **{k: r[k] for k in ("OP", "BWT", "matrix", "seconds", "cpu_seconds")}}
                    done[key] = rec
                    f.write(json.dumps(rec) + "\n")
                    n += 1
    return n


def _mean(values):
    vals = [v for v in values if v is not None]     # (None: a run recovered without its CPU time)
    return round(sum(vals) / len(vals), 1) if vals else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    ap.add_argument("--factors", nargs="+", default=None, metavar="NAME", help="subset of the factors (names as printed)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, 1 torch thread each (default 2)")
    ap.add_argument("--ref-seeds", type=int, default=None,
                    help=f"seeds of {' and '.join(REFERENCES)} (default: --seeds)")
    ap.add_argument("--no-run", action="store_true",
                    help="run nothing: summarise the runs already in OUT/demo_factor_runs.jsonl (a factor "
                         "on the seeds it has)")
    ap.add_argument("--reuse-demo", default=None, metavar="DIR",
                    help="take the baseline and reference runs from `seekr demo --out DIR` (same settings)")
    a = ap.parse_args(argv)
    out = common.out_dir(a)
    s = demo.QUICK if a.quick else demo.FULL
    names = a.factors or (QUICK_FACTORS if a.quick else list(FACTORS))
    for n in names:
        if n not in FACTORS:
            raise SystemExit(f"--factors: unknown factor {n!r}; known: {list(FACTORS)}")
    seeds = list(range(1 if a.quick and a.seeds == 3 else a.seeds))
    ref_seeds = list(range(max(len(seeds), a.ref_seeds or 0)))

    def seeds_of(n):
        return ref_seeds if n in REFERENCES else seeds
    # the runs' data, checkpoints and memories: scratch, removed at the end
    root = tempfile.mkdtemp(prefix="demo-factors-")
    for seed in ref_seeds:
        demo.write_stream(demo.make_stream(s["n_train"], s["n_test"], s["length"], s["tasks"], seed=seed),
                          os.path.join(root, "data", f"seed-{seed}"))
    log_path = os.path.join(out, "demo_factor_runs.jsonl")
    skey = settings_key(s)
    done = load_done(log_path, skey)
    if a.reuse_demo:
        print(f"{reuse_demo(a.reuse_demo, s, a.quick, ref_seeds, names, skey, done, log_path)} runs taken from "
              f"{a.reuse_demo}", flush=True)
    # seed by seed: an interrupted study has every factor on its first seeds
    todo = {} if a.no_run else {(n, seed): factor_config(n, seed, s, root) for seed in ref_seeds for n in names
                                if seed in seeds_of(n) and (n, seed) not in done}
    total = sum(len(seeds_of(n)) for n in names)
    print(f"{len(names)} factors x {len(seeds)} seeds ({', '.join(r for r in REFERENCES if r in names) or 'no reference'}"
          f" on {len(ref_seeds)}): {len(todo)} runs to do, {total - len(todo)} reused from {log_path}; "
          f"{common.machine()}", flush=True)

    def record(key, r):
        n, seed = key
        rec = {"factor": n, "seed": seed, "settings": skey, **{k: r[k] for k in ("OP", "BWT", "matrix", "seconds",
                                                                                    "cpu_seconds")}}
        done[key] = rec
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"seed {seed} {n:<48} OP {100 * r['OP']:5.1f}%  BWT {100 * r['BWT']:+6.1f}%  "
              f"({r['seconds']:.0f} s, {r['cpu_seconds']:.0f} s CPU)", flush=True)

    t0 = time.time()
    try:
        demo.run_configs(todo, jobs=a.jobs, threads=1, on_result=record)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base, ref = "baseline (seekr-1%)", "replay-10% (reference)"
    rows = []
    print(f"\n{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
          f"{f' ({len(ref_seeds)} for the baseline and replay-10%)' if ref_seeds != seeds else ''}; "
          f"{demo.format_versions(demo.versions())}; {time.time() - t0:.0f} s")
    print("| factor (one change to the demo's seekr-1% run) | seeds | OP, mean [min, max] | BWT, mean [min, max] "
          "| OP - baseline, paired mean | OP > baseline | OP > replay-10% |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in names:
        own = [seed for seed in seeds_of(n) if (n, seed) in done]     # (fewer only with --no-run)
        if not own:
            print(f"| {n} | 0 | not run | | | | |")
            continue
        op = demo.spread(done[(n, seed)]["OP"] for seed in own)
        bwt = demo.spread(done[(n, seed)]["BWT"] for seed in own)
        cmp = {}
        for c in (base, ref):
            common_seeds = [seed for seed in own if c in names and c != n and (c, seed) in done]
            per = {seed: {n: done[(n, seed)], c: done[(c, seed)]} for seed in common_seeds}
            cmp[c] = f"{demo.seed_wins(per, n, c)}/{len(common_seeds)}" if common_seeds else ""
            if c == base:
                d_op = (sum(per[x][n]["OP"] - per[x][c]["OP"] for x in common_seeds) / len(common_seeds)
                        if common_seeds else None)
        d_txt = "" if d_op is None else f"{100 * d_op:+.1f}"
        print(f"| {n} | {len(own)} | {demo._pct(op, False)} | {demo._pct(bwt, True)} | {d_txt} | {cmp[base]} "
              f"| {cmp[ref]} |")
        rows.append({"factor": n, "seeds": len(own), "OP_mean": op["mean"], "OP_min": op["min"], "OP_max": op["max"],
                     "BWT_mean": bwt["mean"], "BWT_min": bwt["min"], "BWT_max": bwt["max"],
                     "OP_minus_baseline_paired": d_op, "OP_wins_vs_baseline": cmp[base],
                     "OP_wins_vs_replay10": cmp[ref],
                     "cpu_seconds_mean": _mean(done[(n, seed)]["cpu_seconds"] for seed in own)})
    common.write_csv(os.path.join(out, "demo_factors.csv"), rows, say=False)
    print(f"\nwritten: {os.path.join(out, 'demo_factors.csv')}, per run: {log_path}")


if __name__ == "__main__":
    main()
