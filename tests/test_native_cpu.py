"""The C++/OpenMP backend (seekr_kernels._C) against the plain-PyTorch oracle.

Values and gradients over the issue's grid, every compiled instruction set, the
dq/dk ownership rules (duplicates, GQA), exact fp16/bf16 conversions, the native-level
re-checks, and float64 gradcheck.
"""
import itertools
import os

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels import _backend, _native, reference
from seekr_kernels._checks import check_attention_args

_ok, _why = _backend.available("cpu", torch.device("cpu"))
pytestmark = pytest.mark.skipif(not _ok, reason=f"C++ extension not built: {_why}")
if _ok:
    from seekr_kernels import _C

    ISAS = _C.available_isas()
else:
    ISAS = []

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def make_case(B, H, Hkv, L, D, S, queries="all", pad="none", empty=True, dtype=torch.float32,
              teacher_dtype=torch.float32, seed=0, logit_scale=1.0):
    """Random q/k in `dtype` and a teacher that is a distribution over each row's visible keys.

    queries: "all" (None), "subset" (random positions, with repeats), or a tensor.
    """
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, L, D, generator=g) * logit_scale).to(dtype)
    k = (torch.randn(B, Hkv, L, D, generator=g) * logit_scale).to(dtype)
    S = min(S, H)
    heads = torch.stack([torch.randperm(H, generator=g)[:S] for _ in range(B)])
    if empty and S > 1:
        heads[0, -1] = -1
    if isinstance(queries, torch.Tensor):
        qs = queries
    elif queries == "subset":
        Q = max(1, (2 * L) // 3)
        qs = torch.randint(0, L, (B, Q), generator=g)
        qs[:, -1] = qs[:, 0]          # at least one repeated position per sample
    else:
        qs = None
    mask = torch.ones(B, L, dtype=torch.long)
    if pad == "left":
        mask[0, : L // 3] = 0
        if B > 1:
            mask[-1, : L // 2] = 0
    elif pad == "right":
        mask[-1, L - L // 3:] = 0
    tq = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    tk = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    teacher = reference.attention_probs(check_attention_args(tq, tk, heads, qs, mask), torch.float64)
    return q, k, teacher.to(teacher_dtype), heads, qs, mask


def run(backend, q, k, teacher, heads, queries, mask, reduction="none", upcast=False, **kw):
    """Loss and gradients of sum(w * loss) for a fixed random w. upcast: run on fp64 copies
    of the inputs (the oracle for low-precision inputs)."""
    if upcast:
        q, k, teacher = q.double(), k.double(), teacher.double()
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    out = sk.attention_kl(q, k, teacher, heads, queries, mask, reduction=reduction,
                          backend=backend, **kw)
    # The same weights whatever out's dtype (randn draws differ between dtypes), exact in
    # fp32: ops/attention_kl.py hands the backends an fp32 grad_rows.
    w = (torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
         if out.dim() else torch.ones((), dtype=torch.float64)).float().to(out.dtype)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad


def assert_close(got, ref, tol, what):
    got, ref = got.double(), ref.double()
    err = (got - ref).norm().item()
    scale = ref.norm().item()
    assert err <= tol * max(scale, 1.0), f"{what}: |diff|={err:.3g} |ref|={scale:.3g} tol={tol}"


# Errors relative to an fp64 oracle on the same (rounded) inputs. Values accumulate in fp32
# for every input dtype; fp16/bf16 gradients are rounded once to the input dtype.
TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (2e-6, 1e-3), torch.bfloat16: (2e-6, 8e-3),
       torch.float64: (1e-12, 1e-12)}
TEACHER_FOR = {torch.float32: torch.bfloat16, torch.float16: torch.float32,
               torch.bfloat16: torch.float16}

# The grid: B, H/Hkv, L, D, queries, padding, dtype. L x D x pad x dtype is taken
# in full; B, H/Hkv and the query mode cycle through it so every combination of those
# three appears too.
_BHQ = list(itertools.product([1, 3], [(4, 4), (8, 2)], ["all", "subset"]))
GRID = [(*_BHQ[i % len(_BHQ)], L, D, pad, dt) for i, (L, D, pad, dt) in enumerate(
    itertools.product([1, 17, 64, 130], [16, 64, 128], ["none", "left", "right"],
                      [torch.float32, torch.float16, torch.bfloat16]))]
GRID_IDS = [f"B{b}-H{h}/{hk}-{qm}-L{L}-D{D}-{pad}-{str(dt)[6:]}"
            for b, (h, hk), qm, L, D, pad, dt in GRID]


@pytest.mark.parametrize("B,HK,qmode,L,D,pad,dtype", GRID, ids=GRID_IDS)
def test_grid_matches_reference(B, HK, qmode, L, D, pad, dtype):
    case = make_case(B, *HK, L, D, S=3, queries=qmode, pad=pad, dtype=dtype,
                     teacher_dtype=TEACHER_FOR[dtype], seed=L * 131 + D)
    ref = run("torch", *case, upcast=True)
    got = run("cpu", *case)
    tv, tg = TOL[dtype]
    assert got[0].dtype == torch.float32 and torch.isfinite(got[0]).all()
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert_close(got[0], ref[0], tv, "rows")
    assert_close(got[1], ref[1], tg, "dq")
    assert_close(got[2], ref[2], tg, "dk")
    # Same inputs through the torch backend (its own dtype handling) agree as well.
    ref_t = run("torch", *case)
    assert_close(got[0], ref_t[0], 1e-5, "rows vs torch backend")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,D", [(torch.float32, 20), (torch.float32, 72), (torch.float64, 40),
                                     (torch.bfloat16, 96), (torch.float16, 8)])
def test_every_instruction_set(monkeypatch, isa, dtype, D):
    """Each compiled ISA copy (SEEKR_CPU_ISA forces one), head dims that need padding."""
    monkeypatch.setenv("SEEKR_CPU_ISA", isa)
    assert _C.isa() == isa
    case = make_case(2, 6, 3, 150, D, S=3, queries="subset", pad="left", dtype=dtype, seed=D)
    ref = run("torch", *case, upcast=True)
    got = run("cpu", *case)
    tv, tg = TOL[dtype]
    assert_close(got[0], ref[0], tv, "rows")
    assert_close(got[1], ref[1], tg, "dq")
    assert_close(got[2], ref[2], tg, "dk")


def test_unknown_isa_is_value_error(monkeypatch):
    monkeypatch.setenv("SEEKR_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SEEKR_CPU_ISA"):
        _C.isa()


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_gradcheck_float64(reduction):
    q, k, t, heads, qs, mask = make_case(2, 4, 2, 7, 4, S=2, queries="subset", pad="left",
                                         dtype=torch.float64)
    q.requires_grad_()
    k.requires_grad_()

    def f(q, k):
        return sk.attention_kl(q, k, t, heads, qs, mask, reduction=reduction, backend="cpu",
                               check_values=False)

    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_long_runs_of_one_position_add_up():
    """A position repeated more than a row tile (64) forces the dq ownership groups to span
    several tiles; every copy must add into dq."""
    L = 90
    qs = torch.cat([torch.full((1, 150), 70), torch.arange(0, 90, 3)[None], torch.full((1, 70), 5)], 1)
    qs = torch.cat([qs, qs.flip(1)], 0)
    case = make_case(2, 4, 2, L, 32, S=3, queries=qs, pad="right", seed=3)
    ref = run("torch", *case, upcast=True)
    got = run("cpu", *case)
    for a, b, what in zip(got, ref, ["rows", "dq", "dk"]):
        assert_close(a, b, 1e-5, what)


def test_deterministic():
    case = make_case(3, 8, 2, 200, 64, S=4, queries="subset", pad="left", seed=5)
    a = run("cpu", *case)
    b = run("cpu", *case)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_non_contiguous_inputs_give_identical_results():
    q, k, t, heads, qs, mask = make_case(2, 4, 2, 70, 32, S=2, queries="subset",
                                         teacher_dtype=torch.float16, seed=7)
    ref = run("cpu", q, k, t, heads, qs, mask)
    qn = q.transpose(2, 3).contiguous().transpose(2, 3)
    kn = torch.cat([k, k], dim=3)[..., ::2]   # strided last dim
    kn.copy_(k)
    tn = t.transpose(2, 3).contiguous().transpose(2, 3)
    hn = torch.stack([heads, heads], 2)[..., 0]
    qsn = torch.stack([qs, qs], 2)[..., 1]
    assert not (qn.is_contiguous() or kn.is_contiguous() or tn.is_contiguous() or qsn.is_contiguous())
    got = run("cpu", qn, kn, tn, hn, qsn, mask.bool())
    for x, y in zip(got, ref):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_convert_exactly(dtype):
    """fp16/bf16 -> fp32 by hand must be exact: same results as the fp32 copy, bit for bit
    (subnormal fp16 values included)."""
    q, k, t, heads, qs, mask = make_case(2, 4, 4, 40, 16, S=2, dtype=dtype, seed=11)
    q[0, 0, :, 0] = 3e-6                      # fp16 subnormals
    k[0, 0, :, 1] = -1e-7
    t = t.to(dtype)
    lo = run("cpu", q, k, t, heads, qs, mask)
    hi = run("cpu", q.float(), k.float(), t.float(), heads, qs, mask)
    assert torch.equal(lo[0], hi[0])
    assert torch.equal(lo[1], hi[1].to(dtype))
    assert torch.equal(lo[2], hi[2].to(dtype))


def _args(B=2, H=4, Hkv=2, L=37, D=24, S=3, queries="subset", pad="left", dtype=torch.float32, seed=0):
    q, k, t, heads, qs, mask = make_case(B, H, Hkv, L, D, S, queries=queries, pad=pad,
                                         dtype=dtype, seed=seed)
    return check_attention_args(q, k, heads, qs, mask), t


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_attention_probs_matches_reference(q_dtype):
    a, _ = _args(L=140, D=40, dtype=q_dtype, seed=2)
    cpu = _native.module_for("cpu")
    got = cpu.attention_probs(a, torch.float64 if q_dtype == torch.float64 else torch.float32)
    ref = reference.attention_probs(check_attention_args(
        a.q.double(), a.k.double(), a.heads, a.queries, a.key_mask), torch.float64)
    tol = 1e-12 if q_dtype == torch.float64 else 2e-6
    assert (got.double() - ref).abs().max().item() <= tol
    inactive = ~a.row_active
    assert (got[inactive] == 0).all()
    # Every active row is a distribution over its visible keys.
    sums = got.double().sum(-1)[a.row_active]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_attention_probs_rounds_like_torch(out_dtype):
    """fp32 -> fp16/bf16 by hand, ties to even, subnormals included: bitwise equal to torch's
    conversion of the fp32 output."""
    a, _ = _args(L=300, D=16, seed=4)
    cpu = _native.module_for("cpu")
    f32 = cpu.attention_probs(a, torch.float32)
    low = cpu.attention_probs(a, out_dtype)
    assert low.dtype == out_dtype
    assert torch.equal(low, f32.to(out_dtype))
    if out_dtype == torch.float16:
        assert ((low > 0) & (low < 6.1e-5)).any(), "no subnormal fp16 values exercised"


def test_tmass_path_matches_reference():
    """teacher=None: rows = tmass * lse, backward dz = g * T * p (the TopK path)."""
    a, _ = _args(dtype=torch.float64, seed=6)
    g = torch.Generator().manual_seed(0)
    tmass = torch.rand(a.B, a.S, a.Q, generator=g, dtype=torch.float64)
    cpu = _native.module_for("cpu")
    rows, lse, T = cpu.attention_kl_fwd(a, None, tmass)
    ref = reference.attention_kl_rows(a, None, tmass)
    assert torch.allclose(rows, ref, atol=1e-12)
    assert torch.equal(T, torch.where(a.row_active, tmass, torch.zeros_like(tmass)))
    grad = torch.randn(rows.shape, generator=g, dtype=torch.float64)
    dq, dk = cpu.attention_kl_bwd(a, None, lse, T, grad)
    q = a.q.detach().clone().requires_grad_()
    k = a.k.detach().clone().requires_grad_()
    a2 = check_attention_args(q, k, a.heads, a.queries, a.key_mask)
    (reference.attention_kl_rows(a2, None, tmass) * grad).sum().backward()
    assert torch.allclose(dq, q.grad, atol=1e-10)
    assert torch.allclose(dk, k.grad, atol=1e-10)


def test_inactive_rows_are_zero_without_gradient():
    q, k, t, heads, qs, mask = make_case(2, 4, 2, 30, 16, S=3, queries="subset", pad="left", seed=8)
    heads[1] = -1                                  # sample 1: no head at all
    mask[0, :] = 0                                 # sample 0: every token padded
    mask[0, 25:] = 1                               # ...but a few
    rows, dq, dk = run("cpu", q, k, t, heads, qs, mask)
    ref = run("torch", q, k, t, heads, qs, mask, upcast=True)
    a = check_attention_args(q, k, heads, qs, mask)
    assert (rows[~a.row_active] == 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all()
    assert (dk[0, :, :25] == 0).all()              # padded keys get nothing
    for x, y, what in zip((rows, dq, dk), ref, ["rows", "dq", "dk"]):
        assert_close(x, y, 1e-5, what)
    # Nothing active at all: zero loss, zero gradients, no NaN.
    mask[:] = 0
    rows, dq, dk = run("cpu", q, k, t, heads, qs, mask)
    assert (rows == 0).all() and (dq == 0).all() and (dk == 0).all()


def test_large_logits_stay_finite():
    case = make_case(2, 4, 2, 80, 32, S=2, pad="right", logit_scale=6.0, seed=9)
    ref = run("torch", *case, upcast=True)
    got = run("cpu", *case)
    for x, y, what in zip(got, ref, ["rows", "dq", "dk"]):
        assert torch.isfinite(x).all()
        assert_close(x, y, 1e-5, what)


def test_teacher_mass_on_hidden_keys_is_ignored():
    q, k, t, heads, qs, mask = make_case(2, 4, 2, 50, 16, S=2, queries="subset", pad="left", seed=12)
    noisy = torch.rand(t.shape, generator=torch.Generator().manual_seed(3))  # mass everywhere
    got = run("cpu", q, k, noisy, heads, qs, mask)
    ref = run("torch", q, k, noisy, heads, qs, mask, upcast=True)
    for x, y, what in zip(got, ref, ["rows", "dq", "dk"]):
        assert_close(x, y, 1e-5, what)


def test_module_for():
    cpu = _native.module_for("cpu")
    for name in ("attention_kl_fwd", "attention_kl_bwd", "attention_probs", "attention_sqdiff"):
        assert callable(getattr(cpu, name))
    with pytest.raises(ValueError, match="backend"):
        _native.module_for("tpu")
    try:
        mod = _native.module_for("cuda")
    except RuntimeError as e:
        assert "cuda" in str(e)
    else:
        assert hasattr(mod, "attention_kl_fwd")
    assert _C.num_threads() >= 1


# ---- native-level re-checks: the C++ side never trusts its caller --------------------

class Raw:
    """Contiguous buffers of a small valid problem and the positional args of the _C calls."""

    def __init__(self):
        self.B, self.H, self.Hkv, self.L, self.D, self.S, self.Q = 2, 4, 2, 8, 16, 2, 3
        B, H, Hkv, L, D, S, Q = self.B, self.H, self.Hkv, self.L, self.D, self.S, self.Q
        self.q = torch.randn(B, H, L, D)
        self.k = torch.randn(B, Hkv, L, D)
        self.qb = self.q + 0.5 * torch.randn(B, H, L, D)
        self.kb = self.k.clone()
        self.t = torch.rand(B, S, Q, L)
        self.heads = torch.tensor([[0, 3], [1, -1]], dtype=torch.int32)
        self.queries = torch.tensor([[0, 5, 7], [2, 2, 1]], dtype=torch.int32)
        self.mask = torch.ones(B, L, dtype=torch.int32)
        self.rows = torch.zeros(B, S, Q)
        self.lse = torch.zeros(B, S, Q)
        self.T = torch.ones(B, S, Q)
        self.g = torch.ones(B, S, Q)
        self.dq = torch.zeros(B, H, L, D)
        self.dk = torch.zeros(B, Hkv, L, D)
        self.out = torch.zeros(B, S, Q, L)

    def dims(self, **kw):
        d = dict(B=self.B, H=self.H, Hkv=self.Hkv, L=self.L, D=self.D, S=self.S, Q=self.Q)
        d.update(kw)
        return d

    def fwd(self, teacher=True, tmass=False, teacher_dtype=0, q_dtype=0, scale=0.25, **dims):
        return _C.attention_kl_fwd(
            q=self.q.data_ptr(), k=self.k.data_ptr(), teacher=self.t.data_ptr() if teacher else 0,
            teacher_dtype=teacher_dtype, tmass_in=self.T.data_ptr() if tmass else 0,
            heads=self.heads.data_ptr(), queries=self.queries.data_ptr(),
            key_mask=self.mask.data_ptr(), rows_out=self.rows.data_ptr(),
            lse_out=self.lse.data_ptr(), tmass_out=self.T.data_ptr(), **self.dims(**dims),
            q_dtype=q_dtype, scale=scale)

    def bwd(self, lse=True, **dims):
        return _C.attention_kl_bwd(
            self.q.data_ptr(), self.k.data_ptr(), self.t.data_ptr(), 0, self.heads.data_ptr(),
            self.queries.data_ptr(), self.mask.data_ptr(), self.lse.data_ptr() if lse else 0,
            self.T.data_ptr(), self.g.data_ptr(), self.dq.data_ptr(), self.dk.data_ptr(),
            *self.dims(**dims).values(), 0, 0.25)

    def sqdiff(self, qb=True, **dims):
        return _C.attention_sqdiff(
            self.q.data_ptr(), self.k.data_ptr(), self.qb.data_ptr() if qb else 0, self.kb.data_ptr(),
            self.heads.data_ptr(), self.queries.data_ptr(), self.mask.data_ptr(),
            self.rows.data_ptr(), *self.dims(**dims).values(), 0, 0.25)

    def probs(self, out_dtype=0, **dims):
        return _C.attention_probs(
            self.q.data_ptr(), self.k.data_ptr(), self.heads.data_ptr(), self.queries.data_ptr(),
            self.mask.data_ptr(), self.out.data_ptr(), out_dtype, *self.dims(**dims).values(), 0, 0.25)


def test_raw_calls_work():
    r = Raw()
    r.fwd()
    r.bwd()
    r.probs()
    assert torch.isfinite(r.rows).all() and (r.rows[1, 1] == 0).all()
    r.rows.fill_(7)
    r.sqdiff()
    assert (r.rows[1, 1] == 0).all() and (r.rows[0, :, 1:] > 0).all()   # position 0: one key, 0
    assert r.dq.abs().sum() > 0 and (r.dq[1, 0] == 0).all()
    # S = 0 / Q = 0: nothing to compute, gradients written as zeros.
    r.dq.fill_(7)
    r.dk.fill_(7)
    r.bwd(S=0)
    assert (r.dq == 0).all() and (r.dk == 0).all()
    r.fwd(Q=0)


RAW_BAD = [
    ("Hkv", lambda r: r.fwd(Hkv=3)),
    ("H", lambda r: r.fwd(H=0)),
    ("D", lambda r: r.bwd(D=0)),
    ("L", lambda r: r.probs(L=0)),
    ("S", lambda r: r.fwd(S=-1)),
    ("q_dtype", lambda r: r.fwd(q_dtype=7)),
    ("teacher_dtype", lambda r: r.fwd(teacher_dtype=-1)),
    ("out_dtype", lambda r: r.probs(out_dtype=4)),
    ("scale", lambda r: r.fwd(scale=0.0)),
    ("scale", lambda r: r.fwd(scale=float("nan"))),
    ("teacher", lambda r: r.fwd(teacher=True, tmass=True)),
    ("teacher", lambda r: r.fwd(teacher=False, tmass=False)),
    ("lse", lambda r: r.bwd(lse=False)),
    ("heads", lambda r: r.heads.__setitem__((0, 0), 4) or r.fwd()),
    ("heads", lambda r: r.heads.__setitem__((0, 0), -2) or r.bwd()),
    ("heads", lambda r: r.heads.__setitem__((1, 1), 1) or r.probs()),
    ("queries", lambda r: r.queries.__setitem__((1, 2), 8) or r.fwd()),
    ("queries", lambda r: r.queries.__setitem__((0, 0), -1) or r.bwd()),
    ("key_mask", lambda r: r.mask.__setitem__((1, 3), 2) or r.probs()),
    ("q_b", lambda r: r.sqdiff(qb=False)),
    ("Hkv", lambda r: r.sqdiff(Hkv=3)),
    ("heads", lambda r: r.heads.__setitem__((1, 1), -2) or r.sqdiff()),
    ("heads", lambda r: r.heads.__setitem__((1, 0), 4) or r.sqdiff()),
    ("queries", lambda r: r.queries.__setitem__((1, 2), 8) or r.sqdiff()),
    ("key_mask", lambda r: r.mask.__setitem__((0, 0), -1) or r.sqdiff()),
]


@pytest.mark.parametrize("name,call", RAW_BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(RAW_BAD)])
def test_native_rechecks_raise_value_error(name, call):
    with pytest.raises(ValueError, match=name):
        call(Raw())


def test_native_rejects_misaligned_pointer():
    r = Raw()
    with pytest.raises(ValueError, match="q: data pointer is not aligned"):
        _C.attention_probs(r.q.data_ptr() + 1, r.k.data_ptr(), r.heads.data_ptr(),
                           r.queries.data_ptr(), r.mask.data_ptr(), r.out.data_ptr(), 0,
                           *r.dims().values(), 0, 0.25)


def test_native_sqdiff_rejects_misaligned_pointer():
    r = Raw()
    with pytest.raises(ValueError, match="k_b: data pointer is not aligned"):
        _C.attention_sqdiff(r.q.data_ptr(), r.k.data_ptr(), r.qb.data_ptr(), r.kb.data_ptr() + 2,
                            r.heads.data_ptr(), r.queries.data_ptr(), r.mask.data_ptr(),
                            r.rows.data_ptr(), *r.dims().values(), 0, 0.25)


# ---- attention_sqdiff (forgettability): the C++ kernel against the torch backend --------

def sqdiff_case(B, H, Hkv, L, D, S, dtype=torch.float32, seed=0, delta=0.3, **kw):
    """Two models' q/k (b = a + delta * noise, rounded to `dtype`) on make_case's heads,
    queries and mask."""
    qa, ka, _, heads, qs, mask = make_case(B, H, Hkv, L, D, S, dtype=torch.float64, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    qb = qa + delta * torch.randn(qa.shape, generator=g, dtype=torch.float64)
    kb = ka + delta * torch.randn(ka.shape, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (qa, ka, qb, kb)] + [heads, qs, mask]


def sqdiff(backend, qa, ka, qb, kb, heads, qs, mask, upcast=False):
    if upcast:
        qa, ka, qb, kb = (t.double() for t in (qa, ka, qb, kb))
    return sk.attention_sqdiff(qa, ka, qb, kb, heads, qs, mask, backend=backend)


# Rows are sums of squared probability differences (<= 2): errors relative to the fp64
# oracle on the same rounded inputs; the kernel accumulates in fp32 for every input dtype.
SQ_TOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6, torch.float64: 1e-13}


@pytest.mark.parametrize("B,HK,qmode,L,D,pad,dtype", GRID[::3], ids=GRID_IDS[::3])
def test_sqdiff_grid_matches_reference(B, HK, qmode, L, D, pad, dtype):
    case = sqdiff_case(B, *HK, L, D, S=3, queries=qmode, pad=pad, dtype=dtype, seed=L * 7 + D)
    got = sqdiff("cpu", *case)
    ref = sqdiff("torch", *case, upcast=True)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert_close(got, ref, SQ_TOL[dtype], "sqdiff rows")
    assert_close(got, sqdiff("torch", *case), 1e-5, "sqdiff rows vs torch backend")
    a = check_attention_args(case[0], case[1], case[4], case[5], case[6])
    assert (got[~a.row_active] == 0).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,D", [(torch.float32, 20), (torch.float32, 72), (torch.float64, 40),
                                     (torch.bfloat16, 96), (torch.float16, 8)])
