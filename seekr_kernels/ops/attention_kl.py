"""Fused KL(teacher attention || student attention) on selected heads and query rows.

Math (DESIGN.md §2), for one row r = (b, s, i), head h = heads[b, s], valid keys
V = {j <= i, mask[b, j] = 1}, z_j = scale * q[b, h, i] . k[b, h // G, j]:

    KL_r = sum_{j in V, t_j > 0} t_j log t_j - sum_{j in V} t_j z_j + T_r * lse_r,
    T_r = sum_{j in V} t_j,   lse_r = log sum_{j in V} exp(z_j)

Teacher mass on keys outside V (future or padded keys) is ignored. The fused backends
stream over key blocks and save only lse and T per row (fp32).
"""
from __future__ import annotations

import torch

from .. import reference
from .._backend import resolve
from .._checks import (AttnArgs, _check_finite, check_attention_args, check_reduction, check_teacher_rows,
                       ensure_index_ranges, kl_overflow_checks, reduce_rows, refuse_double_backward)


def _impl(backend):
    if backend == "triton":
        from ..triton import attention_kl as mod
        return mod
    if backend in ("cpu", "cuda"):
        from .. import _native
        return _native.module_for(backend)
    raise AssertionError(backend)


class _AttentionKLFunction(torch.autograd.Function):
    """Per-row KL [B, S, Q] from a fused backend; gradients to q and k only.

    Once differentiable: the fused backward kernels are not themselves differentiable, so
    a backward with ``create_graph=True`` raises a RuntimeError instead of returning a
    gradient silently cut from the graph. The torch backend (plain autograd) supports
    double backward.
    """

    @staticmethod
    def forward(ctx, q, k, teacher, tmass, a: AttnArgs, backend):
        impl = _impl(backend)
        rows, lse, T = impl.attention_kl_fwd(a, teacher, tmass)
        ctx.a, ctx.backend = a, backend
        ctx.save_for_backward(teacher, lse, T)
        ctx.mark_non_differentiable(lse, T)
        return rows, lse, T

    @staticmethod
    def backward(ctx, grad_rows, _glse, _gT):
        refuse_double_backward("attention_kl")
        teacher, lse, T = ctx.saved_tensors
        a = ctx.a
        if grad_rows is None:
            return None, None, None, None, None, None
        grad_rows = grad_rows.to(lse.dtype).contiguous()   # fp64 stays fp64 (gradcheck)
        dq, dk = _impl(ctx.backend).attention_kl_bwd(a, teacher, lse, T, grad_rows)
        return dq, dk, None, None, None, None


