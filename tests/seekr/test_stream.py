"""The replay stream is one interleaver for both loops: the package's trainer and the
Hugging Face integration's replay dataloader replay the same batches at the same steps,
and resume to the same position."""
from types import SimpleNamespace

import pytest

from seekr_kernels.integrations.hf import REPLAY_KEY, _ReplayLoader
from seekr_kernels.seekr.stream import ReplaySchedule, ReplayStream, replay_batch_size, replay_count


class _Recipe:
    """What the HF replay loader asks of a recipe, with a real ReplayStream."""

    def __init__(self, keys, bs, order, cycle=0):
        self.keys, self.bs, self.order, self.cycle = keys, bs, order, cycle
        self.replays_in_accumulation = False
        self.dist = SimpleNamespace(rank=0, world_size=1)

    def replay_stream(self, n):
        return ReplayStream(lambda: ReplaySchedule(self.keys, self.bs, n, cycle=self.cycle, order=self.order,
                                                   seed=11))

    def micro_batches(self, keys):
        return [list(range(len(keys)))]

    def batch(self, keys, global_keys=None):
        return {"input_ids": tuple(keys), "attention_mask": None}


def _hf_stream(recipe, items, epoch, skip=0, accum=1):
    trainer = SimpleNamespace(recipe=recipe, args=SimpleNamespace(gradient_accumulation_steps=accum))
    loader = _ReplayLoader(trainer, items)
    loader.set_epoch(epoch)
    if skip:
        loader.skip_first(skip)
    out = []
    for b in loader:
        out.append(("replay", b[REPLAY_KEY].batch["input_ids"]) if REPLAY_KEY in b else ("train", b))
    return out


def _trainer_stream(recipe, items, epochs):
    """The package trainer's events (run.trainer: loop.replay.events over its units)."""
    stream = recipe.replay_stream(len(items))
    out = []
    for kind, e, _, x in stream.events(epochs, lambda e: list(items)):
        out.append((e, (kind, tuple(x)) if kind == "replay" else (kind, x)))
    return out


@pytest.mark.parametrize("order", ["reshuffle", "fixed"])
@pytest.mark.parametrize("n_keys,cycle", [(5, 0), (12, 0), (7, 2), (30, 0)])
def test_both_loops_replay_the_same_batches_at_the_same_steps(order, n_keys, cycle):
    keys = [(0, j) for j in range(n_keys)]
    items = [f"b{i}" for i in range(9)]
    rec = _Recipe(keys, 3, order, cycle)
    own = _trainer_stream(rec, items, epochs=3)
    hf = []
    for e in range(3):
        hf += [(e, ev) for ev in _hf_stream(rec, items, e)]
    assert own == hf
    assert any(k == "replay" for _, (k, _) in own)


@pytest.mark.parametrize("order", ["reshuffle", "fixed"])
def test_both_loops_resume_to_the_same_position(order):
    """The trainer regenerates the task's events and skips the consumed ones; the HF
    Trainer starts a fresh loader at the checkpoint's epoch and skips micro-batches. Every
    split point of every epoch gives the uninterrupted remainder."""
    keys = [(t, j) for t in range(2) for j in range(5)]
    items = [f"b{i}" for i in range(8)]
    rec = _Recipe(keys, 4, order)
    own = _trainer_stream(rec, items, epochs=3)
    for e in range(3):
        epoch_events = [ev for ee, ev in own if ee == e]
        for done in range(len(epoch_events)):
            resumed = _hf_stream(rec, items, e, skip=done)
            assert resumed == epoch_events[done:], (e, done)


def test_a_unit_is_taken_only_after_its_replay():
    """The train loader is advanced only when the train unit is due, so a sampler that
    draws from the global RNG draws at the same moment with or without replay."""
    taken = []

    def units():
        for i in range(4):
            taken.append(i)
            yield i
    stream = ReplayStream(lambda: ReplaySchedule([(0, 0), (0, 1)], 1, 4, cycle=1, seed=0))
    it = stream.epoch(0, units())
    assert next(it)[0] == "replay" and taken == []
    assert next(it) == ("train", 0, 0) and taken == [0]


def test_replay_batch_rule_and_count():
    cfg = SimpleNamespace(replay=SimpleNamespace(batch_size=None, in_accumulation=False), batch_size=16,
                          grad_accum=4)
    assert replay_batch_size(cfg, 2) == (16, 8)
    cfg.replay.in_accumulation = True
    assert replay_batch_size(cfg, 2) == (4, 2)
    run = SimpleNamespace(replay=SimpleNamespace(batch_size=6, in_accumulation=False),
                          train=SimpleNamespace(batch_size=16, grad_accum=2))
    assert replay_batch_size(run, 1) == (6, 2)
    assert [replay_count(n, r) for n, r in ((100, 0.01), (50, 0.01), (10, 3.0), (2, 5.0))] == [1, 1, 3, 2]
