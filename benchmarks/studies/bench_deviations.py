"""Effect of each deviation from the published SEEKR code, measured on the demo stream.

    python -m benchmarks.studies.bench_deviations --stats            # rows 1-5: the statistics
    python -m benchmarks.studies.bench_deviations --runs --seeds 0 1  # rows 5-8: OP/BWT of whole runs
    python -m benchmarks.studies.bench_deviations --stats --runs --out DIR
    python -m benchmarks.studies.bench_deviations --carry            # what DeepSpeed carries across tasks

``--stats`` measures the attention-log row on synthetic heads of growing sharpness, then
trains SEEKR (package recipe) on the demo's four rules with inputs of varying length
(padded to a multiple of 8, as published) and, at the end
of every task, also computes each statistic the published way (same model, same replay
samples, same pre-task weights): the attention KL with ``log(p + 1e-8)`` against the
exact one (loss and gradient norm on every replay batch, after the last task),
forgettability normalised per sample vs over the padded replay set, sensitivity over the
real tokens vs the padded map, and query rows drawn with replacement vs all rows (query
budget 100 > every demo sample's length) — and whether the head selection changes.

``--runs`` trains the whole stream once per configuration: the demo's settings (package
recipe; the demo clips gradients at 1.0), each run-level row switched to the published
choice alone, and ``recipe: official`` (all rows, at the demo's batch size), and prints
OP/BWT.

The numbers printed also go to ``deviations.json`` in ``--out DIR`` (default
``./bench-out/``; the committed results are replaced only with ``--out
benchmarks/results``). ``--quick``: the demo's quick settings (3 tasks, a 2-layer model), a
smoke run whose numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
import warnings

import torch

from benchmarks import common
from seekr_kernels.run.config import from_dict, set_dotted
from seekr_kernels.run.data import Example
from seekr_kernels.run.demo import FULL, LETTERS, QUICK, RULES, demo_config, make_stream, write_stream

# The demo stream at a size a busy 2-core machine trains in a few minutes per run.
SETTINGS = dict(FULL, n_train=600, n_test=100, epochs=3, first_epochs=5)


def var_stream(n_train, n_test, tasks, seed, lengths=range(3, 10)):
    """The demo's rules on inputs of varying length (TRACE samples vary in length too; the
    demo's all have one length, where padding-related definitions coincide)."""
    rng = random.Random(seed)
    xs = ["".join(rng.choice(LETTERS) for _ in range(rng.choice(list(lengths)))) for _ in range(n_train + n_test)]
    return {name: {"train": [Example(f"{name}:{x}=", RULES[name](x)) for x in xs[:n_train]],
                   "test": [Example(f"{name}:{x}=", RULES[name](x)) for x in xs[n_train:]]} for name in tasks}


def sharp_heads(scales=(1, 4, 16, 64), seed=0):
    """Attention KL with log(p + 1e-8) vs exact on heads of growing sharpness: random q, k
    whose scores are multiplied by ``scale``; the teacher is the same head before a small
    drift of q (a student that has moved away from its teacher)."""
    import seekr_kernels as sk
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = 4, 8, 64, 32
    out = []
    for s in scales:
        k = torch.randn(B, H, L, D, generator=g)
        q0 = torch.randn(B, H, L, D, generator=g) * s
        q = (q0 + 0.3 * s * torch.randn(B, H, L, D, generator=g)).requires_grad_()
        heads = torch.arange(H)
        teacher = sk.attention_probs(q0, k, heads, None, None, backend="torch")
        vals = []
        for eps in (0.0, 1e-8):
            loss = sk.attention_kl(q, k, teacher, heads, None, None, backend="torch", log_eps=eps)
            (gq,) = torch.autograd.grad(loss, (q,))
            vals.append((float(loss), float(gq.norm())))
        (l0, g0), (l1, g1) = vals
        out.append((s, l0, 1 - l1 / l0, 1 - g1 / g0))
    return out


def rel(a, b):
    """max and median |a - b| / |b| over entries where b > 0."""
    a, b = a.double().flatten(), b.double().flatten()
    m = b.abs() > 0
    r = ((a[m] - b[m]).abs() / b[m].abs())
    return float(r.max()), float(r.median())


def config(method, ratio, out, data, seed, s, **over):
    d = demo_config(method, ratio, out, data, s, seed)
    d["log"] = {"progress": False}
    for k, v in over.items():
        set_dotted(d, k, v)
    return d


# ============================================================================ statistics

