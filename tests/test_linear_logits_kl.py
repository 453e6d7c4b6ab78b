"""linear_logits_kl against the materialising oracle: values, gradients, teachers, contract."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels.ops.linear_logits_kl import LinearLogitsKLLoss, default_chunk, linear_logits_kl
from seekr_kernels.ops.logits_kl import TOPK_MODES
from seekr_kernels.ops.teachers import SampledTeacher, TopK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Hd, V = 20, 37
# max-abs error allowed, relative to the largest reference entry
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def make(dtype=torch.float32, seed=0, bias=True, shape=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, Hd, generator=g).to(dtype)
    W = (torch.randn(V, Hd, generator=g) * 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    lab = torch.randint(0, V, shape, generator=g)
    lab.view(-1)[2] = -100                  # a gap: the rows of a chunk are not contiguous
    lab.view(-1)[7:10] = -100
    t = torch.randn(*shape, V, generator=g) * 2
    return h, W, b, lab, t


def teacher_of(kind, t):
    if kind == "dense":
        return t
    if kind == "topk":
        return TopK.from_dense(t, 5, kind="logits")
    return SampledTeacher.from_dense(t, 6, seed=3)


def run(h, W, b, lab, teacher, backend, g=1.0, **kw):
    h = h.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = linear_logits_kl(h, W, teacher, lab, bias=b, backend=backend, **kw)
    (loss * g).backward()
    return [loss.detach(), h.grad, W.grad] + ([] if b is None else [b.grad])


def reference(h, W, b, lab, teacher, **kw):
    """The oracle in fp64 on the same (rounded) inputs."""
    up = (lambda x: None if x is None else x.double())
    if isinstance(teacher, TopK):
        teacher = type(teacher)(teacher.values.double(), teacher.indices, teacher.full_size, teacher.kind,
                                lse=None if teacher.lse is None else teacher.lse.double())
    return run(up(h), up(W), up(b), lab, teacher, "torch", **kw)


def assert_match(out, ref, dtype):
    names = ["loss", "hidden", "weight", "bias"]
    for name, a, r in zip(names, out, ref):
        assert a.dtype == (torch.float32 if name == "loss" and dtype != torch.float64 else dtype), name
        tol = TOL[dtype] * max(float(r.abs().max()), 1e-3)
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- oracle agreement
@pytest.mark.parametrize("kind", ["dense", "topk", "sampled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["chunked", "triton", "torch"])
def test_matches_oracle(backend, dtype, kind):
    h, W, b, lab, t = make(dtype)
    teacher = teacher_of(kind, t)
    kw = dict(hard_weight=0.3, soft_weight=0.7)
    out = run(h, W, b, lab, teacher, backend, chunk_size=4, _block=16, **kw)
    assert_match(out, reference(h, W, b, lab, teacher, **kw), dtype)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("mode", TOPK_MODES)
def test_topk_modes(backend, mode):
    h, W, b, lab, t = make(seed=1, bias=False)
    teacher = TopK.from_dense(t, 4, kind="logits")
    out = run(h, W, b, lab, teacher, backend, chunk_size=5, topk_mode=mode)
    assert_match(out, reference(h, W, b, lab, teacher, topk_mode=mode), torch.float32)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_many_rows_in_one_chunk(backend):
    """39 rows in one chunk: several row tiles of the GEMM (16 rows each under the interpreter)."""
    h, W, b, lab, t = make(seed=2, shape=(3, 13))
    teacher = TopK.from_dense(t, 6, kind="logits")
    for te in (t, teacher):
        out = run(h, W, b, lab, te, backend, hard_weight=0.5, soft_weight=0.5)
        assert_match(out, reference(h, W, b, lab, te, hard_weight=0.5, soft_weight=0.5), torch.float32)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_fp64_gradcheck(backend):
    g = torch.Generator().manual_seed(0)
    h, W, b = (torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in ((1, 5, 6), (9, 6), (9,)))
    lab = torch.tensor([[3, -100, 8, 0, 1]])
    t = torch.randn(1, 5, 9, generator=g, dtype=torch.float64)
    # teachers whose gradient is the derivative of the value (student_tail's is a
    # stop-gradient target by design): dense, TopK 'uniform', sampled
    for teacher, mode in ((t, None), (TopK.from_dense(t, 4, kind="logits"), "uniform"),
                          (SampledTeacher.from_dense(t, 3, seed=1), None)):
        fn = (lambda h, W, b: linear_logits_kl(h, W, teacher, lab, bias=b, hard_weight=0.4, backend=backend,
                                               chunk_size=2, topk_mode=mode))
        assert torch.autograd.gradcheck(fn, (h, W, b), fast_mode=True)


def test_triton_refuses_fp64():
    h, W, b, lab, t = make(torch.float64)
    with pytest.raises(TypeError, match="hidden.*fp64"):
        linear_logits_kl(h, W, t, lab, backend="triton")


@pytest.mark.parametrize("backend", ["chunked", "triton", "torch"])
def test_hard_only_soft_only_sum_and_empty(backend):
    h, W, b, lab, t = make()
    # hard term alone needs no teacher: the fused linear cross entropy
    out = run(h, W, b, lab, None, backend, hard_weight=1.0, soft_weight=0.0)
    ref = reference(h, W, b, lab, None, hard_weight=1.0, soft_weight=0.0)
    assert_match(out, ref, torch.float32)
    ce = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, W, b).reshape(-1, V), lab.reshape(-1))
    torch.testing.assert_close(out[0], ce)
    out = run(h, W, b, lab, t, backend, reduction="sum")
    assert_match(out, reference(h, W, b, lab, t, reduction="sum"), torch.float32)
    # empty label set: 0 and zero gradients, not NaN
    out = run(h, W, b, torch.full_like(lab, -100), t, backend, hard_weight=0.5)
    assert float(out[0]) == 0.0
    for g in out[1:]:
        assert g is not None and float(g.abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_grad_output_scaling_no_grad_and_chunk_sizes(backend):
    h, W, b, lab, t = make()
    ref = run(h, W, b, lab, t, backend, hard_weight=0.2)
    out = run(h, W, b, lab, t, backend, g=2.5, hard_weight=0.2)
    for a, r in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, 2.5 * r)
    with torch.no_grad():
        v = linear_logits_kl(h, W, t, lab, bias=b, hard_weight=0.2, backend=backend)
    torch.testing.assert_close(v, ref[0])
    for c in (1, 3, 1000):
        torch.testing.assert_close(run(h, W, b, lab, t, backend, chunk_size=c, hard_weight=0.2)[0], ref[0])
    # only the weight trains (frozen hidden, no bias): no dhidden computed, same dW
    Wr = W.clone().requires_grad_()
    linear_logits_kl(h, Wr, t, lab, bias=b, hard_weight=0.2, backend=backend).backward()
    torch.testing.assert_close(Wr.grad, ref[2])


def test_strided_inputs_and_default_chunk():
    h, W, b, lab, t = make(shape=(7, 2))
    hT, tT, labT = h.transpose(0, 1), t.transpose(0, 1), lab.t()      # non-contiguous rows
    WT = W.t().contiguous().t()                                      # non-contiguous weight
    assert not hT.is_contiguous() and WT.stride(-1) != 1
    ref = reference(hT.contiguous(), W, b, labT.contiguous(), tT.contiguous())
    for backend in ("chunked", "triton"):
        assert_match(run(hT, WT, b, labT, tT, backend), ref, torch.float32)
    assert default_chunk(8192, 128256, 4096) == 256
    assert default_chunk(2048, 32000, 1024) == 64
    assert default_chunk(10, 128256, 64) == 16
    assert default_chunk(2048, 128256, 1024, "cpu") == 128 and default_chunk(2048, 32000, 1024, "cpu") == 512


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_tied_embeddings(backend):
    """lm_head tied to the input embedding: both uses' gradients add up, as materialised."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (2, 6), generator=g)
    lab = torch.roll(ids, -1, 1)
    lab[:, -1] = -100
    t = torch.randn(2, 6, V, generator=g)

    def grads(fused):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(V, Hd)
        proj = torch.nn.Linear(Hd, Hd)
        h = torch.tanh(proj(emb(ids)))
        if fused:
            loss = linear_logits_kl(h, emb.weight, t, lab, hard_weight=0.5, soft_weight=0.5, backend=backend,
                                    chunk_size=3)
        else:
            loss = linear_logits_kl(h, emb.weight, t, lab, hard_weight=0.5, soft_weight=0.5, backend="torch")
        loss.backward()
        return loss.detach(), emb.weight.grad, proj.weight.grad

    for a, r in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, r, atol=2e-6, rtol=1e-5)


