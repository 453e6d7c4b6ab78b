"""SEEKR replay memory: per task a seeded subset of the data and its teacher.

Per task the memory keeps (:class:`ReplayTask`):

* the replay samples (:class:`ReplaySample`): real token ids only (no padding) with an
  answer mask (the supervised tokens; labels are derived from it), the query positions
  of the query budget (relative to the sample's first real token; None = all rows), the
  teacher logits of a contiguous range of positions (dense ``[A, V]`` or a
  :class:`~seekr_kernels.TopK` of them) and the teacher attention rows of the task's
  selected heads, ``{layer: [S_l, Q, n]}`` with slot ``s`` = ``heads[layer][s]``;
* the heads selected after that task, ``{layer: sorted LongTensor}``;
* which positions the teacher logits are (``logits_positions``, the
  ``distill.logits_positions`` they were captured under): ``"predict"``, the positions
  that predict the answer tokens, or ``"published"``, the answer tokens' own positions.
  A replay batch takes its samples from tasks of one kind and says which
  (``batch["logits_positions"]``), so the loss never reads one as the other.

Replay batches mix tasks (:meth:`ReplayMemory.batch`): every sample carries its own heads,
so the per-layer heads are ``[B, S]`` with -1 slots and the teachers ``[B, S, Q, L]``.

Alignment when re-padding
-------------------------
Samples are stored unpadded and left-padded per batch: a sample of ``n`` tokens in a batch
of length ``L`` starts at ``p = L - n``. Everything stored relative to the sample shifts
by ``p``: query ``r`` becomes absolute position ``p + r``, teacher column ``j`` becomes
column ``p + j`` (columns ``< p`` are padding, 0), teacher logits of relative position
``t`` land at ``p + t``. (The published code stores query positions relative to the right
end, the same invariant under left padding.) Samples with fewer query rows than the
batch's ``Q`` fill the extra slots with a *padding* position (0, whose key mask is 0):
such rows are inactive, so each sample's rows — and the 'batchmean' attention loss — are
exactly what the sample gives alone. When a sample needing filler slots is also the
longest of the batch it has no padding position, so the batch gets one extra column of
left padding. Empty head slots (-1) have all-zero teacher rows.

Persistence
-----------
A memory on disk is a directory with one ``task-NNN/`` per task — ``data.safetensors``
(flat tensors) and ``manifest.json`` (format version, task name and index, heads, layout,
sha256 and byte size of the data file, and ``manifest_sha256``, the checksum of the
manifest itself, so an edited layout or head list is refused) — plus ``memory.json``, the
index: the task names in order with the sha256 of each task's manifest, under its own
checksum. The index is written last and is the commit point:

* :meth:`ReplayMemory.save` is all-or-nothing: the whole memory (every task directory
  and the index) is built in a temporary sibling, fsynced and swapped in with
  :func:`~seekr_kernels.utils.store.atomic_dir`, so a killed save leaves the previous
  memory or the new one, never old and new tasks mixed.
* :meth:`ReplayMemory.save_task` (the trainer's, one task at a time) writes one task
  directory atomically and then rewrites the index to list tasks ``0..index``; a kill
  between the two is detected by :meth:`load` (the manifest differs from the index's).
* :meth:`ReplayMemory.load` verifies the index, every listed manifest against it, every
  manifest's own checksum and every data file's, and refuses a corrupt, truncated,
  foreign, incomplete (a task of the index missing) or mismatched memory with
  :class:`ReplayMemoryError` naming the path. Task directories the index does not list
  (an interrupted ``save_task``) are not part of the memory. Before reading it removes
  the temporaries of killed saves and renames back a copy a killed swap left aside.
  A directory without an index (older versions) loads only with ``names=``.

Every digest, manifest and checksummed JSON file goes through
:mod:`seekr_kernels.utils.store`; what older versions wrote and this one still reads is
listed in :data:`READS` and read in one place (the end of this module).

:meth:`ReplayMemory.disk_sizes` reports the bytes on disk per task.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..ops.teachers import SampledTeacher, TopK, pack_indices, unpack_indices
from ..utils import store
from ..utils.store import atomic_dir, clean_leftovers
from .batching import IGNORE_INDEX
from .config import LOGITS_POSITIONS
from .selection import batch_heads
from .stream import replay_count

__all__ = ["ReplaySample", "ReplayTask", "ReplayMemory", "ReplayMemoryError", "ReplayDataset"]

FORMAT = 1
#: The versioned reader's table: the formats this build reads and what each holds. Every
#: memory written so far says format 1; older writers left out what later ones added, and
#: each such absence is still read (tests/data/legacy/replay_v1, replay_v2), by the
#: functions at the end of this module only.
READS = {1: {
    "logits positions": "layout.logits_positions (predict / published; published memories keep their starts "
                        "as logits_answer_start, a tensor older readers refuse); a layout without it holds the "
                        "teacher at the 'predict' positions",
    "index": "memory.json (from 3575421 on); without it (61b56de) load() needs names= and save_task() "
             "lists the tasks from their verified manifests",
    "sealed manifests": "manifest_sha256 (from 3575421 on); a manifest without it (61b56de) still has its "
                        "data checksum, and the layout is cross-checked against the data",
    "packed indices": "TopK / sampled indices as logits.indices16 (+ logits.indices_hi); int32 logits.indices "
                      "before (61b56de, 3575421)",
}}
_KIND = "seekr-replay-task"
_DATA = "data.safetensors"
_MANIFEST = "manifest.json"
_INDEX = "memory.json"
_INDEX_KIND = "seekr-replay-memory"


class ReplayMemoryError(ValueError):
    """A replay memory directory or sample that cannot be used; the message says why."""


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# ============================================================================ data model

@dataclass(eq=False)
class ReplaySample:
    """One replay sample (see the module docstring).

    input_ids: ``[n]`` integer token ids, real tokens only.
    answer_mask: ``[n]`` bool, True on supervised (answer) tokens.
    queries: ``[Q]`` sorted relative query positions in ``[0, n)``, or None (all n rows).
    logits: teacher logits ``[A, V]`` (dense), a TopK of kind 'logits' or a SampledTeacher ``[A, k]``, for
        relative positions ``logits_start .. logits_start + A - 1``; or None.
    attention: ``{layer: [S_l, Q, n]}`` teacher rows, slot s = the task's ``heads[layer][s]``.
    """
    input_ids: torch.Tensor
    answer_mask: torch.Tensor
    queries: Optional[torch.Tensor] = None
    logits: object = None
    logits_start: int = 0
    attention: Dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0:
            raise ReplayMemoryError("input_ids: expected a non-empty 1-D tensor")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ReplayMemoryError(f"input_ids: expected an integer dtype, got {ids.dtype}")
        self.input_ids = ids.to("cpu", torch.long)
        n = self.n
        am = torch.as_tensor(self.answer_mask)
        if am.shape != (n,):
            raise ReplayMemoryError(f"answer_mask: expected shape [{n}], got {list(am.shape)}")
        self.answer_mask = am.to("cpu", torch.bool)
        if self.queries is not None:
            q = torch.as_tensor(self.queries)
            if q.dim() != 1 or q.dtype.is_floating_point or q.dtype == torch.bool:
                raise ReplayMemoryError("queries: expected a 1-D integer tensor or None")
            q = q.to("cpu", torch.long)
            if q.numel() == 0 or int(q.min()) < 0 or int(q.max()) >= n:
                raise ReplayMemoryError(f"queries: expected 1+ positions in [0, {n})")
            self.queries = q
        if not _is_int(self.logits_start) or self.logits_start < 0:
            raise ReplayMemoryError(f"logits_start: expected an int >= 0, got {self.logits_start!r}")
        if self.logits is not None:
            lg = self.logits
            if isinstance(lg, TopK):
                if lg.kind not in ("logits", "sampled") or lg.values.dim() != 2:
                    raise ReplayMemoryError("logits: a TopK teacher must be of kind 'logits' or 'sampled' with "
                                            "shape [A, k]")
                A = lg.values.shape[0]
                self.logits = lg.to("cpu")
            elif isinstance(lg, torch.Tensor) and lg.dim() == 2 and lg.dtype.is_floating_point:
                A = lg.shape[0]
                self.logits = lg.detach().cpu()
            else:
                raise ReplayMemoryError("logits: expected a float tensor [A, V], a TopK [A, k] or None")
            if self.logits_start + A > n:
                raise ReplayMemoryError(f"logits: rows {self.logits_start}..{self.logits_start + A - 1} "
                                        f"exceed the sample's {n} positions")
        Q = self.num_queries
        att = {}
        for l, r in dict(self.attention).items():
            if not _is_int(l) or l < 0:
                raise ReplayMemoryError(f"attention: keys must be layer indices, got {l!r}")
            if not isinstance(r, torch.Tensor) or not r.dtype.is_floating_point or r.dim() != 3 \
                    or tuple(r.shape[1:]) != (Q, n):
                raise ReplayMemoryError(f"attention[{l}]: expected a float tensor [S, {Q}, {n}], got "
                                        f"{list(getattr(r, 'shape', []))}")
            att[int(l)] = r.detach().cpu()
        self.attention = att

    @property
    def n(self) -> int:
        return self.input_ids.numel()

    @property
    def num_queries(self) -> int:
        return self.n if self.queries is None else self.queries.numel()

    @property
    def labels(self) -> torch.Tensor:
        return torch.where(self.answer_mask, self.input_ids, torch.full_like(self.input_ids, IGNORE_INDEX))

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in (self.input_ids, self.answer_mask))
        if self.queries is not None:
            n += self.queries.numel() * 8
        if isinstance(self.logits, TopK):
            n += self.logits.nbytes
        elif self.logits is not None:
            n += self.logits.numel() * self.logits.element_size()
        return n + sum(r.numel() * r.element_size() for r in self.attention.values())


@dataclass(eq=False)
class ReplayTask:
    """A task's replay samples, the heads selected after it, JSON-able metadata, and the
    positions its teacher logits are at (``"predict"`` or ``"published"``; module
    docstring)."""
    name: str
    samples: List[ReplaySample]
    heads: Dict[int, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    logits_positions: str = "predict"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ReplayMemoryError(f"name: expected a non-empty str, got {self.name!r}")
        if self.logits_positions not in LOGITS_POSITIONS:
            raise ReplayMemoryError(f"task {self.name!r}: logits_positions must be one of {list(LOGITS_POSITIONS)}, "
                                    f"got {self.logits_positions!r}")
        if not isinstance(self.samples, (list, tuple)) or not self.samples:
            raise ReplayMemoryError(f"task {self.name!r}: samples must be a non-empty list")
        self.samples = list(self.samples)
        heads = {}
        for l, h in dict(self.heads).items():
            h = torch.as_tensor(h)
            if not _is_int(l) or l < 0 or h.dim() != 1 or h.dtype.is_floating_point or h.numel() == 0:
                raise ReplayMemoryError(f"task {self.name!r}: heads must map layer -> non-empty 1-D integer "
                                        f"tensor, got {l!r}: {list(h.shape)}")
            h = h.to("cpu", torch.long)
            if not bool((h[1:] > h[:-1]).all()) or int(h.min()) < 0:
                raise ReplayMemoryError(f"task {self.name!r}: heads[{l}] must be increasing head indices "
                                        f"(select_heads output), got {h.tolist()}")
            heads[int(l)] = h
        self.heads = dict(sorted(heads.items()))
        kinds = set()
        for i, s in enumerate(self.samples):
            if not isinstance(s, ReplaySample):
                raise ReplayMemoryError(f"task {self.name!r}: samples[{i}] is a {type(s).__name__}, not a ReplaySample")
            if s.attention:
                if set(s.attention) != set(self.heads):
                    raise ReplayMemoryError(f"task {self.name!r}: samples[{i}] has attention rows of layers "
                                            f"{sorted(s.attention)}, the task's heads are at {sorted(self.heads)}")
                for l, r in s.attention.items():
                    if r.shape[0] != self.heads[l].numel():
                        raise ReplayMemoryError(f"task {self.name!r}: samples[{i}].attention[{l}] has {r.shape[0]} "
                                                f"rows of heads, heads[{l}] has {self.heads[l].numel()}")
            kinds.add(_logits_kind(s.logits))
        if len(kinds) > 1:
            raise ReplayMemoryError(f"task {self.name!r}: samples mix teacher logits kinds {sorted(map(str, kinds))}")
        json.dumps(self.meta)    # must be JSON-able: it goes into the manifest

    @property
    def has_attention(self) -> bool:
        return bool(self.samples[0].attention)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.samples)


def _logits_kind(lg):
    if lg is None:
        return None
    if isinstance(lg, TopK):
        return ("sampled" if lg.kind == "sampled" else "topk", lg.full_size, lg.k, str(lg.values.dtype))
    return ("dense", lg.shape[1], None, str(lg.dtype))


# ============================================================================ the memory

class ReplayMemory:
    """Replay samples and teachers of every learned task; see the module docstring.

    ::

        mem = ReplayMemory()
        idx = ReplayMemory.sample_indices(len(train), 0.01, seed)         # seeded subset
        qs = ReplayMemory.choose_queries([len(x) for x in ids], 100, seed)  # query budget
        ...capture teachers...
        mem.add_task("task-a", samples, heads)
        b = mem.batch(keys, pad_token_id)      # mixed-task batch, teachers aligned
        mem.save("run/memory"); mem = ReplayMemory.load("run/memory")
    """

    def __init__(self, tasks: Sequence[ReplayTask] = ()):
        self.tasks: List[ReplayTask] = []
        for t in tasks:
            self.add(t)

    # ---------------------------------------------------------------- sampling helpers
    @staticmethod
    def sample_indices(n: int, ratio, seed: int, mode: str = "random") -> List[int]:
        """Sorted indices of a replay subset of ``n`` training samples.

        ``ratio < 1``: ``int(n * ratio)`` samples (the published rule), at least 1;
        ``ratio >= 1``: that many samples (a whole number), at most n. ``mode="random"``
        draws them with a generator seeded by ``seed``; ``mode="first"`` takes the first
        ones, as the published code does (its replay set is ``range(int(n * ratio))``;
        there the count may be 0, here it is at least 1 as well).
        """
        if mode not in ("random", "first"):
            raise ValueError(f"mode: must be 'random' or 'first', got {mode!r}")
        if not _is_int(n) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"ratio: expected a fraction in (0, 1) or a count >= 1, got {ratio!r}")
        if ratio >= 1 and float(ratio) != int(ratio):
            raise ValueError(f"ratio: a count (>= 1) must be a whole number, got {ratio}")
        k = replay_count(n, ratio)
        if mode == "first":
            return list(range(k))
        g = torch.Generator().manual_seed(int(seed))
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    @staticmethod
    def choose_queries(lengths: Sequence[int], budget: Optional[int], seed: int,
                       mode: str = "subset") -> List[Optional[torch.Tensor]]:
        """Seeded query positions per sample, relative to its first real token.

        ``budget`` None/0: None (all rows) for every sample. Otherwise a sorted random
        subset of ``budget`` of the sample's real tokens; for a sample with ``n <= budget``
        tokens ``mode="subset"`` gives None (all n rows) and ``mode="official"`` gives, as
        the published code does, ``budget`` positions drawn *with replacement* and sorted
        (repeated rows weigh more in the loss and in forgettability).
        """
        if budget is not None and (not _is_int(budget) or budget < 0):
            raise ValueError(f"budget: expected an int >= 0 or None, got {budget!r}")
        if mode not in ("subset", "official"):
            raise ValueError(f"mode: must be 'subset' or 'official', got {mode!r}")
        g = torch.Generator().manual_seed(int(seed))
        out = []
        for i, n in enumerate(lengths):
            if not _is_int(n) or n < 1:
                raise ValueError(f"lengths[{i}]: expected a positive int, got {n!r}")
            if not budget or (n <= budget and mode == "subset"):
                out.append(None)
            elif n < budget:
                out.append(torch.sort(torch.randint(n, (budget,), generator=g)).values)
            else:
                out.append(torch.sort(torch.randperm(n, generator=g)[:budget]).values)
        return out

    # ---------------------------------------------------------------- as a Dataset
    def dataset(self) -> "ReplayDataset":
        """A :class:`torch.utils.data.Dataset` view: item ``i`` is the ``i``-th sample's
        ``(task, sample)`` key (see :class:`ReplayDataset`)."""
        return ReplayDataset(self)

    # ---------------------------------------------------------------- content
    def add(self, task: ReplayTask) -> int:
        """Append a task; returns its index."""
        if not isinstance(task, ReplayTask):
            raise TypeError(f"task: expected a ReplayTask, got {type(task).__name__}")
        self.tasks.append(task)
        return len(self.tasks) - 1

    def add_task(self, name: str, samples: Sequence[ReplaySample], heads: Optional[Mapping] = None,
                 meta: Optional[dict] = None, logits_positions: str = "predict") -> int:
        """Append a task built from its parts (see :class:`ReplayTask`); returns its index."""
        return self.add(ReplayTask(name, list(samples), dict(heads or {}), dict(meta or {}), logits_positions))

    def __len__(self) -> int:
        return sum(len(t.samples) for t in self.tasks)

    def keys(self) -> List[Tuple[int, int]]:
        """Every sample as ``(task index, sample index)``."""
        return [(ti, si) for ti, t in enumerate(self.tasks) for si in range(len(t.samples))]

    def sample(self, key) -> ReplaySample:
        ti, si = key
        return self.tasks[ti].samples[si]

    def batches(self, batch_size: int, seed: int, epoch: int = 0, shuffle: bool = True) -> List[list]:
        """Key lists of one pass over the whole memory (tasks mixed), seeded by (seed, epoch)."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        keys = self.keys()
        if shuffle:
            random.Random(f"{seed}:{epoch}").shuffle(keys)
        return [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]

    def nbytes(self) -> List[int]:
        """Bytes held in memory per task."""
        return [t.nbytes() for t in self.tasks]

    # ---------------------------------------------------------------- batching
    def batch(self, keys: Sequence, pad_token_id: int = 0, pad_to_multiple_of: int = 1, *, logits: bool = True,
              attention: bool = True, layers=None, attention_dtype: Optional[torch.dtype] = None) -> dict:
        """A left-padded batch of replay samples with their teachers aligned to it.

        Args:
            keys: ``(task index, sample index)`` pairs, tasks may be mixed.
            pad_token_id, pad_to_multiple_of: padding of the token ids.
            logits: include ``teacher_logits`` (if the samples have them).
            attention: include heads, queries and ``teacher_attention``.
            layers: restrict the attention layers (default: every layer a sample's task has).
            attention_dtype: dtype of the teacher rows (default: the stored one, promoted
                across tasks).

        Returns a dict of CPU tensors:
            ``input_ids, attention_mask, position_ids, labels`` ``[B, L]`` (labels -100
            except on answer tokens; positions count real tokens only);
            ``task`` ``[B]``;
            ``teacher_logits`` ``[B, L, V]`` dense, or TopK / SampledTeacher ``[B, L, k]``, with the teacher
            at each sample's stored positions (elsewhere 0, a uniform TopK filler or zero sampled weights),
            ``logits_mask`` ``[B, L]`` bool marking them and ``logits_positions`` (str) saying which
            positions they are (the samples' tasks must agree);
            ``heads`` ``{layer: [B, S]}`` (-1 = empty slot), ``queries`` ``[B, Q]`` absolute
            positions or None (all rows, when no sample has a query budget), and
            ``teacher_attention`` ``{layer: [B, S, Q, L]}`` — ready for
            :func:`seekr_kernels.distill_attention`.
        """
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence) or not keys:
            raise ValueError("keys: expected a non-empty list of (task, sample) pairs")
        samples, tasks = [], []
        for i, k in enumerate(keys):
            try:
                ti, si = k
                s = self.tasks[ti].samples[si]
                if ti < 0 or si < 0:
                    raise IndexError
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"keys[{i}]: {k!r} is not a (task, sample) pair of this memory") from None
            samples.append(s)
            tasks.append(self.tasks[ti])
        if not _is_int(pad_to_multiple_of) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of: expected a positive int, got {pad_to_multiple_of!r}")
        B = len(samples)
        want_att = attention and any(t.heads and t.has_attention for t in tasks)
        att_layers = []
        if want_att:
            att_layers = sorted({l for t in tasks if t.has_attention for l in t.heads})
            if layers is not None:
                keep = {int(l) for l in layers}
                att_layers = [l for l in att_layers if l in keep]
            want_att = bool(att_layers)
        all_rows = not want_att or all(s.queries is None for s in samples)
        lengths = [s.n for s in samples]
        L = max(lengths)
        Qn = None
        if not all_rows:
            Qn = max(s.num_queries for s in samples)
            # A sample with filler query slots needs a padding position to point them at.
            if any(s.num_queries < Qn and s.n == L for s in samples):
                L += 1
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
        if all_rows:
            # Every row of the padded batch is a query row; taken after the rounding so the
            # teacher's row and column axes both span the padded length.
            Qn = L
        pads = [L - n for n in lengths]

        ids = torch.full((B, L), int(pad_token_id), dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        for b, (s, p) in enumerate(zip(samples, pads)):
            ids[b, p:] = s.input_ids
            mask[b, p:] = 1
            labels[b, p:] = s.labels
        out = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp_min(0),
               "labels": labels, "task": torch.tensor([k[0] for k in keys], dtype=torch.long)}

        if logits and any(s.logits is not None for s in samples):
            kinds = {t.logits_positions for t, s in zip(tasks, samples) if s.logits is not None}
            if len(kinds) > 1:
                raise ValueError(f"keys: the samples' teacher logits sit at different positions ({sorted(kinds)}); "
                                 "batch tasks captured under one distill.logits_positions together")
            out.update(self._batch_logits(samples, pads, L))
            out["logits_positions"] = kinds.pop()

        if want_att:
            if all_rows:
                queries = None
            else:
                queries = torch.zeros(B, Qn, dtype=torch.long)          # filler: position 0 = padding
                for b, (s, p) in enumerate(zip(samples, pads)):
                    rel = torch.arange(s.n) if s.queries is None else s.queries
                    queries[b, :rel.numel()] = rel + p
            sels = [t.heads if t.has_attention else {} for t in tasks]
            heads = batch_heads(sels, layers=att_layers)
            dts = {r.dtype for s in samples for l, r in s.attention.items() if l in heads}
            dt = attention_dtype or (torch.float32 if not dts else _promote(dts))
            teacher = {}
            for l in att_layers:
                S = heads[l].shape[1]
                t = torch.zeros(B, S, Qn, L, dtype=dt)
                for b, (s, p) in enumerate(zip(samples, pads)):
                    r = s.attention.get(l)
                    if r is None:
                        continue
                    if all_rows:
                        t[b, :r.shape[0], p:, p:] = r
                    else:
                        t[b, :r.shape[0], :r.shape[1], p:] = r
                teacher[l] = t
            out.update(heads=heads, queries=queries, teacher_attention=teacher)
        return out

    @staticmethod
    def _batch_logits(samples, pads, L):
        B = len(samples)
        kinds = {_logits_kind(s.logits) for s in samples} - {None}
        if len(kinds) > 1:
            raise ValueError(f"keys: the samples' teacher logits differ in kind/size ({sorted(map(str, kinds))}); "
                             "batch tasks with compatible teachers together")
        kind = kinds.pop()
        lmask = torch.zeros(B, L, dtype=torch.bool)
        if kind[0] == "dense":
            V = kind[1]
            t = torch.zeros(B, L, V, dtype=getattr(torch, kind[3].split(".")[-1]))
            for b, (s, p) in enumerate(zip(samples, pads)):
                if s.logits is not None:
                    a0 = p + s.logits_start
                    t[b, a0:a0 + s.logits.shape[0]] = s.logits
                    lmask[b, a0:a0 + s.logits.shape[0]] = True
            return {"teacher_logits": t, "logits_mask": lmask}
        sampled = kind[0] == "sampled"
        _, V, k, dts = kind
        # Filler rows (no teacher) hold a uniform distribution (TopK: distinct indices, equal
        # values) or, sampled, zero weights (no pull).
        vals = torch.zeros(B, L, k, dtype=getattr(torch, dts.split(".")[-1]))
        idx = torch.arange(k, dtype=torch.int32).expand(B, L, k).clone()
        lse = None if sampled else torch.full((B, L), math.log(V), dtype=torch.float32)
        for b, (s, p) in enumerate(zip(samples, pads)):
            if s.logits is not None:
                a0 = p + s.logits_start
                A = s.logits.values.shape[0]
                vals[b, a0:a0 + A] = s.logits.values
                idx[b, a0:a0 + A] = s.logits.indices
                if not sampled:
                    lse[b, a0:a0 + A] = s.logits.lse.float()
                lmask[b, a0:a0 + A] = True
        teacher = SampledTeacher(vals, idx, V, "sampled") if sampled else TopK(vals, idx, V, "logits", lse=lse)
        return {"teacher_logits": teacher, "logits_mask": lmask}

    # ---------------------------------------------------------------- persistence
    def save(self, root: str) -> List[int]:
        """Write the whole memory to ``root`` all-or-nothing; returns bytes per task.

        ``root`` is replaced as a whole (see the module docstring): a killed save leaves
        the previous memory. A ``root`` holding anything but a replay memory is refused.
        """
        if os.path.isdir(root):
            foreign = [n for n in os.listdir(root)
                       if n != _INDEX and not _TASK_NAME.match(n) and not n.startswith(".")]
            if foreign:
                raise ReplayMemoryError(f"{root}: holds {sorted(foreign)[:5]}, not a replay memory; "
                                        "refusing to replace it")
        elif os.path.exists(root):
            raise ReplayMemoryError(f"{root}: exists and is not a directory")
        entries = []
        with atomic_dir(root) as tmp:
            for i in range(len(self.tasks)):
                entries.append(self._write_task(_task_dir(tmp, i), i))
            _write_index(tmp, entries)
        return [_dir_bytes(_task_dir(root, i)) for i in range(len(self.tasks))]

    def save_task(self, root: str, index: int) -> int:
        """Write task ``index`` to ``root/task-NNN`` atomically, then commit it to the
        index, which lists tasks ``0..index`` afterwards (later task directories stay on
        disk but are no longer part of the memory); returns the task's bytes on disk.

        Tasks ``0..index-1`` must already be on disk (they keep their index entries, or
        get one from their verified manifest when the index predates them).
        """
        if not _is_int(index) or not 0 <= index < len(self.tasks):
            raise ValueError(f"index: expected a task index in [0, {len(self.tasks)}), got {index!r}")
        os.makedirs(root, exist_ok=True)
        prev = _read_index(root, must_exist=False) or []
        entries = []
        for i in range(index):
            entries.append(prev[i] if i < len(prev) else _unindexed_entry(root, i))
        final = _task_dir(root, index)
        with atomic_dir(final) as tmp:
            entries.append(self._write_task(tmp, index))
        _write_index(root, entries)
        return _dir_bytes(final)

    def _write_task(self, d: str, index: int) -> dict:
        """Files of task ``index`` into directory ``d``; returns its index entry."""
        from safetensors.torch import save
        task = self.tasks[index]
        tensors, layout = _pack(task)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, _DATA), "wb") as f:
            f.write(save(tensors))
        store.write_manifest(d, {
            "format": FORMAT, "kind": _KIND, "index": index, "name": task.name,
            "num_samples": len(task.samples), "heads": {str(l): h.tolist() for l, h in task.heads.items()},
            "layout": layout, "meta": task.meta}, name=_MANIFEST, key="manifest_sha256")
        return _index_entry(task.name, d)

    @staticmethod
    def disk_sizes(root: str) -> Dict[int, int]:
        """Bytes on disk of every ``task-NNN`` directory under ``root``."""
        return {i: _dir_bytes(_task_dir(root, i)) for i in _task_indices(root)}

    @classmethod
    def load(cls, root: str, names: Optional[Sequence[str]] = None) -> "ReplayMemory":
        """Read and verify the memory committed to ``root`` (see the module docstring).

        ``names``: the expected task names in order. A task of another name, a missing
        task, a corrupt file, an edited manifest or an unknown format is a
        :class:`ReplayMemoryError`. Without an index (written by an older version, or
        by an interrupted first save) ``names`` is required: it says how many tasks the
        memory must hold.
        """
        clean_leftovers(root)                     # a swapped-out copy of root itself
        if not os.path.isdir(root):
            raise ReplayMemoryError(f"{root}: no such replay memory directory")
        clean_leftovers(root, any_name=True)      # temporaries / old copies of task dirs
        entries = _read_index(root, must_exist=False)
        n = _unindexed_count(root, names) if entries is None else len(entries)
        if names is not None and len(names) != n:
            raise ReplayMemoryError(f"{root}: holds {n} tasks, expected {len(names)} ({list(names)})")
        mem = cls()
        for i in range(n):
            d = _task_dir(root, i)
            if entries is not None:
                man_p = os.path.join(d, _MANIFEST)
                if not os.path.isdir(d):
                    raise ReplayMemoryError(f"{d}: missing; the index {_INDEX} lists {n} tasks "
                                            "(an incomplete copy of the memory?)")
                if os.path.exists(man_p) and store.digest_file(man_p) != entries[i]["manifest_sha256"]:
                    raise ReplayMemoryError(f"{man_p}: differs from the manifest the index {_INDEX} "
                                            "lists (edited, or an interrupted save_task)")
            want = names[i] if names is not None else (entries[i]["name"] if entries is not None else None)
            mem.add(cls.load_task(root, i, want))
        return mem

    @staticmethod
    def load_task(root: str, index: int, name: Optional[str] = None) -> ReplayTask:
        """Read and verify ``root/task-NNN``; ``name`` (if given) must match the manifest."""
        from safetensors.torch import load
        d = _task_dir(root, index)
        clean_leftovers(d)
        man_p = os.path.join(d, _MANIFEST)
        man = store.read_json(man_p, "seekr replay memory manifest", ReplayMemoryError, kind=_KIND, versions=READS,
                              missing=f"{d}: missing {_MANIFEST} (not a replay memory task directory, or an "
                                      "interrupted write)")
        if man.get("index") != index:
            raise ReplayMemoryError(f"{man_p}: belongs to task #{man.get('index')}, found in the directory of #{index}")
        if name is not None and man.get("name") != name:
            raise ReplayMemoryError(f"{man_p}: holds task {man.get('name')!r}, expected {name!r}")
        _check_manifest_seal(man, man_p)
        payload = store.check_file(os.path.join(d, _DATA), (man.get("files") or {}).get(_DATA) or {},
                                   error=ReplayMemoryError, manifest=_MANIFEST, read=True)
        try:
            tensors = load(payload)
            task = _unpack(man, tensors)
        except ReplayMemoryError as e:
            raise ReplayMemoryError(f"{d}: {e}") from None
        except Exception as e:  # a well-formed checksum over inconsistent content
            raise ReplayMemoryError(f"{d}: inconsistent replay memory content ({type(e).__name__}: {e})") from None
        return task


