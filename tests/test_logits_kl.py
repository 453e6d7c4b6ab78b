"""logits_kl against the published formula: values, gradients, TopK teachers, contract."""
import os
import warnings

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels.ops import logits_kl as lk
from seekr_kernels.ops.logits_kl import LogitsKLLoss, logits_kl
from seekr_kernels.ops.teachers import TopK

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def published(s, t, labels):
    """The reference code's term: CrossEntropyLoss()(s[sel], softmax(t[sel])), in fp64."""
    sel = labels != -100
    return torch.nn.CrossEntropyLoss()(s[sel].double(), torch.softmax(t[sel].double(), -1))


def ref_grad(s, t, labels):
    s64 = s.detach().double().requires_grad_()
    v = published(s64, t, labels)
    g, = torch.autograd.grad(v, s64)
    return v.detach(), g


def make(N=2, L=5, V=37, dtype=torch.float32, tdtype=None, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, L, V, generator=g) * spread).to(dtype)
    t = (torch.randn(N, L, V, generator=g) * spread).to(tdtype or dtype)
    labels = torch.randint(0, V, (N, L), generator=g)
    labels[0, 1] = -100
    labels[-1, -1] = -100
    return s, t, labels


def run(s, t, labels, backend, block=16, **kw):
    s = s.detach().requires_grad_()
    v = logits_kl(s, t, labels, backend=backend, _block=block, **kw)
    g, = torch.autograd.grad(v, s)
    return v, g


