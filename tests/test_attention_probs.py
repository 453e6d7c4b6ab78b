"""attention_probs (teacher capture) on every backend against eager softmax rows."""
import pytest
import torch

import seekr_kernels as sk
from seekr_kernels._backend import available


def _backends():
    out = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]
    ok, why = available("cpu", torch.device("cpu"))
    out.append(pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not ok, reason=f"cpu backend: {why}")))
    return out


BACKENDS = _backends()


def eager_rows(q, k, heads, queries, mask, scale=None):
    """Independent oracle: full eager attention [B, H, L, L] in fp64 (additive causal and
    padding mask, softmax), then the selected heads and rows; zero for empty slots and
    padded queries."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    qd, kd = q.double(), k.double().repeat_interleave(G, dim=1)
    w = qd @ kd.transpose(-1, -2) * scale
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.long)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    w = w.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(w, -1).nan_to_num(0.0)                                # [B, H, L, L]
    if heads.dim() == 1:
        heads = heads.unsqueeze(0).expand(B, -1)
    if queries is None:
        queries = torch.arange(L).unsqueeze(0).expand(B, L)
    S, Q = heads.shape[1], queries.shape[1]
    out = torch.zeros(B, S, Q, L, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            h = int(heads[b, s])
            if h < 0:
                continue
            for qi in range(Q):
                i = int(queries[b, qi])
                if mask[b, i]:
                    out[b, s, qi] = p[b, h, i]
    return out


TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}


def _inputs(B, H, Hkv, L, D, dtype, seed=0, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g) * 1.5
    k = torch.randn(B, Hkv, L, D, generator=g) * 1.5
    if layout == "blhd":   # the transposed layout a model produces: non-contiguous views
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    return q.to(dtype), k.to(dtype)


def _check(backend, q, k, heads, queries=None, mask=None, out_dtype=None, scale=None):
    got = sk.attention_probs(q, k, heads, queries, mask, scale=scale, out_dtype=out_dtype, backend=backend)
    want = eager_rows(q, k, heads, queries, mask, scale)
    od = out_dtype or q.dtype
    assert got.dtype == od
    assert got.is_contiguous()
    assert tuple(got.shape) == tuple(want.shape)
    torch.testing.assert_close(got.double(), want, atol=TOL[od] + TOL[q.dtype], rtol=0)
    return got


CASES = [
    # name, B, H, Hkv, L, D, heads, queries, mask
    ("mha_all_rows", 1, 2, 2, 19, 16, [1, 0], None, None),
    ("gqa_odd_L_D", 2, 4, 2, 37, 24, [[3, -1, 0], [1, 2, -1]], None, "left"),
    ("right_pad_subset_dups", 2, 4, 1, 33, 8, [[0, 2], [3, -1]], [[0, 5, 32, 5, 20], [1, 2, 3, 30, 32]], "right"),
    ("empty_slots_only", 1, 2, 2, 17, 16, [[-1, -1]], [[3, 16]], None),
    ("long_row_blocks", 1, 2, 1, 130, 32, [1], [[0, 64, 65, 129, 129]], "left"),
]


def _mask(kind, B, L):
    if kind is None:
        return None
    m = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        n = 3 + 2 * b
        if kind == "left":
            m[b, :n] = 0
        else:
            m[b, L - n:] = 0
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_eager_fp32(backend, case):
    _, B, H, Hkv, L, D, heads, queries, mask = case
    q, k = _inputs(B, H, Hkv, L, D, torch.float32, layout="blhd")
    heads = torch.tensor(heads)
    queries = None if queries is None else torch.tensor(queries)
    out = _check(backend, q, k, heads, queries, _mask(mask, B, L))
    # Active rows are distributions over their valid keys.
    s = out.sum(-1)
    assert torch.all(((s - 1).abs() < 1e-5) | (s == 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    q, k = _inputs(2, 4, 2, 29, 16, dtype, seed=1)
    heads = torch.tensor([[0, 3], [2, -1]])
    queries = torch.tensor([[0, 7, 28, 7], [4, 5, 28, 1]])
    if backend == "triton" and dtype == torch.float64:
        # Every Triton kernel refuses fp64 (it accumulates in fp32); see _backend.supports.
        with pytest.raises(TypeError, match="q: dtype torch.float64 is not supported by the triton"):
            sk.attention_probs(q, k, heads, queries, _mask("left", 2, 29), backend=backend)
        return
    _check(backend, q, k, heads, queries, _mask("left", 2, 29))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_out_dtype(backend, out_dtype):
    q, k = _inputs(1, 2, 1, 21, 16, torch.bfloat16, seed=2)
    _check(backend, q, k, torch.tensor([1]), None, _mask("right", 1, 21), out_dtype=out_dtype, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_bitwise_close(backend):
    """Every backend against the torch backend on a wider random case (fp32)."""
    q, k = _inputs(2, 6, 3, 45, 40, torch.float32, seed=3)
    heads = torch.tensor([[5, 0, 3, -1], [1, 2, 4, 0]])
    g = torch.Generator().manual_seed(4)
    queries = torch.randint(0, 45, (2, 17), generator=g)
    mask = _mask("left", 2, 45)
    ref = sk.attention_probs(q, k, heads, queries, mask, backend="torch")
    got = sk.attention_probs(q, k, heads, queries, mask, backend=backend)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_query_set_and_no_grad(backend):
    q, k = _inputs(1, 2, 2, 9, 16, torch.float32)
    q.requires_grad_(True)
    out = sk.attention_probs(q, k, torch.tensor([0]), torch.zeros(1, 0, dtype=torch.long), backend=backend)
    assert out.shape == (1, 1, 0, 9)
    out = sk.attention_probs(q, k, torch.tensor([0]), backend=backend)
    assert not out.requires_grad and out.grad_fn is None


def test_contract_errors():
    q, k = _inputs(1, 2, 1, 8, 16, torch.float32)
    h = torch.tensor([0])
    with pytest.raises(TypeError, match="out_dtype"):
        sk.attention_probs(q, k, h, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        sk.attention_probs(q, k, h, out_dtype="float32")
    with pytest.raises(ValueError, match="q"):
        sk.attention_probs(q[0], k, h)
    with pytest.raises(ValueError, match="k"):
        sk.attention_probs(q, k[:, :, :5], h)
    with pytest.raises(ValueError, match="heads"):
        sk.attention_probs(q, k, torch.tensor([2]))
    with pytest.raises(ValueError, match="heads"):
        sk.attention_probs(q, k, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="queries"):
        sk.attention_probs(q, k, h, torch.tensor([[8]]))
    with pytest.raises(ValueError, match="attention_mask"):
        sk.attention_probs(q, k, h, None, torch.full((1, 8), 2))
    with pytest.raises(ValueError, match="q"):
        sk.attention_probs(q.clone().index_fill_(2, torch.tensor([3]), float("nan")), k, h)
    with pytest.raises(ValueError, match="backend"):
        sk.attention_probs(q, k, h, backend="nope")
    with pytest.raises(RuntimeError, match="cuda"):
        sk.attention_probs(q, k, h, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_gpu(dtype):
    q, k = _inputs(2, 8, 2, 300, 128, dtype, seed=5, layout="blhd")
    heads = torch.tensor([[7, 0, -1], [1, 2, 6]])
    g = torch.Generator().manual_seed(6)
    queries = torch.randint(0, 300, (2, 64), generator=g)
    mask = _mask("left", 2, 300)
    ref = sk.attention_probs(q, k, heads, queries, mask, backend="torch", out_dtype=torch.float32)
    got = sk.attention_probs(q.cuda(), k.cuda(), heads.cuda(), queries.cuda(), mask.cuda(),
                             backend="triton", out_dtype=torch.float32)
    # bf16/fp16 tl.dot on the GPU accumulates in a different order than torch on the CPU.
    torch.testing.assert_close(got.cpu(), ref, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=0)