class ReplayDataset(torch.utils.data.Dataset):
    """A :class:`ReplayMemory` as a map-style Dataset, one item per replay sample.

    Item ``i`` is the ``(task index, sample index)`` key of the ``i``-th sample in
    :meth:`ReplayMemory.keys` order (cheap to draw, to send to DataLoader workers and to
    shard); :meth:`collate_fn` turns a list of keys into the left-padded batch of
    :meth:`ReplayMemory.batch` with every teacher aligned. Works with any sampler,
    :class:`torch.utils.data.distributed.DistributedSampler` included::

        ds = memory.dataset()
        dl = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=W, rank=r),
                        collate_fn=ds.collate_fn(pad_token_id, pad_to_multiple_of=8))

    The view reads the memory when indexed: tasks added later appear in it.
    """

    def __init__(self, memory: "ReplayMemory"):
        if not isinstance(memory, ReplayMemory):
            raise TypeError(f"memory: expected a ReplayMemory, got {type(memory).__name__}")
        self.memory = memory

    def __len__(self) -> int:
        return len(self.memory)

    def __getitem__(self, i) -> Tuple[int, int]:
        if not _is_int(i):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        n = len(self.memory)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a replay memory of {n} samples")
        for ti, t in enumerate(self.memory.tasks):
            if i < len(t.samples):
                return (ti, i)
            i -= len(t.samples)
        raise AssertionError("unreachable")

    def sample(self, i) -> ReplaySample:
        """The :class:`ReplaySample` of item ``i``."""
        return self.memory.sample(self[i])

    def collate_fn(self, pad_token_id: int = 0, pad_to_multiple_of: int = 1, **batch_kwargs):
        """A DataLoader ``collate_fn``: keys -> :meth:`ReplayMemory.batch` (keyword
        arguments are passed on)."""
        memory = self.memory

        def collate(keys):
            return memory.batch([tuple(k) for k in keys], pad_token_id, pad_to_multiple_of, **batch_kwargs)
        return collate