# ---------------------------------------------------------------------------- dense teacher
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_matches_published(backend, dtype):
    # V = 37 with blocks of 16: three chunks, the last one partial.
    s, t, labels = make(dtype=dtype, tdtype=torch.bfloat16 if dtype == torch.float32 else torch.float32)
    v, g = run(s, t, labels, backend)
    rv, rg = ref_grad(s, t, labels)
    assert v.dtype == torch.float32 and v.dim() == 0
    assert g.dtype == dtype
    torch.testing.assert_close(v.double(), rv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), rg, atol=TOL[dtype] * rg.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_one_big_block(backend):
    base_s, base_t, labels = make(N=3, L=8, V=50)
    s = base_s[:, ::2]                                # non-contiguous rows
    t = base_t.transpose(0, 1).contiguous().transpose(0, 1)[:, 1::2]
    lab = labels[:, ::2]
    for block in (16, None):                          # None: one block >= V
        v, g = run(s, t, lab, backend, block=block)
        rv, rg = ref_grad(s, t, lab)
        torch.testing.assert_close(v.double(), rv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.double(), rg, atol=1e-6, rtol=1e-4)
    # a non-contiguous last dim is made contiguous
    sT = base_s.transpose(1, 2).contiguous().transpose(1, 2)
    assert sT.stride(-1) != 1
    v, g = run(sT, base_t, labels, backend)
    rv, rg = ref_grad(base_s, base_t, labels)
    torch.testing.assert_close(v.double(), rv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), rg, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_never_read(backend):
    s, t, labels = make()
    s2, t2 = s.clone(), t.clone()
    s2[0, 1] = float("nan")
    t2[-1, -1] = float("inf")
    v, g = run(s2, t2, labels, backend)
    rv, rg = ref_grad(s, t, labels)
    torch.testing.assert_close(v.double(), rv, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(g).all()
    assert (g[0, 1] == 0).all() and (g[-1, -1] == 0).all()
    torch.testing.assert_close(g.double(), rg, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_is_zero_and_reductions(backend):
    s, t, labels = make()
    none = torch.full_like(labels, -100)
    v, g = run(s, t, none, backend)
    assert v.item() == 0.0 and torch.isfinite(v)
    assert (g == 0).all()
    # sum and none agree with the per-token published terms
    rows = logits_kl(s, t, labels, reduction="none", backend=backend, _block=16)
    assert rows.shape == labels.shape
    assert (rows[labels == -100] == 0).all()
    per_tok = -(torch.softmax(t.double(), -1) * torch.log_softmax(s.double(), -1)).sum(-1)
    torch.testing.assert_close(rows.double()[labels != -100], per_tok[labels != -100], atol=1e-5, rtol=1e-5)
    tot = logits_kl(s, t, labels, reduction="sum", backend=backend, _block=16)
    torch.testing.assert_close(tot, rows.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits(backend):
    # A masked vocabulary entry (-inf in both) contributes nothing and stays finite.
    s, t, labels = make()
    s[..., 3] = float("-inf")
    t[..., 3] = float("-inf")
    t[0, 0, 5] = float("-inf")
    v, g = run(s, t, labels, backend)
    assert torch.isfinite(v) and torch.isfinite(g).all()
    sf, tf = s.clone(), t.clone()
    sf[..., 3] = -1e4
    tf[..., 3] = -1e4
    tf[0, 0, 5] = -1e4
    rv, rg = ref_grad(sf, tf, labels)
    torch.testing.assert_close(v.double(), rv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), rg, atol=1e-6, rtol=1e-4)


def test_torch_backend_chunks(monkeypatch):
    s, t, labels = make(N=3, L=7, V=40)
    v0, g0 = run(s, t, labels, "torch")
    monkeypatch.setattr(lk, "_CHUNK_ELEMS", 90)      # two rows per chunk
    v1, g1 = run(s, t, labels, "torch")
    torch.testing.assert_close(v0, v1)
    torch.testing.assert_close(g0, g1)


def test_gradcheck_fp64_torch():
    s, t, labels = make(N=2, L=3, V=11, dtype=torch.float64)
    s.requires_grad_()
    torch.autograd.gradcheck(lambda x: logits_kl(x, t, labels, backend="torch"), (s,))
    tk = TopK.from_dense(t, 4, kind="logits")
    for mode in ("uniform", "kept", "renorm"):
        torch.autograd.gradcheck(lambda x: logits_kl(x, tk, labels, backend="torch", topk_mode=mode), (s,))
    # reduction="none" with an arbitrary incoming gradient
    torch.autograd.gradcheck(lambda x: logits_kl(x, t, labels, backend="torch", reduction="none"), (s,))


# ---------------------------------------------------------------------------- TopK teacher
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_full_equals_dense(backend):
    s, t, labels = make(V=37)
    vd, gd = run(s, t, labels, backend)
    tk = TopK.from_dense(t, 37, kind="logits")
    for mode in lk.TOPK_MODES:
        v, g = run(s, tk, labels, backend, topk_mode=mode)
        torch.testing.assert_close(v, vd, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g, gd, atol=1e-7, rtol=1e-5)


def _explicit_target(s, t, k, mode):
    """The documented TopK approximations as an explicit dense target w (fp64)."""
    s, t = s.double(), t.double()
    V = t.shape[-1]
    lt = torch.logsumexp(t, -1, keepdim=True)
    v, i = t.topk(k, -1)
    p = torch.exp(v - lt)
    tk = p.sum(-1, keepdim=True)
    pd = (1 - tk).clamp_min(0)
    w = torch.zeros_like(s)
    if mode == "kept":
        w.scatter_(-1, i, p)
    elif mode == "renorm":
        w.scatter_(-1, i, p / tk)
    elif mode == "uniform":
        w[:] = pd / (V - k)
        w.scatter_(-1, i, p)
    else:  # student_tail: dropped mass spread like the student's own tail
        q = torch.softmax(s, -1)
        qd = 1 - q.gather(-1, i).sum(-1, keepdim=True)
        w = q * pd / qd
        w.scatter_(-1, i, p)
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", lk.TOPK_MODES)
def test_topk_modes_match_their_definition(backend, mode):
    s, t, labels = make(V=37, seed=3)
    k = 9
    tk = TopK.from_dense(t, k, kind="logits")
    v, g = run(s, tk, labels, backend, topk_mode=mode)
    w = _explicit_target(s, t, k, mode)
    sel = labels != -100
    s64 = s.double().requires_grad_()
    logq = torch.log_softmax(s64, -1)
    rows = -(w * logq).sum(-1)
    ref = rows[sel].mean()
    rg, = torch.autograd.grad(ref, s64)               # w is a fixed (detached) target
    torch.testing.assert_close(v.double(), ref.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(g.double(), rg, atol=2e-6, rtol=1e-4)


def test_topk_default_keeps_kl_closest():
    # LM-like teacher (Zipf prior + context noise) and a student that drifted from it.
    torch.manual_seed(0)
    N, L, V, k = 2, 16, 2048, 64
    rank = torch.randperm(V).float() + 1
    t = (-1.1 * torch.log(rank) + 2.0 * torch.randn(N, L, V)) / 0.7
    s = t + 0.3 * torch.randn(N, L, V) + 3.0
    labels = torch.zeros(N, L, dtype=torch.long)
    vd, gd = run(s, t, labels, "torch")
    tk = TopK.from_dense(t, k, kind="logits")
    errs = {}
    for mode in lk.TOPK_MODES:
        v, g = run(s, tk, labels, "torch", topk_mode=mode)
        cos = torch.nn.functional.cosine_similarity(g.flatten(), gd.flatten(), 0).item()
        errs[mode] = (abs(v.item() - vd.item()) / vd.item(), cos)
    best = lk.DEFAULT_TOPK_MODE
    assert errs[best][0] < 0.02 and errs[best][1] > 0.999, errs
    assert all(errs[best][0] <= e[0] for e in errs.values()), errs
    # and the default is what logits_kl uses without topk_mode
    v, _ = run(s, tk, labels, "torch")
    assert abs(v.item() - vd.item()) / vd.item() == pytest.approx(errs[best][0], abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_student_equals_teacher_has_zero_gradient(backend):
    # student_tail is exact when the student's tail matches the teacher's: the dense
    # stationary point (student == teacher) stays stationary.
    s, _, labels = make(V=37)
    tk = TopK.from_dense(s, 5, kind="logits")
    v, g = run(s, tk, labels, backend)
    assert g.abs().max().item() < 1e-6
    vd, _ = run(s, s, labels, backend)
    torch.testing.assert_close(v, vd, atol=1e-5, rtol=1e-5)


def test_topk_bf16_values():
    s, t, labels = make(dtype=torch.bfloat16, V=37)
    tk = TopK.from_dense(t, 37, kind="logits")
    v, g = run(s, tk, labels, "triton")
    rv, rg = ref_grad(s, t, labels)
    torch.testing.assert_close(v.double(), rv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g.double(), rg, atol=1.6e-2 * rg.abs().max().item(), rtol=0)


# ---------------------------------------------------------------------------- contract
def test_contract_errors():
    s, t, labels = make()
    cases = [
        (dict(student_logits=s.long()), TypeError, "student_logits"),
        (dict(student_logits=s[0]), ValueError, "student_logits"),
        (dict(student_logits=s[..., :0], teacher=t[..., :0]), ValueError, "student_logits"),
        (dict(teacher=t[..., :5]), ValueError, "teacher"),
        (dict(teacher=t.long()), TypeError, "teacher"),
        (dict(teacher=t.numpy()), TypeError, "teacher"),
        (dict(teacher=TopK.from_dense(torch.rand_like(t), 3, kind="probs")), ValueError, "teacher"),
        (dict(teacher=TopK.from_dense(t[:, :2], 3, kind="logits")), ValueError, "teacher"),
        (dict(labels=labels.float()), TypeError, "labels"),
        (dict(labels=labels[:, :2]), ValueError, "labels"),
        (dict(labels=labels.tolist()), TypeError, "labels"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
        (dict(topk_mode="nope"), ValueError, "topk_mode"),
        (dict(backend="cpu"), ValueError, "backend"),
        (dict(backend="bogus"), ValueError, "backend"),
        (dict(student_logits=s.double(), backend="triton"), TypeError, "student_logits"),
        (dict(check_values=1), TypeError, "check_values"),
    ]
    for kw, exc, name in cases:
        args = dict(student_logits=s, teacher=t, labels=labels)
        args.update(kw)
        with pytest.raises(exc, match=name):
            logits_kl(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_errors_name_the_argument(backend):
    s, t, labels = make()
    bad = s.clone()
    bad[0, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="student_logits"):
        logits_kl(bad, t, labels, backend=backend)
    bad = t.clone()
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="teacher"):
        logits_kl(s, bad, labels, backend=backend)
    bad = s.clone()
    bad[0, 0, 2] = float("-inf")                        # teacher puts mass there
    with pytest.raises(ValueError, match="student_logits: the loss is not finite"):
        logits_kl(bad, t, labels, backend=backend)
    # unchecked: no error, the result is simply not finite
    assert not torch.isfinite(logits_kl(bad, t, labels, backend=backend, check_values=False))
    tk = TopK.from_dense(t, 4, kind="logits")
    tk.values[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher"):
        logits_kl(s, tk, labels, backend=backend)


def test_auto_backend_cpu_is_torch_without_warning():
    s, t, labels = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = logits_kl(s, t, labels)
    torch.testing.assert_close(v, logits_kl(s, t, labels, backend="torch"))


def test_module_and_exports():
    s, t, labels = make()
    assert sk.logits_kl is logits_kl and sk.LogitsKLLoss is LogitsKLLoss
    m = LogitsKLLoss(reduction="sum", backend="torch")
    torch.testing.assert_close(m(s, t, labels), logits_kl(s, t, labels, reduction="sum", backend="torch"))
    with pytest.raises(ValueError, match="reduction"):
        LogitsKLLoss(reduction="x")


def test_teacher_gets_no_gradient():
    s, t, labels = make()
    t = t.requires_grad_()
    s = s.requires_grad_()
    logits_kl(s, t, labels, backend="torch").backward()
    assert t.grad is None and s.grad is not None


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_vs_torch_llama_vocab(dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    N, L, V = 2, 64, 32000
    s = (torch.randn(N, L, V, device=dev, generator=g) * 3).to(dtype)
    t = (torch.randn(N, L, V, device=dev, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (N, L), device=dev, generator=g)
    labels[:, :7] = -100
    v1, g1 = run(s, t, labels, "triton", block=None)
    v0, g0 = run(s, t, labels, "torch", block=None)
    torch.testing.assert_close(v1, v0, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g1.float(), g0.float(), atol=TOL[dtype] * g0.float().abs().max().item(), rtol=0)
    tk = TopK.from_dense(t, 64, kind="logits")
    v1, g1 = run(s, tk, labels, "triton", block=None)
    v0, g0 = run(s, tk, labels, "torch", block=None)
    torch.testing.assert_close(v1, v0, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g1.float(), g0.float(), atol=TOL[dtype] * g0.float().abs().max().item(), rtol=0)


@pytest.mark.parametrize("pattern", ["alternating", "spans"])
def test_torch_row_chunking_patterns(monkeypatch, pattern):
    # Fragmented masks take index chunks, span masks take slices; both must agree with the
    # published formula, also with strides that cannot be flattened (gather path).
    base_s, base_t, _ = make(N=3, L=12, V=40, seed=5)
    labels = torch.zeros(3, 12, dtype=torch.long)
    if pattern == "alternating":
        labels[:, ::2] = -100
    else:
        labels[:, :4] = -100
        labels[1, 9:] = -100
    monkeypatch.setattr(lk, "_CHUNK_ELEMS", 130)      # 3 rows per chunk
    s_nv = base_s.transpose(0, 1).contiguous().transpose(0, 1)
    assert lk._flat_view(s_nv) is None
    for s in (base_s, s_nv):
        v, g = run(s, base_t, labels, "torch")
        rv, rg = ref_grad(base_s, base_t, labels)
        torch.testing.assert_close(v.double(), rv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.double(), rg, atol=1e-6, rtol=1e-4)
        tk = TopK.from_dense(base_t, 40, kind="logits")
        v, g = run(s, tk, labels, "torch")
        torch.testing.assert_close(v.double(), rv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.double(), rg, atol=1e-6, rtol=1e-4)
