"""Logits distillation: cross-entropy of the student logits against softmax(teacher logits).

The published SEEKR term (``cal_replay_logits_distill_loss`` in the reference code) is

    CrossEntropyLoss()(s[sel], softmax(t[sel]))      sel = labels != -100

i.e. the mean over the selected token rows r of

    loss_r = sum_v -softmax(t_r)_v * log_softmax(s_r)_v  =  lse(s_r) - sum_v softmax(t_r)_v s_r,v

**No shift.** The reference selects logits and labels at the *same* positions (it passes
the model's unshifted ``labels``, so it distils positions whose own token is supervised).
This op does the same: the caller passes aligned ``student_logits``, ``teacher`` and
``labels`` and decides the alignment. ``seekr_kernels.seekr.losses.logits_kl_mean``
shifts first (positions that *predict* an answer token); to reproduce the reference
exactly, pass the model's labels as they are.

The gradient flows to ``student_logits`` only (d loss_r / d s_r = softmax(s_r) -
softmax(t_r)); the teacher is a fixed target. All accumulation is fp32 (fp64 for fp64
student logits) whatever the input dtypes; the gradient is returned in the student's dtype.

Teachers given as :class:`~seekr_kernels.ops.teachers.TopK` (kind ``"logits"``) keep k
logits per row plus the row's exact log-sum-exp, so the kept probabilities
p_i = exp(v_i - lse_t) are exact; the teacher mass P_d = 1 - sum_i p_i on the V - k
dropped entries is unknown in its distribution. ``topk_mode`` says what is assumed
(q = softmax(s), K = kept entries, D = dropped ones, Q_d = sum_D q):

* ``"student_tail"`` (default): P_d is spread over D *like the student's own tail*,
  p_j = P_d * q_j / Q_d, a stop-gradient target (the student's current tail, detached):
  loss_r = sum_K -p_i log q_i - (P_d / Q_d) * sum_D q_j log q_j;
  gradient q_i - p_i on kept entries and (1 - P_d / Q_d) q_j on dropped ones.
  Exact whenever the student's tail has the teacher's shape, in particular at
  student == teacher, where the gradient is 0 as for the dense teacher (no other mode
  keeps that fixed point). Q_d below 1e-4 (fp32 rounding territory) is clamped to 1e-4.
* ``"uniform"``: P_d spread evenly over D, i.e. exactly the dense loss against
  ``TopK.to_dense()``: loss_r = sum_K -p_i log q_i - P_d / (V - k) * sum_D log q_j;
  gradient q - p on kept entries and q_j - P_d / (V - k) on dropped ones.
* ``"kept"``: the dropped entries are ignored, nothing renormalised:
  loss_r = sum_K -p_i log q_i (the dense loss minus the dropped entries' terms).
* ``"renorm"``: kept probabilities rescaled to sum to 1 (p_i / sum_K p).

With k = V nothing is dropped and every mode equals the dense teacher (value and
gradient, to rounding). Measured against the dense teacher on LM-like logits
(``benchmarks/bench_logits_kl.py --topk-quality``, V = 32000, k in 16/64/256, teacher
entropy 1.3-5.2 nats, student drift 0.3-2.0), ``student_tail`` has the smallest value
error everywhere (k = 64: 0.03-6% vs 5-32% uniform, 4-58% kept, 3-35% renorm) and a
gradient cosine >= 0.997 at k = 64 (uniform's is higher by <= 0.0015 at drift >= 1,
lower by up to 0.015 at drift 0.3; kept/renorm fall to 0.47). A rejected fifth option, weighting lse
by the full mass 1 with kept terms only, depends on the student logits' offset.

A :class:`~seekr_kernels.ops.teachers.SampledTeacher` (TopK kind ``"sampled"``) holds importance
weights p_hat with E[p_hat] = softmax(t) at k sampled positions; the loss against it,
sum_K -p_hat_i log q_i (``"kept"`` with p = p_hat: lse(s) weighted by sum p_hat, gradient
sum(p_hat) q - p_hat), is linear in p_hat and so an unbiased estimate of the dense value and
gradient (tests/test_topk.py checks it statistically).

Backends: ``triton`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) streams the
vocabulary in chunks (seekr_kernels/triton/logits_kl.py); ``torch`` works through the
supervised rows in chunks of ~2M logits, so neither creates an fp32 copy of [N, L, V].
Both keep only a few fp32 numbers per row for the backward, which recomputes the
softmaxes. For a TopK teacher both run the same streaming pass over the student alone
(lse, sum s, sum q log q) and gather the k kept student logits with torch (cheap:
[N, L, k]); the kept entries of the gradient are written by index_copy_ afterwards.
"""
from __future__ import annotations

