"""Budgeted head selection (the published SEEKR rule) and per-batch head layouts.

:func:`select_heads` turns an importance table ``[n_layers, n_heads]`` into the heads to
distil: first the ``layer_budget`` layers with the largest summed importance, then the
``head_budget`` most important heads across those layers (not per layer). This is the
rule of jinghan1he/SEEKR ``select_layer_head``; ``ties`` says how equal importances are
ranked (``distill.head_selection``):

* ``"stable"`` (the default): lower index first — among layers with equal sums the lower
  layer wins; among heads with equal importance the lower ``(layer, head)`` pair in
  row-major order wins. Sums are taken in fp64 so that the layer ranking does not depend
  on the summation order of fp32 values. A pure function of the values.
* ``"published"``: the published calls themselves, ``torch.topk`` of the layer sums (in
  the importance's dtype, fp32 in the recipe as published), then ``torch.topk`` of the
  kept layers' heads flattened row-major. On ties that is whatever order ``torch.topk``
  returns (on CPU not the lower index, and not promised across torch versions): with all
  40 x 40 importances equal and budgets 24 / 128 it keeps layers 5-8 and 20-39 and heads
  of layers 28-33, where ``"stable"`` takes layers 0-3 (torch 2.13).

Without ties (in the fp32 layer sums too) the two give the same heads.

:func:`batch_heads` lays out, for a replay batch that mixes tasks, the heads each sample
must distil at each layer: ``{layer: [B, S] LongTensor}`` with -1 in empty slots, the
contract of :func:`seekr_kernels.attention_kl` and :func:`seekr_kernels.distill_attention`.
"""
from __future__ import annotations

import numbers
from typing import Dict, Mapping, Optional, Sequence

import torch

__all__ = ["select_heads", "batch_heads"]