def test_sqdiff_every_instruction_set(monkeypatch, isa, dtype, D):
    monkeypatch.setenv("SEEKR_CPU_ISA", isa)
    case = sqdiff_case(2, 6, 3, 150, D, S=3, queries="subset", pad="left", dtype=dtype, seed=D)
    got = sqdiff("cpu", *case)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, sqdiff("torch", *case, upcast=True), SQ_TOL[dtype], "sqdiff rows")


def test_sqdiff_small_changes_keep_their_relative_accuracy():
    """Forgettability is measured on small changes of attention: the difference is formed
    from normalised probabilities entry by entry, so 1e-3 perturbations keep ~1e-3 relative
    accuracy in fp32 (the one-pass identity would cancel to noise)."""
    case = sqdiff_case(2, 4, 2, 200, 64, S=4, queries="all", pad="right", seed=3, delta=1e-3)
    got = sqdiff("cpu", *case)
    ref = sqdiff("torch", *case, upcast=True)
    a = check_attention_args(case[0], case[1], case[4], case[5], case[6])
    on = a.row_active.clone()
    on[:, :, 0] = False                                    # row 0 sees one key: exactly 0
    assert float(ref[on].min()) > 0
    assert ((got[on].double() - ref[on]).abs() / ref[on]).max() < 1e-2
    same = sqdiff("cpu", case[0], case[1], case[0].clone(), case[1].clone(), *case[4:])
    assert (same == 0).all()