def stats(seed, tmp, s):
    from seekr_kernels.seekr.recipe import SeekrRecipe
    from seekr_kernels.seekr.memory import ReplayMemory
    from seekr_kernels.seekr.selection import select_heads
    from seekr_kernels.run.trainer import ContinualTrainer
    data = os.path.join(tmp, "data")
    write_stream(var_stream(s["n_train"], s["n_test"], s["tasks"], seed), data)
    cfg = from_dict(config("seekr", 0.01, os.path.join(tmp, "stats"), data, seed, s,
                           **{"distill.query_budget": 100, "distill.backend": "torch",
                              "train.pad_to_multiple_of": 8}))
    tr = ContinualTrainer(cfg, quiet=True)
    rc: SeekrRecipe = tr.recipe
    d = rc.cfg.distill
    rows = {"forget": [], "sens": [], "queries": [], "select": [], "rows": [], "rows_select": []}
    imp_pkg = torch.zeros(cfg.model.arch["num_hidden_layers"], cfg.model.arch["num_attention_heads"])
    imp_off = imp_pkg.clone()
    imp_zero = imp_pkg.clone()
    orig_end = rc.end_task

    def end_task(model):
        st = rc.current
        d.forgettability_norm = "official"
        f_off = rc.forgettability(model, st.samples, st.before)
        d.forgettability_norm = "sample"
        f_pkg = rc.forgettability(model, st.samples, st.before)
        d.sensitivity_padding = "official"
        d.padded_rows = "official"
        s_off = rc.sensitivity(model, st.samples)
        d.padded_rows = "zero"            # the padded map with SDPA's zero padding rows
        s_zero = rc.sensitivity(model, st.samples)
        d.sensitivity_padding = "real"
        s_pkg = rc.sensitivity(model, st.samples)
        # query rows when n < Q: the published draw (with replacement, sorted) vs all rows
        kept = [s.queries for s in st.samples]
        qs = ReplayMemory.choose_queries([s.length for s in st.samples], d.query_budget, 11, mode="official")
        for s, q in zip(st.samples, qs):
            s.queries = q
        f_dup = rc.forgettability(model, st.samples, st.before)
        for s, q in zip(st.samples, kept):
            s.queries = q
        rows["forget"].append(rel(f_off, f_pkg))
        rows["sens"].append(rel(s_off, s_pkg))
        rows["queries"].append(rel(f_dup, f_pkg))
        rows["rows"].append(rel(s_zero, s_off))
        imp_pkg.add_(s_pkg * f_pkg)
        imp_off.add_(s_off * f_off)
        imp_zero.add_(s_zero * f_off)
        lb, hb = rc.budgets
        a = {l: h.tolist() for l, h in select_heads(imp_pkg, lb, hb).items()}
        b = {l: h.tolist() for l, h in select_heads(imp_off, lb, hb).items()}
        z = {l: h.tolist() for l, h in select_heads(imp_zero, lb, hb).items()}
        rows["select"].append(a != b)
        rows["rows_select"].append(z != b)
        return orig_end(model)

    rc.end_task = end_task
    res = tr.run()
    # attention log: every replay batch of the final memory, exact vs log(p + 1e-8)
    from seekr_kernels.llama import distill_attention
    model = tr.base.train()
    keys = rc.memory.keys()
    att = []
    for i in range(0, len(keys), 4):
        b = rc.batch(keys[i:i + 4])
        if not b["distill_layers"]:
            continue
        heads, teacher, q = rc._attention_targets(b, b["distill_layers"], torch.device("cpu"))
        vals = []
        for eps in (0.0, 1e-8):
            with distill_attention(model, heads, q, teacher, b["attention_mask"], backend="torch", log_eps=eps) as dc:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                      use_cache=False)
            loss = dc.loss()
            g = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
            gn = torch.sqrt(sum((x.double() ** 2).sum() for x in g if x is not None))
            vals.append((float(loss), float(gn)))
        (l0, g0), (l1, g1) = vals
        if l0 > 1e-4:       # (a batch of the last task is its own teacher: KL ~ 0)
            att.append((1 - l1 / l0, 1 - g1 / g0, l0))
    return rows, att, res