def test_module_form():
    h, W, b, lab, t = make()
    m = LinearLogitsKLLoss(hard_weight=0.5, soft_weight=0.5, backend="chunked")
    torch.testing.assert_close(m(h, W, t, lab, b), linear_logits_kl(h, W, t, lab, bias=b, hard_weight=0.5,
                                                                   soft_weight=0.5, backend="torch"))
    assert "hard_weight=0.5" in repr(m)
    assert sk.linear_logits_kl is linear_logits_kl and sk.LinearLogitsKLLoss is LinearLogitsKLLoss
    with pytest.raises(ValueError, match="backend"):
        LinearLogitsKLLoss(backend="cuda")


def test_bad_input():
    h, W, b, lab, t = make()
    cases = [
        (dict(hidden=h.long()), TypeError, "hidden"),
        (dict(hidden=h[..., :0]), ValueError, "hidden"),
        (dict(weight=W[:, :5]), ValueError, "weight"),
        (dict(weight=W.double()), TypeError, "weight"),
        (dict(weight="W"), TypeError, "weight"),
        (dict(bias=b[:5]), ValueError, "bias"),
        (dict(bias=b.half()), TypeError, "bias"),
        (dict(labels=lab.float()), TypeError, "labels"),
        (dict(labels=lab[:, :3]), ValueError, "labels"),
        (dict(teacher=t[..., :5]), ValueError, "teacher"),
        (dict(teacher=t.long()), TypeError, "teacher"),
        (dict(teacher=[1]), TypeError, "teacher"),
        (dict(teacher=None), ValueError, "teacher"),
        (dict(teacher=TopK.from_dense(t.softmax(-1), 3)), ValueError, "teacher"),      # kind probs
        (dict(teacher=TopK.from_dense(t[:1], 3, kind="logits")), ValueError, "teacher"),
        (dict(teacher=SampledTeacher.from_dense(t, 3), topk_mode="uniform"), ValueError, "topk_mode"),
        (dict(topk_mode="bucket"), ValueError, "topk_mode"),
        (dict(hard_weight=-1.0), ValueError, "hard_weight"),
        (dict(soft_weight=float("nan")), ValueError, "soft_weight"),
        (dict(hard_weight="1"), TypeError, "hard_weight"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="cpu"), ValueError, "backend"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(labels=torch.full_like(lab, V), hard_weight=1.0), ValueError, "labels"),
        (dict(hidden=h.clone().index_fill_(0, torch.tensor([1]), float("nan"))), ValueError, "hidden"),
        (dict(weight=W.clone().fill_(float("inf"))), ValueError, "weight"),
        (dict(teacher=t.clone().fill_(float("nan"))), ValueError, "teacher"),
    ]
    for over, exc, name in cases:
        args = dict(hidden=h, weight=W, teacher=t, labels=lab, bias=b, backend="chunked")
        args.update(over)
        kw = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "teacher", "labels")}
        with pytest.raises(exc, match=name):
            linear_logits_kl(args["hidden"], args["weight"], args["teacher"], args["labels"], **kw)
    # the teacher's -100 rows are never read: NaN there is fine
    t2 = t.clone()
    t2[lab == -100] = float("nan")
    assert torch.isfinite(linear_logits_kl(h, W, t2, lab, backend="chunked"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_vs_oracle_llama_vocab(dtype):
    """Real CUDA compile and launch configs, shapes that are not tile multiples."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    T, H, Vb = 300, 256, 32003
    h = torch.randn(T, H, generator=g).to(dev, dtype)
    W = (torch.randn(Vb, H, generator=g) * H ** -0.5).to(dev, dtype)
    b = torch.randn(Vb, generator=g).to(dev, dtype)
    lab = torch.randint(0, Vb, (T,), generator=g).to(dev)
    lab[:70] = -100
    t = (torch.randn(T, Vb, generator=g) * 3).to(dev, torch.bfloat16)
    for teacher in (t, TopK.from_dense(t, 64, kind="logits"), SampledTeacher.from_dense(t, 64, seed=0)):
        out = run(h, W, b, lab, teacher, "triton", hard_weight=0.5, soft_weight=0.5, chunk_size=128)
        ref = reference(h, W, b, lab, teacher, hard_weight=0.5, soft_weight=0.5)
        assert_match(out, ref, dtype)


# ---------------------------------------------------------------------------- FSDP2 DTensor weight
WORKER = r"""
import json, os, sys, torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import seekr_kernels as sk
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
g = torch.Generator().manual_seed(0)
V, Hd = 37, 20
h = torch.randn(2, 5, Hd, generator=g)
W = torch.randn(V, Hd, generator=g) * 0.5
t = torch.randn(2, 5, V, generator=g)
lab = torch.randint(0, V, (2, 5), generator=g); lab[0, 1] = -100
Wd = torch.nn.Parameter(distribute_tensor(W, mesh, [Shard(0)]))
hd = h.clone().requires_grad_()
loss = sk.linear_logits_kl(hd, Wd, t, lab, hard_weight=0.5, soft_weight=0.5, backend="chunked", chunk_size=3)
loss.backward()
Wr = W.clone().requires_grad_(); hr = h.clone().requires_grad_()
ref = sk.linear_logits_kl(hr, Wr, t, lab, hard_weight=0.5, soft_weight=0.5, backend="torch")
ref.backward()
full = Wd.grad.full_tensor()
out = {"loss": abs(float(loss) - float(ref)), "dW": float((full - Wr.grad).abs().max()),
       "dh": float((hd.grad - hr.grad).abs().max()), "local": list(Wd.grad.to_local().shape)}
if dist.get_rank() == 0:
    print("RESULT" + json.dumps(out))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def test_fsdp2_dtensor_weight():
    """A weight sharded over a 2-rank gloo mesh (what FSDP2 makes of the lm_head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    res = json.loads(next(line for line in outs[0].splitlines() if line.startswith("RESULT"))[6:])
    assert res["loss"] < 1e-6 and res["dW"] < 1e-6 and res["dh"] < 1e-6, res
    assert res["local"] == [19, Hd]                      # the gradient stays sharded like the weight


# ---------------------------------------------------------------------------- CUDA compile specs
def test_compile_specs_describe_the_launcher():
    """The specs gpu_compile_check.py compiles are the launchers' CUDA configurations."""
    from seekr_kernels.triton import linear_logits_kl as tri
    specs = tri.compile_specs()
    assert {s["dtype"] for s in specs} == {"bf16", "fp16", "fp32"}
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    fwd = [s for s in specs if s["kernel"] is tri._logits_fwd]
    rows = [s for s in specs if s["kernel"] is tri._grad_rows]
    assert len(fwd) + len(rows) == len(specs)
    for s in specs:
        # kernel_spec's form: every parameter either in the signature or a constant
        assert set(s["signature"]) == set(s["kernel"].arg_names)
        assert {p for p, t in s["signature"].items() if t == "constexpr"} == set(s["constexprs"])
        assert s["role"] == "default" and s["vocab"] == 32000
    for s in fwd:
        dt = dts[s["dtype"]]
        BM, BN, BK, warps, stages, prec, upcast = tri.gemm_config(dt, cuda=True)
        c = s["constexprs"]
        assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], s["num_warps"], s["num_stages"]) == \
            (BM, BN, BK, warps, stages) and s["tile"] == (BM, BN, warps, stages) and not c["UPCAST"]
        assert s["expect_mma"] == (c["DOT_PREC"] == "tf32")
        assert (dt == torch.float32) == (c["DOT_PREC"] in ("ieee", "tf32") and s["dtype"] == "fp32")
    # every constexpr variant the op launches, per dtype; fp32 also with tf32 products
    for name in dts:
        got = {(s["constexprs"]["HAS_T"], s["constexprs"]["QLOGQ"], s["constexprs"]["HAS_BIAS"],
                s["constexprs"]["DOT_PREC"]) for s in fwd if s["dtype"] == name}
        prec = "ieee" if name == "fp32" else "tf32"
        want = {(t, q, b, prec) for t, q, b in ((True, False, False), (True, False, True), (False, True, False),
                                                 (False, False, False), (False, False, True))}
        assert got == want | ({(True, False, False, "tf32")} if name == "fp32" else set())
        got = {(s["constexprs"]["HAS_T"], s["constexprs"]["HAS_LABEL"]) for s in rows if s["dtype"] == name}
        assert got == {(True, True), (True, False), (False, True), (False, False)}
    BLOCK, warps = tri.row_config(32000, cuda=True)
    assert all((s["constexprs"]["BLOCK"], s["num_warps"], s["num_stages"]) == (BLOCK, warps, tri.ROW_STAGES)
               for s in rows)
    # the JIT's specialisation: 16-byte aligned pointers and multiples of 16 hinted, the
    # tile count (250) not
    s = fwd[0]
    hinted = {s["kernel"].arg_names[i] for (i,) in s["attrs"]}
    assert hinted == {"H", "W", "BIAS", "T", "Z", "P", "C", "V", "D", "h_sr", "w_sr", "t_sr", "z_sr"}


