"""attention_kl: every backend against the plain-PyTorch oracle, plus the contract."""
import itertools
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seekr_kernels as sk
from seekr_kernels import _backend, reference
from seekr_kernels._checks import check_attention_args

from cases import GRID, GRID_IDS, TOL, assert_close, make_case


def _backends():
    out = []
    out.append(pytest.param("triton", marks=pytest.mark.skipif(
        not _backend.available("triton", torch.device("cpu"))[0],
        reason="triton not installed or TRITON_INTERPRET not set")))
    out.append(pytest.param("cpu", marks=pytest.mark.skipif(
        not _backend.available("cpu", torch.device("cpu"))[0],
        reason="C++ extension seekr_kernels._C not built")))
    return out


BACKENDS = _backends()
AVAILABLE = [n for n in ("triton", "cpu") if _backend.available(n, torch.device("cpu"))[0]]
def run(backend, q, k, teacher, heads, queries, mask, reduction="none", **kw):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    out = sk.attention_kl(q, k, teacher, heads, queries, mask, reduction=reduction, backend=backend, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device) \
        if out.dim() else torch.ones((), device=out.device)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,HK,L,D,Q,pad,dtype", GRID, ids=GRID_IDS)
def test_backend_matches_torch(backend, B, HK, L, D, Q, pad, dtype):
    H, Hkv = HK
    case = make_case(B, H, Hkv, L, D, S=3, Q=Q, pad=pad, dtype=dtype, seed=L * 7 + D)
    ref = run("torch", *case)
    got = run(backend, *case)
    tol = TOL[dtype]
    assert got[0].dtype == torch.float32
    assert torch.isfinite(got[0]).all()
    assert_close(got[0], ref[0], tol, "rows")
    assert_close(got[1].float(), ref[1].float(), 4 * tol, "dq")
    assert_close(got[2].float(), ref[2].float(), 4 * tol, "dk")
    assert got[1].dtype == dtype and got[2].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions(backend, reduction):
    case = make_case(3, 8, 2, 23, 16, S=3, Q=6, pad="left")
    ref = run("torch", *case, reduction=reduction)
    got = run(backend, *case, reduction=reduction)
    for a, b, what in zip(got, ref, ["loss", "dq", "dk"]):
        assert_close(a, b, 1e-5, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_dtype_and_strides(backend):
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 33, 16, S=2, teacher_dtype=torch.bfloat16)
    ref = run("torch", q, k, t, heads, queries, mask)
    # Non-contiguous views of every tensor input.
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)
    tt = t.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous() or not tt.is_contiguous()
    got = run(backend, qt, kt, tt, heads, queries, mask)
    for a, b, what in zip(got, ref, ["rows", "dq", "dk"]):
        assert_close(a, b, 1e-5, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_queries_add_up(backend):
    q, k, t, heads, _, mask = make_case(2, 4, 4, 19, 16, S=2, pad="left")
    queries = torch.tensor([[18, 18, 10, 3], [5, 18, 5, 5]])
    ta = check_attention_args(torch.randn(2, 4, 19, 16, dtype=torch.float64),
                              torch.randn(2, 4, 19, 16, dtype=torch.float64), heads, queries, mask)
    t = reference.attention_probs(ta, torch.float32)
    ref = run("torch", q, k, t, heads, queries, mask)
    got = run(backend, q, k, t, heads, queries, mask)
    for a, b, what in zip(got, ref, ["rows", "dq", "dk"]):
        assert_close(a, b, 1e-5, what)


def test_triton_tmass_path_matches_torch():
    """teacher=None computes rows = T * lse (used by TopK teachers); check it on its own."""
    if not _backend.available("triton", torch.device("cpu"))[0]:
        pytest.skip("triton interpreter unavailable")
    from seekr_kernels.ops.attention_kl import attention_kl_rows
    q, k, _, heads, queries, mask = make_case(2, 8, 2, 29, 32, S=3, Q=7, pad="right")
    tm = torch.rand(2, 3, 7)
    outs = []
    for be in ["torch", "triton"]:
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        a = check_attention_args(qq, kk, heads, queries, mask)
        r = attention_kl_rows(a, None, tm, be)
        r.sum().backward()
        outs.append((r.detach(), qq.grad, kk.grad))
    for a, b, what in zip(outs[1], outs[0], ["rows", "dq", "dk"]):
        assert_close(a, b, 1e-5, what)


def test_gradcheck_torch_float64():
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 9, 8, S=2, Q=4, pad="left", dtype=torch.float64,
                                              teacher_dtype=torch.float64)
    q.requires_grad_()
    k.requires_grad_()
    f = lambda q, k: sk.attention_kl(q, k, t, heads, queries, mask, reduction="none", backend="torch")
    assert torch.autograd.gradcheck(f, (q, k))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_gradcheck_float64(backend):
    # The Triton kernels accumulate in fp32 whatever the input (documented), so a float64
    # gradcheck applies to torch and cpu only.
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 9, 16, S=2, Q=4, pad="right", dtype=torch.float64,
                                              teacher_dtype=torch.float64)
    q.requires_grad_()
    k.requires_grad_()
    f = lambda q, k: sk.attention_kl(q, k, t, heads, queries, mask, reduction="none", backend=backend)
    assert torch.autograd.gradcheck(f, (q, k), atol=1e-6)


