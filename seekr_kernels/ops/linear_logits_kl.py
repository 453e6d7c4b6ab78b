"""Logits distillation without the logits: the lm_head fused with the SEEKR logits term.

::

    loss = linear_logits_kl(hidden, weight, teacher, labels, bias=None,
                            hard_weight=0.0, soft_weight=1.0)

equals, value and gradients (to ``hidden``, ``weight``, ``bias``),

    logits = hidden @ weight.T + bias
    hard_weight * cross_entropy(logits, labels) + soft_weight * logits_kl(logits, teacher, labels)

with ``cross_entropy`` averaged over the same tokens as :func:`~seekr_kernels.logits_kl`
(rows whose label is not -100, **no shift**: labels are aligned with the rows, as in
``logits_kl``; an empty label set gives 0 with zero gradients, not NaN) and every teacher
``logits_kl`` accepts: dense teacher logits, a :class:`~seekr_kernels.TopK` of kind
``"logits"`` (with ``topk_mode``) or a :class:`~seekr_kernels.SampledTeacher`.

How (the Liger-Kernel way, docs/DESIGN.md §5): the supervised rows are processed in
chunks of ``chunk_size`` rows. Per chunk the logits z [c, V] are computed, then the row
log-sum-exps, the losses and dloss/dz = (hard + soft) softmax(z) - soft p_teacher - hard
onehot(label) (sparse teachers: the TopK/sampled coefficients of ``logits_kl``), and at
once dhidden = dz W and dW += dz^T h, db += sum dz (fp32 accumulators). The forward
returns the loss and keeps the finished gradients; the backward only multiplies them by
the incoming gradient. So [tokens, V] never exists beyond one chunk: peak memory is
O(chunk x V + V x Hd) (the fp32 dW accumulator, when ``weight`` needs a gradient; an
fp32 copy of W for bf16/fp16 on the ``chunked`` backend). Rows with label -100 are never
computed at all.

Backends:

* ``"triton"`` (CUDA): per chunk a Triton GEMM with tl.dot (tensor cores for bf16/fp16,
  fp32 accumulation) writes the chunk's logits in the input dtype and, in its epilogue,
  partial softmax statistics per vocabulary tile; a row kernel turns the buffer into dz in
  place; the dz products use cuBLAS (seekr_kernels/triton/linear_logits_kl.py). No fp64.
  Its logits buffer has the input dtype, so with fp16 input a logit beyond +-65504 is inf
  there (the loss then becomes non-finite and ``check_values`` refuses it, naming
  ``hidden``) where ``chunked`` and ``torch`` form fp32 logits and return a finite loss:
  the one documented difference between the backends (fp16 logits of a trained lm_head
  stay far below it; bf16 has fp32's range).
* ``"chunked"`` (any device, the CPU path): the same algorithm in plain PyTorch with fp32
  (fp64 for fp64) logits per chunk; BLAS does the three products.
* ``"torch"``: materialises ``hidden @ weight.T + bias`` (fp32, fp64 for fp64) of the
  labelled rows and calls ``logits_kl`` and ``cross_entropy``: the test oracle.
* ``"auto"``: ``triton`` for CUDA tensors (when Triton is installed and the dtype is not
  fp64), else ``chunked``.

Default chunk: about as many logits per chunk as the hidden states hold numbers,
c = T / ceil(V / Hd) rounded up to a power of two, at least 16 (Liger's rule): at V =
128256, Hd = 4096 a chunk of 256 rows for T = 8192. On CPU at least 2**24 / V rows
(128 at V = 128256, 512 at V = 32000; see ``default_chunk``).

Distributed: a weight (or bias) that is a ``torch.distributed.tensor.DTensor`` (FSDP2
shards parameters as DTensors) is gathered with ``full_tensor()`` around the call; its
gradient flows back to the shards through DTensor's autograd (reduce-scatter). Tied
embeddings need nothing special: the gradient returned for ``weight`` is added by
autograd to the embedding's.
"""
from __future__ import annotations

