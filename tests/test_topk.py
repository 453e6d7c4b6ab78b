"""TopK compact teachers: container round trips, and attention-KL with a TopK teacher."""
import pytest
import torch

import seekr_kernels as sk
from seekr_kernels import reference
from seekr_kernels._backend import available
from seekr_kernels._checks import check_attention_args
from seekr_kernels.ops import attention_kl as attention_kl_mod
from seekr_kernels.ops import teachers as teachers_mod
from seekr_kernels.ops.attention_kl import attention_kl_topk_rows
from seekr_kernels.ops.teachers import TopK


def _backends():
    out = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]
    ok, why = available("cpu", torch.device("cpu"))
    out.append(pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not ok, reason=f"cpu backend: {why}")))
    return out


BACKENDS = _backends()


# ---------------------------------------------------------------- container
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_dense_keeps_the_largest(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 50, generator=g).to(dtype)
    t = TopK.from_dense(x, 7)
    assert t.values.dtype == dtype and t.indices.dtype == torch.int32
    assert t.shape == x.shape and t.k == 7 and t.full_size == 50 and t.kind == "probs"
    torch.testing.assert_close(t.values, torch.topk(x, 7, -1).values)
    torch.testing.assert_close(t.values, x.gather(-1, t.indices.long()))
    torch.testing.assert_close(t.mass, x.float().sum(-1))
    dense = t.to_dense()
    assert dense.dtype == dtype
    kept = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, t.indices.long(), True)
    assert torch.equal(dense[kept], x[kept]) and torch.all(dense[~kept] == 0)
    assert (~kept).sum() == 3 * 4 * 43


@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_full_k_round_trip_is_exact(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 11, generator=g)
    if kind == "probs":
        x = x.softmax(-1)
    t = TopK.from_dense(x, 11, kind=kind)
    assert torch.equal(t.to_dense(), x)


def test_logits_keep_exact_probabilities():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 300, generator=g) * 3
    t = TopK.from_dense(x, 16, kind="logits")
    torch.testing.assert_close(t.lse, torch.logsumexp(x, -1))
    p = x.softmax(-1)
    torch.testing.assert_close(t.probs(), p.gather(-1, t.indices.long()))
    torch.testing.assert_close(t.log_probs(), p.log().gather(-1, t.indices.long()))
    # to_dense spreads the dropped mass evenly: same lse, same kept probabilities.
    d = t.to_dense()
    torch.testing.assert_close(torch.logsumexp(d, -1), t.lse)
    torch.testing.assert_close(d.softmax(-1).gather(-1, t.indices.long()), t.probs())


def test_from_dense_chunks_rows(monkeypatch):
    monkeypatch.setattr(teachers_mod, "_CHUNK_ELEMS", 64)     # several chunks, a ragged last one
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 40, generator=g)
    a = TopK.from_dense(x, 5, kind="logits")
    torch.testing.assert_close(a.lse, torch.logsumexp(x, -1))
    torch.testing.assert_close(a.values, torch.topk(x, 5, -1).values)


def test_to_and_properties():
    x = torch.rand(2, 3, 9)
    t = TopK.from_dense(x, 4)
    b = t.to(dtype=torch.bfloat16)
    assert b.values.dtype == torch.bfloat16 and b.indices.dtype == torch.int32 and b.mass.dtype == torch.float32
    assert t.to("cpu").device.type == "cpu"
    assert t.row_shape == (2, 3) and t.dim() == 3
    assert t.nbytes == 2 * 3 * 4 * (4 + 4) + 2 * 3 * 4
    assert "k=4" in repr(t)
    t.check()