def _published(q, k, teacher, heads, queries, mask):
    """Eager path of the published code: full [B, H, L, L] softmax in fp32."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    kk = k.repeat_interleave(G, dim=1)
    z = (q.float() @ kk.float().transpose(-1, -2)) * D ** -0.5
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    z = z.masked_fill(~allowed, torch.finfo(torch.float32).min)
    p = torch.softmax(z, -1)
    return reference.published_attention_kl(p, teacher, heads, queries, mask)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("Q,pad", [(None, "none"), (6, "left"), (None, "right")])
def test_batchmean_is_published_formula(backend, Q, pad):
    case = make_case(3, 4, 2, 21, 16, S=3, Q=Q, pad=pad, logit_scale=0.7)
    ours = sk.attention_kl(*case, reduction="batchmean", backend=backend)
    pub = _published(*case)
    # log(p + 1e-8) vs the exact log-softmax: differs only where p < ~1e-6.
    assert abs(ours.item() - pub.item()) <= 1e-4 * abs(pub.item()) + 1e-6


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_empty_selection_and_masked_rows_are_zero(backend):
    q, k, t, heads, queries, mask = make_case(2, 4, 4, 11, 16, S=2)
    # All slots empty: a defined result of 0 with zero gradients.
    empty = torch.full((2, 2), -1)
    qq = q.clone().requires_grad_()
    loss = sk.attention_kl(qq, k, t, empty, queries, mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(qq.grad) == 0
    # S = 0 and Q = 0.
    assert sk.attention_kl(q, k, t[:, :0], heads[:, :0], backend=backend).item() == 0.0
    z = sk.attention_kl(q, k, t[:, :, :0], heads, torch.zeros(2, 0, dtype=torch.long), backend=backend,
                        reduction="none")
    assert z.shape == (2, 2, 0)
    # A sample with every token masked: 0, not NaN; 'batchmean' counts it in B.
    mask0 = torch.ones(2, 11, dtype=torch.long)
    mask0[1] = 0
    t0 = t.clone()
    t0[1] = 0
    rows = sk.attention_kl(q, k, t0, heads, None, mask0, reduction="none", backend=backend)
    assert torch.isfinite(rows).all() and (rows[1] == 0).all()
    bm = sk.attention_kl(q, k, t0, heads, None, mask0, backend=backend)
    one = sk.attention_kl(q[:1], k[:1], t0[:1], heads[:1], None, mask0[:1], backend=backend)
    assert math.isclose(bm.item(), one.item() / 2, rel_tol=1e-5)


def test_kl_is_nonnegative_and_zero_for_own_attention():
    q, k, _, heads, queries, mask = make_case(2, 4, 2, 15, 16, S=2, Q=5, pad="left")
    a = check_attention_args(q, k, heads, queries, mask)
    own = reference.attention_probs(a, torch.float32)
    for backend in ["torch"] + AVAILABLE:
        rows = sk.attention_kl(q, k, own, heads, queries, mask, reduction="none", backend=backend)
        assert rows.abs().max() < 1e-5, backend


def test_module_and_export():
    case = make_case(1, 4, 4, 9, 16, S=2)
    m = sk.AttentionKLLoss(reduction="sum", backend="torch")
    assert "sum" in repr(m)
    assert torch.allclose(m(*case), sk.attention_kl(*case, reduction="sum", backend="torch"))
    with pytest.raises(ValueError, match="reduction"):
        sk.AttentionKLLoss(reduction="avg")


def test_auto_backend_on_cpu():
    case = make_case(1, 4, 4, 9, 16, S=2)
    _backend._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = sk.attention_kl(*case, backend="auto")
    ref = sk.attention_kl(*case, backend="torch")
    assert torch.allclose(out, ref, atol=1e-5)
    fell_back = any("falls back" in str(x.message) for x in w)
    assert fell_back == (not _backend.available("cpu", torch.device("cpu"))[0])


# ---- contract violations: each names the argument -------------------------------------

def _base():
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 8, 16, S=2, Q=3, empty=False)
    return dict(q=q, k=k, teacher=t, heads=heads, queries=queries, attention_mask=mask)


BAD = [
    ("q", lambda d: d.update(q=d["q"].numpy()), TypeError),
    ("q", lambda d: d.update(q=d["q"].long()), TypeError),
    ("q", lambda d: d.update(q=d["q"][0]), ValueError),
    ("q", lambda d: d["q"].__setitem__((0, 0, 0, 0), float("nan")), ValueError),
    ("k", lambda d: d["k"].__setitem__((1, 1, 1, 1), float("inf")), ValueError),
    ("k", lambda d: d.update(k=d["k"].double()), TypeError),
    ("k", lambda d: d.update(k=d["k"][:, :, :5]), ValueError),
    ("k", lambda d: d.update(k=torch.randn(2, 3, 8, 16)), ValueError),
    ("heads", lambda d: d.update(heads=d["heads"].float()), TypeError),
    ("heads", lambda d: d.update(heads=torch.tensor([[0, 4], [1, 2]])), ValueError),
    ("heads", lambda d: d.update(heads=torch.tensor([[0, -2], [1, 2]])), ValueError),
    ("heads", lambda d: d.update(heads=torch.tensor([[1, 1], [1, 2]])), ValueError),
    ("heads", lambda d: d.update(heads=torch.tensor([[0, 1]] * 3)), ValueError),
    ("heads", lambda d: d.update(heads=torch.zeros(2, 2, 1, dtype=torch.long)), ValueError),
    ("queries", lambda d: d.update(queries=torch.tensor([[0, 1, 8], [0, 1, 2]])), ValueError),
    ("queries", lambda d: d.update(queries=torch.tensor([[0, -1, 2], [0, 1, 2]])), ValueError),
    ("queries", lambda d: d.update(queries=torch.tensor([0, 1, 2])), ValueError),
    ("queries", lambda d: d.update(queries=torch.zeros(2, 3)), TypeError),
    ("attention_mask", lambda d: d.update(attention_mask=torch.ones(2, 7, dtype=torch.long)), ValueError),
    ("attention_mask", lambda d: d.update(attention_mask=torch.ones(2, 8)), TypeError),
    ("attention_mask", lambda d: d.update(attention_mask=torch.full((2, 8), 2)), ValueError),
    ("teacher", lambda d: d.update(teacher=d["teacher"][:, :1]), ValueError),
    ("teacher", lambda d: d["teacher"].__setitem__((0, 0, 0, 0), float("nan")), ValueError),
    ("teacher", lambda d: d["teacher"].__setitem__((0, 0, 0, 0), -0.5), ValueError),
    ("teacher", lambda d: d.update(teacher=d["teacher"].long()), TypeError),
]


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("name,mutate,exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_contract_violation(backend, name, mutate, exc):
    d = _base()
    mutate(d)
    with pytest.raises(exc, match=name):
        sk.attention_kl(**d, backend=backend)


def test_bad_options():
    d = _base()
    with pytest.raises(ValueError, match="reduction"):
        sk.attention_kl(**d, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        sk.attention_kl(**d, backend="metal")
    with pytest.raises(RuntimeError, match="cuda"):
        sk.attention_kl(**d, backend="cuda")
    with pytest.raises(ValueError, match="scale"):
        sk.attention_kl(**d, scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        sk.attention_kl(**d, scale=float("nan"))


def test_teacher_gets_no_gradient():
    d = _base()
    d["teacher"] = d["teacher"].clone().requires_grad_()
    d["q"].requires_grad_()
    sk.attention_kl(**d, backend="torch").backward()
    assert d["teacher"].grad is None


# ---- property-based: random small shapes ----------------------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.integers(1, 3), L=st.integers(1, 40),
       D=st.sampled_from([8, 16, 24, 32]), S=st.integers(1, 4), Q=st.one_of(st.none(), st.integers(1, 9)),
       pad=st.sampled_from(["none", "left", "right"]), seed=st.integers(0, 2**16))
def test_property_backends_agree(B, Hkv, G, L, D, S, Q, pad, seed):
    case = make_case(B, Hkv * G, Hkv, L, D, S=S, Q=Q, pad=pad, seed=seed)
    ref = run("torch", *case)
    assert (ref[0] >= -1e-5).all()   # KL of proper distributions is non-negative
    for b in AVAILABLE:
        got = run(b, *case)
        for x, y, what in zip(got, ref, ["rows", "dq", "dk"]):
            assert_close(x, y, 2e-5, f"{b} {what}")


# ---- GPU: the Triton kernels compiled for real (run with SEEKR_TEST_GPU=1) ---------------

GPU_GRID = list(itertools.product([(32, 8)], [512, 2048, 8192], [128], [None, 100],
                                  [torch.bfloat16, torch.float32]))


@pytest.mark.gpu
@pytest.mark.parametrize("HK,L,D,Q,dtype", GPU_GRID)
def test_gpu_triton_matches_torch(HK, L, D, Q, dtype):
    H, Hkv = HK
    case = make_case(1, H, Hkv, L, D, S=4, Q=Q, pad="left", dtype=dtype, device="cuda",
                     teacher_dtype=torch.bfloat16)
    ref = run("torch", *case)
    got = run("triton", *case)
    tol = TOL[dtype] * 2
    for a, b, what in zip(got, ref, ["rows", "dq", "dk"]):
        assert_close(a.float(), b.float(), tol, what)


@pytest.mark.gpu
@pytest.mark.parametrize("B,HK,L,D,Q,pad,dtype", GRID, ids=GRID_IDS)
def test_gpu_grid(B, HK, L, D, Q, pad, dtype):
    H, Hkv = HK
    case = make_case(B, H, Hkv, L, D, S=3, Q=Q, pad=pad, dtype=dtype, seed=L, device="cuda")
    ref = run("torch", *case)
    got = run("triton", *case)
    for a, b, what in zip(got, ref, ["rows", "dq", "dk"]):
        assert_close(a.float(), b.float(), TOL[dtype] * 4, what)
