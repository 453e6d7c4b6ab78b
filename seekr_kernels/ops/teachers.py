"""Compact teacher: the k largest entries of each row, for attention rows and for logits.

A :class:`TopK` stands in for a dense teacher tensor ``x [..., N]`` wherever an op accepts
one (``attention_kl``, ``logits_kl``). It keeps, per row of the last dimension,

* ``values  [..., k]``  the k largest entries (x's dtype),
* ``indices [..., k]``  their positions in ``[0, N)`` (int32),
* ``full_size``         N,
* ``kind``              ``"probs"`` (x holds probabilities, e.g. attention rows) or
  ``"logits"`` (x holds unnormalised log-probabilities, e.g. LM logits),
* ``lse [...]``         fp32, logits only: ``logsumexp(x, -1)`` of the dense row, so the
  exact probability of every kept entry, ``exp(value - lse)``, is recoverable,
* ``mass [...]``        fp32, probs only (optional): ``sum(x, -1)`` of the dense row, the
  total teacher mass; lets a consumer know how much mass the dropped entries held.

What is approximated when k < N is decided by each consumer and documented there; for
attention see :func:`seekr_kernels.ops.attention_kl.attention_kl_topk_rows`.

A third kind, ``"sampled"`` (built by :meth:`SampledTeacher.from_dense`), stands for
teacher *probabilities* p = softmax(x) of logits x: ``values`` are importance weights
p_hat >= 0 at k sampled positions with E[p_hat_v] = p_v for every v (an unbiased sparse
estimate of p; 0 on unused slots), no lse and no mass. Every loss linear in p (the
logits-distillation cross entropy and its gradient) is then unbiased. See
:class:`SampledTeacher`.

Index storage
-------------
In memory ``indices`` are int32 (what every consumer indexes with). On disk
(:class:`~seekr_kernels.TeacherCache`, :class:`~seekr_kernels.ReplayMemory`) they are
stored compactly by :func:`pack_indices`: the low 16 bits as int16 (enough on their own
when N <= 65536, i.e. L and Llama-2's 32000 vocabulary) and, for larger N (Llama-3's
128256), the remaining ``ceil(log2 N) - 16`` high bits bit-packed into uint8 (17 bits a
index at N = 128256: 2.125 bytes instead of 4). Keeping them packed in memory as well
would save 2 bytes per entry of host memory at the cost of a decode in every consumer;
the replay memory keeps them int32 and pays 2 of its k*(2+4) bytes per row for that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._checks import _fail


KINDS = ("probs", "logits", "sampled")

# from_dense works through the rows in chunks so that its fp32 temporaries (for logsumexp
# of bf16 logits) stay bounded, whatever the size of x.
_CHUNK_ELEMS = 1 << 24




def _check_dense(x, k):
    """x: a float tensor [..., N], N >= 1; k: an int in [1, N]."""
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, "x", f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        _fail(TypeError, "x", f"expected a floating dtype, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        _fail(ValueError, "x", f"expected shape [..., N] with N >= 1, got {tuple(x.shape)}")
    N = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int):
        _fail(TypeError, "k", f"expected an int, got {type(k).__name__}")
    if not 1 <= k <= N:
        _fail(ValueError, "k", f"must lie in [1, {N}] (the size of x's last dim), got {k}")


@dataclass(eq=False)
class TopK:
    """k largest entries of each row of a dense teacher tensor (see the module docstring).

    Construct with :meth:`from_dense`, or directly from tensors (the constructor checks
    shapes, dtypes and devices; :meth:`check` also checks values, at one host sync).
    """
    values: torch.Tensor
    indices: torch.Tensor
    full_size: int
    kind: str = "probs"
    lse: Optional[torch.Tensor] = None
    mass: Optional[torch.Tensor] = None

    def __post_init__(self):
        v, i = self.values, self.indices
        if not isinstance(v, torch.Tensor):
            _fail(TypeError, "values", f"expected a torch.Tensor, got {type(v).__name__}")
        if not v.dtype.is_floating_point:
            _fail(TypeError, "values", f"expected a floating dtype, got {v.dtype}")
        if not isinstance(i, torch.Tensor):
            _fail(TypeError, "indices", f"expected a torch.Tensor, got {type(i).__name__}")
        if i.dtype.is_floating_point or i.dtype.is_complex or i.dtype == torch.bool:
            _fail(TypeError, "indices", f"expected an integer dtype, got {i.dtype}")
        if v.dim() < 1:
            _fail(ValueError, "values", "expected at least one dimension [..., k]")
        if tuple(i.shape) != tuple(v.shape):
            _fail(ValueError, "indices", f"shape {tuple(i.shape)} differs from values {tuple(v.shape)}")
        if i.device != v.device:
            _fail(ValueError, "indices", f"is on {i.device}, values are on {v.device}")
        if isinstance(self.full_size, bool) or not isinstance(self.full_size, int):
            try:
                fs = int(self.full_size)
                if fs != self.full_size:
                    raise ValueError
            except (TypeError, ValueError):
                _fail(TypeError, "full_size", f"expected an int, got {self.full_size!r}")
            self.full_size = fs
        if self.full_size < 1:
            _fail(ValueError, "full_size", f"must be >= 1, got {self.full_size}")
        k = v.shape[-1]
        if not 1 <= k <= self.full_size:
            _fail(ValueError, "values", f"last dim k={k} must lie in [1, full_size={self.full_size}]")
        if self.full_size > 2 ** 31 - 1:
            _fail(ValueError, "full_size", "does not fit int32 indices")
        if self.kind not in KINDS:
            _fail(ValueError, "kind", f"must be one of {KINDS}, got {self.kind!r}")
        if i.dtype != torch.int32:
            self.indices = i.to(torch.int32)
        for name in ("lse", "mass"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                _fail(TypeError, name, f"expected a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                _fail(TypeError, name, f"expected a floating dtype, got {t.dtype}")
            if tuple(t.shape) != tuple(v.shape[:-1]):
                _fail(ValueError, name, f"expected shape {tuple(v.shape[:-1])} (values without "
                      f"the last dim), got {tuple(t.shape)}")
            if t.device != v.device:
                _fail(ValueError, name, f"is on {t.device}, values are on {v.device}")
            if t.dtype not in (torch.float32, torch.float64):
                setattr(self, name, t.float())
        if self.kind == "sampled":
            if self.lse is not None or self.mass is not None:
                _fail(ValueError, "lse" if self.lse is not None else "mass",
                      "a TopK of kind 'sampled' holds importance weights only (no lse, no mass)")
        elif self.kind == "logits":
            if self.lse is None:
                _fail(ValueError, "lse", "a TopK of kind 'logits' needs the rows' log-sum-exp "
                      "(TopK.from_dense computes it)")
            if self.mass is not None:
                _fail(ValueError, "mass", "is for kind 'probs' only")
        elif self.lse is not None:
            _fail(ValueError, "lse", "is for kind 'logits' only (kind 'probs' may carry mass)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, x: torch.Tensor, k: int, kind: str = "probs") -> "TopK":
        """Keep the k largest entries of every row of ``x [..., N]`` (no gradient).

        ``kind="probs"``: x holds probabilities (>= 0); the row sums are kept as ``mass``.
        ``kind="logits"``: x holds logits; the exact row log-sum-exp is kept as ``lse``.
        Ties are broken by torch.topk. Values keep x's dtype; lse/mass are fp32 (fp64 for
        fp64 x).

        x is checked as the dense teacher would be (one host sync), so a TopK never admits
        what the dense path refuses: ValueError naming ``x`` for NaN or infinite
        probabilities, negative ones, NaN or +inf logits, a row of only -inf logits, or a
        row with fewer than k finite logits (a kept -inf logit; pick a smaller k).
        """
        _check_dense(x, k)
        if kind not in KINDS:
            _fail(ValueError, "kind", f"must be one of {KINDS}, got {kind!r}")
        if kind == "sampled":
            _fail(ValueError, "kind", "a sampled teacher is drawn by SampledTeacher.from_dense")
        N = x.shape[-1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, N)
        R = x2.shape[0]
        values = x2.new_empty((R, k))
        indices = torch.empty((R, k), dtype=torch.int64, device=x.device)
        red = torch.empty((R,), dtype=acc, device=x.device)
        step = max(1, _CHUNK_ELEMS // N)
        for r0 in range(0, R, step):
            xc = x2[r0:r0 + step]
            vc, ic = torch.topk(xc, k, dim=-1)
            values[r0:r0 + step] = vc
            indices[r0:r0 + step] = ic
            if kind == "logits":
                red[r0:r0 + step] = torch.logsumexp(xc.to(acc), dim=-1)
            else:
                red[r0:r0 + step] = xc.sum(-1, dtype=acc)
        _check_dense_rows(x2, values, red, kind)
        values = values.reshape(*lead, k)
        indices = indices.to(torch.int32).reshape(*lead, k)
        red = red.reshape(lead)
        if kind == "logits":
            return cls(values, indices, N, kind, lse=red)
        return cls(values, indices, N, kind, mass=red)

    # ------------------------------------------------------------------ properties
    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense tensor this stands for: ``values.shape[:-1] + (full_size,)``."""
        return torch.Size((*self.values.shape[:-1], self.full_size))

    @property
    def row_shape(self) -> torch.Size:
        return self.values.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def dim(self) -> int:
        return self.values.dim()

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (values, indices, lse/mass)."""
        n = 0
        for t in (self.values, self.indices, self.lse, self.mass):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def __repr__(self):
        extra = " +lse" if self.lse is not None else (" +mass" if self.mass is not None else "")
        return (f"{type(self).__name__}(kind={self.kind!r}, shape={list(self.shape)}, k={self.k}, "
                f"dtype={self.dtype}, device={self.device}{extra})")

    # ------------------------------------------------------------------ conversions
    def to(self, device=None, dtype=None, non_blocking=False) -> "TopK":
        """A copy on ``device`` and/or with values cast to ``dtype`` (indices stay int32)."""
        def mv(t, dt=None):
            if t is None:
                return None
            return t.to(device=device if device is not None else t.device,
                        dtype=dt if dt is not None else t.dtype, non_blocking=non_blocking)
        if dtype is not None and not dtype.is_floating_point:
            _fail(TypeError, "dtype", f"expected a floating dtype, got {dtype}")
        return type(self)(mv(self.values, dtype), mv(self.indices), self.full_size, self.kind,
                          lse=mv(self.lse), mass=mv(self.mass))

    def probs(self) -> torch.Tensor:
        """Probabilities of the kept entries, [..., k] fp32 (fp64 for fp64 lse/values).

        probs: the values themselves; logits: ``exp(values - lse)`` (exact, not renormalised);
        sampled: the importance weights (unbiased estimates of the probabilities).
        """
        if self.kind == "logits":
            return torch.exp(self.values.to(self.lse.dtype) - self.lse.unsqueeze(-1))
        acc = torch.float64 if self.values.dtype == torch.float64 else torch.float32
        return self.values.to(acc)

    def log_probs(self) -> torch.Tensor:
        """Exact log-probabilities of the kept entries (logits only), [..., k]."""
        if self.kind != "logits":
            raise ValueError("kind: log_probs() needs a TopK of kind 'logits'; use probs()")
        return self.values.to(self.lse.dtype) - self.lse.unsqueeze(-1)

    def to_dense(self) -> torch.Tensor:
        """The dense [..., N] tensor this stands for, in values' dtype.

        probs: kept entries at their positions, 0 elsewhere (dropped mass is not spread).
        logits: kept logits at their positions; the dropped mass ``1 - sum(exp(v - lse))``
        is spread evenly over the N - k dropped positions, so the dense row has exactly
        the stored lse and softmax gives the exact probabilities of the kept entries.
        (A row whose kept entries hold all the mass gets -inf at the dropped positions.)
        With k = N both are exact round trips.
        sampled: the sparse probability estimate p_hat (weights at their positions, 0
        elsewhere), **probabilities, not logits**.
        """
        idx = self.indices.long()
        if self.kind in ("probs", "sampled"):
            out = self.values.new_zeros(self.shape)
            return out.scatter_(-1, idx, self.values)
        N, k = self.full_size, self.k
        if k == N:
            fill = torch.full(self.row_shape, float("-inf"), dtype=self.lse.dtype, device=self.device)
        else:
            kept = torch.logsumexp(self.values.to(self.lse.dtype), dim=-1)        # log kept mass
            # log(exp(lse) - exp(kept)) - log(N - k), computed stably
            rest = self.lse + torch.log1p(-torch.exp((kept - self.lse).clamp_max(0.0)))
            fill = rest - torch.log(torch.tensor(float(N - k), dtype=self.lse.dtype))
        out = fill.unsqueeze(-1).expand(self.shape).to(self.values.dtype).clone()
        return out.scatter_(-1, idx, self.values)

    # ------------------------------------------------------------------ validation
    def check(self, name: str = "teacher", check_values: bool = True, rows=None) -> "TopK":
        """Value checks at one host sync: indices in [0, N), no repeated index in a row,
        finite values (and lse/mass), probs >= 0. Raises ValueError naming ``name``.

        ``rows``: optional bool mask of ``row_shape``; only those rows are checked (e.g.
        the supervised tokens of logits_kl, which never reads the others).
        """
        if not check_values or self.values.numel() == 0:
            return self
        if rows is not None:
            rows = torch.as_tensor(rows, device=self.device).bool()
            if tuple(rows.shape) != tuple(self.row_shape):
                _fail(ValueError, "rows", f"expected shape {list(self.row_shape)}, got {list(rows.shape)}")
            sel = TopK.__new__(TopK)    # the selected rows, without re-running the constructor
            sel.values, sel.indices = self.values[rows], self.indices[rows]
            sel.full_size, sel.kind = self.full_size, self.kind
            sel.lse = None if self.lse is None else self.lse[rows]
            sel.mass = None if self.mass is None else self.mass[rows]
            sel.check(name, check_values)
            return self
        il = self.indices.long()
        checks = [
            ("indices", ((il < 0) | (il >= self.full_size)).any(),
             f"values must lie in [0, full_size={self.full_size})"),
            ("values", (~torch.isfinite(self.values)).any(), "contain NaN or infinite values"),
        ]
        if self.k > 1:
            s, _ = torch.sort(il, dim=-1)
            checks.append(("indices", (s[..., 1:] == s[..., :-1]).any(), "repeat a position within a row"))
        if self.kind in ("probs", "sampled"):
            checks.append(("values", (self.values < 0).any(), "contain negative probabilities"))
        if self.lse is not None:
            checks.append(("lse", (~torch.isfinite(self.lse)).any(), "contains NaN or infinite values"))
        if self.mass is not None:
            checks.append(("mass", ((~torch.isfinite(self.mass)) | (self.mass < 0)).any(),
                           "must be finite and >= 0"))
        flags = torch.stack([c[1] for c in checks]).cpu().tolist()
        for (field, _, msg), bad in zip(checks, flags):
            if bad:
                raise ValueError(f"{name}: TopK {field} {msg}")
        return self

    def check_indices(self, name: str = "teacher") -> "TopK":
        """Only the index range [0, full_size): what a consumer indexes with. Run even
        when value checks are off, so an index never reads out of bounds (one sync)."""
        if self.indices.numel():
            lo, hi = torch.aminmax(self.indices)
            if int(lo) < 0 or int(hi) >= self.full_size:
                raise ValueError(f"{name}: TopK indices must lie in [0, full_size={self.full_size})")
        return self


def _check_dense_rows(x2, values, red, kind):
    """from_dense's value checks of the dense rows x2 [R, N] (see from_dense), one sync.

    values: the kept entries [R, k]; red: the row lse (logits) or sums (probs)."""
    if x2.numel() == 0:
        return
    lo, hi = torch.aminmax(x2)
    if kind == "probs":
        checks = [(~torch.isfinite(lo) | ~torch.isfinite(hi), "contains NaN or infinite probabilities"),
                  (lo < 0, "contains negative probabilities")]
    else:
        # -inf logits are allowed (masked entries); what the dense loss refuses is not.
        checks = [(torch.isnan(lo) | torch.isnan(hi) | (hi == float("inf")), "contains NaN or +inf logits"),
                  ((~torch.isfinite(red)).any(), "has a row of only -inf logits"),
                  ((values == float("-inf")).any(), "has a row with fewer finite logits than k "
                                                    "(a kept entry would be -inf); pick a smaller k")]
    flags = torch.stack([c[0] for c in checks]).cpu().tolist()
    for (_, msg), bad in zip(checks, flags):
        if bad:
            _fail(ValueError, "x", msg)


# ---------------------------------------------------------------------- index storage
def index_bits(full_size: int) -> int:
    """Bits an index in [0, full_size) needs."""
    return max(1, (int(full_size) - 1).bit_length())


def pack_indices(indices: torch.Tensor, full_size: int) -> dict:
    """Compact on-disk form of ``indices [..., k]`` (values in [0, full_size)).

    Returns ``{"lo": int16 [..., k]}`` (the low 16 bits, read back as unsigned) and, when
    full_size > 65536, ``"hi": uint8 [..., ceil(k * (bits - 16) / 8)]`` with the high bits
    of each row's indices bit-packed (little-endian bit order). Rows stay rows, so row
    slices of the packed tensors are the packing of row slices.
    """
    i = indices.to(torch.int32)
    lo = i & 0xFFFF
    lo = (lo - ((lo & 0x8000) << 1)).to(torch.int16)          # 32768..65535 -> -32768..-1
    out = {"lo": lo}
    hb = index_bits(full_size) - 16
    if hb > 0:
        k = i.shape[-1]
        shifts = torch.arange(hb, device=i.device, dtype=torch.int32)
        bits = ((i >> 16)[..., None] >> shifts) & 1                      # [..., k, hb]
        bits = bits.reshape(*i.shape[:-1], k * hb)
        nbytes = -(-(k * hb) // 8)
        bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - k * hb))
        weights = (1 << torch.arange(8, device=i.device, dtype=torch.int32))
        out["hi"] = (bits.reshape(*i.shape[:-1], nbytes, 8) * weights).sum(-1).to(torch.uint8)
    return out


def unpack_indices(lo: torch.Tensor, hi: Optional[torch.Tensor], full_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: int32 indices [..., k]. Raises ValueError naming
    the part that does not fit ``full_size``."""
    if lo.dtype != torch.int16:
        _fail(ValueError, "indices", f"packed low bits must be int16, got {lo.dtype}")
    i = lo.to(torch.int32) & 0xFFFF
    hb = index_bits(full_size) - 16
    if hb <= 0:
        if hi is not None:
            _fail(ValueError, "indices", f"high bits stored for full_size {full_size} <= 65536")
        return i
    if hi is None or hi.dtype != torch.uint8:
        _fail(ValueError, "indices", f"full_size {full_size} needs the packed high bits (uint8)")
    k = lo.shape[-1]
    nbytes = -(-(k * hb) // 8)
    if tuple(hi.shape) != (*lo.shape[:-1], nbytes):
        _fail(ValueError, "indices", f"packed high bits have shape {list(hi.shape)}, expected "
              f"{[*lo.shape[:-1], nbytes]}")
    bits = (hi.to(torch.int32)[..., None] >> torch.arange(8, device=hi.device, dtype=torch.int32)) & 1
    bits = bits.reshape(*lo.shape[:-1], nbytes * 8)[..., :k * hb].reshape(*lo.shape, hb)
    high = (bits << torch.arange(hb, device=hi.device, dtype=torch.int32)).sum(-1, dtype=torch.int32)
    return i | (high << 16)


def packed_nbytes(k: int, full_size: int) -> float:
    """Bytes per index of :func:`pack_indices` for rows of k indices."""
    hb = max(0, index_bits(full_size) - 16)
    return 2 + (-(-(k * hb) // 8)) / k


# ---------------------------------------------------------------------- sampled teacher
SAMPLING_METHODS = ("priority", "multinomial")


class SampledTeacher(TopK):
    """An unbiased sparse teacher: k sampled vocabulary positions per row with importance
    weights (a :class:`TopK` of kind ``"sampled"``; build it with :meth:`from_dense`).

    Caching the top-k teacher logits gives a *biased* distillation gradient: the dropped
    tail's pull is guessed, not known. Sparse Logit Sampling (Anshumann et al., ACL 2025)
    instead samples teacher tokens and weights them so that the sparse target's
    expectation is the dense teacher distribution p. Here, for a loss linear in p (the
    logits term sum_v -p_v log softmax(s)_v, whose gradient softmax(s) * sum(p) - p is
    linear in p as well), ``E[loss(p_hat)] = loss(p)`` and ``E[grad(p_hat)] = grad(p)``
    exactly, whatever the student.

    Methods:

    * ``"priority"`` (default; priority sampling, Duffield, Lund & Thorup 2007): draw
      u_v ~ U(0, 1] for every position, keep the k largest priorities p_v / u_v, and with
      tau the (k+1)-th largest priority store p_hat_v = max(p_v, tau). Exactly k distinct
      positions; tokens with p_v > tau are always kept with their exact probability (the
      head behaves like TopK), the tail is represented by a few tokens of weight tau.
      Unbiased for every position; near-optimal variance among k-sample schemes.
    * ``"multinomial"`` (the paper's sampling, with Horvitz-Thompson weights): k draws
      with replacement from the proposal q = softmax(x / temperature); each distinct drawn
      v gets p_hat_v = p_v / pi_v with pi_v = 1 - (1 - q_v)^k its inclusion probability.
      Fewer than k distinct positions are padded with unused positions of weight 0.

    Reproducible: the random numbers come from a ``torch.Generator`` on x's device seeded
    with ``seed``, consumed in a fixed order of row chunks, so the same (x, k, seed,
    method) on the same device type gives the same teacher.
    """

    @classmethod
    def from_dense(cls, x: torch.Tensor, k: int, *, method: str = "priority", seed: int = 0,
                   temperature: float = 1.0, dtype: Optional[torch.dtype] = None) -> "SampledTeacher":
        """Sample an unbiased sparse teacher from logits ``x [..., V]`` (no gradient).

        k: slots per row (``"multinomial"``: also the number of draws). seed: int.
        temperature: ``"multinomial"`` proposal temperature (> 0; 1 samples from p).
        dtype: of the stored weights (default fp32; fp64 for fp64 x). With k = V both
        methods return the dense probabilities exactly.
        """
        _check_dense(x, k)
        V = x.shape[-1]
        if method not in SAMPLING_METHODS:
            _fail(ValueError, "method", f"must be one of {SAMPLING_METHODS}, got {method!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            _fail(TypeError, "seed", f"expected an int, got {type(seed).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0 or temperature == float("inf"):
            _fail(ValueError, "temperature", f"must be a finite number > 0, got {temperature!r}")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            _fail(TypeError, "dtype", f"expected a floating torch.dtype, got {dtype!r}")
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, V)
        R = x2.shape[0]
        weights = torch.empty((R, k), dtype=acc, device=x.device)
        indices = torch.empty((R, k), dtype=torch.int64, device=x.device)
        gen = torch.Generator(device=x.device).manual_seed(seed)
        step = max(1, _CHUNK_ELEMS // V)
        for r0 in range(0, R, step):
            xc = x2[r0:r0 + step].to(acc)
            bad = ~torch.isfinite(torch.logsumexp(xc, -1))
            if bool(bad.any()):
                _fail(ValueError, "x", "a row has NaN or +inf logits, or only -inf logits")
            p = torch.softmax(xc, -1)
            if k == V:
                w, ic = p, torch.arange(V, device=x.device).expand_as(p)
            elif method == "priority":
                w, ic = _priority(p, k, gen)
            else:
                w, ic = _multinomial(p, xc, k, float(temperature), gen)
            weights[r0:r0 + step] = w
            indices[r0:r0 + step] = ic
        weights = weights.reshape(*lead, k)
        if dtype is not None:
            weights = weights.to(dtype)
        return cls(weights, indices.to(torch.int32).reshape(*lead, k), V, "sampled")


def _priority(p, k, gen):
    # u in (0, 1]: 1 - U[0, 1). Zero-probability positions get priority 0 and weight 0.
    u = 1.0 - torch.rand(p.shape, generator=gen, device=p.device, dtype=p.dtype)
    prio = p / u
    top, idx = torch.topk(prio, k + 1, dim=-1)
    tau = top[:, k:k + 1]
    idx = idx[:, :k]
    w = torch.maximum(p.gather(1, idx), tau)
    w = torch.where(p.gather(1, idx) > 0, w, torch.zeros_like(w))
    idx, order = torch.sort(idx, dim=-1)
    return w.gather(1, order), idx


def _multinomial(p, x, k, temperature, gen):
    R, V = p.shape
    q = p if temperature == 1.0 else torch.softmax(x / temperature, -1)
    # Inverse CDF of fp64 cumulative sums: the uniforms decide, so the draws do not depend
    # on how a device's multinomial kernel consumes its generator.
    cdf = torch.cumsum(q.double(), -1)
    u = torch.rand((R, k), generator=gen, device=p.device, dtype=torch.float64) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True).clamp_max(V - 1)
    hit = torch.zeros((R, V), dtype=torch.bool, device=p.device).scatter_(1, draws, True)
    # Slots: every drawn position, then the lowest undrawn ones (weight 0) as padding.
    score = torch.where(hit, torch.full((), 2.0 * V, dtype=p.dtype, device=p.device),
                        -torch.arange(V, device=p.device, dtype=p.dtype))
    idx = torch.sort(torch.topk(score, k, dim=-1).indices, dim=-1).values
    qk = q.gather(1, idx)
    pi = -torch.expm1(k * torch.log1p(-qk.clamp_max(1.0)))          # P(v drawn at least once)
    w = torch.where(hit.gather(1, idx) & (pi > 0), p.gather(1, idx) / pi.clamp_min(torch.finfo(p.dtype).tiny),
                    torch.zeros_like(qk))
    return w, idx
