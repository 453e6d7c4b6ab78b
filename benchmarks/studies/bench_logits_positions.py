"""``distill.logits_positions``: the logits term at the package's positions (``predict``)
against the published ones (``published``), on the same replay batches of a tiny run.

    python -m benchmarks.studies.bench_logits_positions                 # examples/smoke.yaml, seed 0
    python -m benchmarks.studies.bench_logits_positions --seeds 0 1 2 --config examples/smoke.yaml

Trains the run (its config as written: ``predict``), and at every task's end captures the
teacher's logits a second time at the ``published`` positions (same model, same samples).
Before every replay step it computes the replay loss of that step's batch both ways on the
model as it is (no step taken in between) and records: the logits term and the total loss
(relative difference to ``predict``), the largest difference of any parameter's gradient
as a fraction of the largest gradient entry, and the share of distilled rows that differ
(the two sets of rows of a sample overlap in all but one row each side). Prints the range
over the replay steps, per seed and over all seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import warnings

import torch

from seekr_kernels.run.config import load_config
from seekr_kernels.seekr import passes
from seekr_kernels.seekr.losses import distilled_rows
from seekr_kernels.seekr.memory import ReplayMemory, ReplayTask
from seekr_kernels.seekr.recipe import SeekrRecipe

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def positions(recipe, pos, memory=None):
    """The recipe as if run under ``distill.logits_positions: pos`` (and ``memory``)."""
    d = recipe.cfg.distill
    old, old_mem = d.logits_positions, recipe.memory
    d.logits_positions = pos
    if memory is not None:
        recipe.memory = memory
    try:
        yield recipe
    finally:
        d.logits_positions, recipe.memory = old, old_mem


def measure(config, seed, out):
    cfg = load_config(config, {"seed": seed, "output_dir": out, "log.progress": False})
    assert cfg.distill.logits_positions == "predict"
    shadow = {}              # task name -> ReplayTask of the published teacher
    rows = []
    capture, replay_loss, batch = SeekrRecipe.capture_teacher, SeekrRecipe.replay_loss, SeekrRecipe.batch
    last = {}

    def capture_both(self, model, samples, heads=None):
        capture(self, model, samples, heads)
        twins = [copy.copy(s) for s in samples]
        with positions(self, "published"):
            passes.capture_teacher(self, model, twins, {})
        shadow[self.current.name] = [t.to_replay() for t in twins]

    def batch_keys(self, keys, *, global_keys=None):
        last["keys"], last["global"] = list(keys), global_keys
        return batch(self, keys, global_keys=global_keys)

    def both_losses(self, model, b, **kw):
        params = [p for p in model.parameters() if p.requires_grad]
        mem = ReplayMemory([ReplayTask(t.name, shadow[t.name], t.heads, t.meta, "published")
                            for t in self.memory.tasks])
        with positions(self, "published", mem):
            bp = batch(self, last["keys"], global_keys=last["global"])
            lp, pp = replay_loss(self, model, bp, **kw)
            gp = torch.autograd.grad(lp, params, allow_unused=True)
        l0, p0 = replay_loss(self, model, b, **kw)
        g0 = torch.autograd.grad(l0, params, allow_unused=True)
        big = max(float(g.abs().max()) for g in g0 if g is not None)
        gd = max(float((a - c).abs().max()) for a, c in zip(gp, g0) if a is not None)
        r0, r1 = distilled_rows(b["labels"], "predict"), distilled_rows(b["labels"], "published")
        rows.append({"logits": abs(float(pp["logits_kl"]) / float(p0["logits_kl"]) - 1),
                     "total": abs(float(lp) / float(l0) - 1), "grad": gd / big,
                     "rows": float((r0 ^ r1).sum()) / float(r0.sum() + r1.sum())})
        return replay_loss(self, model, b, **kw)

    SeekrRecipe.capture_teacher, SeekrRecipe.batch, SeekrRecipe.replay_loss = capture_both, batch_keys, both_losses
    try:
        from seekr_kernels.run.trainer import ContinualTrainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ContinualTrainer(cfg, quiet=True).run()
    finally:
        SeekrRecipe.capture_teacher, SeekrRecipe.batch, SeekrRecipe.replay_loss = capture, batch, replay_loss
    return rows


def span(rows, k):
    v = sorted(r[k] for r in rows)
    return f"{100 * v[0]:.3g}-{100 * v[-1]:.3g}% (median {100 * v[len(v) // 2]:.3g}%)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(HERE, "examples", "smoke.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    every = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(args.config, seed, os.path.join(tmp, "run"))
        every += rows
        print(f"seed {seed}: {len(rows)} replay steps; logits term {span(rows, 'logits')}, total loss "
              f"{span(rows, 'total')}, gradient (of the largest entry) {span(rows, 'grad')}, distilled rows "
              f"that differ {span(rows, 'rows')}")
    if len(args.seeds) > 1:
        print(f"all: logits term {span(every, 'logits')}, total loss {span(every, 'total')}, gradient "
              f"{span(every, 'grad')}, rows {span(every, 'rows')}")


if __name__ == "__main__":
    main()
