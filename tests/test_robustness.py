"""Regression tests of issue 15's op defects: nothing silently wrong, no out-of-bounds read.

Each test names the defect it pins down (numbers as in the issue). The fuzz campaign in
tests/fuzz/ covers the same contracts over random inputs; these are the exact cases.
"""
import math
import warnings

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels import _backend
from seekr_kernels._checks import check_attention_args
from seekr_kernels.ops import logits_kl as lk

CPU = torch.device("cpu")
FUSED = [b for b in ("cpu", "triton") if _backend.available(b, CPU)[0]]
ALL = FUSED + ["torch"]
needs_triton = pytest.mark.skipif("triton" not in FUSED, reason="triton is not installed")


def _case(dtype=torch.float32, B=2, H=4, Hkv=2, L=6, D=8, S=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    heads = torch.tensor([[0, 3], [1, -1]])[:, :S]
    t = torch.softmax(torch.randn(B, S, L, L, generator=g), -1).to(dtype)
    return q, k, t, heads


# ----------------------------------------------------------------------------- 1. fp64
@needs_triton
def test_triton_refuses_fp64_everywhere():
    q, k, t, heads = _case(torch.float64)
    msg = "dtype torch.float64 is not supported by the triton backend"
    with pytest.raises(TypeError, match="q: " + msg):
        sk.attention_kl(q, k, t, heads, backend="triton")
    with pytest.raises(TypeError, match="q: " + msg):
        sk.attention_kl(q, k, sk.TopK.from_dense(t, 3), heads, backend="triton")
    with pytest.raises(TypeError, match="q: " + msg):
        sk.attention_probs(q, k, heads, backend="triton")
    with pytest.raises(TypeError, match="q_a: " + msg):
        sk.attention_sqdiff(q, k, q, k, heads, backend="triton")
    s = torch.randn(1, 3, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="student_logits: " + msg):
        sk.logits_kl(s, s.clone(), torch.zeros(1, 3, dtype=torch.long), backend="triton")
    # the launchers themselves refuse it too, whoever calls them
    from seekr_kernels.triton import attention_kl as tri
    with pytest.raises(TypeError, match=msg):
        tri.attention_kl_fwd(check_attention_args(q, k, heads), t, None)


def test_auto_picks_an_fp64_backend():
    q, k, t, heads = _case(torch.float64)
    want = sk.attention_kl(q, k, t, heads, backend="torch", reduction="none")
    got = sk.attention_kl(q, k, t, heads, backend="auto", reduction="none")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    # On CUDA: fp32 goes to triton, fp64 to the CUDA extension (or torch when not built).
    cuda = torch.device("cuda")
    if _backend.available("triton", cuda)[0]:
        assert _backend.resolve("auto", cuda, "op", dtype=torch.float32) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _backend.resolve("auto", cuda, "op", dtype=torch.float64) in ("cuda", "torch")


# ----------------------------------------------------------------------------- 2. TopK teacher
@pytest.mark.parametrize("bad,msg", [(-0.05, "negative"), (float("nan"), "NaN or infinite"),
                                     (float("inf"), "NaN or infinite")])
def test_topk_from_dense_probs_refuses_what_dense_refuses(bad, msg):
    q, k, t, heads = _case()
    t = t.clone()
    t[0, 0, 3, 1] = bad
    with pytest.raises(ValueError, match="teacher"):
        sk.attention_kl(q, k, t, heads, backend="torch")        # dense: refused
    with pytest.raises(ValueError, match="x: contains " + msg):
        sk.TopK.from_dense(t, 3)                                 # TopK: refused as well


@pytest.mark.parametrize("what,msg", [("nan", "NaN or \\+inf"), ("inf", "NaN or \\+inf"),
                                      ("all_neg_inf", "only -inf"), ("few_finite", "fewer finite")])
def test_topk_from_dense_logits(what, msg):
    x = torch.randn(2, 3, 7)
    if what == "nan":
        x[1, 2, 0] = float("nan")
    elif what == "inf":
        x[0, 0, 4] = float("inf")
    elif what == "all_neg_inf":
        x[1, 1] = float("-inf")
    else:
        x[0, 1, 2:] = float("-inf")                              # 2 finite entries, k = 4
    with pytest.raises(ValueError, match="x: .*" + msg):
        sk.TopK.from_dense(x, 4, kind="logits")
    x = torch.randn(2, 3, 7)
    x[0, 1, 5:] = float("-inf")                                  # masked entries are fine
    tk = sk.TopK.from_dense(x, 4, kind="logits")
    assert torch.isfinite(tk.values).all() and torch.isfinite(tk.lse).all()


# ----------------------------------------------------------------------------- 5. overflow
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflowing_scores_are_refused_on_every_backend(backend, dtype):
    q = torch.full((1, 1, 4, 4), 3e19).to(dtype)
    k = torch.full((1, 1, 4, 4), 3e19).to(dtype)
    t = torch.softmax(torch.randn(1, 1, 4, 4), -1)
    heads = torch.tensor([0])
    with pytest.raises(ValueError, match="q: attention scores may overflow"):
        sk.attention_kl(q, k, t, heads, backend=backend)
    with pytest.raises(ValueError, match="q: attention scores may overflow"):
        sk.attention_kl(q, k, sk.TopK.from_dense(t, 2), heads, backend=backend)
    with pytest.raises(ValueError, match="q: attention scores may overflow"):
        sk.attention_probs(q, k, heads, backend=backend)
    small = torch.randn(1, 1, 4, 4).to(dtype)
    with pytest.raises(ValueError, match="q_b: attention scores may overflow"):
        sk.attention_sqdiff(small, small, q, k, heads, backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_large_but_safe_scores_are_finite_and_agree(backend):
    # scale * D * max|q| * max|k| = 0.5 * 4 * 1e36 = 2e36, under the 8.5e37 limit, and the
    # loss bound of attention_kl (10 active rows * 2 * 2e36 * teacher mass 1 = 4e37) too
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 4, generator=g).clamp(-1, 1) * 1e18
    k = torch.randn(1, 2, 5, 4, generator=g).clamp(-1, 1) * 1e18
    t = torch.softmax(torch.randn(1, 2, 5, 5, generator=g), -1)
    heads = torch.tensor([0, 1])
    got = sk.attention_probs(q, k, heads, backend=backend)
    want = sk.attention_probs(q.double(), k.double(), heads, backend="torch")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert torch.isfinite(sk.attention_kl(q, k, t, heads, backend=backend))


# ----------------------------------------------------------------------------- 6. index re-checks
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("head", [4, 10 ** 6, 2 ** 32, -2])
def test_bad_head_without_value_checks_is_an_error(backend, head):
    q, k, t, heads = _case()
    heads = heads.clone()
    heads[1, 0] = head
    for call in (lambda: sk.attention_kl(q, k, t, heads, backend=backend, check_values=False),
                 lambda: sk.attention_probs(q, k, heads, backend=backend, check_values=False)):
        with pytest.raises(ValueError, match="heads"):
            call()
    with pytest.raises(ValueError, match="heads"):
        sk.attention_sqdiff(q, k, q, k, heads, backend=backend, check_values=False)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("pos", [6, -1, 10 ** 9])
def test_bad_query_without_value_checks_is_an_error(backend, pos):
    q, k, t, heads = _case()
    queries = torch.tensor([[0, 5], [pos, 2]])
    t = t[:, :, :2]
    with pytest.raises(ValueError, match="queries"):
        sk.attention_kl(q, k, t, heads, queries, backend=backend, check_values=False)
    with pytest.raises(ValueError, match="queries"):
        sk.attention_probs(q, k, heads, queries, backend=backend, check_values=False)
    with pytest.raises(ValueError, match="queries"):      # the TopK path gathers with them too
        sk.attention_kl(q, k, sk.TopK.from_dense(t, 2), heads, queries, backend=backend, check_values=False)


@needs_triton
def test_triton_launchers_recheck_indices():
    from seekr_kernels.triton.attention_probs import attention_probs as launch
    q, k, _, heads = _case()
    for bad in (4, 10 ** 6):
        h = heads.clone()
        h[0, 1] = bad
        a = check_attention_args(q, k, h, check_values=False)
        with pytest.raises(ValueError, match=r"heads: values must lie in \[-1, 4\)"):
            launch(a, torch.float32)


def test_topk_indices_rechecked_without_value_checks():
    q, k, t, heads = _case()
    tk = sk.TopK.from_dense(t, 3)
    tk.indices[0, 0, 2, 0] = 6                                   # == L
    with pytest.raises(ValueError, match="teacher: TopK indices"):
        sk.attention_kl(q, k, tk, heads, backend="torch", check_values=False)


# ----------------------------------------------------------------------------- 7. ignored TopK rows
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if "triton" in FUSED else []))
@pytest.mark.parametrize("check_values", [True, False])
def test_logits_kl_topk_never_reads_ignored_rows(backend, check_values):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 11, generator=g)
    tk = sk.TopK.from_dense(torch.randn(2, 4, 11, generator=g), 3, kind="logits")
    labels = torch.tensor([[1, -100, 2, 3], [-100, -100, 4, 5]])
    dirty = sk.TopK(tk.values.clone(), tk.indices.clone(), 11, "logits", lse=tk.lse.clone())
    for n, l in ((0, 1), (1, 0)):
        dirty.values[n, l] = float("nan")
        dirty.lse[n, l] = float("nan")
        dirty.indices[n, l] = torch.tensor([-7, 99, 99])          # out of range and repeated
    out = []
    for teacher in (tk, dirty):
        x = s.clone().requires_grad_()
        loss = sk.logits_kl(x, teacher, labels, backend=backend, check_values=check_values)
        loss.backward()
        out.append((loss.detach(), x.grad))
    assert torch.isfinite(out[1][0]) and torch.isfinite(out[1][1]).all()
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])
    dirty.values[0, 0, 0] = float("nan")                          # a supervised row: refused
    if check_values:
        with pytest.raises(ValueError, match="teacher: TopK values"):
            sk.logits_kl(s, dirty, labels, backend=backend)


