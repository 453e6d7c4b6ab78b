"""The replay stream: when a task replays, which replay batches, and where a resumed task
stands.

:class:`ReplaySchedule` decides before which train steps a replay batch runs and draws the
batches (global key lists) from the memory; :func:`interleave` is the one interleaver of
train and replay (micro-)steps that both loops consume — the package's own trainer and the
Hugging Face integration's replay dataloader — so they replay the same batches at the same
steps, and a resumed task regenerates the same sequence and skips what its checkpoint did.
"""
from __future__ import annotations

import itertools
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
    sample) is dropped. ``per_device`` > 0 (the number of processes) cuts every pass the
    published way instead: :func:`per_device_batches` with ``batch_size / per_device``
    samples per process, the last batch partial, nothing dropped.
    """

    def __init__(self, keys: Sequence, batch_size: int, n_train_batches: int, *, cycle: int = 0,
                 min_batch: int = 1, order: str = "reshuffle", outnumbered: str = "every_step", seed: int = 0,
                 per_device: int = 0):
        self.keys = list(keys)
        self.n_train_batches = int(n_train_batches)
        self.batch_size = int(batch_size)
        self.min_batch = int(min_batch)
        self.per_device = int(per_device)
        if self.per_device and self.batch_size % self.per_device:
            raise ValueError(f"batch_size: {self.batch_size} is not a multiple of the {self.per_device} processes "
                             "of per-device batching")
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
        if self.per_device:
            return per_device_batches(order, self.per_device, self.batch_size // self.per_device)
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


def per_device_batches(order: Sequence, world: int, per_device: int) -> list:
    """The published per-device batching of one epoch's ``order``, as global micro-batches.

    A ``DistributedSampler`` without ``drop_last`` pads the order with its own first items
    to a multiple of ``world`` and gives process r every ``world``-th item from r; each
    process's ``DataLoader`` cuts batches of ``per_device``, the last one partial. Item k
    of the result is every process's k-th batch, process by process, so a contiguous
    :func:`~seekr_kernels.seekr.batching.shard` of it gives each process its own (all
    processes hold the same number of items). ``ceil(ceil(n / world) / per_device)``
    batches; none is dropped and none is empty.
    """
    order = list(order)
    if not order:
        return []
    per = -(-len(order) // world)
    padded = (order * -(-per * world // len(order)))[:per * world]
    ranks = [padded[r::world] for r in range(world)]
    return [[x for r in ranks for x in r[i:i + per_device]] for i in range(0, per, per_device)]


def replay_batch_size(cfg, world_size: int = 1):
    """The replay-batch rule, one place for the recipe, the loops and the preflight checks.

    Returns ``(batch_size, need)``: a replay batch holds ``replay.batch_size`` samples
    (default: the train batch, or one micro-batch of it when replay runs inside the
    accumulation window), and needs at least ``need`` samples — one per process and per
    accumulation micro-step it is spread over. ``cfg`` is a :class:`RecipeConfig` or a
    run config (anything with ``replay``, and ``batch_size``/``grad_accum`` either on it
    or on its ``train`` section).
    """
    rc = cfg.replay
    src = getattr(cfg, "train", cfg)
    bs, acc = int(src.batch_size), int(src.grad_accum)
    if replays_in_accumulation(cfg):
        return rc.batch_size or bs // acc, world_size
    return rc.batch_size or bs, world_size * acc


def replays_in_accumulation(cfg) -> bool:
    """A replay batch is one micro-step of an accumulation window (``replay.in_accumulation``
    with ``grad_accum`` > 1, the published DeepSpeed behaviour) rather than an optimiser
    step of its own."""
    src = getattr(cfg, "train", cfg)
    return bool(cfg.replay.in_accumulation) and int(src.grad_accum) > 1


def replay_count(n: int, ratio: float) -> int:
    """How many of a task's ``n`` training samples the memory keeps (``replay.ratio``:
    a fraction < 1 of them, ``int(n * ratio)`` as published, or a count >= 1), at least 1
    and at most ``n``."""
    k = int(ratio) if ratio >= 1 else int(n * ratio)
    return max(1, min(n, k))


_END = object()


class ReplayStream:
    """The one interleaver of train and replay (micro-)steps, shared by every loop.

    ``make_schedule()`` builds the task's :class:`ReplaySchedule` (the recipe's
    ``replay_schedule``). :meth:`epoch` yields, for train unit ``step`` of epoch
    ``epoch`` (a global batch, or a group of micro-batches, whatever the loop trains on),
    ``("replay", step, keys)`` when the schedule replays before it, then
    ``("train", step, unit)``. Every epoch draws exactly ``per_epoch`` replay batches, so
    the stream can be positioned at the start of any epoch by drawing those of the epochs
    before it: a loop that restarts at a later epoch (the Hugging Face Trainer's resume)
    and a loop that regenerates the task from its start (the package's trainer) see the
    same replay batches at the same steps.
    """

    def __init__(self, make_schedule):
        self._make = make_schedule
        self.schedule: ReplaySchedule = make_schedule()
        self._next_epoch = 0

    @property
    def per_epoch(self) -> int:
        """Replay batches per epoch."""
        return self.schedule.per_epoch

    def at_epoch(self, epoch: int) -> ReplaySchedule:
        """The schedule positioned at the start of ``epoch`` (a fresh one fast-forwarded
        when the loop does not come from the epoch before)."""
        if epoch != self._next_epoch:
            self.schedule = self._make()
            for _ in range(epoch * self.schedule.per_epoch):
                self.schedule.next_batch()
        self._next_epoch = epoch + 1
        self.schedule.start_epoch(epoch)
        return self.schedule

    def epoch(self, epoch: int, units):
        """The events of one epoch over ``units`` (any iterable of train units). A unit is
        taken from ``units`` only after the replay before it was consumed, so a loader
        whose sampler draws from the global RNG draws at the same moment with or without
        replay in front of it."""
        sched = self.at_epoch(epoch)
        it = iter(units)
        for step in itertools.count():
            if step < sched.n_train_batches and sched.is_replay_step(step):
                yield "replay", step, sched.next_batch()
            unit = next(it, _END)
            if unit is _END:
                return
            yield "train", step, unit

    def events(self, epochs: int, units_of):
        """Every epoch's events in order, as ``(kind, epoch, step, payload)``;
        ``units_of(epoch)`` gives the epoch's train units."""
        for e in range(epochs):
            for kind, step, x in self.epoch(e, units_of(e)):
                yield kind, e, step, x
