"""Input validation shared by every attention op.

Every public op funnels its arguments through :func:`check_attention_args` so that all
backends see the same normalised, *already validated* inputs. With ``check_values=False``
the value scans (NaN/inf, score overflow, index ranges) are skipped to save a host sync,
but what a kernel *indexes with* is still re-checked by every backend before it is used:
the C++ backend on the host, the CUDA backend with a device-side flag, the Triton and
torch backends with :func:`ensure_index_ranges` (B x S + B x Q + B x L values, one sync).
A bad head or query position is therefore always a ValueError naming it, never an
out-of-bounds read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(exc, name, msg):
    """Raise ``exc("<name>: <msg>")``: the one argument-error helper (every op's and the
    teacher cache's validation names the argument this way)."""
    raise exc(f"{name}: {msg}")


def _check_float(name, t, allowed=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        _fail(TypeError, name, f"dtype {t.dtype} is not supported (expected one of {list(allowed)})")


def abs_max(t):
    """max |t| as a 0-dim fp64 tensor on t's device (NaN if t holds a NaN, inf if an inf;
    0 for an empty tensor). One aminmax pass: as fast as a sum, and it cannot overflow."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(-lo.double(), hi.double())


def _check_finite(items, extra=()):
    """Raise ValueError naming the first argument holding NaN/inf, then the first failed
    `extra` (name, bool-tensor, message) check, at one host sync for all of them.

    `items` are (name, tensor) pairs or (name, tensor, abs_max_of_tensor) triples (when
    the caller needs the magnitude anyway); a NaN or inf makes the abs-max non-finite.
    """
    if not items and not extra:
        return
    mags = [it[2] if len(it) > 2 else abs_max(it[1]) for it in items]
    flags = torch.stack([~torch.isfinite(m) for m in mags] + [e[1] for e in extra]).cpu().tolist()
    for it, bad in zip(items, flags[:len(items)]):
        if bad:
            _fail(ValueError, it[0], "contains NaN or infinite values")
    for (name, _, msg), bad in zip(extra, flags[len(items):]):
        if bad:
            _fail(ValueError, name, msg)


def score_overflow_check(name, q_max, k_max, D, scale, dtype):
    """An `extra` check for :func:`_check_finite`: can a score overflow the accumulator?

    Every backend forms z = scale * q . k in fp32 (fp64 for fp64 input), and the base-2
    kernels multiply by log2(e) once more. |z| <= max(1, 2 * scale) * D * max|q| * max|k|,
    so when that bound reaches a quarter of the accumulator's largest value (8.5e37 in
    fp32) a score may become inf and the softmax NaN. Such input is refused with a
    ValueError on every backend: a sufficient condition, so q and k with huge but
    orthogonal rows are refused too; no trained model comes near it (fp16 input never
    can: D * 65504^2 stays far below it for any D < 2^64).
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    limit = torch.finfo(acc).max / 4
    bound = q_max * k_max * (float(D) * max(1.0, 2.0 * float(scale)))
    return (name, bound >= limit,
            f"attention scores may overflow the {str(acc)[6:]} accumulator "
            f"(scale * D * max|q| * max|k| >= {limit:.3g}); rescale q and k")


def kl_overflow_checks(a: "AttnArgs", t_max, row_mass, floor=None):
    """`extra` checks for :func:`_check_finite`: can attention_kl's loss, or its gradients
    for an upstream gradient of at most 1 per row, overflow the accumulator?

    :func:`score_overflow_check` keeps every score finite, but the loss sums B*S*Q rows of
    up to ~2 * max|z| each, and dk sums as many rows of scale * |q|: inputs that pass it
    can still give an inf loss or gradient on every backend (near-limit q and k:
    all three backends returned inf for reduction 'sum'/'mean'). So attention_kl also
    refuses, with the same rule (a sufficient bound reaching a quarter of the accumulator's
    range, fp32 for fp32/fp16/bf16 input), what its own sums could overflow:

    * the loss: n * (T * (2 * Z + log L + |log t_max| + tail) + L), with n active rows,
      Z = scale * D * max|q| * max|k| (|z| <= Z, so |lse| <= Z + log L), T a bound on a
      row's teacher mass, and L bounding the small-t part of sum t log t (|t log t| <= 1/e);
      ``teacher`` is named when the teacher alone (Z = 0) overflows it, else ``q``;
    * dk <= 2 * scale * max|q| * T * n * amp and dq <= 2 * scale * max|k| * T * Q * amp
      (sum_j |dz_j| <= 2 g T per row; a position repeats at most Q times), naming q / k.

    ``floor``: the TopK bucket's floor on the dropped mass (ops/attention_kl.py, _TAIL_FLOOR): its gradient is
    formed from two parts of size up to 1/floor times the gradient (amp) and its row holds
    delta * log(1/floor) more (tail). Gradients are bounded in the accumulator only: a
    gradient whose exact value exceeds fp16's range is inf in an fp16 gradient, as with
    plain autograd (what a GradScaler detects), since a bound against 65504 would refuse
    ordinary fp16 input. No trained model comes near these bounds: for L = 4096,
    n = 10^6 rows, Z = 10^4 they stay under 10^17.
    """
    if a.q_absmax is None or a.k_absmax is None:
        return []
    acc = torch.float64 if a.q.dtype == torch.float64 else torch.float32
    limit = torch.finfo(acc).max / 4
    amp, tail = (1.0, 0.0) if floor is None else (1.0 / floor, -math.log(floor))
    n = a.row_active.sum().double()
    t_max = t_max.double()
    row_mass = row_mass.double()
    tlog = torch.log(torch.where(t_max > 0, t_max, torch.ones_like(t_max))).abs()
    own = row_mass * (math.log(a.L) + 1.0 + tlog + tail) + a.L
    zmax = a.scale * a.D * a.q_absmax * a.k_absmax
    grad_k = 2.0 * amp * a.scale * a.q_absmax * row_mass * n
    grad_q = 2.0 * amp * a.scale * a.k_absmax * row_mass * float(a.Q)
    name = str(acc)[6:]
    return [
        ("teacher", n * own >= limit, f"its mass is so large that the loss may overflow the {name} "
         "accumulator (active rows * row mass * log terms)"),
        ("q", n * (own + 2.0 * row_mass * zmax) >= limit,
         f"the loss may overflow the {name} accumulator (active rows * teacher row mass * 2 * scale * "
         f"D * max|q| * max|k| >= {limit:.3g}); rescale q and k"),
        ("q", grad_k >= limit, f"the gradient of k may overflow the {name} accumulator (2 * scale * "
         f"max|q| * teacher row mass * active rows >= {limit:.3g}); rescale q"),
        ("k", grad_q >= limit, f"the gradient of q may overflow the {name} accumulator (2 * scale * "
         f"max|k| * teacher mass * Q >= {limit:.3g}); rescale k"),
    ]


def _check_index(name, t):
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, f"expected an integer torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        _fail(TypeError, name, f"expected an integer dtype, got {t.dtype}")
    if t.dtype in _SHELL_UINTS:
        _fail(TypeError, name, f"dtype {t.dtype} is not supported (torch cannot compare it on every "
              "device); use int64, int32, int16, int8 or uint8")


# uint32/uint64 exist in torch but without comparison kernels (lt/gt raise on CPU), so
# their range could not be checked the same way on every backend: refused up front.
_SHELL_UINTS = tuple(getattr(torch, n) for n in ("uint32", "uint64") if hasattr(torch, n))


@dataclass
class AttnArgs:
    """Normalised arguments of one attention op call.

    heads:    int32 [B, S], -1 = empty slot
    queries:  int32 [B, Q] absolute positions (arange(L) when the caller passed None)
    key_mask: int32 [B, L] of 0/1
    row_active: bool [B, S, Q] (slot holds a head and the query position is a real token)
    """
    q: torch.Tensor
    k: torch.Tensor
    heads: torch.Tensor
    queries: torch.Tensor
    key_mask: torch.Tensor
    row_active: torch.Tensor
    scale: float
    all_queries: bool
    B: int
    H: int
    Hkv: int
    L: int
    D: int
    S: int
    Q: int
    #: True when check_attention_args already range-checked heads, queries and the mask
    #: (check_values=True); backends that index with them re-check them otherwise.
    indices_checked: bool = False
    #: max|q| and max|k| (0-dim fp64 tensors on q's device) when check_values scanned
    #: them; attention_kl bounds its loss and gradients with them (kl_overflow_checks).
    q_absmax: Optional[torch.Tensor] = None
    k_absmax: Optional[torch.Tensor] = None

    @property
    def group(self) -> int:
        return self.H // self.Hkv


def check_attention_args(q, k, heads, queries=None, attention_mask=None, scale=None,
                         check_values=True) -> AttnArgs:
    """Validate and normalise the common (q, k, heads, queries, mask, scale) contract."""
    _check_float("q", q)
    _check_float("k", k)
    if q.dim() != 4:
        _fail(ValueError, "q", f"expected shape [B, H, L, D], got {tuple(q.shape)}")
    if k.dim() != 4:
        _fail(ValueError, "k", f"expected shape [B, Hkv, L, D], got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        _fail(TypeError, "k", f"dtype {k.dtype} differs from q's dtype {q.dtype}")
    if k.device != q.device:
        _fail(ValueError, "k", f"is on {k.device}, q is on {q.device}")
    B, H, L, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or Lk != L or Dk != D:
        _fail(ValueError, "k", f"shape {tuple(k.shape)} does not match q {tuple(q.shape)} "
              "(expected [B, Hkv, L, D] with q's B, L, D)")
    if B == 0 or L == 0 or D == 0 or H == 0 or Hkv == 0:
        _fail(ValueError, "q", f"has an empty dimension: {tuple(q.shape)}")
    if H % Hkv != 0:
        _fail(ValueError, "k", f"query heads H={H} are not a multiple of key heads Hkv={Hkv}")
    dev = q.device

    # heads -> int32 [B, S]
    _check_index("heads", heads)
    if heads.device != dev:
        _fail(ValueError, "heads", f"is on {heads.device}, q is on {dev}")
    if heads.dim() == 1:
        heads = heads.unsqueeze(0).expand(B, -1)
    elif heads.dim() == 2:
        if heads.shape[0] != B:
            _fail(ValueError, "heads", f"shape {tuple(heads.shape)}: first dim must be the batch size {B}")
    else:
        _fail(ValueError, "heads", f"expected shape [S] or [B, S], got {tuple(heads.shape)}")
    S = heads.shape[1]

    # queries -> int32 [B, Q]
    all_queries = queries is None
    if all_queries:
        queries = torch.arange(L, device=dev, dtype=torch.int32).unsqueeze(0).expand(B, L)
    else:
        _check_index("queries", queries)
        if queries.device != dev:
            _fail(ValueError, "queries", f"is on {queries.device}, q is on {dev}")
        if queries.dim() != 2 or queries.shape[0] != B:
            _fail(ValueError, "queries", f"expected shape [B={B}, Q], got {tuple(queries.shape)}")
    Q = queries.shape[1]

    # attention_mask -> int32 [B, L]
    if attention_mask is None:
        key_mask = torch.ones(B, L, device=dev, dtype=torch.int32)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            _fail(TypeError, "attention_mask", f"expected a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            _fail(TypeError, "attention_mask", f"expected bool or integer 0/1, got {attention_mask.dtype}")
        if attention_mask.dtype in _SHELL_UINTS:
            _fail(TypeError, "attention_mask", f"dtype {attention_mask.dtype} is not supported; use bool "
                  "or int64, int32, int16, int8, uint8")
        if attention_mask.device != dev:
            _fail(ValueError, "attention_mask", f"is on {attention_mask.device}, q is on {dev}")
        if tuple(attention_mask.shape) != (B, L):
            _fail(ValueError, "attention_mask", f"expected shape [B={B}, L={L}], got {tuple(attention_mask.shape)}")
        key_mask = _to_int32(attention_mask, 2)

    if scale is None:
        scale = D ** -0.5
    else:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            _fail(TypeError, "scale", f"expected a float, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            _fail(ValueError, "scale", f"must be finite and > 0, got {scale}")

    qm = km = None
    if check_values:
        checks = _index_checks(heads, None if all_queries else queries,
                               None if attention_mask is None else attention_mask, H, L)
        if S > 1:
            hs, _ = torch.sort(heads.long(), dim=1)
            dup = ((hs[:, 1:] == hs[:, :-1]) & (hs[:, 1:] >= 0)).any()
            checks.append(("heads", dup, "the same head appears twice in one sample"))
        qm, km = abs_max(q), abs_max(k)
        checks.append(score_overflow_check("q", qm, km, D, scale, q.dtype))
        _check_finite([("q", q, qm), ("k", k, km)], extra=checks)   # one host sync for everything

    # Values of 64-bit index tensors that do not fit int32 must not wrap into range.
    heads = _to_int32(heads, -2)
    queries = _to_int32(queries, -1)
    key_mask = key_mask.contiguous()
    if Q:
        # Clamped so that unchecked positions (check_values=False) cannot make this gather
        # read out of bounds (a device-side assert on CUDA); the backends then reject them.
        qpos = queries.long().clamp(0, L - 1)
        qmask = torch.gather(key_mask, 1, qpos).bool() & (queries >= 0) & (queries < L)
    else:
        qmask = torch.zeros(B, 0, dtype=torch.bool, device=dev)
    row_active = (heads >= 0).unsqueeze(2) & qmask.unsqueeze(1)    # [B, S, Q]
    return AttnArgs(q=q, k=k, heads=heads, queries=queries, key_mask=key_mask,
                    row_active=row_active, scale=scale, all_queries=all_queries,
                    B=B, H=H, Hkv=Hkv, L=L, D=D, S=S, Q=Q,
                    indices_checked=bool(check_values), q_absmax=qm, k_absmax=km)


def _to_int32(t, bad):
    """int32 copy of an index tensor; values outside int32 become ``bad`` (out of range).

    Only dtypes wider than int32 can hold such values. Narrower ones (int8, int16, uint8)
    must not be compared with int32's limits: torch casts the Python bound to the tensor's
    own dtype, where -2**31 wraps to 0, and every value of an int16 tensor then compared
    as out of range (int16 heads all became -2: the cpu backend refused them and
    the torch backend silently treated every slot as empty).
    """
    if t.dtype != torch.bool and t.numel() and _wider_than_int32(t.dtype):
        lim = torch.iinfo(torch.int32)
        t = torch.where((t < lim.min) | (t > lim.max), torch.full_like(t, bad), t)
    return t.to(torch.int32).contiguous()


def _wider_than_int32(dtype):
    if dtype.is_floating_point or dtype.is_complex:
        return False
    info = torch.iinfo(dtype)
    lim = torch.iinfo(torch.int32)
    return info.min < lim.min or info.max > lim.max


def _index_checks(heads, queries, mask, H, L):
    """(name, bad-flag tensor, message) range checks of what the kernels index with."""
    hl = heads.long()
    checks = [("heads", ((hl < -1) | (hl >= H)).any(), f"values must lie in [-1, {H}) (-1 = empty slot)")]
    if queries is not None and queries.numel():
        ql = queries.long()
        checks.append(("queries", ((ql < 0) | (ql >= L)).any(), f"positions must lie in [0, {L})"))
    if mask is not None and mask.numel():
        am = mask.long()
        checks.append(("attention_mask", ((am != 0) & (am != 1)).any(), "values must be 0 or 1"))
    return checks


def ensure_index_ranges(a: AttnArgs) -> None:
    """Re-check heads, query positions and mask values of `a` unless check_attention_args
    already did (see the module docstring). Cheap: B*S + B*Q + B*L values, one sync."""
    if a.indices_checked:
        return
    _check_finite([], extra=_index_checks(a.heads, a.queries, a.key_mask, a.H, a.L))
    a.indices_checked = True


def check_teacher_rows(teacher, a: AttnArgs, check_values=True, name="teacher"):
    """Dense teacher attention rows [B, S, Q, L], any float dtype, finite and >= 0, and
    (when ``a`` carries max|q|, max|k|) a loss that cannot overflow: kl_overflow_checks
    with t_max = max t and the largest row mass. One host sync."""
    _check_float(name, teacher)
    if teacher.device != a.q.device:
        _fail(ValueError, name, f"is on {teacher.device}, q is on {a.q.device}")
    exp = (a.B, a.S, a.Q, a.L)
    if tuple(teacher.shape) != exp:
        _fail(ValueError, name, f"expected shape [B, S, Q, L] = {list(exp)}, got {list(teacher.shape)}")
    if check_values and teacher.numel():
        lo, hi = torch.aminmax(teacher.detach())
        mag = torch.maximum(-lo.double(), hi.double())
        extra = [(name, lo < 0, "contains negative probabilities")]
        # Only meaningful for finite teachers; _check_finite names a NaN/inf teacher first.
        if a.q_absmax is not None:
            safe = torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag))
            mass = teacher.detach().sum(-1, dtype=torch.float64).amax()
            mass = torch.where(torch.isfinite(mass), mass, torch.zeros_like(mass)).clamp_min(0)
            extra += kl_overflow_checks(a, safe, mass)
        _check_finite([(name, teacher, mag)], extra=extra)
    return teacher


REDUCTIONS = ("none", "sum", "mean", "batchmean")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        _fail(ValueError, "reduction", f"must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_rows(rows: torch.Tensor, row_active: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-row values [B, S, Q] (already 0 on inactive rows).

    'mean' averages over active rows, 'batchmean' is (1/B) * sum_b mean over sample b's
    active rows; a sample (or a batch) with no active row contributes 0, not NaN.
    """
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    B = rows.shape[0]
    if reduction == "mean":
        n = row_active.sum().clamp_min(1).to(rows.dtype)
        return rows.sum() / n
    per_sample = rows.reshape(B, -1).sum(1)
    n = row_active.reshape(B, -1).sum(1).clamp_min(1).to(rows.dtype)
    return (per_sample / n).sum() / B


def triton_entry_checks(a: AttnArgs) -> None:
    """First lines of every Triton launcher, whoever calls it: fp64 is refused (TypeError,
    see :func:`seekr_kernels._backend.supports`) and the index ranges are re-checked unless
    already validated, so a head >= H can never make a kernel read out of bounds."""
    from ._backend import supports
    ok, why, exc = supports("triton", a.q.dtype)
    if not ok:
        raise exc(why)
    ensure_index_ranges(a)


def refuse_double_backward(op: str, what="the fused backends are",
                           hint="needs backend='torch'") -> None:
    """First line of a fused backward: the kernels are not differentiable themselves.

    autograd runs a backward with grad mode on exactly when the caller asked for
    ``create_graph=True``. Without this check the gradient would come back silently cut
    from the graph (``torch.autograd.function.once_differentiable`` only errors when the
    incoming gradient itself requires grad, which a mean's constant gradient does not).
    """
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: {what} once differentiable; a double backward "
                           f"(create_graph=True) {hint}")