# ---------------------------------------------------------------------------- issue 22.1
ALL_BACKENDS = ["chunked", "triton", "torch"]


def _dirty_ignored_rows(h, t, lab, teacher):
    """Copies of hidden and the teacher whose ignored (-100) rows hold NaN, inf and huge
    values; a TopK teacher also gets garbage indices there."""
    ign = lab == -100
    h2 = h.clone()
    h2[ign] = float("nan")
    r0 = tuple(ign.nonzero()[0].tolist())
    h2[r0 + (0,)] = float("inf")
    h2[r0 + (1,)] = 1e30 if h.dtype != torch.float16 else 6e4
    if isinstance(teacher, TopK):
        vals, idx = teacher.values.clone(), teacher.indices.clone()
        vals[ign] = float("nan")
        idx[ign] = torch.tensor([V + 9] + [-5] * (teacher.k - 1), dtype=idx.dtype)
        lse = None if teacher.lse is None else teacher.lse.clone()
        if lse is not None:
            lse[ign] = float("nan")
        t2 = type(teacher)(vals, idx, teacher.full_size, teacher.kind, lse=lse)
    else:
        t2 = t.clone()
        t2[ign] = float("nan")
    return h2, t2


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("check_values", [True, False])
def test_ignored_rows_never_contribute(backend, kind, check_values):
    """A NaN hidden state on a -100 row used to make the torch backend's weight gradient NaN
    (0 * NaN through the materialised logits); no backend may read such rows at all."""
    h, W, b, lab, t = make(seed=4)
    teacher = teacher_of(kind, t)
    h2, t2 = _dirty_ignored_rows(h, t, lab, teacher)
    kw = dict(hard_weight=0.4, soft_weight=0.6, chunk_size=4, check_values=check_values)
    clean = run(h, W, b, lab, teacher, backend, **kw)
    dirty = run(h2, W, b, lab, t2, backend, **kw)
    for name, a, c in zip(["loss", "hidden", "weight", "bias"], dirty, clean):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert (dirty[1][lab == -100] == 0).all()