def test_container_errors():
    x = torch.rand(2, 9)
    with pytest.raises(ValueError, match="k"):
        TopK.from_dense(x, 0)
    with pytest.raises(ValueError, match="k"):
        TopK.from_dense(x, 10)
    with pytest.raises(TypeError, match="k"):
        TopK.from_dense(x, 2.0)
    with pytest.raises(ValueError, match="kind"):
        TopK.from_dense(x, 2, kind="attn")
    with pytest.raises(TypeError, match="x"):
        TopK.from_dense(torch.ones(2, 9, dtype=torch.long), 2)
    v, i = torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="indices"):
        TopK(v, i[:, :2], 9)
    with pytest.raises(TypeError, match="indices"):
        TopK(v, i.float(), 9)
    with pytest.raises(ValueError, match="values"):
        TopK(v, i, 2)                                          # k > full_size
    with pytest.raises(ValueError, match="lse"):
        TopK(v, i, 9, kind="logits")                           # logits need lse
    with pytest.raises(ValueError, match="lse"):
        TopK(v, i, 9, kind="logits", lse=torch.zeros(3))
    with pytest.raises(ValueError, match="mass"):
        TopK(v, i, 9, kind="logits", lse=torch.zeros(2), mass=torch.ones(2))
    with pytest.raises(ValueError, match="lse"):
        TopK(v, i, 9, kind="probs", lse=torch.zeros(2))
    with pytest.raises(TypeError, match="full_size"):
        TopK(v, i, "9")
    with pytest.raises(ValueError, match="indices"):
        TopK(v, torch.tensor([[0, 1, 9], [0, 1, 2]]), 9).check()
    with pytest.raises(ValueError, match="indices"):
        TopK(v, torch.tensor([[0, 1, 1], [0, 1, 2]]), 9).check()
    with pytest.raises(ValueError, match="values"):
        TopK(-v, torch.tensor([[0, 1, 2], [0, 1, 2]]), 9).check()
    with pytest.raises(ValueError, match="values"):
        TopK(v.clone().fill_(float("nan")), torch.tensor([[0, 1, 2], [0, 1, 2]]), 9).check()
    with pytest.raises(ValueError, match="log_probs"):
        TopK.from_dense(x, 2).log_probs()


# ---------------------------------------------------------------- attention-KL
def _case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, L, D = 2, 4, 2, 29, 16
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    heads = torch.tensor([[3, -1, 0], [1, 2, -1]])
    queries = torch.tensor([[0, 5, 28, 5, 20], [1, 2, 3, 24, 28]])   # duplicates; padded rows
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :4] = 0                                                    # left padding
    mask[1, 25:] = 0                                                   # right padding
    a = check_attention_args(torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
                             heads, queries, mask)
    teacher = reference.attention_probs(a, torch.float32)
    # Mass on keys the rows cannot see: both paths must ignore it.
    teacher = teacher + 0.02 * torch.rand(teacher.shape, generator=g)
    return q, k, teacher, heads, queries, mask


def _loss_and_grads(q, k, teacher, heads, queries, mask, backend, reduction, g=None):
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = sk.attention_kl(qq, kk, teacher, heads, queries, mask, reduction=reduction, backend=backend)
    (loss * (1 if g is None else g)).sum().backward()
    return loss.detach(), qq.grad, kk.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_k_equals_dense(backend, reduction, dtype):
    q, k, teacher, heads, queries, mask = _case(dtype)
    g = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(9)) if reduction == "none" else None
    dense = _loss_and_grads(q, k, teacher, heads, queries, mask, backend, reduction, g)
    top = _loss_and_grads(q, k, TopK.from_dense(teacher, teacher.shape[-1]), heads, queries, mask,
                          backend, reduction, g)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for d, t in zip(dense, top):
        torch.testing.assert_close(t.float(), d.float(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_k_matches_torch_backend(backend):
    q, k, teacher, heads, queries, mask = _case(seed=1)
    t = TopK.from_dense(teacher, 6)
    ref = _loss_and_grads(q, k, t, heads, queries, mask, "torch", "sum")
    got = _loss_and_grads(q, k, t, heads, queries, mask, backend, "sum")
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)


def _explicit(a, teacher, kept_idx, mode):
    """Materialised oracle of each documented treatment of the dropped mass (fp64)."""
    z, valid = reference.selected_logits(a)
    logp = reference.masked_log_softmax(z, valid)
    p = logp.exp() * valid
    keep = torch.zeros_like(valid).scatter_(-1, kept_idx, True) & valid
    t = teacher.double() * valid
    tk = (t * keep).sum(-1)
    delta = (t * (valid & ~keep)).sum(-1)
    xlogx = lambda x: torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))  # noqa: E731
    kl_kept = torch.where(keep, xlogx(t) - t * logp, torch.zeros_like(t)).sum(-1)
    lse = torch.logsumexp(z.masked_fill(~valid, float("-inf")), -1).nan_to_num(0.0, neginf=0.0)
    if mode == "kept":
        out = kl_kept
    elif mode == "bucket":
        pd = (p * (valid & ~keep)).sum(-1)
        out = kl_kept + torch.where(delta > 0, xlogx(delta) - delta * torch.log(pd.clamp_min(1e-300)),
                                    torch.zeros_like(delta))
    elif mode == "renorm":
        r = torch.where(tk > 0, (tk + delta) / tk.clamp_min(1e-300), torch.zeros_like(tk))[..., None]
        tr = t * r
        out = torch.where(keep, xlogx(tr) - tr * logp, torch.zeros_like(t)).sum(-1)
    else:  # full_lse
        out = torch.where(keep, xlogx(t) - t * z, torch.zeros_like(t)).sum(-1) + (tk + delta) * lse
    return torch.where(a.row_active, out, torch.zeros_like(out))