import math
import numbers

import torch

from .._checks import _fail

from .._backend import available
from .._checks import _check_finite, abs_max
from .logits_kl import IGNORE_INDEX, TOPK_MODES, _topk_terms, sparse_teacher_probs
from .teachers import TopK

BACKENDS = ("auto", "triton", "chunked", "torch")
REDUCTIONS = ("mean", "sum")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)




def _full(x):
    """A DTensor gathered to a regular tensor (differentiably); anything else as it is."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:          # torch without distributed
        return x
    return x.full_tensor() if isinstance(x, DTensor) else x


# ---------------------------------------------------------------------------- checks
def _check_weight_arg(name, x):
    if x is None or isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)) \
            or float(x) < 0:
        _fail(ValueError if isinstance(x, numbers.Real) and not isinstance(x, bool) else TypeError, name,
              f"expected a finite number >= 0, got {x!r}")
    return float(x)


def _check_args(hidden, weight, teacher, labels, bias, hard_weight, soft_weight, chunk_size, backend,
                reduction, topk_mode):
    if not isinstance(hidden, torch.Tensor):
        _fail(TypeError, "hidden", f"expected a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in _DTYPES:
        _fail(TypeError, "hidden", f"dtype {hidden.dtype} is not supported (expected one of {list(_DTYPES)})")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        _fail(ValueError, "hidden", f"expected shape [..., Hd] with Hd >= 1, got {tuple(hidden.shape)}")
    Hd = hidden.shape[-1]
    lead = tuple(hidden.shape[:-1])
    if not isinstance(weight, torch.Tensor):
        _fail(TypeError, "weight", f"expected a torch.Tensor [V, Hd], got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != Hd or weight.shape[0] == 0:
        _fail(ValueError, "weight", f"expected shape [V, Hd={Hd}] (the lm_head weight), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        _fail(TypeError, "weight", f"dtype {weight.dtype} differs from hidden's {hidden.dtype} (cast one of them)")
    if weight.device != hidden.device:
        _fail(ValueError, "weight", f"is on {weight.device}, hidden is on {hidden.device}")
    V = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            _fail(TypeError, "bias", f"expected a torch.Tensor [V] or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            _fail(ValueError, "bias", f"expected shape [V={V}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            _fail(TypeError, "bias", f"dtype {bias.dtype} differs from hidden's {hidden.dtype}")
        if bias.device != hidden.device:
            _fail(ValueError, "bias", f"is on {bias.device}, hidden is on {hidden.device}")
    if not isinstance(labels, torch.Tensor):
        _fail(TypeError, "labels", f"expected an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        _fail(TypeError, "labels", f"expected an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != lead:
        _fail(ValueError, "labels", f"expected shape {list(lead)} (hidden without its last dim), got "
              f"{list(labels.shape)}")
    if labels.device != hidden.device:
        _fail(ValueError, "labels", f"is on {labels.device}, hidden is on {hidden.device}")
    hw = _check_weight_arg("hard_weight", hard_weight)
    sw = _check_weight_arg("soft_weight", soft_weight)
    if teacher is None:
        if sw != 0:
            _fail(ValueError, "teacher", "is None but soft_weight != 0")
    elif isinstance(teacher, TopK):
        if teacher.kind not in ("logits", "sampled"):
            _fail(ValueError, "teacher", f"a TopK logits teacher must be of kind 'logits' or 'sampled', got "
                  f"kind {teacher.kind!r}")
        if tuple(teacher.shape) != lead + (V,):
            _fail(ValueError, "teacher", f"TopK stands for shape {list(teacher.shape)}, expected "
                  f"{list(lead + (V,))} (hidden's rows x weight's V)")
        if teacher.device != hidden.device:
            _fail(ValueError, "teacher", f"is on {teacher.device}, hidden is on {hidden.device}")
        if teacher.kind == "sampled" and topk_mode is not None:
            _fail(ValueError, "topk_mode", "applies to TopK teachers of kind 'logits'; a sampled teacher is "
                  "used as it is (it is unbiased)")
    elif isinstance(teacher, torch.Tensor):
        if not teacher.dtype.is_floating_point:
            _fail(TypeError, "teacher", f"expected floating-point logits, got {teacher.dtype}")
        if tuple(teacher.shape) != lead + (V,):
            _fail(ValueError, "teacher", f"expected shape {list(lead + (V,))} (hidden's rows x weight's V), "
                  f"got {list(teacher.shape)}")
        if teacher.device != hidden.device:
            _fail(ValueError, "teacher", f"is on {teacher.device}, hidden is on {hidden.device}")
    else:
        _fail(TypeError, "teacher", f"expected a tensor of logits, a TopK, a SampledTeacher or None, got "
              f"{type(teacher).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        _fail(ValueError, "chunk_size", f"expected an int >= 1 or None, got {chunk_size!r}")
    _check_options(backend, reduction, topk_mode)
    return hw, sw


def _check_options(backend, reduction, topk_mode):
    if backend not in BACKENDS:
        _fail(ValueError, "backend", f"must be one of {BACKENDS}, got {backend!r}")
    if reduction not in REDUCTIONS:
        _fail(ValueError, "reduction", f"must be one of {REDUCTIONS}, got {reduction!r}")
    if topk_mode is not None and topk_mode not in TOPK_MODES:
        _fail(ValueError, "topk_mode", f"must be one of {TOPK_MODES}, got {topk_mode!r}")


def _resolve(backend, hidden):
    dev, dt = hidden.device, hidden.dtype
    if backend == "auto":
        if dev.type == "cuda" and dt != torch.float64 and available("triton", dev)[0]:
            return "triton"
        return "chunked"
    if backend == "triton":
        ok, why = available("triton", dev)
        if not ok:
            raise RuntimeError(f"backend='triton' is unavailable for linear_logits_kl: {why}")
        if dt == torch.float64:
            _fail(TypeError, "hidden", "the triton backend computes in fp32; fp64 needs backend='chunked' "
                  "or 'torch'")
    return backend


def default_chunk(T, V, Hd, device_type="cuda"):
    """Rows per chunk: Liger's rule, about as many logits per chunk as hidden numbers (a
    power of two >= 16); on CPU at least ~2**24 logits (64 MiB of fp32) per chunk, since
    every chunk streams W twice and dW once through memory and CPU BLAS wants tall
    chunks (measured at V = 128256: 16-32 rows took twice the time of 128-1024)."""
    c = -(-T // -(-V // Hd))
    c = max(16, 1 << max(0, (c - 1).bit_length()))
    if device_type != "cuda":
        c = max(c, 1 << max(0, ((1 << 24) // V).bit_length() - 1))
    return c


# ---------------------------------------------------------------------------- chunk engines
class _TorchEngine:
    """The chunked backend's per-chunk steps in plain PyTorch, in place on two [c, V]
    buffers (logits -> softmax -> gradient, and the teacher's softmax)."""

    def __init__(self, W, b, acc):
        self.acc = acc
        self.W = W.to(acc)                      # no copy for fp32 / fp64 weights
        self.b = None if b is None else b.to(acc)
        self.p = None

    def forward(self, h, t, label, idx, qlogq):
        """Returns (softmax(z) [c, V], stats); the gathers and sums are taken of z first."""
        z = h.to(self.acc) @ self.W.t()
        if self.b is not None:
            z += self.b
        st = {}
        if label is not None:
            st["zl"] = z.gather(1, label[:, None]).squeeze(1)
        if idx is not None:
            st["zk"] = z.gather(1, idx)
            st["sum_s"] = z.sum(-1)
        if t is not None:
            p = t.to(self.acc)
            if p.data_ptr() == t.data_ptr():
                p = p.clone()
            _softmax_(p)
            st["pz"] = _rowdot(p, z)
            self.p = p
        m = z.amax(-1, keepdim=True)
        z.sub_(m)                               # z - max: the rest needs no more than this
        if qlogq:
            e = torch.exp(z)
            S = e.sum(-1)
            # sum q log q = sum e (z - m) / S - log S
            st["qlogq"] = _rowdot(e, z) / S - torch.log(S)
            del e
        z.exp_()
        S = z.sum(-1)
        z.div_(S[:, None])
        st["lse_s"] = m.squeeze(1) + torch.log(S)
        return z, st

    def grad(self, q, t, st, A, B, U, CL, label):
        d = q.mul_(A[:, None])
        if t is not None:
            d.sub_(self.p.mul_(B[:, None]))
            self.p = None
        if U is not None:
            d.sub_(U[:, None])
        if label is not None:
            d.scatter_add_(1, label[:, None], -CL[:, None].to(d.dtype))
        return d

    def products(self, d, h, need_dh, dW, db):
        dh = d @ self.W if need_dh else None
        if dW is not None:
            dW.addmm_(d.t(), h.to(self.acc))
        if db is not None:
            db += d.sum(0)
        return dh


def _rowdot(a, b):
    """sum_v a_v b_v per row as a batched BLAS dot (vecdot would allocate a * b)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def _softmax_(x):
    """Row softmax in place (torch.softmax would allocate a second [c, V])."""
    x.sub_(x.amax(-1, keepdim=True)).exp_()
    x.div_(x.sum(-1, keepdim=True))
    return x


class _TritonEngine:
    def __init__(self, W, b, acc, block=None):
        self.W = W if W.stride(-1) == 1 else W.contiguous()
        self.b = None if b is None else b.contiguous()
        self.block = block

    def forward(self, h, t, label, idx, qlogq):
        """Returns (z [c, V] in the input dtype, stats)."""
        from ..triton import linear_logits_kl as tri
        z, st = tri.logits_chunk(h.contiguous(), self.W, self.b, t, qlogq)
        if label is not None:
            st["zl"] = z.gather(1, label[:, None]).squeeze(1)
        if idx is not None:
            st["zk"] = z.gather(1, idx)
        return z, st

    def grad(self, z, t, st, A, B, U, CL, label):
        from ..triton import linear_logits_kl as tri
        U = torch.zeros_like(A) if U is None else U
        return tri.grad_rows(z, t, st["lse_s"], st.get("lse_t"), A, B, U, CL, label, self.block)

    def products(self, d, h, need_dh, dW, db):
        dh = d @ self.W if need_dh else None
        if dW is not None:
            if dW.dtype == d.dtype:
                dW.addmm_(d.t(), h)
            else:                                # fp32 accumulator of a bf16/fp16 weight
                dW += d.t() @ h
        if db is not None:
            db += d.sum(0, dtype=torch.float32)
        return dh


def _row_chunks(idx, c):
    """Chunks of the valid row indices: (slice or index tensor, number of rows)."""
    n = idx.numel()
    out = []
    for a in range(0, n, c):
        part = idx[a:a + c]
        lo, hi = int(part[0]), int(part[-1]) + 1
        out.append((slice(lo, hi) if hi - lo == part.numel() else part, part.numel()))
    return out


def _take(x, r):
    return x[r] if isinstance(r, slice) else x.index_select(0, r)


def _fused(h2, W, b, teacher, lab, hw, sw, reduction, topk_mode, chunk_size, backend, needs, block=None,
           parts=None):
    """Loss and (when ``needs``) the finished gradients of the fused computation.

    h2 [T, Hd], lab [T]; teacher dense [T, V], TopK/sampled over [T, V] rows, or None.
    needs = (hidden, weight, bias) gradient flags. Returns (loss, dh, dW, db). ``parts``:
    a dict that receives the unweighted ``hard`` (CE) and ``soft`` (distillation) terms,
    each reduced like the loss (those with a weight > 0).
    """
    T, Hd = h2.shape
    V = W.shape[0]
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    dev = h2.device
    valid = lab != IGNORE_INDEX
    idx = valid.nonzero().squeeze(1)
    n = idx.numel()
    scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
    need_dh, need_dW, need_db = needs
    any_grad = need_dh or need_dW or need_db
    dh = torch.zeros((T, Hd), device=dev, dtype=h2.dtype) if need_dh else None
    dW = db = None
    if need_dW:
        dW = torch.zeros((V, Hd), device=dev, dtype=acc)
    if need_db:
        db = torch.zeros((V,), device=dev, dtype=acc)
    total = torch.zeros((), device=dev, dtype=acc)
    tot_hard = torch.zeros((), device=dev, dtype=acc)
    tot_soft = torch.zeros((), device=dev, dtype=acc)
    eng = _TritonEngine(W, b, acc, block) if backend == "triton" else _TorchEngine(W, b, acc)

    dense = isinstance(teacher, torch.Tensor)
    sparse = isinstance(teacher, TopK)
    if dense:
        t2 = teacher.detach()
        if t2.stride(-1) != 1:
            t2 = t2.contiguous()
    if sparse:
        mode, p_all = sparse_teacher_probs(teacher, topk_mode, acc)
        p_all = p_all.reshape(-1, teacher.k)
        i_all = teacher.indices.reshape(-1, teacher.k)
    c = chunk_size or default_chunk(T, V, Hd, dev.type)
    for r, cn in _row_chunks(idx, c):
        h_c = _take(h2, r)
        t_c = _take(t2, r) if dense else None
        l_c = _take(lab, r).long()
        ik = _take(i_all, r).long() if sparse and sw else None
        buf, st = eng.forward(h_c, t_c, l_c if hw else None, ik, sparse and mode == "student_tail")
        lse = st["lse_s"].to(acc)
        rows = torch.zeros(cn, device=dev, dtype=acc)
        A = torch.full((cn,), (hw + sw) * scale if not sparse else hw * scale, device=dev, dtype=acc)
        B = U = corr = None
        if hw:
            ce_rows = lse - st["zl"].to(acc)
            if parts is not None:
                tot_hard += ce_rows.sum()
            rows += hw * ce_rows
        if dense and sw:
            kd_rows = lse - st["pz"].to(acc)
            if parts is not None:
                tot_soft += kd_rows.sum()
            rows += sw * kd_rows
            B = torch.full((cn,), sw * scale, device=dev, dtype=acc)
        if ik is not None:
            zk = st["zk"].to(acc)
            sum_s = st.get("sum_s", lse).to(acc)
            trow, At, Ut, Wk, w = _topk_terms(mode, _take(p_all, r), zk, lse, sum_s,
                                              st.get("qlogq", lse).to(acc), V, acc)
            if parts is not None:
                tot_soft += trow.sum()
            rows += sw * trow
            A = A + sw * scale * At
            if bool((Ut != 0).any()):
                U = sw * scale * Ut
            # Kept positions: the row step writes A q - U there; add what turns it into
            # the TopK gradient, (Wk - At) q + Ut - w (times sw * scale).
            qk = torch.exp(zk - lse[:, None])
            corr = (sw * scale) * ((Wk - At)[:, None] * qk + Ut[:, None] - w)
        total = total + rows.sum()
        if not any_grad:
            eng.p = None
            continue
        CL = torch.full((cn,), hw * scale, device=dev, dtype=acc) if hw else None
        d = eng.grad(buf, t_c, st, A, B, U, CL, l_c if hw else None)
        if corr is not None:
            d.scatter_add_(1, ik, corr.to(d.dtype))
        dh_c = eng.products(d, h_c, need_dh, dW, db)
        if need_dh:
            if isinstance(r, slice):
                dh[r] = dh_c.to(dh.dtype)
            else:
                dh.index_copy_(0, r, dh_c.to(dh.dtype))
        del buf, d
    loss = total * scale
    if parts is not None:
        if hw:
            parts["hard"] = tot_hard * scale
        if sw:
            parts["soft"] = tot_soft * scale
    if dW is not None and dW.dtype != W.dtype:
        dW = dW.to(W.dtype)
    if db is not None and db.dtype != W.dtype:
        db = db.to(W.dtype)
    return loss, dh, dW, db


class _LinearLogitsKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_t, lab, meta):
        teacher = meta["teacher"] if teacher_t is None else teacher_t
        shape = hidden.shape
        h2 = hidden.reshape(-1, shape[-1])
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, dh, dW, db = _fused(h2, weight, bias, teacher, lab, meta["hw"], meta["sw"], meta["reduction"],
                                  meta["topk_mode"], meta["chunk"], meta["backend"], needs, meta.get("block"),
                                  meta.get("parts"))
        ctx.shape = shape
        ctx.save_for_backward(dh, dW, db)
        return loss

    @staticmethod
    def backward(ctx, g):
        dh, dW, db = ctx.saved_tensors
        one = bool(g == 1)                   # the usual case: skip the rescaling

        def sc(x):
            if x is None:
                return None
            return x if one else x * g.to(x.dtype)
        dh = sc(dh)
        return (None if dh is None else dh.reshape(ctx.shape)), sc(dW), sc(db), None, None, None


def _oracle(hidden, weight, bias, teacher, labels, hw, sw, reduction, topk_mode, parts=None):
    """The materialising reference: logits, then cross_entropy and logits_kl.

    Only the supervised rows (label != -100) are selected before anything is computed, as
    the fused backends never compute the others: an ignored row contributes nothing to the
    value or to any gradient, whatever it holds (a NaN hidden state would otherwise reach
    the weight gradient as 0 * NaN). Logits are formed in the accumulation dtype (fp32;
    fp64 for fp64), like the chunked backend, so fp16 logits beyond 65504 do not overflow
    here either. Value checks are the caller's (linear_logits_kl): the inner logits_kl runs
    unchecked so that an error names linear_logits_kl's arguments, not its own.
    """
    from .logits_kl import logits_kl
    V, Hd = weight.shape
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lab = labels.reshape(-1)
    rows = (lab != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.reshape(-1, Hd).index_select(0, rows)
    logits = torch.nn.functional.linear(h.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    lg3 = logits.reshape(1, -1, V)
    lab = lab.index_select(0, rows).reshape(1, -1)
    n = lab.shape[1] if reduction == "mean" else 1
    n = max(n, 1)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    if hw:
        ce = torch.nn.functional.cross_entropy(lg3[0], lab[0].long(), reduction="sum")
        loss = loss + hw * ce / n
        if parts is not None:
            parts["hard"] = (ce / n).detach()
    if sw:
        if isinstance(teacher, TopK):
            def pick(x, *tail):
                return x.reshape(-1, *tail).index_select(0, rows)[None]
            t3 = type(teacher)(pick(teacher.values, teacher.k), pick(teacher.indices, teacher.k),
                               teacher.full_size, teacher.kind,
                               lse=None if teacher.lse is None else pick(teacher.lse))
        else:
            t3 = teacher.reshape(-1, V).index_select(0, rows)[None]
        kd = logits_kl(lg3, t3, lab, reduction=reduction, backend="torch", topk_mode=topk_mode,
                       check_values=False)
        loss = loss + sw * kd
        if parts is not None:
            parts["soft"] = kd.detach()
    return loss


def _input_checks(hidden, weight, bias, labels, hw, V):
    """(name, bad-flag, message) value checks of what the loss reads, for one host sync.

    hidden: only rows with a label (the others are never computed, on any backend, so they
    may hold anything); weight and bias: in full (every logit of a used row reads all of
    them). A NaN/inf there would give NaN logits on the fused backends but, where the
    softmax gives the entry no mass (an inf weight row with a -inf logit), a finite loss
    with a NaN gradient on others: refused up front instead, the same on every backend.
    """
    Hd = weight.shape[1]
    used = labels.reshape(-1) != IGNORE_INDEX
    checks = []
    if hidden.numel():
        lo, hi = torch.aminmax(hidden.detach().reshape(-1, Hd), dim=-1)   # per row; NaN propagates
        bad = ~(torch.isfinite(lo) & torch.isfinite(hi)) & used
        checks.append(("hidden", bad.any(), "a row with label != -100 contains NaN or infinite values"))
    checks.append(("weight", ~torch.isfinite(abs_max(weight)), "contains NaN or infinite values"))
    if bias is not None:
        checks.append(("bias", ~torch.isfinite(abs_max(bias)), "contains NaN or infinite values"))
    if hw and labels.numel():
        lab = labels.reshape(-1)
        checks.append(("labels", (used & ((lab < 0) | (lab >= V))).any(),
                       f"with hard_weight > 0 every label must be -100 or lie in [0, V={V})"))
    return checks


def _diagnose(teacher, labels):
    """Name the argument that made the loss non-finite, once the inputs are known finite."""
    if isinstance(teacher, torch.Tensor):
        used = (labels != IGNORE_INDEX).reshape(-1)
        lse = torch.logsumexp(teacher.detach().reshape(-1, teacher.shape[-1])[used].float(), -1)
        if not bool(torch.isfinite(lse).all()):
            _fail(ValueError, "teacher", "a row with label != -100 has NaN or +inf logits, or only -inf logits")
    _fail(ValueError, "hidden", "the loss is not finite (logits overflow?)")


# ---------------------------------------------------------------------------- public API
def linear_logits_kl(hidden, weight, teacher, labels, *, bias=None, hard_weight=0.0, soft_weight=1.0,
                     chunk_size=None, backend="auto", topk_mode=None, reduction="mean", check_values=True,
                     _block=None, _parts=None):
    """Fused lm_head + logits distillation (+ optional hard CE) without materialised logits.

    Args:
        hidden: [..., Hd] final hidden states (fp32/fp16/bf16; fp64 on ``chunked``/``torch``).
        weight: [V, Hd] lm_head weight, same dtype (may be tied to the embeddings, or an
            FSDP2 DTensor, gathered for the call).
        teacher: dense teacher logits [..., V] aligned with ``hidden`` (any float dtype),
            a ``TopK`` of kind ``"logits"`` or a ``SampledTeacher`` over [..., V]; None
            when ``soft_weight == 0``. Gets no gradient.
        labels: [...] integer, -100 = ignored row (never read, on any backend). Aligned with hidden:
            no shift (as ``logits_kl``). With ``hard_weight > 0`` the others must lie in
            [0, V).
        bias: [V] or None.
        hard_weight, soft_weight: the loss is hard_weight * CE(labels) + soft_weight *
            logits_kl(teacher); finite numbers >= 0.
        chunk_size: rows per chunk (default: module docstring).
        backend: ``"auto"``, ``"triton"``, ``"chunked"`` or ``"torch"`` (the materialising
            oracle).
        topk_mode: dropped-mass treatment of a TopK teacher (as ``logits_kl``).
        reduction: ``"mean"`` over rows with a label (0 when there are none) or ``"sum"``.
        check_values: the same on every backend: before anything is computed, one host
            sync refuses (ValueError naming the argument) NaN/inf in a row of ``hidden``
            whose label is not -100, anywhere in ``weight`` or ``bias``, and (with
            ``hard_weight > 0``) labels outside [0, V); TopK teachers are checked on the
            labelled rows (``TopK.check``). After the forward, a non-finite loss (finite
            inputs whose logits overflow, a dense teacher row of NaN/+inf or only -inf
            logits) is a ValueError naming ``teacher`` or ``hidden``. Rows with label
            -100 are never read by any backend and may hold anything: they contribute
            nothing, to the value or to any gradient. With ``check_values=False`` only the
            TopK indices of labelled rows are range-checked (they are gathered); the
            result of non-finite input is then undefined.
        _parts: a dict that receives the detached unweighted terms ``"hard"`` (the CE)
            and ``"soft"`` (the distillation term), reduced like the loss, of those with
            a weight > 0 (the replay loss logs them).

    Returns:
        fp32 scalar (fp64 for fp64 inputs).
    """
    hw, sw = _check_args(hidden, weight, teacher, labels, bias, hard_weight, soft_weight, chunk_size, backend,
                         reduction, topk_mode)
    weight = _full(weight)
    bias = None if bias is None else _full(bias)
    hidden = _full(hidden)
    V = weight.shape[0]
    if sw == 0:
        teacher = None
    if check_values:
        _check_finite([], extra=_input_checks(hidden, weight, bias, labels, hw, V))    # one host sync
    if isinstance(teacher, TopK):
        used = labels != IGNORE_INDEX          # ignored rows are never read: they may hold anything
        if check_values:
            teacher.check("teacher", rows=used)
        elif teacher.indices.numel():          # gathered with on every backend: never out of bounds
            _check_topk_indices(teacher, used)
    bk = _resolve(backend, hidden)
    if bk == "torch":
        loss = _oracle(hidden, weight, bias, teacher, labels, hw, sw, reduction, topk_mode, _parts)
    else:
        lab = labels.reshape(-1)
        meta = {"teacher": teacher, "hw": hw, "sw": sw, "reduction": reduction, "topk_mode": topk_mode,
                "chunk": chunk_size, "backend": bk, "block": _block, "parts": _parts}
        dense_t = teacher.reshape(-1, V) if isinstance(teacher, torch.Tensor) else None
        if isinstance(teacher, TopK):
            meta["teacher"] = type(teacher)(teacher.values.reshape(-1, teacher.k),
                                            teacher.indices.reshape(-1, teacher.k), V, teacher.kind,
                                            lse=None if teacher.lse is None else teacher.lse.reshape(-1))
        grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
        if grad:
            loss = _LinearLogitsKL.apply(hidden, weight, bias, None if dense_t is None else dense_t.detach(),
                                         lab, meta)
        else:
            with torch.no_grad():
                loss = _fused(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                              dense_t if dense_t is not None else meta["teacher"], lab, hw, sw, reduction,
                              topk_mode, chunk_size, bk, (False, False, False), _block, _parts)[0]
    if check_values and not bool(torch.isfinite(loss.detach())):
        _diagnose(teacher, labels)
    return loss


def _check_topk_indices(teacher, used):
    """TopK indices of the used rows in [0, full_size) (one sync), as logits_kl does with
    check_values=False."""
    idx = teacher.indices[used]
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= teacher.full_size:
            _fail(ValueError, "teacher", f"TopK indices must lie in [0, full_size={teacher.full_size})")


class LinearLogitsKLLoss(torch.nn.Module):
    """Module form: ``LinearLogitsKLLoss(hard_weight=0.5, soft_weight=0.5)(hidden, weight,
    teacher, labels, bias=None)``."""

    def __init__(self, hard_weight=0.0, soft_weight=1.0, chunk_size=None, backend="auto", topk_mode=None,
                 reduction="mean", check_values=True):
        super().__init__()
        _check_weight_arg("hard_weight", hard_weight)
        _check_weight_arg("soft_weight", soft_weight)
        _check_options(backend, reduction, topk_mode)
        self.hard_weight, self.soft_weight = hard_weight, soft_weight
        self.chunk_size, self.backend, self.topk_mode = chunk_size, backend, topk_mode
        self.reduction, self.check_values = reduction, check_values

    def forward(self, hidden, weight, teacher, labels, bias=None):
        return linear_logits_kl(hidden, weight, teacher, labels, bias=bias, hard_weight=self.hard_weight,
                                soft_weight=self.soft_weight, chunk_size=self.chunk_size, backend=self.backend,
                                topk_mode=self.topk_mode, reduction=self.reduction,
                                check_values=self.check_values)

    def extra_repr(self):
        return (f"hard_weight={self.hard_weight}, soft_weight={self.soft_weight}, backend={self.backend!r}, "
                f"reduction={self.reduction!r}")