# ----------------------------------------------------------------------------- 8. double backward
@pytest.mark.parametrize("backend", FUSED)
def test_fused_attention_kl_is_once_differentiable(backend):
    q, k, t, heads = _case()
    q.requires_grad_()
    for teacher in (t, sk.TopK.from_dense(t, 3)):
        loss = sk.attention_kl(q, k, teacher, heads, backend=backend)
        with pytest.raises(RuntimeError, match="attention_kl.*once differentiable"):
            torch.autograd.grad(loss, q, create_graph=True)
        (g,) = torch.autograd.grad(sk.attention_kl(q, k, teacher, heads, backend=backend), q)
        assert torch.isfinite(g).all() and g.abs().sum() > 0      # a plain backward still works


def test_logits_kl_is_once_differentiable_and_torch_attention_twice():
    s = torch.randn(1, 3, 5, requires_grad=True)
    loss = sk.logits_kl(s, torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="logits_kl: every backend is once differentiable"):
        torch.autograd.grad(loss, s, create_graph=True)
    # the plain-PyTorch attention backend supports double backward (autograd all the way)
    q, k, t, heads = _case(torch.float64, B=1, H=1, Hkv=1, L=3, D=2, S=1)
    q.requires_grad_()
    f = lambda x: sk.attention_kl(x, k, t, torch.tensor([0]), backend="torch")
    assert torch.autograd.gradgradcheck(f, (q,))


