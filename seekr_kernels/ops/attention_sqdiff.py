"""Squared difference of two models' attention rows, without [L, L] maps.

For a selected row r = (b, s, i) with head h = heads[b, s] and valid keys
V = {j <= i, attention_mask[b, j] = 1}, with p_x the softmax of model x's scores
``scale * q_x[b, h, i] . k_x[b, h // G, j]`` over V (x = a, b):

    rows[b, s, i] = sum_{j in V} (p_a_j - p_b_j)^2

Keys outside V are 0 in both attention maps, so this is also the sum over the whole row
of the [L, L] maps. It is the building block of SEEKR's forgettability (mean of
(A_before - A_after)^2 over a head's attention map, see
:func:`seekr_kernels.seekr.importance.measure_forgettability`).

The fused backends (triton; cpu, the C++/OpenMP kernel of csrc/cpu_kernels.cpp) stream
key blocks twice — the log-sum-exp of both rows, then the squared difference of the
normalised probabilities — and write only [B, S, Q].
The torch backend materialises the rows of a bounded number of slots at a time (an
independent oracle for the tests is in tests/test_attention_sqdiff.py: eager [L, L] maps).
"""
from __future__ import annotations

import dataclasses

import torch

from .._backend import resolve
from .._checks import _check_finite, abs_max, check_attention_args, ensure_index_ranges, score_overflow_check

# torch backend: at most this many entries of [B, s, Q, L] scores (or [B, s, L, D] gathered
# keys) per chunk of s slots; a few fp32 temporaries of that size live at once (~4 MiB each).
_TORCH_CHUNK = 1 << 20


def _check_pair(name_q, name_k, q, k, a):
    for name, t, ref in ((name_q, q, a.q), (name_k, k, a.k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from model a's dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}: is on {t.device}, model a's tensors are on {ref.device}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {list(t.shape)} differs from model a's {list(ref.shape)}")


def _torch_rows(a, q_b, k_b):
    acc = torch.float64 if a.q.dtype == torch.float64 else torch.float32
    B, L, D = a.B, a.L, a.D
    dev = a.q.device
    out = torch.zeros(B, a.S, a.Q, device=dev, dtype=acc)
    pos = a.queries.long()                                                   # [B, Q]
    j = torch.arange(L, device=dev)
    visible = (j[None, None, :] <= pos[:, :, None]) & a.key_mask.bool()[:, None, :]   # [B, Q, L]
    per_slot = max(1, B * max(a.Q * L, L * D))
    step = max(1, _TORCH_CHUNK // per_slot)
    bidx = torch.arange(B, device=dev)[:, None]
    for s0 in range(0, a.S, step):
        s1 = min(a.S, s0 + step)
        h = a.heads[:, s0:s1].long().clamp_min(0)                            # empty slots read head 0
        probs = []
        for q, k in ((a.q, a.k), (q_b, k_b)):
            qr = q[bidx[:, :, None], h[:, :, None], pos[:, None, :]]         # [B, s, Q, D]
            kh = k[bidx, h // a.group]                                       # [B, s, L, D]
            z = torch.matmul(qr.to(acc), kh.to(acc).transpose(-1, -2)).mul_(a.scale)
            del qr, kh
            # Rows without a visible key become NaN here; they are inactive and zeroed below.
            probs.append(torch.softmax(z.masked_fill_(~visible[:, None], float("-inf")), dim=-1))
            del z
        rows = (probs[0] - probs[1]).square_().sum(-1)
        del probs
        act = a.row_active[:, s0:s1]
        out[:, s0:s1] = torch.where(act, rows, torch.zeros_like(rows))
    return out


def attention_sqdiff(q_a, k_a, q_b, k_b, heads, queries=None, attention_mask=None, *, scale=None,
                     backend="auto", check_values=True) -> torch.Tensor:
    """Per-row ``sum_j (p_a_j - p_b_j)^2`` of two models' attention, ``[B, S, Q]``.

    Args:
        q_a, k_a: model a's post-RoPE queries ``[B, H, L, D]`` and keys ``[B, Hkv, L, D]``
            (fp32, fp16, bf16 or fp64; any strides); head h reads kv head h // (H // Hkv).
        q_b, k_b: model b's, same shapes, dtype and device as model a's.
        heads: integer ``[S]`` or ``[B, S]`` heads (-1 = empty slot). For forgettability
            usually every head of the layer, ``arange(H)``.
        queries: integer ``[B, Q]`` absolute query positions, or None for all L rows.
        attention_mask: ``[B, L]`` 0/1 key padding mask (left or right padding), None =
            all ones; the causal mask is always applied. Both models see the same tokens.
        scale: softmax scale of both models, default D ** -0.5.
        backend: 'auto' (triton on CUDA, the C++ extension on CPU, torch otherwise with
            a one-time warning), 'triton' (also CPU tensors under TRITON_INTERPRET=1),
            'cpu' or 'torch'.
        check_values: scan inputs for NaN/inf, out-of-range indices and scores that could
            overflow (one host sync; see :func:`seekr_kernels.attention_kl`). Head and query
            ranges are re-checked by every backend even when off. fp64 input is refused by
            the triton backend (TypeError); 'auto' picks cpu (CPU tensors) or torch for it.

    Returns:
        fp32 ``[B, S, Q]`` (fp64 for fp64 inputs); 0 for empty slots and padded query
        positions. Not differentiable: it runs under ``torch.no_grad()``.
    """
    a = check_attention_args(q_a, k_a, heads, queries, attention_mask, scale, check_values)
    _check_pair("q_b", "k_b", q_b, k_b, a)
    if check_values:
        qm, km = abs_max(q_b), abs_max(k_b)
        _check_finite([("q_b", q_b, qm), ("k_b", k_b, km)],
                      extra=[score_overflow_check("q_b", qm, km, a.D, a.scale, a.q.dtype)])
    b = resolve(backend, a.q.device, "attention_sqdiff", supported=("triton", "cpu", "torch"),
                dtype=a.q.dtype, head_dim=a.D, arg="q_a")
    with torch.no_grad():
        q_a, k_a, q_b, k_b = (t.detach() for t in (q_a, k_a, q_b, k_b))
        a = dataclasses.replace(a, q=q_a, k=k_a)
        if a.B * a.S * a.Q == 0:
            ensure_index_ranges(a)  # nothing is indexed, but the same input is refused everywhere
            acc = torch.float64 if a.q.dtype == torch.float64 else torch.float32
            return torch.zeros(a.B, a.S, a.Q, device=a.q.device, dtype=acc)
        if b == "triton":
            from ..triton.attention_sqdiff import attention_sqdiff_rows
            return attention_sqdiff_rows(a, q_b, k_b)
        if b == "cpu":
            from .. import _native
            return _native.module_for("cpu").attention_sqdiff(a, q_b, k_b)
        ensure_index_ranges(a)
        return _torch_rows(a, q_b, k_b)