import functools

import torch

from .._backend import available, resolve
from .._checks import _fail, refuse_double_backward
from .teachers import TopK

#: Label of a position that is not supervised (prompt, padding): PyTorch's cross-entropy
#: default. The one definition; the method's batching and the loops use it.
IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")
TOPK_MODES = ("student_tail", "uniform", "kept", "renorm")
DEFAULT_TOPK_MODE = "student_tail"
_STUDENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Rows per chunk of the torch backend: about this many logits at a time, so that its fp32
# temporaries stay a few tens of MB whatever N * L is.
_CHUNK_ELEMS = 1 << 21




# ---------------------------------------------------------------------------- checks
def _check_args(student_logits, teacher, labels, reduction, topk_mode, check_values):
    s = student_logits
    if not isinstance(s, torch.Tensor):
        _fail(TypeError, "student_logits", f"expected a torch.Tensor, got {type(s).__name__}")
    if s.dtype not in _STUDENT_DTYPES:
        _fail(TypeError, "student_logits", f"dtype {s.dtype} is not supported "
              f"(expected one of {list(_STUDENT_DTYPES)})")
    if s.dim() != 3:
        _fail(ValueError, "student_logits", f"expected shape [N, L, V], got {tuple(s.shape)}")
    N, L, V = s.shape
    if V == 0:
        _fail(ValueError, "student_logits", f"has an empty vocabulary dimension: {tuple(s.shape)}")
    if not isinstance(labels, torch.Tensor):
        _fail(TypeError, "labels", f"expected an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        _fail(TypeError, "labels", f"expected an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != (N, L):
        _fail(ValueError, "labels", f"expected shape [N, L] = {[N, L]}, got {list(labels.shape)}")
    if labels.device != s.device:
        _fail(ValueError, "labels", f"is on {labels.device}, student_logits is on {s.device}")
    if isinstance(teacher, TopK):
        if teacher.kind not in ("logits", "sampled"):
            _fail(ValueError, "teacher", f"a TopK logits teacher must be of kind 'logits' or "
                  f"'sampled', got kind {teacher.kind!r}")
        if teacher.kind == "sampled" and topk_mode is not None:
            _fail(ValueError, "topk_mode", "applies to TopK teachers of kind 'logits'; a sampled "
                  "teacher is used as it is (it is unbiased)")
        if tuple(teacher.shape) != (N, L, V):
            _fail(ValueError, "teacher", f"TopK stands for shape {list(teacher.shape)}, expected "
                  f"student_logits' shape {[N, L, V]}")
        if teacher.device != s.device:
            _fail(ValueError, "teacher", f"TopK is on {teacher.device}, student_logits is on {s.device}")
    elif isinstance(teacher, torch.Tensor):
        if not teacher.dtype.is_floating_point:
            _fail(TypeError, "teacher", f"expected floating-point logits, got {teacher.dtype}")
        if tuple(teacher.shape) != (N, L, V):
            _fail(ValueError, "teacher", f"expected shape [N, L, V] = {[N, L, V]} (as "
                  f"student_logits), got {list(teacher.shape)}")
        if teacher.device != s.device:
            _fail(ValueError, "teacher", f"is on {teacher.device}, student_logits is on {s.device}")
    else:
        _fail(TypeError, "teacher", "expected a torch.Tensor of logits or a TopK, got "
              f"{type(teacher).__name__}")
    if reduction not in REDUCTIONS:
        _fail(ValueError, "reduction", f"must be one of {REDUCTIONS}, got {reduction!r}")
    if topk_mode is not None and topk_mode not in TOPK_MODES:
        _fail(ValueError, "topk_mode", f"must be one of {TOPK_MODES}, got {topk_mode!r}")
    if not isinstance(check_values, bool):
        _fail(TypeError, "check_values", f"expected a bool, got {type(check_values).__name__}")


def _resolve_backend(backend, s):
    """auto: triton on CUDA, torch on CPU (torch is this op's intended CPU path, chunked and
    memory-lean, so no fall-back warning); an explicit name goes through ``resolve``."""
    if backend == "auto":
        if s.device.type == "cuda" and s.dtype != torch.float64 and available("triton", s.device)[0]:
            return "triton"
        if s.device.type == "cuda" and s.dtype != torch.float64:
            return resolve("auto", s.device, "logits_kl", supported=("triton", "torch"))
        return "torch"
    name = resolve(backend, s.device, "logits_kl", supported=("triton", "torch"))
    if name == "triton" and s.dtype == torch.float64:
        _fail(TypeError, "student_logits", "dtype torch.float64 is not supported by the triton "
              "backend (its kernels accumulate in fp32); use backend='torch' for fp64")
    return name


# ---------------------------------------------------------------------------- torch backend
def _acc(s):
    return torch.float64 if s.dtype == torch.float64 else torch.float32


def _row_ranges(mask, V):
    """Ranges [a, b) of flattened rows (n * L + l) where ``mask`` holds, at most
    ~_CHUNK_ELEMS logits each. Supervised tokens come in spans (answers), so most chunks
    are plain slices; masks fragmented into short runs fall back to index chunks."""
    step = max(1, _CHUNK_ELEMS // V)
    m = mask.reshape(-1).cpu()
    idx = m.nonzero().squeeze(1)
    if idx.numel() == 0:
        return []
    # run starts/ends of consecutive True rows
    brk = (idx[1:] - idx[:-1] != 1).nonzero().squeeze(1)
    starts = torch.cat([idx[:1], idx[brk + 1]]).tolist()
    ends = torch.cat([idx[brk], idx[-1:]]).add(1).tolist()
    if len(starts) * 16 > idx.numel():
        return [idx[i:i + step] for i in range(0, idx.numel(), step)]
    out = []
    for a, b in zip(starts, ends):
        out.extend((c, min(c + step, b)) for c in range(a, b, step))
    return out


def _flat_view(x):
    """x [N, L, V] as [N*L, V] without copying, or None when its strides do not allow it."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _take(x, x2, rng, L):
    """Rows ``rng`` (a range tuple or an index tensor) of x [N, L, V] as [c, V]."""
    if isinstance(rng, tuple):
        if x2 is not None:
            return x2[rng[0]:rng[1]]
        rng = torch.arange(rng[0], rng[1])
    rng = rng.to(x.device)
    return x[rng // L, rng % L]


def _put(grad2, rng, val):
    if isinstance(rng, tuple):
        grad2[rng[0]:rng[1]].copy_(val)
    else:
        grad2[rng.to(grad2.device)] = val.to(grad2.dtype)


def _ridx(rng, device):
    return slice(rng[0], rng[1]) if isinstance(rng, tuple) else rng.to(device)


def _dot_rows(a, b, zero):
    """sum_v a_v * b_v per row where a_v = 0 contributes 0 even if b_v = -inf (BLAS dot;
    the rare rows that hit 0 * -inf = NaN are redone with an explicit where)."""
    d = torch.linalg.vecdot(a, b)
    bad = torch.isnan(d)
    if bool(bad.any()):
        ab, bb = a[bad], b[bad]
        d[bad] = torch.where(ab != 0, ab * bb, zero).sum(-1)
    return d


def _torch_fwd(s, t, valid):
    """Same outputs as triton.logits_kl.logits_kl_fwd (lse_t is not needed by the torch
    backward and stays 0; lse_s, sum_s, qlogq only without a teacher), chunked over the
    valid rows with PyTorch's fused (log_)softmax kernels."""
    N, L, V = s.shape
    acc = _acc(s)
    loss = torch.zeros(N * L, device=s.device, dtype=acc)
    lse_s, lse_t, sum_s = torch.zeros_like(loss), torch.zeros_like(loss), torch.zeros_like(loss)
    qlogq = torch.zeros_like(loss)
    zero = torch.zeros((), dtype=acc, device=s.device)
    s2 = _flat_view(s)
    t2 = None if t is None else _flat_view(t)
    for rng in _row_ranges(valid, V):
        r = _ridx(rng, s.device)
        # (an explicit cast then the fused kernel is faster on CPU than softmax(dtype=))
        scf = _take(s, s2, rng, L).to(acc)                          # [c, V]
        logq = torch.log_softmax(scf, dim=-1)
        if t is not None:
            p = torch.softmax(_take(t, t2, rng, L).to(acc), dim=-1)
            loss[r] = -_dot_rows(p, logq, zero)
        else:
            # log_softmax is monotone: its max sits where s is largest, and is ~0 there,
            # so max(s) - max(log q) is the row's lse to full precision.
            lse_s[r] = scf.amax(-1) - logq.amax(-1)
            sum_s[r] = scf.sum(-1)
            qlogq[r] = _dot_rows(torch.exp(logq), logq, zero)
    return loss, lse_s, lse_t, sum_s, qlogq


def _torch_bwd(s, t, lse_s, lse_t, A, U):
    """Same as triton.logits_kl.logits_kl_bwd: A*softmax(s) - (A*p | U), chunked (the
    softmaxes are recomputed with the fused kernels; lse_s/lse_t are not needed)."""
    N, L, V = s.shape
    acc = _acc(s)
    grad = torch.zeros((N, L, V), device=s.device, dtype=s.dtype)
    g2 = grad.view(-1, V)
    s2 = _flat_view(s)
    t2 = None if t is None else _flat_view(t)
    for rng in _row_ranges((A != 0) | (U != 0), V):
        r = _ridx(rng, s.device)
        d = torch.softmax(_take(s, s2, rng, L).to(acc), dim=-1)
        if t is not None:
            d.sub_(torch.softmax(_take(t, t2, rng, L).to(acc), dim=-1))
            d.mul_(A[r, None])
        else:
            d.mul_(A[r, None]).sub_(U[r, None])
        _put(g2, rng, d)
    return grad


# ---------------------------------------------------------------------------- TopK teacher
def _tail_floor(acc):
    # Below this the student's dropped mass 1 - sum_K q is mostly rounding (fp32 sums of
    # k terms): the student_tail ratio P_d / Q_d uses max(Q_d, floor) instead.
    return 1e-4 if acc == torch.float32 else 1e-10


def _topk_terms(mode, p, sk, lse_s, sum_s, qlogq, V, acc):
    """Row losses and gradient coefficients of a TopK teacher (module docstring).

    p: kept teacher probabilities [N, L, k]; sk: kept student logits [N, L, k] (acc);
    lse_s, sum_s, qlogq: [N, L] student row statistics. Returns (rows, A, U, Wk, w):
    the gradient of a row is A * softmax(s) - U on dropped entries and
    Wk * softmax(s) - w on kept ones.
    """
    k = p.shape[-1]
    zero = torch.zeros((), dtype=acc, device=p.device)
    logq = sk - lse_s[..., None]                                     # kept log softmax(s)
    tk = p.sum(-1)
    ones = torch.ones_like(tk)
    ce_kept = -(p * logq).sum(-1)                                    # sum_K -p log q
    if mode == "kept" or k == V:
        # k = V: nothing is dropped and every mode is the dense loss; one formula for all.
        return ce_kept, tk, torch.zeros_like(tk), tk, p
    if mode == "renorm":
        inv = 1.0 / tk.clamp_min(torch.finfo(acc).tiny)
        return ce_kept * inv, ones, torch.zeros_like(tk), ones, p * inv[..., None]
    pd = (1.0 - tk).clamp_min(0.0)                                   # dropped teacher mass
    if mode == "uniform":
        u = pd / (V - k)
        # sum over dropped of log q = (sum_s - sum_K s) - (V - k) lse_s; skipped where u = 0
        # so that a -inf student logit there does not give 0 * inf.
        drop_logq = (sum_s - sk.sum(-1)) - (V - k) * lse_s
        rows = ce_kept - torch.where(u != 0, u * drop_logq, zero)
        return rows, ones, u, ones, p
    # student_tail: dropped teacher mass distributed like the student's own dropped tail,
    # p_j ~ P_d * q_j / Q_d (a stop-gradient target).
    q = torch.exp(logq)
    qd = (1.0 - q.sum(-1)).clamp_min(_tail_floor(acc))
    ratio = pd / qd
    kept_qlogq = torch.where(q > 0, q * logq, zero).sum(-1)
    drop_qlogq = torch.minimum(qlogq - kept_qlogq, zero)             # sum_drop q log q <= 0
    rows = ce_kept - ratio * drop_qlogq
    return rows, 1.0 - ratio, torch.zeros_like(tk), ones, p


def _outside_autocast(fn):
    """Run an autograd.Function method with autocast off: the op chooses its own
    precision (fp32 accumulation), and autocast would turn its reductions into fp16/bf16
    ops whose results no longer fit the fp32 buffers (an error, or lost precision)."""
    @functools.wraps(fn)
    def run(ctx, *args):
        dev = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=dev, enabled=False):
            return fn(ctx, *args)
    return run


class _LogitsKLFunction(torch.autograd.Function):
    """Per-row loss [N, L] (0 on ignored rows) plus lse_s, lse_t [N*L]; gradient to s only.

    Once differentiable on every backend: the chunked backward is not differentiable
    itself, so ``create_graph=True`` raises a RuntimeError rather than a silently cut graph.

    Dense teacher: ``t`` is the teacher tensor. TopK teacher: ``t`` is None and ``topk`` =
    (indices int64 [N, L, k], kept probabilities [N, L, k], mode).
    """

    @staticmethod
    @_outside_autocast
    def forward(ctx, s, t, valid, idx, p, mode, backend, block):
        N, L, V = s.shape
        acc = _acc(s)
        if backend == "triton":
            from ..triton import logits_kl as tri
            loss, lse_s, lse_t, sum_s, qlogq = tri.logits_kl_fwd(s, t, valid, block)
        else:
            loss, lse_s, lse_t, sum_s, qlogq = _torch_fwd(s, t, valid)
        A = Uc = Wk = w = None
        if idx is not None:
            # TopK teacher: the kept student logits are a cheap [N, L, k] gather.
            zero = torch.zeros((), dtype=acc, device=s.device)
            sk = torch.where(valid[..., None], s.gather(-1, idx).to(acc), zero)
            rows, A, Uc, Wk, w = _topk_terms(mode, p, sk, lse_s.to(acc).reshape(N, L),
                                             sum_s.to(acc).reshape(N, L),
                                             qlogq.to(acc).reshape(N, L), V, acc)
            loss = torch.where(valid, rows, zero).reshape(-1)
        ctx.backend, ctx.block = backend, block
        ctx.save_for_backward(s, t, valid, idx, lse_s, lse_t, A, Uc, Wk, w)
        ctx.mark_non_differentiable(lse_s, lse_t)
        return loss.reshape(N, L), lse_s, lse_t

    @staticmethod
    @_outside_autocast
    def backward(ctx, grad_rows, _g1, _g2):
        refuse_double_backward("logits_kl", "every backend is", "is not supported")
        s, t, valid, idx, lse_s, lse_t, A, Uc, Wk, w = ctx.saved_tensors
        none = (None,) * 7
        if grad_rows is None or not ctx.needs_input_grad[0]:
            return (None,) + none
        N, L, V = s.shape
        acc = _acc(s)
        zero = torch.zeros((), dtype=acc, device=s.device)
        g = torch.where(valid, grad_rows.to(acc), zero)              # [N, L]
        if idx is None:
            a_r, u_r = g.reshape(-1), torch.zeros_like(g).reshape(-1)
        else:
            a_r, u_r = (g * A).reshape(-1), (g * Uc).reshape(-1)
        if ctx.backend == "triton":
            from ..triton import logits_kl as tri
            grad = tri.logits_kl_bwd(s, t, lse_s, lse_t, a_r, u_r, ctx.block)
        else:
            grad = _torch_bwd(s, t, lse_s, lse_t, a_r, u_r)
        if idx is not None:
            # Kept entries: g * (Wk * softmax(s)_i - w_i), computed in fp32 and written once.
            sk = torch.where(valid[..., None], s.gather(-1, idx).to(acc), zero)
            qk = torch.exp(sk - lse_s.to(acc).reshape(N, L, 1))
            dk = g[..., None] * (Wk[..., None] * qk - w)
            dk = torch.where(valid[..., None], dk, zero).to(s.dtype)
            # index_copy_ into the flat gradient: scatter_ on a bf16 CPU tensor makes an
            # fp32 copy of the whole [N, L, V]. Positions are unique within a row.
            flat = (torch.arange(N * L, device=s.device).reshape(N, L, 1) * V + idx).reshape(-1)
            grad.view(-1).index_copy_(0, flat, dk.reshape(-1))
        return (grad,) + none


def sparse_teacher_probs(teacher, topk_mode, acc):
    """(mode, p [..., k]) of a TopK logits or sampled teacher: the exact kept probabilities
    exp(v - lse_t) and the chosen treatment of the dropped mass, or a sampled teacher's
    importance weights with ``"kept"`` (sum_k -p_hat log q is the unbiased estimate)."""
    if teacher.kind == "sampled":
        return "kept", teacher.values.detach().to(acc)
    mode = DEFAULT_TOPK_MODE if topk_mode is None else topk_mode
    return mode, torch.exp(teacher.values.detach().to(acc) - teacher.lse.detach().to(acc)[..., None])


def _check_rows(rows, valid, s, t):
    """One host sync: every supervised row's loss must be finite. Only when one is not are
    the offending rows examined, to name the argument at fault."""
    bad = valid & ~torch.isfinite(rows.detach())
    if not bool(bad.any()):
        return
    n, l = bad.nonzero(as_tuple=True)
    acc = _acc(s)

    def row_ok(x):
        lse = torch.logsumexp(x[n, l].to(acc), dim=-1)
        return bool(torch.isfinite(lse).all())

    if t is not None and not row_ok(t):
        _fail(ValueError, "teacher", "a row with label != -100 has NaN or +inf logits, or only -inf logits")
    if not row_ok(s):
        _fail(ValueError, "student_logits", "a row with label != -100 has NaN or +inf logits, or only "
              "-inf logits")
    _fail(ValueError, "student_logits", "the loss is not finite: -inf logits where the teacher puts "
          "probability mass")


# ---------------------------------------------------------------------------- public API
def logits_kl(student_logits, teacher, labels, *, reduction="mean", backend="auto",
              check_values=True, topk_mode=None, _block=None):
    """Logits distillation loss: CE(student, softmax(teacher)) over supervised tokens.

    Args:
        student_logits: [N, L, V] fp32/fp16/bf16 (fp64 on the torch backend); any strides
            (a non-contiguous last dim is made contiguous). Receives the gradient.
        teacher: dense teacher logits [N, L, V] (any float dtype, no gradient), or a
            :class:`TopK` of kind ``"logits"`` standing for them (see ``topk_mode``), or a
            :class:`SampledTeacher` (kind ``"sampled"``): the loss against its importance
            weights p_hat, sum_k -p_hat log softmax(s), an unbiased estimate of the dense
            value and gradient.
        labels: [N, L] integer; rows with ``labels == -100`` are ignored (never read).
            Aligned with the logits: **no shift** is applied (see the module docstring).
        reduction: ``"mean"`` (default, the published term) over supervised tokens;
            ``"sum"``; ``"none"`` -> [N, L] per-token losses, 0 on ignored tokens.
            With no supervised token, ``"mean"`` is 0 (not NaN) with a zero gradient.
        backend: ``"auto"`` (triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``.
        check_values: after the forward, one host sync checks that every supervised row
            has a finite loss; if one does not, a ValueError names the argument at fault
            (NaN/+inf logits, a row of only -inf, or -inf student logits where the
            teacher has mass). TopK teachers are also checked with ``TopK.check`` on
            the supervised rows. Ignored rows are never read (dense or TopK), so they may
            hold anything. With ``check_values=False`` the TopK indices of supervised rows
            are still range-checked (they are gathered).
        topk_mode: approximation for a TopK logits teacher with k < V:
            ``"student_tail"`` (default), ``"uniform"``, ``"kept"`` or ``"renorm"``
            (``TOPK_MODES``; module docstring). Must be None for a sampled teacher.

    Returns:
        fp32 scalar (fp64 for fp64 logits), or [N, L] for ``reduction="none"``.
        Once differentiable: a backward with ``create_graph=True`` raises a RuntimeError.
    """
    _check_args(student_logits, teacher, labels, reduction, topk_mode, check_values)
    s = student_logits
    if s.stride(-1) != 1:
        s = s.contiguous()
    N, L, V = s.shape
    bk = _resolve_backend(backend, s)
    acc = _acc(s)
    valid = labels != IGNORE_INDEX
    if isinstance(teacher, TopK):
        if check_values:
            teacher.check("teacher", rows=valid)
        mode, p = sparse_teacher_probs(teacher, topk_mode, acc)
        t = None
        # Ignored rows are never read: their indices become 0..k-1 (in range, distinct) and
        # their probabilities 0, so whatever they hold (NaN, garbage) cannot leak.
        keep = valid[..., None]
        idx = torch.where(keep, teacher.indices.long(),
                          torch.arange(teacher.k, device=s.device).expand(teacher.indices.shape))
        if not check_values and idx.numel():     # gathered below: never out of bounds
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= V:
                _fail(ValueError, "teacher", f"TopK indices must lie in [0, full_size={V})")
        p = torch.where(keep, p, torch.zeros((), dtype=acc, device=s.device))
    else:
        t = teacher.detach()
        if t.stride(-1) != 1:
            t = t.contiguous()
        idx = p = mode = None
    rows, lse_s, lse_t = _LogitsKLFunction.apply(s, t, valid, idx, p, mode, bk, _block)
    if check_values and N * L:
        _check_rows(rows, valid, s, t)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


class LogitsKLLoss(torch.nn.Module):
    """Module form of :func:`logits_kl`: ``LogitsKLLoss()(student_logits, teacher, labels)``."""

    def __init__(self, reduction="mean", backend="auto", check_values=True, topk_mode=None):
        super().__init__()
        if reduction not in REDUCTIONS:
            _fail(ValueError, "reduction", f"must be one of {REDUCTIONS}, got {reduction!r}")
        if topk_mode is not None and topk_mode not in TOPK_MODES:
            _fail(ValueError, "topk_mode", f"must be one of {TOPK_MODES}, got {topk_mode!r}")
        self.reduction, self.backend = reduction, backend
        self.check_values, self.topk_mode = check_values, topk_mode

    def forward(self, student_logits, teacher, labels):
        return logits_kl(student_logits, teacher, labels, reduction=self.reduction,
                         backend=self.backend, check_values=self.check_values,
                         topk_mode=self.topk_mode)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