# ----------------------------------------------------------------------------- 9. auto and D
def test_auto_falls_back_to_torch_for_a_head_dim_the_native_backend_cannot_take():
    D = _backend.NATIVE_MAX_HEAD_DIM + 1
    q, k, t, heads = _case(B=1, H=1, Hkv=1, L=3, D=D, S=1)
    heads = torch.tensor([0])
    _backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="head dim D=4097 exceeds the cpu backend"):
        got = sk.attention_kl(q, k, t, heads, backend="auto")
    torch.testing.assert_close(got, sk.attention_kl(q, k, t, heads, backend="torch"))
    if "cpu" in FUSED:
        with pytest.raises(ValueError, match="q: head dim D=4097 exceeds the cpu backend"):
            sk.attention_kl(q, k, t, heads, backend="cpu")


# ----------------------------------------------------------------------------- 10, 11
def test_importance_update_refuses_complex():
    imp = sk.Importance(2, 3)
    with pytest.raises(TypeError, match="sensitivity: expected a real"):
        imp.update(torch.ones(2, 3, dtype=torch.complex64), torch.ones(2, 3))
    with pytest.raises(TypeError, match="forgettability: expected a real"):
        imp.update(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.complex128))
    assert imp.num_tasks == 0


def test_logits_kl_docstring_lists_the_real_topk_modes():
    doc = sk.logits_kl.__doc__
    part = doc[doc.index("topk_mode:"):doc.index("Returns:")]
    named = {m for m in ("student_tail", "uniform", "kept", "renorm", "full_lse", "bucket")
             if f'"{m}"' in part}
    assert named == set(lk.TOPK_MODES)
    assert f'"{lk.DEFAULT_TOPK_MODE}"`` (default)' in part.replace("\n", " ").replace("            ", "")