def _check_budget(name, value, upper, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")
    if value > upper:
        raise ValueError(f"{name}: {value} is larger than {what} ({upper})")
    return value


#: ``ties`` of :func:`select_heads` (``distill.head_selection``).
TIES = ("stable", "published")


def select_heads(importance: torch.Tensor, layer_budget: int, head_budget: int,
                 ties: str = "stable") -> Dict[int, torch.Tensor]:
    """The heads to distil under a layer budget and a head budget.

    Args:
        importance: ``[n_layers, n_heads]`` real tensor (any float dtype, any device),
            finite. Larger is more important.
        layer_budget: how many layers may hold distilled heads, ``1 <= layer_budget <= n_layers``.
        head_budget: how many heads in total, ``1 <= head_budget <= layer_budget * n_heads``.
        ties: ``"stable"`` (lower index first) or ``"published"`` (``torch.topk``'s
            order, the published calls); see the module docstring.

    Returns:
        ``{layer: LongTensor of head indices}`` on the CPU, keys in increasing order, heads
        sorted increasingly, only layers that received at least one head (a layer kept by
        the layer budget can end up with none). Exactly ``head_budget`` heads in total.

    With ``ties="stable"`` ties are broken towards the lower index (see the module
    docstring), so the result is a pure function of the values.
    """
    if not isinstance(importance, torch.Tensor):
        raise TypeError(f"importance: expected a torch.Tensor, got {type(importance).__name__}")
    if importance.dtype.is_complex or importance.dtype == torch.bool:
        raise TypeError(f"importance: expected a real dtype, got {importance.dtype}")
    if importance.dim() != 2 or importance.shape[0] == 0 or importance.shape[1] == 0:
        raise ValueError(f"importance: expected a non-empty [n_layers, n_heads] tensor, got shape "
                         f"{list(importance.shape)}")
    if ties not in TIES:
        raise ValueError(f"ties: must be one of {list(TIES)}, got {ties!r}")
    imp = importance.detach().to("cpu")
    if not bool(torch.isfinite(imp).all()):
        raise ValueError("importance: contains NaN or infinite values")
    n_layers, n_heads = imp.shape
    layer_budget = _check_budget("layer_budget", layer_budget, n_layers, "the number of layers")
    head_budget = _check_budget("head_budget", head_budget, layer_budget * n_heads,
                                f"layer_budget x heads per layer = {layer_budget} x {n_heads}")

    if ties == "published":
        # select_layer_head's calls: topk of the layer sums, sorted; topk over the kept
        # layers' heads flattened row-major (its (layer, head) sort is the flat order).
        layers = imp.sum(1).topk(layer_budget)[1].sort()[0]
        picked = imp[layers].reshape(-1).topk(head_budget)[1].sort()[0]
    else:
        # Stable descending sort: equal keys keep their index order, so lower indices win ties.
        imp = imp.to(torch.float64)
        layers = torch.sort(torch.argsort(-imp.sum(1), stable=True)[:layer_budget]).values
        sub = imp[layers].reshape(-1)            # row-major over (kept layer, head)
        picked = torch.sort(torch.argsort(-sub, stable=True)[:head_budget]).values
    out: Dict[int, torch.Tensor] = {}
    rows = layers[picked // n_heads]
    heads = picked % n_heads
    for l in torch.unique(rows).tolist():
        out[int(l)] = heads[rows == l].clone()   # already increasing: picked is sorted
    return out


def _check_selection(i, sel, n_heads):
    if sel is None:
        return {}
    if not isinstance(sel, Mapping):
        raise TypeError(f"selections[{i}]: expected a dict {{layer: heads}}, got {type(sel).__name__}")
    out = {}
    for l, h in sel.items():
        if isinstance(l, bool) or not isinstance(l, numbers.Integral) or l < 0:
            raise TypeError(f"selections[{i}]: keys must be layer indices (int >= 0), got {l!r}")
        h = torch.as_tensor(h)
        if h.dtype.is_floating_point or h.dtype.is_complex or h.dtype == torch.bool:
            raise TypeError(f"selections[{i}][{l}]: expected integer head indices, got {h.dtype}")
        if h.dim() != 1:
            raise ValueError(f"selections[{i}][{l}]: expected a 1-D tensor of heads, got shape {list(h.shape)}")
        h = h.to("cpu", torch.long)
        if h.numel() and (int(h.min()) < 0 or (n_heads is not None and int(h.max()) >= n_heads)):
            hi = "" if n_heads is None else f", {n_heads}"
            raise ValueError(f"selections[{i}][{l}]: head indices must lie in [0{hi})")
        if h.numel() != torch.unique(h).numel():
            raise ValueError(f"selections[{i}][{l}]: the same head appears twice")
        out[int(l)] = h
    return out


def batch_heads(selections: Sequence[Optional[Mapping[int, torch.Tensor]]], layers=None,
                n_heads: Optional[int] = None, sort: bool = False) -> Dict[int, torch.Tensor]:
    """Per-layer ``[B, S]`` head tables for a batch whose samples carry their own heads.

    Args:
        selections: one ``{layer: 1-D tensor of heads}`` per sample (``None`` or ``{}``:
            the sample distils nothing), e.g. the :func:`select_heads` result of the task
            each sample comes from.
        layers: the layers to lay out (default: every layer some sample names). A layer
            no sample names gets a ``[B, 1]`` table of -1.
        n_heads: if given, head indices are range-checked against it.
        sort: sort each sample's heads; by default slot ``s`` of sample ``b`` holds the
            ``s``-th head *in the order given*, so teacher rows stored in that order line
            up with the slots without a permutation.

    Returns:
        ``{layer: LongTensor [B, S_l]}`` with ``S_l`` the most heads any sample has at
        that layer (at least 1); sample ``b``'s heads fill slots ``0..n_b-1`` and the rest
        is -1 (an empty slot: its rows are inactive in every op).
    """
    if isinstance(selections, Mapping) or not isinstance(selections, Sequence):
        raise TypeError("selections: expected a sequence with one dict per sample, got "
                        f"{type(selections).__name__}")
    if len(selections) == 0:
        raise ValueError("selections: empty batch")
    sels = [_check_selection(i, s, n_heads) for i, s in enumerate(selections)]
    if layers is None:
        layers = sorted({l for s in sels for l in s})
    else:
        layers = sorted({int(l) for l in layers})
    B = len(sels)
    out = {}
    for l in layers:
        S = max([1] + [s[l].numel() for s in sels if l in s])
        t = torch.full((B, S), -1, dtype=torch.long)
        for b, s in enumerate(sels):
            h = s.get(l)
            if h is not None and h.numel():
                t[b, :h.numel()] = torch.sort(h).values if sort else h
        out[l] = t
    return out