def test_sqdiff_deterministic_and_layout_independent():
    qa, ka, qb, kb, heads, qs, mask = sqdiff_case(3, 8, 2, 200, 64, S=4, queries="subset", pad="left",
                                                  seed=5)
    ref = sqdiff("cpu", qa, ka, qb, kb, heads, qs, mask)
    assert torch.equal(sqdiff("cpu", qa, ka, qb, kb, heads, qs, mask), ref)
    nc = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (qa, ka, qb, kb)]
    assert not any(t.is_contiguous() for t in nc)
    assert torch.equal(sqdiff("cpu", *nc, heads, qs, mask.bool()), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sqdiff_half_inputs_convert_exactly(dtype):
    qa, ka, qb, kb, heads, qs, mask = sqdiff_case(2, 4, 4, 40, 16, S=2, dtype=dtype, seed=11)
    qa[0, 0, :, 0] = 3e-6                      # fp16 subnormals
    kb[0, 0, :, 1] = -1e-7
    lo = sqdiff("cpu", qa, ka, qb, kb, heads, qs, mask)
    hi = sqdiff("cpu", qa.float(), ka.float(), qb.float(), kb.float(), heads, qs, mask)
    assert torch.equal(lo, hi)


def test_sqdiff_auto_runs_the_native_kernel_without_a_fallback_warning():
    """The package's rule: CPU ops have a native kernel; `auto` on CPU tensors must not warn
    that attention_sqdiff falls back to plain PyTorch (it did on every SEEKR run)."""
    import warnings
    case = sqdiff_case(2, 4, 2, 30, 16, S=3, queries="subset", seed=13)
    _backend._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sqdiff("auto", *case)
    assert torch.equal(got, sqdiff("cpu", *case))
    assert _backend.resolve("auto", torch.device("cpu"), "attention_sqdiff",
                            supported=("triton", "cpu", "torch"), dtype=torch.float64) == "cpu"
