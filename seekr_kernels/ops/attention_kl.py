"""Fused KL(teacher attention || student attention) on selected heads and query rows.

Math (docs/DESIGN.md §2), for one row r = (b, s, i), head h = heads[b, s], valid keys
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
from .teachers import TopK
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
    if log_eps != 0.0:
        eps = _check_log_eps(log_eps, backend, teacher, TopK)
        check_teacher_rows(teacher, a, check_values)
        return reduce_rows(attention_kl_rows(a, teacher, None, "torch", eps), a.row_active, reduction)
    if isinstance(teacher, TopK):
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


# ---------------------------------------------------------------------- attention-KL

#: Treatments of the teacher mass a TopK dropped (k < L); see attention_kl_topk_rows.
_MODES = ("bucket", "kept", "renorm", "full_lse")
_DEFAULT_MODE = "bucket"

# Kept scores are computed for chunks of rows so that the [.., k, D] gather of keys never
# exists for all rows at once (forward and backward).
_GATHER_ELEMS = 1 << 22

# Added to the student's mass on the dropped bucket, P_D = 1 - sum_K p_j, before its log.
# P_D is a difference of lse values, resolvable only down to ~1e-7 in fp32, and its gradient
# cancels analytically on kept keys, so an unresolvable P_D amplifies rounding by 1/P_D
# (measured: gradient errors of 1e9+ without a floor). With the floor the term stays smooth
# and bounded; a row whose student tail is below it loses the tail's pull (gradient like
# `kept`). 1e-7 was the best trade-off measured on the torch, cpu and triton backends
# (tests/test_topk.py::test_bucket_with_sharpening_student_matches_fp64).
# Half-precision q/k: the gradient's two cancelling parts (the lse term on every key and the
# kept-score term) are each rounded to q's dtype before autograd adds them, so there P_D is
# resolvable only down to a few ulps of that dtype; a 1e-7 floor let the parts reach 1e7x
# the gradient and overflow fp16 (NaN gradients, found by tests/fuzz). 4 ulps keeps their
# rounding below a quarter of the dropped mass's pull.
_TAIL_FLOOR = {torch.float32: 1e-7, torch.float64: 1e-14,
               torch.float16: 4 * 2.0 ** -10, torch.bfloat16: 4 * 2.0 ** -7}


class _KeptScores(torch.autograd.Function):
    """z[b, s, q, c] = scale * q_rows[b, s, q] . k[b, kvh[b, s], idx[b, s, q, c]]  ([B, S, Q, K]).

    Gradients to q_rows and k; keeps only its inputs, gathers keys chunk by chunk.
    """

    @staticmethod
    def forward(ctx, q_rows, k, kvh, idx, scale, acc):
        B, S, Q, K = idx.shape
        D = k.shape[-1]
        bi = torch.arange(B, device=k.device)[:, None, None, None]
        kv = kvh[:, :, None, None]
        z = torch.empty(B, S, Q, K, device=k.device, dtype=acc)
        step = max(1, _GATHER_ELEMS // max(1, B * S * K * D))
        for q0 in range(0, Q, step):
            kg = k[bi, kv, idx[:, :, q0:q0 + step]].to(acc)                  # [B, S, c, K, D]
            z[:, :, q0:q0 + step] = torch.einsum("bsqd,bsqcd->bsqc", q_rows[:, :, q0:q0 + step].to(acc), kg)
        ctx.save_for_backward(q_rows, k, kvh, idx)
        ctx.scale, ctx.acc = scale, acc
        return z * scale

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("attention_kl (TopK teacher)")
        q_rows, k, kvh, idx = ctx.saved_tensors
        acc, scale = ctx.acc, ctx.scale
        B, S, Q, K = idx.shape
        D = k.shape[-1]
        bi = torch.arange(B, device=k.device)[:, None, None, None]
        kv = kvh[:, :, None, None]
        g = g.to(acc) * scale
        dq = torch.empty(B, S, Q, D, device=k.device, dtype=acc) if ctx.needs_input_grad[0] else None
        dk = torch.zeros(k.shape, device=k.device, dtype=acc) if ctx.needs_input_grad[1] else None
        step = max(1, _GATHER_ELEMS // max(1, B * S * K * D))
        for q0 in range(0, Q, step):
            ic = idx[:, :, q0:q0 + step]
            gc = g[:, :, q0:q0 + step]
            if dq is not None:
                dq[:, :, q0:q0 + step] = torch.einsum("bsqc,bsqcd->bsqd", gc, k[bi, kv, ic].to(acc))
            if dk is not None:
                contrib = gc[..., None] * q_rows[:, :, q0:q0 + step, None, :].to(acc)
                dk.index_put_((bi.expand_as(ic), kv.expand_as(ic), ic), contrib, accumulate=True)
        return (None if dq is None else dq.to(q_rows.dtype), None if dk is None else dk.to(k.dtype),
                None, None, None, None)


def _check_attention_teacher(teacher: TopK, a, check_values):
    if teacher.kind != "probs":
        raise ValueError(f"teacher: a TopK attention teacher must be of kind 'probs' "
                         f"(attention probabilities), got kind {teacher.kind!r}")
    exp = (a.B, a.S, a.Q, a.L)
    if tuple(teacher.shape) != exp:
        raise ValueError(f"teacher: TopK stands for shape {list(teacher.shape)}, expected "
                         f"[B, S, Q, L] = {list(exp)}")
    if teacher.device != a.q.device:
        raise ValueError(f"teacher: TopK is on {teacher.device}, q is on {a.q.device}")
    teacher.check("teacher", check_values)
    if not check_values:
        # what this path gathers with in torch: never out of bounds, whatever the backend
        teacher.check_indices("teacher")
        ensure_index_ranges(a)


def _xlogx(t):
    return torch.where(t > 0, t * torch.log(torch.where(t > 0, t, torch.ones_like(t))), torch.zeros_like(t))


def attention_kl_topk_rows(a, teacher: TopK, backend, check_values=True, mode=None):
    """Per-row attention KL [B, S, Q] against a TopK teacher (validated args ``a``).

    Per row, K = kept entries at valid keys (kept entries at future or padded keys are
    ignored, as the dense path ignores teacher mass there), t their probabilities,
    T_K = sum_K t; D = the valid keys that were not kept; T_V = the dense row's mass on
    valid keys, known from ``teacher.mass`` (the row total) less kept mass on invalid keys;
    delta = T_V - T_K, the dropped mass. z_j = scale * q_row . k_j, p_j = exp(z_j - lse).

    Default (``bucket``): the dropped keys are merged into one bucket whose teacher mass is
    delta and whose student mass is P_D = 1 - sum_K p_j:

        KL_r = sum_K t log(t / p_j) + delta * log(delta / P_D)

    This is the exact KL between teacher and student coarse-grained to {each kept key,
    the rest}; by the chain rule of KL the dense value is this plus delta times the KL of
    the two tails' shapes, so nothing but the within-tail mismatch is dropped (a lower
    bound). Its gradient is exact on every kept key (T_V p_j - t_j) and replaces the
    teacher's tail by the student's tail rescaled to the dropped mass (T_V p_j -
    delta p_j / P_D), so the total pull on the tail is right. When nothing valid was
    dropped (k >= the row's valid keys) delta is exactly 0 and the row equals the dense
    KL, value and gradient. Without ``teacher.mass`` delta is taken as 0 (``kept``).
    P_D enters as log(P_D + 1e-7) (1e-14 with fp64 accumulation, 4 ulps of q's dtype for
    fp16/bf16 q, ``_TAIL_FLOOR``): below that it is rounding noise in fp32 (for scores of
    size z, below ~1e-7 * |z|: backends that round the scores in another order then agree
    only to that noise); such rows keep a bounded value and lose only the tail's pull.

    Other treatments, kept for ``benchmarks/bench_teacher.py`` which measures them all:
    ``kept`` (delta ignored: sum_K t log(t / p), no renormalisation), ``renorm`` (kept
    probabilities rescaled to T_V) and ``full_lse`` (sum_K t log t - sum_K t z + T_V lse).

    Why ``bucket`` (benchmarks/results/teacher_topk_quality.csv, tiny Llama, L = 256,
    students 10 and 100 steps into a new task): it has the best or second-best gradient
    cosine at every k (k=8: 0.91/0.92, k=32: 0.98/0.98, k=128: 0.9996/0.9996) and the
    smallest value error at k=128 (1.7%/2.0%). ``renorm`` and ``full_lse`` are off in value
    by 12-570%. ``kept`` has a smaller value error at k <= 32, but only because the terms
    it drops partly cancel, and its gradients are worse. ``full_lse`` has the best gradient
    after 100 steps but the worst after 10, and an unusable value.

    Only the k kept scores are computed (gathered keys, in chunks, in torch); lse comes
    from the fused kernels (``attention_kl_rows`` with ``teacher=None``), so no [.., L]
    row of the student is ever materialised.
    """
    mode = _DEFAULT_MODE if mode is None else mode
    if mode not in _MODES:
        raise ValueError(f"mode: must be one of {_MODES}, got {mode!r}")
    _check_attention_teacher(teacher, a, check_values)
    acc = torch.float64 if a.q.dtype == torch.float64 else torch.float32
    dev = a.q.device
    zero = torch.zeros((), dtype=acc, device=dev)
    idx = teacher.indices.long()                                        # [B, S, Q, K]
    bi = torch.arange(a.B, device=dev)[:, None, None, None]
    pos = a.queries.long()[:, None, :, None]
    valid = (idx <= pos) & a.key_mask.bool()[bi, idx] & a.row_active[..., None]
    vals = teacher.values.detach().to(acc)
    t = torch.where(valid, vals, zero)
    tk = t.sum(-1)                                                      # T_K  [B, S, Q]

    if mode == "kept" or teacher.mass is None:
        delta = torch.zeros_like(tk)
    else:
        # T_V: the row total less what kept entries hold on invalid keys (exact for captured
        # rows, which hold no mass there); rounding may put it a hair under T_K.
        tv = teacher.mass.to(acc) - torch.where(valid, zero, vals).sum(-1)
        delta = (tv - tk).clamp_min(0)
        # Rows whose valid keys were all kept dropped nothing, whatever the rounding says.
        n_valid = torch.cumsum(a.key_mask.long(), 1).gather(1, a.queries.long())[:, None, :]
        delta = torch.where(valid.sum(-1) < n_valid, delta, zero)
        delta = torch.where(a.row_active, delta, zero)
    if mode == "renorm":
        t = t * torch.where(tk > 0, (tk + delta) / torch.where(tk > 0, tk, torch.ones_like(tk)), zero)[..., None]
        tk = tk + delta
        delta = torch.zeros_like(tk)

    h = a.heads.long().clamp_min(0)
    bq = torch.arange(a.B, device=dev)[:, None, None]
    q_rows = a.q[bq, h[:, :, None], a.queries.long()[:, None, :]]        # [B, S, Q, D]
    z = _KeptScores.apply(q_rows, a.k, h // a.group, idx, a.scale, acc)  # [B, S, Q, K]
    tlogt_tz = (_xlogx(t) - t * torch.where(valid, z, zero)).sum(-1)

    if mode in ("kept", "renorm"):
        rows = tlogt_tz + attention_kl_rows(a, None, tk.to(torch.float32 if acc == torch.float32 else acc),
                                            backend).to(acc)
    elif mode == "full_lse":
        rows = tlogt_tz + attention_kl_rows(a, None, (tk + delta).to(tk.dtype), backend).to(acc)
    else:  # bucket
        ones = a.row_active.to(acc)
        lse = attention_kl_rows(a, None, ones, backend).to(acc)          # lse, gradient p
        # log P_D = log(1 - sum_K p_j), computed as log(-expm1(log sum_K p_j)).
        zk = torch.where(valid, z, torch.full((), float("-inf"), dtype=acc, device=dev))
        log_pk = torch.logsumexp(zk, -1) - lse
        has = delta > 0
        log_pk = torch.where(has, log_pk, torch.full_like(log_pk, -1.0)).clamp_max(0.0)
        floor = _TAIL_FLOOR.get(a.q.dtype, _TAIL_FLOOR[acc])
        log_pd = torch.log(torch.clamp_min(-torch.expm1(log_pk), 0.0) + floor)
        tail = torch.where(has, _xlogx(delta) - delta * log_pd, zero)
        rows = tlogt_tz + tk * lse + tail
    rows = torch.where(a.row_active, rows, torch.zeros_like(rows))
    return rows.to(torch.float64 if acc == torch.float64 else torch.float32)
