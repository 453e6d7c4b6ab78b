"""Token sequences as the recipe batches them: one tokenised example (:class:`Encoded`),
left-padded batches with -100 labels off the answer (:func:`collate`), position ids that
count real tokens only, and a process's contiguous slice of a global batch (:func:`shard`).

Left padding is what decoder-only generation needs; position ids computed from the
attention mask make a sample's result independent of its padding. Both loops (the own
trainer and the Hugging Face Trainer) and the replay memory batch through here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..ops.logits_kl import IGNORE_INDEX  # noqa: F401  (the label of unsupervised positions, defined by the op)


@dataclass
class Encoded:
    """One tokenised example: ``prompt_ids`` (with bos) and ``answer_ids`` (with eos)."""
    prompt_ids: list
    answer_ids: list


def _pad_len(n, multiple):
    return (n + multiple - 1) // multiple * multiple if multiple > 1 else n


def collate(encoded: Sequence[Encoded], pad_token_id: int, pad_to_multiple_of: int = 1,
            with_answer: bool = True) -> dict:
    """Left-pad a list of :class:`Encoded` into a batch.

    Returns input_ids, attention_mask, position_ids and (``with_answer``) labels with
    -100 on prompt and padding. ``with_answer=False`` gives prompt-only batches for
    generation.
    """
    seqs = [e.prompt_ids + (e.answer_ids if with_answer else []) for e in encoded]
    L = _pad_len(max(len(s) for s in seqs), pad_to_multiple_of)
    B = len(seqs)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for b, (e, s) in enumerate(zip(encoded, seqs)):
        n = len(s)
        ids[b, L - n:] = torch.tensor(s, dtype=torch.long)
        mask[b, L - n:] = 1
        if with_answer:
            na = len(e.answer_ids)
            labels[b, L - na:] = torch.tensor(e.answer_ids, dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}
    if with_answer:
        out["labels"] = labels
    return out


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (0 on left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def shard(indices: Sequence[int], rank: int, world: int) -> list:
    """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
    n = len(indices)
    lo = rank * n // world
    hi = (rank + 1) * n // world
    return list(indices[lo:hi])


def as_pair(item, i):
    """(prompt_ids, answer_ids) of one task sample: an ``Encoded``, a mapping with
    ``prompt_ids``/``answer_ids``, or a mapping with ``input_ids`` and ``labels`` (-100 on
    the prompt; the supervised tokens must be a suffix), optionally ``attention_mask``."""
    name = f"task_samples[{i}]"
    if isinstance(item, Encoded):
        return list(item.prompt_ids), list(item.answer_ids)
    if not isinstance(item, Mapping):
        raise TypeError(f"{name}: expected an Encoded or a mapping, got {type(item).__name__}")
    if "prompt_ids" in item and "answer_ids" in item:
        p, a = [int(x) for x in item["prompt_ids"]], [int(x) for x in item["answer_ids"]]
    elif "input_ids" in item and "labels" in item:
        ids = torch.as_tensor(item["input_ids"]).reshape(-1)
        lab = torch.as_tensor(item["labels"]).reshape(-1)
        if ids.shape != lab.shape:
            raise ValueError(f"{name}: input_ids and labels differ in length ({ids.numel()} vs {lab.numel()})")
        if "attention_mask" in item and item["attention_mask"] is not None:
            keep = torch.as_tensor(item["attention_mask"]).reshape(-1).bool()
            if keep.shape != ids.shape:
                raise ValueError(f"{name}: attention_mask differs in length from input_ids")
            ids, lab = ids[keep], lab[keep]
        sup = (lab != IGNORE_INDEX).nonzero().flatten()
        if sup.numel() == 0:
            raise ValueError(f"{name}: no supervised token (every label is -100)")
        s0 = int(sup[0])
        if sup.numel() != ids.numel() - s0 or not torch.equal(lab[s0:], ids[s0:]):
            raise ValueError(f"{name}: the supervised tokens (labels != -100) must be a suffix of input_ids "
                             "with labels equal to the tokens (a prompt followed by its answer)")
        p, a = ids[:s0].tolist(), ids[s0:].tolist()
    else:
        raise ValueError(f"{name}: expected keys prompt_ids/answer_ids or input_ids/labels, got {sorted(item)}")
    if not a:
        raise ValueError(f"{name}: empty answer")
    return p, a


def encoded(samples) -> list:
    """:class:`Encoded` views of anything with ``prompt_ids`` and ``answer_ids``."""
    return [Encoded(s.prompt_ids, s.answer_ids) for s in samples]