# ============================================================================= issue 22
# ----------------------------------------------------------------------------- 2. narrow index dtypes
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8] + \
    [getattr(torch, "uint16")] * hasattr(torch, "uint16")


def _index_case():
    q, k, _, _ = _case(L=6, seed=4)
    queries = torch.tensor([[0, 5, 2], [4, 4, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    t = torch.softmax(torch.randn(2, 2, 3, 6, generator=torch.Generator().manual_seed(5)), -1)
    return q, k, t, queries, mask


def _ops(q, k, t, heads, queries, mask, backend, cv):
    """attention_kl rows, attention_probs and attention_sqdiff as zero-argument calls."""
    kw = dict(backend=backend, check_values=cv)
    calls = [lambda: sk.attention_kl(q, k, t, heads, queries, mask, reduction="none", **kw),
             lambda: sk.attention_probs(q, k, heads, queries, mask, **kw),
             lambda: sk.attention_sqdiff(q, k, 0.7 * q, k, heads, queries, mask, **kw)]
    return calls


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("check_values", [True, False])
def test_every_integer_dtype_of_heads_queries_mask_means_the_same(backend, dtype, check_values):
    """int8/int16 heads used to be converted to int32 through a comparison with int32's
    limits that wrapped in the narrow dtype: every head (a valid -1 included) became -2, so
    the cpu backend refused valid input ("heads: value -2") and torch/triton silently
    returned zeros (every slot empty)."""
    q, k, t, queries, mask = _index_case()
    h64 = torch.tensor([[0, 3], [1, -1]]) if dtype.is_signed else torch.tensor([[0, 3], [1, 2]])
    want = [c() for c in _ops(q, k, t, h64, queries, mask, "torch", True)]
    got = [c() for c in _ops(q, k, t, h64.to(dtype), queries.to(dtype), mask.to(dtype), backend,
                             check_values)]
    assert all(float(w.abs().sum()) > 0 for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("check_values", [True, False])
def test_a_head_below_minus_one_is_refused_alike_in_every_integer_dtype(backend, dtype, check_values):
    """-1 is the only empty-slot marker (ops' docstrings, _checks.AttnArgs): -2 (250 in the
    unsigned dtypes, which cannot hold it) is out of range on every backend, same message."""
    q, k, t, queries, mask = _index_case()
    heads = torch.tensor([[0, 3], [1, -2 if dtype.is_signed else 250]]).to(dtype)
    for call in _ops(q, k, t, heads, queries, mask, backend, check_values):
        with pytest.raises(ValueError, match=r"^heads: values must lie in \[-1, 4\) \(-1 = empty slot\)$"):
            call()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("check_values", [True, False])
def test_a_query_out_of_range_is_refused_alike_in_every_integer_dtype(backend, dtype, check_values):
    q, k, t, queries, mask = _index_case()
    queries = queries.clone()
    queries[1, 2] = -1 if dtype.is_signed else 6
    for call in _ops(q, k, t, torch.tensor([[0, 3], [1, -1]]), queries.to(dtype), mask.to(dtype), backend,
                     check_values):
        with pytest.raises(ValueError, match=r"^queries: positions must lie in \[0, 6\)$"):
            call()


@pytest.mark.parametrize("name", ["uint32", "uint64"])
def test_unsigned_shell_dtypes_are_refused_by_name(name):
    if not hasattr(torch, name):
        pytest.skip(f"torch has no {name}")
    dt = getattr(torch, name)
    q, k, t, queries, mask = _index_case()
    heads = torch.tensor([[0, 3], [1, 2]])
    for arg in ("heads", "queries", "attention_mask"):
        call = dict(heads=heads, queries=queries, attention_mask=mask)
        call[arg] = call[arg].to(dt)
        with pytest.raises(TypeError, match=f"^{arg}: dtype torch.{name} is not supported"):
            sk.attention_probs(q, k, **call, backend="torch")



# ----------------------------------------------------------------------------- 3. near-limit inputs
def _near_limit(frac, D=8, L=16):
    """q, k whose scores reach +-frac * (the score check's limit) / 2.8 with opposite signs on
    alternate keys, and a teacher on the keys the student likes least: every active row's
    KL is ~ 2 * max|z|."""
    m = math.sqrt(frac * 8.5e37 / D)
    q = torch.full((2, 4, L, D), m)
    k = torch.full((2, 2, L, D), m)
    k[:, :, 1::2] = -m
    t = torch.zeros(2, 2, L, L)
    t[..., 1::2] = 1.0
    t = torch.tril(t)
    t[..., 0, 0] = 1.0
    return q, k, t / t.sum(-1, keepdim=True), torch.tensor([[0, 3], [1, -1]])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_a_loss_that_may_overflow_is_refused_like_overflowing_scores(backend, teacher_kind, reduction):
    """These scores pass the score check (scale * D * max|q| * max|k| = 0.1 of its limit),
    but 48 rows of KL ~ 6e36 summed to inf on every backend (issue 22); the same rule, a
    sufficient bound reaching a quarter of the fp32 range, now refuses the loss too."""
    q, k, t, heads = _near_limit(0.1)
    teacher = t if teacher_kind == "dense" else sk.TopK.from_dense(t, 3)
    with pytest.raises(ValueError, match=r"^q: the loss may overflow the float32 accumulator"):
        sk.attention_kl(q, k, teacher, heads, backend=backend, reduction=reduction)
    # Three orders of magnitude below, the same construction is computed, finite, and the
    # backends agree with the fp64 oracle.
    q, k, t, heads = _near_limit(1e-3)
    teacher = t if teacher_kind == "dense" else sk.TopK.from_dense(t, 3)
    q.requires_grad_()
    k.requires_grad_()
    got = sk.attention_kl(q, k, teacher, heads, backend=backend, reduction=reduction)
    gq, gk = torch.autograd.grad(got.sum(), (q, k))
    assert all(bool(torch.isfinite(x).all()) for x in (got, gq, gk))
    q64, k64 = q.detach().double(), k.detach().double()
    t64 = t.double() if teacher_kind == "dense" else sk.TopK.from_dense(t.double(), 3)
    want = sk.attention_kl(q64, k64, t64, heads, backend="torch", reduction=reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", ALL)
def test_a_gradient_that_may_overflow_is_refused(backend):
    """k near the fp32 limit with a tiny q: the scores are tiny, but dq = scale * sum dz k
    overflowed to inf on the cpu and triton backends (torch stayed finite): refused on all
    before any kernel runs."""
    q, k, t, heads = _case()
    q = (q * 1e-30).requires_grad_()
    k = torch.full_like(k, 1e38).requires_grad_()
    with pytest.raises(ValueError, match=r"^k: the gradient of q may overflow the float32 accumulator"):
        sk.attention_kl(q, k, t, heads, backend=backend, reduction="sum")


@pytest.mark.parametrize("backend", ALL)
def test_topk_bucket_gradient_parts_near_the_limit_are_refused(backend):
    """q ~ 3e34, k ~ 1: the TopK bucket's gradient is formed from parts up to 1/floor (1e7)
    times larger than itself; they overflowed to a non-finite dk on every backend."""
    q, k, t, heads = _case()
    q = (q * 1e34).requires_grad_()
    with pytest.raises(ValueError, match=r"^q: the gradient of k may overflow"):
        sk.attention_kl(q, k, sk.TopK.from_dense(t, 3), heads, backend=backend)
    # the dense teacher has no such parts: accepted, finite
    k = k.requires_grad_()
    gq, gk = torch.autograd.grad(sk.attention_kl(q, k, t, heads, backend=backend), (q, k))
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all()


@pytest.mark.parametrize("backend", ALL)
def test_fp16_gradient_beyond_fp16_range_is_inf_on_every_backend(backend):
    """A defined result, not a refusal: an fp16 gradient whose exact value exceeds 65504 is
    +-inf (as plain autograd gives, and what a GradScaler detects), the same entries on
    every backend and never NaN; bounding it up front would refuse ordinary fp16 input."""
    q, k, t, heads = _case(torch.float16, L=64, seed=3)
    t = torch.softmax(torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(1)), -1)
    q = (q.float() * 3e4).clamp(-6e4, 6e4).half().requires_grad_()
    k = k.requires_grad_()
    loss = sk.attention_kl(q, k, t, heads, backend=backend, reduction="sum")
    gq, gk = torch.autograd.grad(loss * 64, (q, k))
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    want = torch.autograd.grad(sk.attention_kl(q32, k32, t, heads, backend="torch", reduction="sum") * 64,
                               (q32, k32))
    assert torch.isinf(gk).any() and not torch.isnan(gk).any() and not torch.isnan(gq).any()
    assert torch.equal(torch.isinf(gk), want[1].abs() > 65504)
