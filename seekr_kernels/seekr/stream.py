"""The replay stream: when a task replays, which replay batches, and where a resumed task
stands.

:class:`ReplaySchedule` decides before which train steps a replay batch runs and draws the
batches (global key lists) from the memory; :func:`interleave` is the one interleaver of
train and replay (micro-)steps that both loops consume — the package's own trainer and the
Hugging Face integration's replay dataloader — so they replay the same batches at the same
steps, and a resumed task regenerates the same sequence and skips what its checkpoint did.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence


class ReplaySchedule:
    """When to replay within a task, and which replay batches (global key lists).

    Replay runs before train step ``step`` when ``(step + 1) % cycle == 0``; the default
    cycle is train batches per epoch // replay batches per pass over the memory, and when
    replay batches outnumber train batches ``outnumbered`` decides: ``every_step`` (cycle
    1) or ``skip`` (cycle 0: no replay, as published). ``per_epoch`` replay batches run per
    epoch. ``order="reshuffle"``: every pass over the memory in a fresh seeded order, the
    queue continuing across epochs; ``"fixed"``: one seeded order, restarted at every
    epoch (:meth:`start_epoch`) as the published loader does. A trailing batch smaller
    than ``min_batch`` (world size x micro-steps: every process and micro-step needs a
    sample) is dropped.
    """

    def __init__(self, keys: Sequence, batch_size: int, n_train_batches: int, *, cycle: int = 0,
                 min_batch: int = 1, order: str = "reshuffle", outnumbered: str = "every_step", seed: int = 0):
        self.keys = list(keys)
        self.batch_size = int(batch_size)
        self.min_batch = int(min_batch)
        self.order = order
        self._rng = random.Random(seed)
        self.cycle, self.per_epoch = 0, 0
        if self.keys:
            n_rb = len(self._pass())
            if n_rb:
                if cycle:
                    self.cycle = cycle
                elif n_train_batches >= n_rb or outnumbered == "every_step":
                    self.cycle = max(1, n_train_batches // n_rb)
                self.per_epoch = n_train_batches // self.cycle if self.cycle else 0
        self._rng.seed(seed)
        self._fixed = self._pass() if order == "fixed" and self.keys else None
        self._queue: list = []

    def _pass(self):
        order = self.keys[:]
        self._rng.shuffle(order)
        bl = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return bl[:-1] if bl and len(bl[-1]) < self.min_batch else bl

    def is_replay_step(self, step: int) -> bool:
        """Whether a replay batch runs before train step ``step`` (0-based, per epoch)."""
        return bool(self.cycle) and (step + 1) % self.cycle == 0

    def start_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (the fixed order restarts there)."""
        if self._fixed is not None:
            self._queue = list(self._fixed)

    def next_batch(self) -> list:
        """The next replay batch's global keys."""
        if not self._queue:
            self._queue = list(self._fixed) if self._fixed is not None else self._pass()
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        """Where the schedule stands (its RNG and the batches left in the current pass),
        as JSON-ready values, for a checkpoint taken in the middle of a task."""
        v, st, gauss = self._rng.getstate()
        return {"cycle": self.cycle, "per_epoch": self.per_epoch, "rng": [v, list(st), gauss],
                "queue": [[list(k) for k in b] for b in self._queue]}

    def load_state_dict(self, sd: Mapping) -> "ReplaySchedule":
        """Restore :meth:`state_dict` output (of a schedule built the same way)."""
        if (sd.get("cycle"), sd.get("per_epoch")) != (self.cycle, self.per_epoch):
            raise ValueError(f"replay schedule: saved with cycle {sd.get('cycle')} x {sd.get('per_epoch')} per "
                             f"epoch, this one has {self.cycle} x {self.per_epoch} (another memory or batch size?)")
        v, st, gauss = sd["rng"]
        self._rng.setstate((v, tuple(st), gauss))
        self._queue = [[tuple(k) for k in b] for b in sd["queue"]]
        return self
