"""attention_sqdiff (forgettability rows) vs eager attention of two models, every backend."""
import warnings

import pytest
import torch

from seekr_kernels import _backend
from seekr_kernels.ops.attention_sqdiff import attention_sqdiff

# cpu: the C++/OpenMP kernel (seekr_kernels._C); skipped, not dropped, when it is not built.
CPU_OK = _backend.available("cpu", torch.device("cpu"))[0]
BACKENDS = ["torch", "triton", pytest.param("cpu", marks=pytest.mark.skipif(
    not CPU_OK, reason="C++ extension not built"))]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
        yield


def eager_probs(q, k, mask, scale):
    """Full [B, H, L, L] causal softmax in fp64, 0 on future/padded keys and padded rows."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    z = q.double() @ kk.transpose(-1, -2) * scale
    valid = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    z = z.masked_fill(~valid, float("-inf"))
    p = torch.softmax(z, -1)
    return torch.nan_to_num(p, nan=0.0) * mask.bool()[:, None, :, None]


def eager_rows(qa, ka, qb, kb, heads, queries, mask, scale):
    pa, pb = eager_probs(qa, ka, mask, scale), eager_probs(qb, kb, mask, scale)
    d = ((pa - pb) ** 2).sum(-1)                      # [B, H, L]
    B, H, L = d.shape
    if heads.dim() == 1:
        heads = heads.expand(B, -1)
    if queries is None:
        queries = torch.arange(L).expand(B, -1)
    out = torch.zeros(B, heads.shape[1], queries.shape[1], dtype=torch.float64)
    for b in range(B):
        for s, h in enumerate(heads[b].tolist()):
            if h >= 0:
                out[b, s] = d[b, h, queries[b]]
    return out


def make(B, H, Hkv, L, D, dtype, seed=0, delta=0.3):
    g = torch.Generator().manual_seed(seed)
    qa = torch.randn(B, H, L, D, generator=g)
    ka = torch.randn(B, Hkv, L, D, generator=g)
    qb = qa + delta * torch.randn(B, H, L, D, generator=g)
    kb = ka + delta * torch.randn(B, Hkv, L, D, generator=g)
    return [t.to(dtype) for t in (qa, ka, qb, kb)]


def left_mask(B, L, pads):
    m = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        m[b, :p] = 0
    return m


TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12),
       torch.float16: (2e-2, 2e-4), torch.bfloat16: (5e-2, 1e-3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_heads_all_rows_vs_eager(backend, dtype):
    B, H, Hkv, L, D = 2, 4, 2, 19, 12
    qa, ka, qb, kb = make(B, H, Hkv, L, D, dtype)
    mask = left_mask(B, L, [5, 0])
    heads = torch.arange(H)
    if backend == "triton" and dtype == torch.float64:
        # Every Triton kernel refuses fp64 (it accumulates in fp32); see _backend.supports.
        with pytest.raises(TypeError, match="q_a: dtype torch.float64 is not supported by the triton"):
            attention_sqdiff(qa, ka, qb, kb, heads, None, mask, backend=backend)
        return
    got = attention_sqdiff(qa, ka, qb, kb, heads, None, mask, backend=backend)
    want = eager_rows(qa, ka, qb, kb, heads, None, mask, D ** -0.5)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (B, H, L)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    assert float(want.abs().max()) > 1e-3      # the test can fail: rows are not trivially 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_selected_heads_queries_gqa(backend, pad_side):
    B, H, Hkv, L, D = 3, 6, 2, 33, 16
    qa, ka, qb, kb = make(B, H, Hkv, L, D, torch.float32, seed=1)
    mask = left_mask(B, L, [0, 7, 30])
    if pad_side == "right":
        mask = mask.flip(1)
    heads = torch.tensor([[5, -1, 0], [1, 2, 3], [-1, -1, 4]])
    queries = torch.tensor([[0, 3, 32, 17], [6, 7, 20, 20], [1, 31, 32, 0]])
    scale = 0.37
    got = attention_sqdiff(qa, ka, qb, kb, heads, queries, mask, scale=scale, backend=backend)
    want = eager_rows(qa, ka, qb, kb, heads, queries, mask, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    # empty slots and padded query positions are exactly 0
    assert (got[0, 1] == 0).all() and (got[2, :2] == 0).all()
    padded = mask.gather(1, queries) == 0
    assert (got.permute(0, 2, 1)[padded] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_models_give_zero_and_small_changes_are_resolved(backend):
    B, H, L, D = 1, 2, 40, 16
    qa, ka, _, _ = make(B, H, H, L, D, torch.float32, seed=2)
    z = attention_sqdiff(qa, ka, qa.clone(), ka.clone(), torch.arange(H), backend=backend)
    assert float(z.abs().max()) == 0.0
    # A tiny perturbation: the two-pass difference keeps its relative accuracy
    # (the one-pass identity sum pa^2 + sum pb^2 - 2 sum pa pb would lose it in fp32).
    g = torch.Generator().manual_seed(3)
    qb = qa + 1e-3 * torch.randn(qa.shape, generator=g)
    got = attention_sqdiff(qa, ka, qb, ka, torch.arange(H), backend=backend)
    want = eager_rows(qa, ka, qb, ka, torch.arange(H), None, torch.ones(B, L), D ** -0.5)
    assert float(want[:, :, 1:].min()) > 0
    torch.testing.assert_close(got.double()[:, :, 1:], want[:, :, 1:], rtol=2e-2, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_ragged_padding_long_rows_and_empty_slots(backend, dtype):
    """Rows longer than one key block / row tile of the fused kernels (64), ragged left and
    right padding in one batch, a sample with every slot empty and one whose only real
    tokens are at the end."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton refuses fp64 (test_all_heads_all_rows_vs_eager)")
    B, H, Hkv, L, D = 4, 4, 2, 150, 24
    qa, ka, qb, kb = make(B, H, Hkv, L, D, dtype, seed=6)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :37] = 0                     # left padding
    mask[1, 101:] = 0                    # right padding
    mask[2, :140] = 0                    # ten real tokens, at the end
    mask[3, ::3] = 0                     # holes (a packed-sequence style mask)
    heads = torch.tensor([[3, 0, -1], [1, 2, 3], [-1, -1, -1], [0, -1, 2]])
    g = torch.Generator().manual_seed(7)
    queries = torch.randint(0, L, (B, 90), generator=g)
    queries[:, :3] = torch.tensor([0, L - 1, 70])
    got = attention_sqdiff(qa, ka, qb, kb, heads, queries, mask, backend=backend)
    want = eager_rows(qa, ka, qb, kb, heads, queries, mask, D ** -0.5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    assert (got[2] == 0).all() and (got[0, 2] == 0).all() and float(want.max()) > 1e-2


def test_backends_agree_on_strided_inputs():
    B, H, L, D = 2, 4, 24, 8
    g = torch.Generator().manual_seed(4)
    big = torch.randn(B, L, H, 2 * D, generator=g)
    qa = big[..., :D].transpose(1, 2)          # non-contiguous
    qb = big[..., D:].transpose(1, 2)
    ka = torch.randn(B, L, H, D, generator=g).transpose(1, 2)
    kb = ka * 1.1
    q = torch.tensor([[0, 5, 23], [2, 2, 9]])
    r_t = attention_sqdiff(qa, ka, qb, kb, torch.tensor([3, 0]), q, backend="torch")
    for backend in ["triton"] + ["cpu"] * CPU_OK:
        r_k = attention_sqdiff(qa, ka, qb, kb, torch.tensor([3, 0]), q, backend=backend)
        torch.testing.assert_close(r_k, r_t, rtol=1e-5, atol=1e-7)


def test_torch_backend_chunks_slots(monkeypatch):
    from seekr_kernels.ops import attention_sqdiff as mod
    B, H, L, D = 2, 5, 16, 8
    qa, ka, qb, kb = make(B, H, H, L, D, torch.float32, seed=5)
    full = attention_sqdiff(qa, ka, qb, kb, torch.arange(H), backend="torch")
    monkeypatch.setattr(mod, "_TORCH_CHUNK", B * L * L)        # one slot per chunk
    torch.testing.assert_close(attention_sqdiff(qa, ka, qb, kb, torch.arange(H), backend="torch"), full)


def test_not_differentiable():
    qa, ka, qb, kb = make(1, 2, 2, 8, 4, torch.float32)
    qa.requires_grad_(True)
    out = attention_sqdiff(qa, ka, qb, kb, torch.arange(2), backend="torch")
    assert not out.requires_grad


def test_errors_name_the_argument():
    qa, ka, qb, kb = make(1, 2, 1, 8, 4, torch.float32)
    h = torch.arange(2)
    with pytest.raises(ValueError, match="q_b"):
        attention_sqdiff(qa, ka, qb[:, :, :4], kb, h, backend="torch")
    with pytest.raises(ValueError, match="k_b"):
        attention_sqdiff(qa, ka, qb, kb.expand(1, 2, 8, 4), h, backend="torch")
    with pytest.raises(TypeError, match="q_b"):
        attention_sqdiff(qa, ka, qb.double(), kb, h, backend="torch")
    with pytest.raises(TypeError, match="k_b"):
        attention_sqdiff(qa, ka, qb, "k", h, backend="torch")
    bad = qb.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q_b"):
        attention_sqdiff(qa, ka, bad, kb, h, backend="torch")
    with pytest.raises(ValueError, match="heads"):
        attention_sqdiff(qa, ka, qb, kb, torch.tensor([2]), backend="torch")
    with pytest.raises(ValueError, match="queries"):
        attention_sqdiff(qa, ka, qb, kb, h, torch.tensor([[8]]), backend="torch")
    with pytest.raises(ValueError, match="backend: attention_sqdiff has no 'cuda' implementation"):
        attention_sqdiff(qa, ka, qb, kb, h, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_llama_layer_shape(dtype):
    B, H, L, D = 1, 32, 1024, 128
    qa, ka, qb, kb = [t.cuda() for t in make(B, H, H, L, D, dtype, delta=0.1)]
    g = torch.Generator().manual_seed(0)
    queries = torch.sort(torch.randperm(L, generator=g)[:100]).values[None].cuda()
    got = attention_sqdiff(qa, ka, qb, kb, torch.arange(H, device="cuda"), queries, backend="triton")
    want = attention_sqdiff(qa, ka, qb, kb, torch.arange(H, device="cuda"), queries, backend="torch")
    torch.testing.assert_close(got, want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-6)