def print_stats(rows, att, sharp, tasks):
    print("\n| sharpness x | attention KL | log(p + 1e-8): KL lower by | gradient norm smaller by |")
    print("| --- | --- | --- | --- |")
    for s, l0, dl, dg in sharp:
        print(f"| {s} | {l0:.3f} | {100 * dl:.2f}% | {100 * dg:.2f}% |")
    print(f"\n| row | measured on the demo rules, inputs of 3-9 letters ({tasks} tasks, seekr, package recipe) |")
    print("| --- | --- |")
    if att:
        worst = max(att, key=lambda x: x[0])
        print(f"| attention log | log(p + 1e-8): attention KL {100 * worst[0]:.2f}% lower (largest over "
              f"{len(att)} replay batches; median {100 * sorted(a[0] for a in att)[len(att) // 2]:.2f}%), "
              f"gradient norm {100 * max(a[1] for a in att):.2f}% smaller (largest) |")
    fm = max(r[0] for r in rows["forget"])
    fmed = sorted(r[1] for r in rows["forget"])[len(rows["forget"]) // 2]
    print(f"| forgettability norm | per head up to {100 * fm:.0f}% apart (median {100 * fmed:.0f}%) |")
    sm = max(r[0] for r in rows["sens"])
    smed = sorted(r[1] for r in rows["sens"])[len(rows["sens"]) // 2]
    print(f"| sensitivity padding | per head (layer-normalised) up to {100 * sm:.0f}% apart (median "
          f"{100 * smed:.0f}%) |")
    rm = max(r[0] for r in rows["rows"])
    rmed = sorted(r[1] for r in rows["rows"])[len(rows["rows"]) // 2]
    print(f"| padded rows | padded sensitivity with SDPA's zero padding rows vs the published (4.31 eager) "
          f"ones: per head up to {100 * rm:.0f}% apart (median {100 * rmed:.0f}%); other heads selected after "
          f"{sum(rows['rows_select'])} of {len(rows['rows_select'])} tasks |")
    qm = max(r[0] for r in rows["queries"])
    qmed = sorted(r[1] for r in rows["queries"])[len(rows["queries"]) // 2]
    print(f"| query rows n < Q | forgettability per head up to {100 * qm:.0f}% apart (median {100 * qmed:.0f}%) |")
    print(f"| head selection | official statistics select other heads after {sum(rows['select'])} of "
          f"{len(rows['select'])} tasks |")


# ============================================================================ runs

RUNS = {
    "demo settings (package recipe)": {},
    "replay.subset: first": {"replay.subset": "first"},
    "replay.order: fixed + outnumbered: skip": {"replay.order": "fixed", "replay.outnumbered": "skip"},
    "train.grad_accum: 4": {"train.grad_accum": 4},
    "train.grad_accum: 4 + replay.in_accumulation": {"train.grad_accum": 4, "replay.in_accumulation": True},
    "train.max_grad_norm: 0 (package default)": {"train.max_grad_norm": 0.0},
    "train.batch_size: 128, grad_accum: 8": {"train.batch_size": 128, "train.grad_accum": 8, "replay.batch_size": 8},
    "recipe: official (batch 32, accum 4)": "official",
    "recipe: official, train.batching: global": ("official", {"train.batching": "global"}),
}


def official_config(run_dir, data, seed, s, **extra):
    """``recipe: official`` on the demo: the published recipe; the demo's model-size choices
    (lr, head and layer budgets, sequence lengths) stay, and its batch of 32 (batch 128
    leaves 600 samples a handful of steps) with the published accumulation structure
    scaled down (accumulation 4)."""
    d = config("seekr", 0.01, run_dir, data, seed, s)
    d["recipe"] = "official"
    for sec in ("replay", "distill"):
        d[sec] = {k: v for k, v in d[sec].items() if k in ("layer_budget", "head_budget", "ratio")}
    d["train"] = {k: d["train"][k] for k in ("lr", "max_prompt_len", "max_answer_len")}
    d["train"].update(batch_size=s["batch_size"], grad_accum=4)
    for k, v in extra.items():
        set_dotted(d, k, v)
    return d


def carry(seed, tmp, s):
    """What the published DeepSpeed engine carries into a task's first optimiser step and
    the package does not (``recipe: official`` on the demo): the micro-steps of the task's
    last, incomplete accumulation window, and the gradients of the sensitivity pass (every
    new replay sample's mean CE, backpropagated through the engine: / grad_accum, never
    stepped or zeroed). Per task end: those micro-steps, and the sensitivity gradient's
    norm against the median norm of the task's update gradients (before clipping at 1)."""
    from seekr_kernels.run.steps import TrainSteps
    from seekr_kernels.run.trainer import ContinualTrainer
    from seekr_kernels.seekr.batching import collate, encoded
    from seekr_kernels.seekr.importance import sensitivity_loss
    data = os.path.join(tmp, f"carry-data-{seed}")
    write_stream(make_stream(s["n_train"], s["n_test"], s["length"], s["tasks"], seed=seed), data)
    tr = ContinualTrainer(from_dict(official_config(os.path.join(tmp, f"carry-{seed}"), data, seed, s)), quiet=True)
    A = tr.cfg.train.grad_accum
    norms, micro, rows = [], [0], []

    def grad_norm(model):
        return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))

    orig_step, orig_t, orig_r = TrainSteps.optimizer_step, TrainSteps.train_micro, TrainSteps.replay_micro

    def step(self, opt, sched):
        norms.append(grad_norm(self.base))
        return orig_step(self, opt, sched)

    def train_micro(self, *a):
        micro[0] += 1
        return orig_t(self, *a)

    def replay_micro(self, *a):
        micro[0] += 1
        return orig_r(self, *a)

    rc = tr.recipe
    orig_end = rc.end_task

    def end_task(model):
        model.zero_grad(set_to_none=True)
        for smp in rc.current.samples:
            b = collate(encoded([smp]), rc.pad_token_id)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                        use_cache=False)
            (sensitivity_loss(out.logits, b["labels"]) / A).backward()
        g = grad_norm(model)
        model.zero_grad(set_to_none=True)
        rows.append((micro[0] % A, len(rc.current.samples), g / sorted(norms)[len(norms) // 2]))
        micro[0] = 0
        norms.clear()
        return orig_end(model)

    rc.end_task = end_task
    TrainSteps.optimizer_step, TrainSteps.train_micro, TrainSteps.replay_micro = step, train_micro, replay_micro
    try:
        tr.run()
    finally:
        TrainSteps.optimizer_step, TrainSteps.train_micro, TrainSteps.replay_micro = orig_step, orig_t, orig_r
    print(f"\n| task end | micro-steps in the last window (of {A}) | replay samples | sensitivity gradient / "
          "median update gradient |")
    print("| --- | --- | --- | --- |")
    for i, (k, n, r) in enumerate(rows):
        print(f"| {i + 1} | {k} | {n} | {r:.2f} |")
    return rows


def runs(seeds, tmp, s, only=None):
    from seekr_kernels.run.trainer import ContinualTrainer
    out = {}
    for seed in seeds:
        data = os.path.join(tmp, f"data-{seed}")
        write_stream(make_stream(s["n_train"], s["n_test"], s["length"], s["tasks"], seed=seed), data)
        for name, over in RUNS.items():
            if only and not any(o in name for o in only):
                continue
            run_dir = os.path.join(tmp, "run")
            shutil.rmtree(run_dir, ignore_errors=True)
            extra = {}
            if isinstance(over, tuple):
                over, extra = over
            if over == "official":
                d = official_config(run_dir, data, seed, s, **extra)
            else:
                d = config("seekr", 0.01, run_dir, data, seed, s, **over)
            t0 = time.time()
            r = ContinualTrainer(from_dict(d), quiet=True).run()
            out.setdefault(name, []).append((r["OP"], r["BWT"]))
            print(f"seed {seed} {name:<36} OP {100 * r['OP']:5.1f}%  BWT {100 * r['BWT']:+6.1f}%  "
                  f"({time.time() - t0:.0f} s)", flush=True)
    print("\n| configuration | OP | BWT |")
    print("| --- | --- | --- |")
    for name, v in out.items():
        op = sum(x[0] for x in v) / len(v)
        bwt = sum(x[1] for x in v) / len(v)
        print(f"| {name} | {100 * op:.1f}% | {100 * bwt:+.1f}% |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stats", action="store_true")
    ap.add_argument("--runs", action="store_true")
    ap.add_argument("--carry", action="store_true", help="what DeepSpeed carries into a task's first step")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", help="--runs: only the configurations whose name contains one of these")
    common.add_common_args(ap)
    a = ap.parse_args()
    out = common.out_dir(a)
    s = QUICK if a.quick else SETTINGS
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    result = {"settings": {k: v for k, v in s.items() if k != "tasks"}, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        if a.stats:
            sharp = sharp_heads()
            rows, att = {}, []
            for seed in a.seeds:        # every seed's task ends together
                r, at, _ = stats(seed, os.path.join(tmp, f"stats-{seed}"), s)
                for k, v in r.items():
                    rows.setdefault(k, []).extend(v)
                att += at
            print_stats(rows, att, sharp, len(s["tasks"]))
            result["stats"] = {"rows": rows, "attention": att, "sharp_heads": sharp}
        if a.runs:
            result["runs"] = runs(a.seeds, tmp, s, a.only)
        if a.carry:
            result["carry"] = {seed: carry(seed, tmp, s) for seed in a.seeds}
    path = os.path.join(out, "deviations.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