def _promote(dtypes):
    out = None
    for d in dtypes:
        out = d if out is None else torch.promote_types(out, d)
    return out


# ============================================================================ on-disk layout

def _task_dir(root, index):
    return os.path.join(root, f"task-{index:03d}")


_TASK_NAME = re.compile(r"^task-\d+$")


def _index_entry(name, d):
    """The index's entry of the task in directory ``d``: its name and manifest's digest."""
    return {"name": name, "manifest_sha256": store.digest_file(os.path.join(d, _MANIFEST))}


def _write_index(root, entries):
    """The commit point of a save: ``memory.json`` listing the tasks, sealed, written atomically."""
    store.write_json(os.path.join(root, _INDEX), store.seal({"format": FORMAT, "kind": _INDEX_KIND, "tasks": entries}))


def _read_index(root, must_exist=True):
    """The verified task entries of ``root/memory.json``, or None when there is none."""
    p = os.path.join(root, _INDEX)
    idx = store.read_json(p, "seekr replay memory index", ReplayMemoryError, kind=_INDEX_KIND, versions=READS,
                          missing=f"{p}: missing", optional=not must_exist)
    if idx is None:
        return None
    store.check_seal(idx, p, "index", error=ReplayMemoryError)
    tasks = idx.get("tasks")
    if not isinstance(tasks, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("manifest_sha256"), str)
            for e in tasks):
        raise ReplayMemoryError(f"{p}: malformed task list")
    return tasks


