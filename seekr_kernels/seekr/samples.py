"""A task's new replay samples while it is learned (:class:`PendingSample`) and the seeds
every random choice of a task derives from (:func:`task_seed`, :func:`sample_seed`), so a
resumed run draws the same subset, query rows and sampled teachers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def task_seed(seed: int, t: int) -> int:
    """The seed of task t: every RNG of the task derives from it."""
    return (int(seed) * 1000003 + 7919 * (t + 1)) % (2 ** 31 - 1)


def sample_seed(seed: int, t: int, j: int) -> int:
    """The seed of replay sample j of task t (its sampled teacher)."""
    return (task_seed(seed, t) * 1000003 + 104729 * (j + 1)) % (2 ** 31 - 1)


@dataclass
class PendingSample:
    """A new replay sample while its task is being learned (:meth:`to_replay` gives the
    :class:`~seekr_kernels.ReplaySample` stored in the memory).

    ``logits``: teacher logits ``[A, V]`` (or a TopK) at the positions of
    ``distill.logits_positions``, from ``logits_start`` on (None: the 'predict' start,
    the positions that predict the A answer tokens that have a token before them);
    ``queries``: ``[Q]`` positions within the sample (None = all rows); ``attn``:
    ``{layer: [S_l, Q, n]}`` teacher rows.
    """
    prompt_ids: list
    answer_ids: list
    task: int
    logits: object = None
    queries: Optional[torch.Tensor] = None
    attn: dict = field(default_factory=dict)
    logits_start: Optional[int] = None

    @property
    def length(self):
        return len(self.prompt_ids) + len(self.answer_ids)

    def to_replay(self):
        from .memory import ReplaySample
        ids = torch.tensor(self.prompt_ids + self.answer_ids, dtype=torch.long)
        mask = torch.zeros(self.length, dtype=torch.bool)
        mask[len(self.prompt_ids):] = True
        start = max(0, len(self.prompt_ids) - 1) if self.logits_start is None else self.logits_start
        return ReplaySample(ids, mask, self.queries, self.logits, start, self.attn)