@pytest.mark.parametrize("mode", ["bucket", "kept", "renorm", "full_lse"])
def test_small_k_is_the_documented_approximation(mode):
    """k < L: each treatment equals its materialised formula, value and gradient (fp64)."""
    q, k, teacher, heads, queries, mask = _case(torch.float64, seed=2)
    teacher = teacher.double()
    # Drop the invalid-key mass so that mass - kept_invalid is exactly the valid mass.
    a0 = check_attention_args(q, k, heads, queries, mask)
    _, valid = reference.selected_logits(a0)
    teacher = teacher * valid
    t = TopK.from_dense(teacher, 5)
    outs = []
    for f in (lambda a: _explicit(a, teacher, t.indices.long(), mode),
              lambda a: attention_kl_topk_rows(a, t, "torch", mode=mode)):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        r = f(check_attention_args(qq, kk, heads, queries, mask))
        (r * torch.arange(1, r.numel() + 1, dtype=r.dtype).reshape(r.shape)).sum().backward()
        outs.append((r.detach(), qq.grad, kk.grad))
    for e, g in zip(*outs):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9)


def test_bucket_is_between_kept_and_dense_and_gradcheck():
    q, k, teacher, heads, queries, mask = _case(torch.float64, seed=3)
    teacher = teacher.double()
    t = TopK.from_dense(teacher, 4)
    a = check_attention_args(q, k, heads, queries, mask)
    dense = reference.attention_kl_rows(a, teacher)
    bucket = attention_kl_topk_rows(a, t, "torch")
    # Chain rule of KL: dense = bucket + delta * KL(tails) >= bucket (teacher rows here are
    # normalised over valid keys up to the invalid-key mass the TopK ignores).
    assert torch.all(bucket <= dense + 1e-9)
    # gradcheck on a case small enough for finite differences to be quick
    g = torch.Generator().manual_seed(13)
    q2 = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k2 = torch.randn(1, 1, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h2, m2 = torch.tensor([1]), torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])
    t2 = TopK.from_dense(torch.rand(1, 1, 9, 9, generator=g, dtype=torch.float64).tril(), 3)
    assert torch.autograd.gradcheck(
        lambda x, y: attention_kl_topk_rows(check_attention_args(x, y, h2, None, m2, check_values=False),
                                            t2, "torch", check_values=False),
        (q2, k2))


def test_without_mass_falls_back_to_kept():
    q, k, teacher, heads, queries, mask = _case(seed=4)
    t = TopK.from_dense(teacher, 5)
    nomass = TopK(t.values, t.indices, t.full_size)
    a = check_attention_args(q, k, heads, queries, mask)
    torch.testing.assert_close(attention_kl_topk_rows(a, nomass, "torch"),
                               attention_kl_topk_rows(a, t, "torch", mode="kept"))