def _task_indices(root):
    out = []
    for name in os.listdir(root):
        if _TASK_NAME.match(name) and os.path.isdir(os.path.join(root, name)):
            out.append(int(name[5:]))
    return sorted(out)


def _dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def _pack(task: ReplayTask):
    """Flat tensors of a task + the JSON layout needed to cut them back into samples."""
    S = task.samples
    t = {
        "input_ids": torch.cat([s.input_ids for s in S]),
        "answer_mask": torch.cat([s.answer_mask for s in S]).to(torch.uint8),
        "lengths": torch.tensor([s.n for s in S], dtype=torch.long),
        "num_queries": torch.tensor([-1 if s.queries is None else s.queries.numel() for s in S], dtype=torch.long),
    }
    qs = [s.queries for s in S if s.queries is not None]
    if qs:
        t["queries"] = torch.cat(qs)
    kind = _logits_kind(S[0].logits)
    layout = {"logits": None if kind is None else kind[0], "attention_layers": []}
    if kind is not None:
        layout["logits_positions"] = task.logits_positions
        t[_start_name(task.logits_positions)] = torch.tensor([s.logits_start for s in S], dtype=torch.long)
        if kind[0] == "dense":
            t["logits_rows"] = torch.tensor([s.logits.shape[0] for s in S], dtype=torch.long)
            t["logits"] = torch.cat([s.logits for s in S]).contiguous()
        else:
            t["logits_rows"] = torch.tensor([s.logits.values.shape[0] for s in S], dtype=torch.long)
            t["logits.values"] = torch.cat([s.logits.values for s in S]).contiguous()
            # packed indices (int16 low bits [+ uint8 high bits]); "logits.indices" (int32)
            # is what older versions wrote, and they fail loudly on these names
            packed = pack_indices(torch.cat([s.logits.indices for s in S]), kind[1])
            t["logits.indices16"] = packed["lo"].contiguous()
            if "hi" in packed:
                t["logits.indices_hi"] = packed["hi"].contiguous()
            if kind[0] == "topk":
                t["logits.lse"] = torch.cat([s.logits.lse for s in S]).contiguous()
            layout["vocab"] = kind[1]
    if task.has_attention:
        for l in task.heads:
            t[f"attention.{l}"] = torch.cat([s.attention[l].reshape(-1) for s in S])
            t[f"heads.{l}"] = task.heads[l]
        layout["attention_layers"] = list(task.heads)
    else:
        for l, h in task.heads.items():
            t[f"heads.{l}"] = h
    return t, layout