def _weight_inf_case():
    """An inf in weight that the softmax hides: every used row's logit of entry 3 is -inf
    (h[..., 0] > 0, W[3, 0] = -inf), so a hard-label loss is finite while dhidden = dz W
    holds 0 * inf = NaN. The torch backend returned that finite loss."""
    h, W, b, lab, t = make(seed=5)
    h[..., 0] = h[..., 0].abs() + 0.1
    lab[lab == 3] = 4
    W = W.clone()
    W[3, 0] = float("-inf")
    return h, W, b, lab, t


BAD_INPUTS = {
    "nan_hidden_used_row": ("hidden", "a row with label != -100 contains NaN or infinite values"),
    "inf_hidden_used_row": ("hidden", "a row with label != -100 contains NaN or infinite values"),
    "neg_inf_weight_hidden_by_softmax": ("weight", "contains NaN or infinite values"),
    "nan_weight": ("weight", "contains NaN or infinite values"),
    "inf_bias": ("bias", "contains NaN or infinite values"),
}


@pytest.mark.parametrize("what", sorted(BAD_INPUTS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kw", [dict(hard_weight=1.0, soft_weight=0.0), dict(hard_weight=0.3, soft_weight=0.7)],
                         ids=["hard", "hard+soft"])
def test_non_finite_inputs_are_refused_alike_before_any_compute(backend, what, kw):
    if what == "neg_inf_weight_hidden_by_softmax":
        h, W, b, lab, t = _weight_inf_case()
    else:
        h, W, b, lab, t = make(seed=6)
        h, W, b = h.clone(), W.clone(), b.clone()
        used = (lab != -100).nonzero()[-1].tolist()
        if what == "nan_hidden_used_row":
            h[tuple(used) + (3,)] = float("nan")
        elif what == "inf_hidden_used_row":
            h[tuple(used) + (0,)] = float("-inf")
        elif what == "nan_weight":
            W[V - 1, Hd - 1] = float("nan")
        else:
            b[0] = float("inf")
    arg, msg = BAD_INPUTS[what]
    with pytest.raises(ValueError, match=f"^{arg}: {msg}"):
        run(h, W, b, lab, t if kw["soft_weight"] else None, backend, **kw)


def test_weight_inf_case_reaches_a_non_finite_gradient_unchecked():
    """The case above is a real one: without the checks (check_values=False, result
    undefined) the loss is finite and the hidden gradient is not, so only an up-front scan
    of the weight can refuse it."""
    h, W, b, lab, t = _weight_inf_case()
    loss, dh = run(h, W, b, lab, None, "torch", hard_weight=1.0, soft_weight=0.0, check_values=False)[:2]
    assert torch.isfinite(loss) and not torch.isfinite(dh).all()


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_fp16_logits_beyond_fp16_range_are_computed_in_fp32(backend):
    """The torch oracle formed fp16 logits (inf beyond 65504) and refused naming
    logits_kl's own 'student_logits'; it now forms them in fp32 like the chunked backend."""
    h, W, b, lab, t = make(torch.float16, seed=7)
    h, W = h * 3000, W * 20
    assert float((h.float() @ W.float().t() + b.float()).abs().max()) > 65504
    out = run(h, W, b, lab, t, backend, hard_weight=0.5, soft_weight=0.5)
    ref = reference(h, W, b, lab, t, hard_weight=0.5, soft_weight=0.5)
    for name, a, r in zip(["loss", "hidden", "weight", "bias"], out, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), r, rtol=4e-3, atol=4e-3 * float(r.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
