"""The pre-task snapshot forgettability compares against: the model's trainable parameters
at the start of a task (:class:`PreTaskWeights`), swapped in for the pre-task passes.

Memory at Llama-2-7B shapes: full fine-tuning (6.74 B trainable parameters in bf16) keeps
13.5 GB on the host for the whole task (``snapshot_device="cpu"``); LoRA (r = 8 on q/v of
32 layers) 17 MB. Under FSDP the recipe keeps every head's attention rows at the query rows
instead (see :class:`seekr_kernels.SeekrRecipe`).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Mapping

import torch


class PreTaskWeights:
    """The trainable parameters of a model at one moment, to run the model with them later.

    SEEKR's forgettability compares each head's attention before and after a task. Rather
    than a copy of the model (which needs to rebuild its class — impossible for PEFT
    models — and costs a second model on the device for the whole task), this keeps the
    parameters that the task can change (those with ``requires_grad``; frozen ones are
    assumed unchanged) and swaps them in for the pre-task passes::

        before = PreTaskWeights.capture(model)       # host copy of the trainable tensors
        ...train...
        with before.applied(model):                   # the model runs its pre-task weights
            model(**batch)
        measure_forgettability(before.module(model), model, batches)   # both at once

    Swapping replaces ``param.data`` (no in-place write, so the trained weights are never
    touched and come back bit for bit). Not for sharded (FSDP) parameters.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors: Dict[str, torch.Tensor] = dict(tensors)

    @classmethod
    def capture(cls, model: torch.nn.Module, device="cpu", trainable_only: bool = True) -> "PreTaskWeights":
        """Copy ``model``'s (trainable) parameters to ``device`` (None: where they are)."""
        out = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if trainable_only and not p.requires_grad:
                    continue
                out[n] = p.detach().to(p.device if device is None else device, copy=True)
        return cls(out)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Run ``model`` with these parameters inside the context; restored on exit."""
        params = dict(model.named_parameters())
        missing = sorted(set(self.tensors) - set(params))
        if missing:
            raise ValueError(f"model: has no parameters {missing[:5]} of the snapshot (another model?)")
        saved = {}
        try:
            for n, t in self.tensors.items():
                p = params[n]
                if tuple(p.shape) != tuple(t.shape) or p.dtype != t.dtype:
                    raise ValueError(f"model: parameter {n} is {list(p.shape)} {p.dtype}, the snapshot holds "
                                     f"{list(t.shape)} {t.dtype}")
                saved[n] = p.data
                p.data = t.to(p.device)
            yield model
        finally:
            for n, d in saved.items():
                params[n].data = d

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        """A module view of ``model`` that runs with these parameters (for
        :func:`~seekr_kernels.measure_forgettability`'s ``model_before``)."""
        return _WithWeights(self, model)


class _WithWeights(torch.nn.Module):
    def __init__(self, weights: PreTaskWeights, model: torch.nn.Module):
        super().__init__()
        self._weights = weights
        self.model = model

    def forward(self, *args, **kwargs):
        with self._weights.applied(self.model):
            return self.model(*args, **kwargs)


def snapshot_kind(before):
    if before is None:
        return None
    return "weights" if isinstance(before, PreTaskWeights) else "rows"


def snapshot_tensors(before):
    """The pre-task snapshot as flat tensors (by reference)."""
    if before is None:
        return None
    if isinstance(before, PreTaskWeights):
        return dict(before.tensors)
    return {f"{i}/{l}": r for i, rows in enumerate(before) for l, r in rows.items()}


def snapshot_from_tensors(kind, tensors, n_samples):
    if kind is None or tensors is None:
        return None
    if kind == "weights":
        return PreTaskWeights(tensors)
    if kind != "rows":
        raise ValueError(f"state_dict: unknown pre-task snapshot kind {kind!r}")
    rows = [dict() for _ in range(n_samples)]
    for k, v in tensors.items():
        i, l = k.split("/")
        rows[int(i)][int(l)] = v
    return rows