def _start_name(positions):
    """The tensor of the samples' first teacher-logits positions: ``logits_start`` for
    'predict' (what every version wrote), ``logits_answer_start`` for 'published', a name
    older readers do not know, so they refuse such a memory instead of reading its teacher
    at the 'predict' positions."""
    return "logits_start" if positions == "predict" else "logits_answer_start"


def _unpack_sparse_logits(layout, t, sl):
    V = int(layout["vocab"])
    idx = _logits_indices(t, sl, V)
    if layout["logits"] == "sampled":
        return SampledTeacher(t["logits.values"][sl], idx, V, "sampled")
    if layout["logits"] != "topk":
        raise ReplayMemoryError(f"unknown teacher logits kind {layout['logits']!r}")
    return TopK(t["logits.values"][sl], idx, V, "logits", lse=t["logits.lse"][sl])


def _unpack(man, t) -> ReplayTask:
    N = man["num_samples"]
    layout = man["layout"]
    lengths = t["lengths"].tolist()
    nq = t["num_queries"].tolist()
    if len(lengths) != N or len(nq) != N:
        raise ReplayMemoryError(f"manifest says {N} samples, the data holds {len(lengths)}")
    heads = {int(l): torch.tensor(h, dtype=torch.long) for l, h in man["heads"].items()}
    for l, h in heads.items():
        if not torch.equal(t[f"heads.{l}"], h):
            raise ReplayMemoryError(f"heads of layer {l} differ between the manifest and the data")
    att_layers = [int(l) for l in layout["attention_layers"]]
    positions = _logits_positions(layout)
    start_name = _start_name(positions)
    pos = {"ids": 0, "q": 0, "lg": 0, **{l: 0 for l in att_layers}}
    samples = []
    for i in range(N):
        n = lengths[i]
        ids = t["input_ids"][pos["ids"]:pos["ids"] + n]
        am = t["answer_mask"][pos["ids"]:pos["ids"] + n].bool()
        if ids.numel() != n:
            raise ReplayMemoryError(f"sample {i}: token data ends early")
        pos["ids"] += n
        queries = None
        if nq[i] >= 0:
            queries = t["queries"][pos["q"]:pos["q"] + nq[i]]
            pos["q"] += nq[i]
        logits, start = None, 0
        if layout["logits"] is not None:
            A = int(t["logits_rows"][i])
            start = int(t[start_name][i])
            sl = slice(pos["lg"], pos["lg"] + A)
            pos["lg"] += A
            if layout["logits"] == "dense":
                logits = t["logits"][sl]
            else:
                logits = _unpack_sparse_logits(layout, t, sl)
        Q = n if queries is None else queries.numel()
        att = {}
        for l in att_layers:
            size = heads[l].numel() * Q * n
            flat = t[f"attention.{l}"][pos[l]:pos[l] + size]
            if flat.numel() != size:
                raise ReplayMemoryError(f"sample {i}: attention rows of layer {l} end early")
            att[l] = flat.reshape(heads[l].numel(), Q, n)
            pos[l] += size
        samples.append(ReplaySample(ids, am, queries, logits, start, att))
    if pos["ids"] != t["input_ids"].numel() or any(pos[l] != t[f"attention.{l}"].numel() for l in att_layers):
        raise ReplayMemoryError("data holds more than the manifest describes")
    used = {"input_ids", "answer_mask", "lengths", "num_queries"} | {f"heads.{l}" for l in heads}
    used |= {f"attention.{l}" for l in att_layers}
    if any(x >= 0 for x in nq):
        used.add("queries")
    if layout["logits"] is not None:
        used |= {start_name, "logits_rows"}
        if layout["logits"] == "dense":
            used.add("logits")
        else:
            used |= {"logits.values"} | ({"logits.lse"} if layout["logits"] == "topk" else set())
            used |= _logits_index_names(t)
    if set(t) != used:
        # e.g. a layout whose logits or attention layers were dropped: the teachers would vanish
        raise ReplayMemoryError(f"the data's tensors {sorted(set(t) ^ used)} are not what the manifest's "
                                "layout describes")
    return ReplayTask(man["name"], samples, heads, man.get("meta") or {}, positions)