def test_bf16_values_and_gather_chunks(monkeypatch):
    monkeypatch.setattr(attention_kl_mod, "_GATHER_ELEMS", 200)           # many row chunks
    q, k, teacher, heads, queries, mask = _case(seed=5)
    t = TopK.from_dense(teacher, 7)
    ref = _loss_and_grads(q, k, t, heads, queries, mask, "torch", "sum")
    monkeypatch.setattr(attention_kl_mod, "_GATHER_ELEMS", 1 << 22)
    one = _loss_and_grads(q, k, t, heads, queries, mask, "torch", "sum")
    for r, o in zip(ref, one):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    tb = t.to(dtype=torch.bfloat16)
    lb = sk.attention_kl(q, k, tb, heads, queries, mask, reduction="sum", backend="torch")
    torch.testing.assert_close(lb, one[0], atol=2e-2, rtol=2e-2)


def test_attention_teacher_errors():
    q, k, teacher, heads, queries, mask = _case()
    with pytest.raises(ValueError, match="teacher"):
        sk.attention_kl(q, k, TopK.from_dense(teacher, 4, kind="logits"), heads, queries, mask)
    with pytest.raises(ValueError, match="teacher"):
        sk.attention_kl(q, k, TopK.from_dense(teacher[:, :2], 4), heads, queries, mask)
    bad = TopK.from_dense(teacher, 4)
    bad.indices[0, 0, 0, 0] = 29
    with pytest.raises(ValueError, match="teacher"):
        sk.attention_kl(q, k, bad, heads, queries, mask)
    with pytest.raises(ValueError, match="mode"):
        attention_kl_topk_rows(check_attention_args(q, k, heads, queries, mask), TopK.from_dense(teacher, 4),
                               "torch", mode="nope")