def out_dtype(q):
    """Losses are fp32 whatever the input; fp64 inputs (gradcheck) keep fp64."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention_kl_rows(a: AttnArgs, teacher, tmass, backend: str, log_eps: float = 0.0):
    """Per-row KL for validated args; ``teacher=None`` means rows = tmass * lse."""
    if a.S == 0 or a.Q == 0:
        ensure_index_ranges(a)      # nothing is indexed, but the same input is refused everywhere
        return a.q.new_zeros((a.B, a.S, a.Q), dtype=out_dtype(a.q)) + 0 * a.q.sum() + 0 * a.k.sum()
    # The teacher is a fixed target: no gradient flows to it on any backend.
    if teacher is not None:
        teacher = teacher.detach()
    if tmass is not None:
        tmass = tmass.detach().to(out_dtype(a.q)).contiguous()
    if backend == "torch":
        ensure_index_ranges(a)
        return reference.attention_kl_rows(a, teacher, tmass, log_eps).to(out_dtype(a.q))
    rows, _, _ = _AttentionKLFunction.apply(a.q, a.k, teacher, tmass, a, backend)
    return rows


def attention_kl(q, k, teacher, heads, queries=None, attention_mask=None, *, scale=None,
                 reduction="batchmean", backend="auto", check_values=True, log_eps=0.0):
    """KL(teacher || student) attention distillation loss for selected heads and query rows.

    Args:
        q: [B, H, L, D] post-RoPE student queries (fp32, fp16, bf16 or fp64; any strides).
        k: [B, Hkv, L, D] post-RoPE student keys, H % Hkv == 0; head h reads kv head
            h // (H // Hkv).
        teacher: [B, S, Q, L] teacher probabilities over all L keys (any float dtype), or a
            :class:`seekr_kernels.TopK` of them. Gets no gradient. Mass on keys the row
            cannot see (j > i or padded) is ignored.
        heads: integer [S] (same for every sample) or [B, S]; -1 marks an empty slot. A head
            out of range or repeated within a sample is a ValueError.
        queries: integer [B, Q] absolute query positions, or None for all L rows.
        attention_mask: [B, L] of 0/1 (bool or integer), left or right padding; None = all
            ones. The causal mask (key j <= query i) is always applied.
        scale: softmax scale, default D ** -0.5.
        reduction: 'none' -> [B, S, Q] (0 on inactive rows), 'sum', 'mean' (over active
            rows), 'batchmean' (default) = (1/B) * sum_b mean over sample b's active rows.
            A row is active when its slot holds a head and its query is a real token. With
            no active row, every reduction gives 0.
        backend: 'auto' (triton on CUDA, the C++ extension on CPU, torch otherwise with
            a warning), 'triton', 'cpu', 'cuda' or 'torch'.
        check_values: scan inputs for NaN/inf, negative teacher mass, repeated heads and
            scores that could overflow the accumulator (one host sync). Turn off only for
            inputs already known to be valid: the result of such input is then undefined.
            Head and query ranges are re-checked by every backend even when off.
        log_eps: 0 (default) for the exact KL above. ``eps > 0`` gives the published
            code's ``sum t log t - sum t log(p + eps)`` (it used ``log(p + 1e-8)``), with
            p the student's softmax over the valid keys; gradients follow that formula.
            Only the ``torch`` backend implements it (``auto`` picks it): the fused
            kernels rely on ``log p = z - lse`` being linear in the scores, which
            ``log(p + eps)`` is not (it would need an extra pass forward and backward).
            A dense teacher is required.

    Returns:
        fp32 loss (scalar, or [B, S, Q] for reduction='none'); fp64 for fp64 inputs (the
        triton backend refuses fp64 with a TypeError; 'auto' picks an fp64 backend).

    Raises:
        ValueError when ``scale * D * max|q| * max|k|`` reaches a quarter of the fp32
        range (fp64 range for fp64 input): scores could overflow to inf and the softmax to
        NaN, so such input is refused on every backend (``_checks.score_overflow_check``).
        With the same rule, ValueError when the loss summed over B*S*Q rows, or the
        gradient of q or k for an upstream gradient of at most 1 per row, could overflow
        the accumulator (``_checks.kl_overflow_checks``): near-limit q and k (q ~ 1e35 with
        k ~ 1, or q, k ~ 1e18) passed the score check and gave an inf loss or gradient on
        every backend. Both are sufficient conditions checked in Python before any kernel
        runs (with ``check_values``); no trained model comes near them. A gradient that
        only exceeds fp16's range (fp16 q/k) is inf in the fp16 gradient, as with autograd.

    The fused backends are once differentiable: ``create_graph=True`` raises a RuntimeError.

    The fused backends never allocate an [L, L] matrix or a full student row: the forward
    pass streams key blocks with an online log-sum-exp and saves only lse and the teacher
    mass per row. The Triton and C++ backward passes are deterministic (no atomics).
    """
    a = check_attention_args(q, k, heads, queries, attention_mask, scale, check_values)
    check_reduction(reduction)
    from .topk import TopK  # local: topk imports this module
    if log_eps != 0.0:
        eps = _check_log_eps(log_eps, backend, teacher, TopK)
        check_teacher_rows(teacher, a, check_values)
        return reduce_rows(attention_kl_rows(a, teacher, None, "torch", eps), a.row_active, reduction)
    if isinstance(teacher, TopK):
        from .topk import attention_kl_topk_rows
        if check_values:
            _check_topk_overflow(a, teacher)
        rows = attention_kl_topk_rows(a, teacher, _resolve(backend, q), check_values)
    else:
        check_teacher_rows(teacher, a, check_values)
        rows = attention_kl_rows(a, teacher, None, _resolve(backend, q))
    return reduce_rows(rows, a.row_active, reduction)


def _check_topk_overflow(a: AttnArgs, teacher):
    """kl_overflow_checks for a TopK teacher (one host sync): entries up to max(values), a
    row mass up to the largest kept sum or ``mass``, and the bucket's floor (its
    gradient parts reach 1/floor times the gradient: q ~ 1e35 made dk inf on every backend).
    Non-finite values are left to TopK.check, which names them."""
    from .topk import _TAIL_FLOOR
    if teacher.values.numel() == 0:
        return

    def finite_max(x):
        m = x.detach().amax().double()
        return torch.where(torch.isfinite(m), m, torch.zeros_like(m)).clamp_min(0)
    t_max = finite_max(teacher.values)
    mass = finite_max(teacher.values.detach().sum(-1, dtype=torch.float64))
    if teacher.mass is not None and teacher.mass.numel():
        mass = torch.maximum(mass, finite_max(teacher.mass))
    acc = torch.float64 if a.q.dtype == torch.float64 else torch.float32
    floor = _TAIL_FLOOR.get(a.q.dtype, _TAIL_FLOOR[acc])
    _check_finite([], extra=kl_overflow_checks(a, t_max, mass, floor))


def _check_log_eps(log_eps, backend, teacher, TopK):
    import math
    if isinstance(log_eps, bool) or not isinstance(log_eps, (int, float)) or not math.isfinite(log_eps) \
            or not 0 <= log_eps < 1:
        raise ValueError(f"log_eps: expected a number in [0, 1), got {log_eps!r}")
    if backend not in ("auto", "torch"):
        raise ValueError(f"log_eps: {log_eps} > 0 is implemented by the torch backend only (backend='auto' "
                         f"or 'torch'), got backend={backend!r}")
    if isinstance(teacher, TopK):
        raise ValueError("log_eps: a TopK teacher is not supported with log_eps > 0; pass the dense rows")
    return float(log_eps)


def _resolve(backend, q):
    return resolve(backend, q.device, "attention_kl", supported=("triton", "cpu", "cuda", "torch"),
                   dtype=q.dtype, head_dim=q.shape[-1])


class AttentionKLLoss(torch.nn.Module):
    """Module form of :func:`attention_kl`: ``AttentionKLLoss()(q, k, teacher, heads, ...)``."""

    def __init__(self, reduction="batchmean", scale=None, backend="auto"):
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.scale = scale
        self.backend = backend

    def forward(self, q, k, teacher, heads, queries=None, attention_mask=None):
        return attention_kl(q, k, teacher, heads, queries, attention_mask, scale=self.scale,
                            reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