# ============================================================================ older writers (READS)
# What versions before this one wrote, still read: every difference is here.

def _unindexed_count(root, names):
    """READS[1]["index"]: a memory without memory.json (61b56de, or an interrupted first
    save) holds as many tasks as ``names`` says, in task-000.. directories."""
    if names is None:
        raise ReplayMemoryError(f"{root}: no {_INDEX} index (written by an older version or an "
                                "interrupted save): cannot tell whether the memory is complete; "
                                "pass names= (the expected task names, in order)")
    idx = _task_indices(root)
    if idx[:len(names)] != list(range(len(names))):
        raise ReplayMemoryError(f"{root}: task directories {idx} are not task-000..task-"
                                f"{len(names) - 1:03d}; expected {len(names)} tasks ({list(names)})")
    return len(names)


def _unindexed_entry(root, i):
    """READS[1]["index"]: the index entry of task ``i`` written before the index listed
    it (verified first)."""
    task = ReplayMemory.load_task(root, i)
    return _index_entry(task.name, _task_dir(root, i))


def _check_manifest_seal(man, man_p):
    """READS[1]["sealed manifests"]: a manifest without ``manifest_sha256`` (61b56de)
    still loads: its data has to match the checksum it records, and :func:`_unpack`
    cross-checks the layout against the data's tensors."""
    store.check_seal(man, man_p, "manifest", error=ReplayMemoryError, key="manifest_sha256", optional=True)


def _logits_index_names(t):
    """READS[1]["packed indices"]: the tensors holding the TopK / sampled indices, int32
    ``logits.indices`` (61b56de, 3575421) or packed."""
    if "logits.indices" in t:
        return {"logits.indices"}
    return {"logits.indices16"} | ({"logits.indices_hi"} if "logits.indices_hi" in t else set())


def _logits_indices(t, sl, V):
    """The int32 indices of rows ``sl`` (see :func:`_logits_index_names`)."""
    if "logits.indices" in t:
        return t["logits.indices"][sl]
    hi = t["logits.indices_hi"][sl] if "logits.indices_hi" in t else None
    return unpack_indices(t["logits.indices16"][sl], hi, V)


def _logits_positions(layout):
    """READS[1]["logits positions"]: the positions of a task's teacher logits; a layout
    without the key (written before it existed) holds them at the 'predict' positions."""
    p = layout.get("logits_positions", "predict")
    if p not in LOGITS_POSITIONS:
        raise ReplayMemoryError(f"unknown teacher logits positions {p!r} (this version reads "
                                f"{list(LOGITS_POSITIONS)})")
    return p