@pytest.mark.gpu
def test_full_k_equals_dense_gpu():
    q, k, teacher, heads, queries, mask = (x.cuda() for x in _case())
    dense = _loss_and_grads(q, k, teacher, heads, queries, mask, "triton", "batchmean")
    top = _loss_and_grads(q, k, TopK.from_dense(teacher, teacher.shape[-1]), heads, queries, mask,
                          "triton", "batchmean")
    for d, t in zip(dense, top):
        torch.testing.assert_close(t, d, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_with_sharpening_student_matches_fp64(backend):
    """Student sharper and sharper on the teacher's top keys, so its mass on the dropped
    keys shrinks towards rounding level: the fp32 result keeps tracking the fp64 oracle
    (no noise blow-up, no gradient lost to the tail floor while P_D is resolvable)."""
    q, k, _, heads, queries, mask = _case(seed=6)
    a0 = check_attention_args(q, k, heads, queries, mask)
    teacher = reference.attention_probs(a0, torch.float32)
    t = TopK.from_dense(teacher, 3)
    for sharp in (2.0, 6.0, 12.0, 16.0, 40.0):
        outs = []
        for dt, f in ((torch.float64, lambda a: _explicit(a, teacher.double(), t.indices.long(), "bucket")),
                      (torch.float32, lambda a: attention_kl_topk_rows(a, t, backend))):
            qq = (q.to(dt) * sharp).detach().clone().requires_grad_()
            kk = k.to(dt).detach().clone().requires_grad_()
            r = f(check_attention_args(qq, kk, heads, queries, mask))
            r.sum().backward()
            outs.append((r.detach().double(), torch.cat([qq.grad.flatten(), kk.grad.flatten()]).double()))
        (r64, g64), (r32, g32) = outs
        assert torch.isfinite(r32).all() and torch.isfinite(g32).all()
        if sharp <= 12:     # student tail still resolvable in fp32: tracks the oracle
            assert (g32 - g64).norm() <= 5e-2 * g64.norm(), sharp
            torch.testing.assert_close(r32.sum(), r64.sum(), rtol=3e-2, atol=1e-4)
        else:               # tail below the floor: its pull is lost, but nothing blows up
            assert g32.norm() <= 2 * g64.norm(), sharp


# ---------------------------------------------------------------- packed indices, sampled teacher (issue 13)
from seekr_kernels.ops.teachers import SampledTeacher, pack_indices, packed_nbytes, unpack_indices  # noqa: E402


@pytest.mark.parametrize("V", [1, 2, 40, 32768, 32769, 65536, 65537, 128256, 2 ** 24])
def test_pack_indices_round_trip(V):
    g = torch.Generator().manual_seed(V % 1000)
    idx = torch.randint(0, V, (3, 4, 9), generator=g, dtype=torch.int32)
    idx[0, 0, 0], idx[0, 0, 1] = 0, V - 1
    packed = pack_indices(idx, V)
    assert packed["lo"].dtype == torch.int16 and packed["lo"].shape == idx.shape
    assert ("hi" in packed) == (V > 65536)
    if V > 65536:
        hb = (V - 1).bit_length() - 16
        assert packed["hi"].dtype == torch.uint8 and packed["hi"].shape == (3, 4, -(-9 * hb // 8))
    back = unpack_indices(packed["lo"], packed.get("hi"), V)
    assert back.dtype == torch.int32 and torch.equal(back, idx)
    # row slices of the packing are the packing of row slices
    assert torch.equal(unpack_indices(packed["lo"][1:], None if "hi" not in packed else packed["hi"][1:], V),
                       idx[1:])
    assert packed_nbytes(256, V) == (2 if V <= 65536 else 2 + (-(-256 * hb // 8)) / 256)


def test_unpack_indices_errors():
    p = pack_indices(torch.tensor([[1, 70000]]), 128256)
    with pytest.raises(ValueError, match="indices"):
        unpack_indices(p["lo"], None, 128256)
    with pytest.raises(ValueError, match="indices"):
        unpack_indices(p["lo"].int(), p["hi"], 128256)
    with pytest.raises(ValueError, match="indices"):
        unpack_indices(p["lo"], p["hi"][:, :0], 128256)
    with pytest.raises(ValueError, match="indices"):
        unpack_indices(p["lo"], p["hi"], 100)


@pytest.mark.parametrize("method", ["priority", "multinomial"])
def test_sampled_teacher_basics(method):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, generator=g) * 2
    a = SampledTeacher.from_dense(x, 7, method=method, seed=5)
    assert isinstance(a, TopK) and a.kind == "sampled" and a.k == 7 and a.shape == x.shape
    assert a.values.dtype == torch.float32 and a.lse is None and a.mass is None
    a.check()
    idx = a.indices.long()
    assert torch.equal(idx, idx.sort(-1).values) and (idx[..., 1:] > idx[..., :-1]).all()   # sorted, distinct
    assert (a.values >= 0).all() and (a.values.sum(-1) > 0).all()
    b = SampledTeacher.from_dense(x, 7, method=method, seed=5)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)          # reproducible
    c = SampledTeacher.from_dense(x, 7, method=method, seed=6)
    assert not torch.equal(a.indices, c.indices)
    full = SampledTeacher.from_dense(x, 50, method=method)                                # k = V: exact
    torch.testing.assert_close(full.to_dense(), torch.softmax(x, -1))
    assert isinstance(a.to(dtype=torch.bfloat16), SampledTeacher)
    assert a.to(dtype=torch.bfloat16).values.dtype == torch.bfloat16
    if method == "priority":
        # tokens above the threshold are kept with their exact probability
        p = torch.softmax(x, -1).gather(-1, idx)
        tau = a.values.min(-1, keepdim=True).values
        big = p > tau
        torch.testing.assert_close(a.values[big], p[big])


def test_sampled_teacher_errors():
    x = torch.randn(2, 9)
    for kw, exc, name in ((dict(k=0), ValueError, "k"), (dict(k=10), ValueError, "k"), (dict(k=2.0), TypeError, "k"),
                          (dict(method="topk"), ValueError, "method"), (dict(seed=1.5), TypeError, "seed"),
                          (dict(temperature=0.0), ValueError, "temperature"),
                          (dict(dtype=torch.int32), TypeError, "dtype")):
        args = dict(k=3)
        args.update(kw)
        with pytest.raises(exc, match=name):
            SampledTeacher.from_dense(x, args.pop("k"), **args)
    with pytest.raises(ValueError, match="x"):
        SampledTeacher.from_dense(torch.full((2, 9), float("nan")), 3)
    with pytest.raises(TypeError, match="x"):
        SampledTeacher.from_dense(torch.ones(2, 9, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="kind"):
        TopK.from_dense(x, 3, kind="sampled")
    with pytest.raises(ValueError, match="lse"):
        TopK(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), 9, kind="sampled", lse=torch.zeros(2))
    with pytest.raises(ValueError, match="values"):
        TopK(-torch.rand(2, 3), torch.tensor([[0, 1, 2], [0, 1, 2]]), 9, kind="sampled").check()
    s = SampledTeacher.from_dense(torch.randn(1, 2, 9), 3)
    with pytest.raises(ValueError, match="topk_mode"):
        sk.logits_kl(torch.randn(1, 2, 9), s, torch.zeros(1, 2, dtype=torch.long), topk_mode="uniform")


def _estimates(s, teachers, labels):
    """logits_kl value and its gradient projected on 3 fixed directions, one row per
    teacher: the teachers are stacked along the batch so that one call does all draws."""
    dirs = torch.randn(3, *s.shape[1:], generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    M = len(teachers)
    if isinstance(teachers[0], TopK):
        cat = (lambda f: torch.cat([getattr(t, f) for t in teachers]))
        big = type(teachers[0])(cat("values"), cat("indices"), s.shape[-1], teachers[0].kind)
    else:
        big = torch.cat(teachers)
    ss = s.repeat(M, 1, 1).requires_grad_()
    rows = sk.logits_kl(ss, big, labels.repeat(M, 1), reduction="none", backend="torch")
    v = rows.sum(1) / (labels != -100).sum()                       # each draw's 'mean' loss
    gr, = torch.autograd.grad(v.sum(), ss)
    proj = (dirs[None] * gr[:, None]).flatten(2).sum(2)            # [M, 3]
    return torch.cat([v.detach()[:, None], proj], 1)


def _zscores(est, dense):
    M = est.shape[0]
    return (est.mean(0) - dense[0]) / (est.std(0) / M ** 0.5)


@pytest.mark.parametrize("method", ["priority", "multinomial"])
def test_sampled_teacher_is_unbiased(method):
    """Mean over many draws of the loss and of the gradient (3 projections) equals the
    dense teacher's within 4.5 standard errors; a biased estimate from the same draws
    (the sampled positions with their plain probabilities) fails the same test."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(1, 3, 50, generator=g, dtype=torch.float64) * 2
    s = torch.randn(1, 3, 50, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, -100, 4]])
    dense = _estimates(s, [t], labels)
    draws = [SampledTeacher.from_dense(t, 6, method=method, seed=i) for i in range(300)]
    z = _zscores(_estimates(s, draws, labels), dense)
    assert z.abs().max() < 4.5, z
    p = torch.softmax(t, -1)
    biased = [SampledTeacher(p.gather(-1, d.indices.long()), d.indices, 50, "sampled") for d in draws]
    zb = _zscores(_estimates(s, biased, labels), dense)
    assert zb.abs().max() > 10, zb


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_kl_sampled_teacher_equals_dense_estimate(backend):
    """Against a sampled teacher logits_kl is CE(student, p_hat) with p_hat = to_dense()."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 4, 37, generator=g) * 2
    s = torch.randn(2, 4, 37, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (2, 4), generator=g)
    labels[0, 1] = -100
    st = SampledTeacher.from_dense(t, 5, seed=1)
    v = sk.logits_kl(s, st, labels, backend=backend, _block=16)
    gv, = torch.autograd.grad(v, s)
    sel = labels != -100
    ph = st.to_dense()
    ref = -(ph[sel] * torch.log_softmax(s[sel], -1)).sum(-1).mean()
    gr, = torch.autograd.grad(ref, s)
    torch.testing.assert_close(v, ref)
    torch.testing.assert_close(gv, gr)
