"""CUDA C++ backend (seekr_kernels._C_cuda, csrc/attention_cuda.cu) against the torch oracle.

Three layers, so that most of it runs on machines without a GPU:

* glue and contract (CPU): seekr_kernels._native_cuda refuses CPU tensors, backend="cuda"
  on CPU tensors is a clear error, the extension's host-side re-checks raise ValueError
  before touching the GPU, a CPU-only import never loads CUDA libraries;
* emulated kernels (CPU): the kernels' own source compiled by the host compiler against
  tests/cuda_emu/cuda_emu.h (a block's 128 threads run as fibers, with real barriers for
  __syncthreads and warp shuffles) and driven through the real glue: values, gradients,
  capture, index-error flags, on small shapes; plus a ThreadSanitizer run with the threads
  as OS threads, which catches a missing __syncthreads();
* `gpu` tests (SEEKR_TEST_GPU=1 on a CUDA machine): the compiled kernels through the public
  ops, over the same grid as the other backends, plus long sequences, fp64 gradcheck,
  determinism and streams.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels import _backend, _native_cuda, reference
from seekr_kernels._checks import check_attention_args

from cases import GRID, TOL, assert_close, make_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_CUDA_EXT = _backend.native_cuda() is not None


# ---- glue and contract (CPU) -------------------------------------------------------------

def _args(**kw):
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 9, 16, S=2, Q=3, **kw)
    return check_attention_args(q, k, heads, queries, mask), t


def test_glue_rejects_cpu_tensors():
    a, t = _args()
    rows = torch.zeros(2, 2, 3)
    calls = [lambda: _native_cuda.attention_kl_fwd(a, t, None),
             lambda: _native_cuda.attention_kl_bwd(a, t, rows, rows, rows),
             lambda: _native_cuda.attention_probs(a, torch.float32)]
    for call in calls:
        with pytest.raises(ValueError, match=r"q: the cuda backend needs CUDA tensors.*cpu"):
            call()


def test_backend_cuda_on_cpu_tensors_is_a_clear_error():
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 9, 16, S=2, Q=3)
    with pytest.raises(RuntimeError, match=r"backend='cuda' is unavailable for attention_kl.*CUDA tensors"):
        sk.attention_kl(q, k, t, heads, queries, mask, backend="cuda")
    from seekr_kernels.ops.attention_probs import attention_probs
    with pytest.raises(RuntimeError, match=r"backend='cuda' is unavailable for attention_probs.*CUDA tensors"):
        attention_probs(q, k, heads, queries, mask, backend="cuda")


def test_glue_reports_a_missing_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "seekr_kernels._C_cuda", None)   # import -> ImportError
    with pytest.raises(RuntimeError, match="seekr_kernels._C_cuda is not built"):
        _native_cuda._module()


def test_glue_rejects_unsupported_dtypes_and_shapes(emu):
    with pytest.raises(TypeError, match="out_dtype"):
        _native_cuda._code("out_dtype", torch.int32)
    a, t = _args()
    rows = torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match="teacher: expected shape"):
        _native_cuda.attention_kl_fwd(a, t[:, :, :2], None)
    with pytest.raises(ValueError, match="tmass: expected shape"):
        _native_cuda.attention_kl_fwd(a, None, rows[:1])
    with pytest.raises(ValueError, match="grad_rows: expected shape"):
        _native_cuda.attention_kl_bwd(a, t, rows, rows, rows[:, :1])


def test_cpu_only_import_never_loads_cuda_libraries():
    """Importing the package, the glue and both extensions maps no CUDA runtime/driver
    (_C does not link cudart; _C_cuda links it statically and only loads the driver on its
    first CUDA call)."""
    code = (
        "import importlib, seekr_kernels, seekr_kernels._native_cuda\n"
        "from seekr_kernels import _backend\n"
        "_backend.native_cpu()\n"
        "_backend.native_cuda()\n"
        "maps = open('/proc/self/maps').read()\n"
        "bad = sorted({l.split()[-1] for l in maps.splitlines() if 'libcudart' in l or 'libcuda.so' in l})\n"
        "print('LOADED', bad)\n"
    )
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps (Linux)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout


@pytest.mark.skipif(not HAVE_CUDA_EXT, reason="seekr_kernels._C_cuda not built (needs nvcc at install time)")
def test_extension_rechecks_dims_and_codes_before_touching_the_gpu():
    """Host-side re-checks: ValueError naming the argument, no CUDA call made (fake pointers)."""
    C = _backend.native_cuda()
    P = 1 << 20   # a fake, never dereferenced pointer

    def fwd(**over):
        kw = dict(q=P, k=P, teacher=P, teacher_dtype=0, tmass_in=0, heads=P, queries=P, key_mask=P,
                  rows_out=P, lse_out=P, tmass_out=P, B=1, H=4, Hkv=2, L=8, D=16, S=1, Q=2,
                  q_dtype=0, scale=0.25)
        kw.update(over)
        return C.attention_kl_fwd(*kw.values())

    for over, name in [(dict(q_dtype=5), "q_dtype"), (dict(teacher_dtype=9), "teacher_dtype"),
                       (dict(H=3), "k: query heads"), (dict(B=0), "B"), (dict(D=-1), "D"),
                       (dict(scale=float("nan")), "scale"), (dict(scale=0.0), "scale"),
                       (dict(teacher=0, tmass_in=0), "tmass_in"), (dict(q=0), "q: null"),
                       (dict(Q=1 << 22), "queries"), (dict(D=8192), "head dim")]:
        with pytest.raises(ValueError, match=name):
            fwd(**over)
    with pytest.raises(ValueError, match="out_dtype"):
        C.attention_probs(P, P, P, P, P, P, 7, 1, 4, 2, 8, 16, 1, 2, 0, 0.25)
    with pytest.raises(ValueError, match="dq_out"):
        C.attention_kl_bwd(P, P, 0, 0, P, P, P, P, P, P, 0, P, 1, 4, 2, 8, 16, 1, 2, 0, 0.25)
    # Empty selections are no-ops (outputs are empty): nothing to check or launch.
    assert fwd(S=0, q=0) is None


@pytest.mark.skipif(not HAVE_CUDA_EXT, reason="seekr_kernels._C_cuda not built (needs nvcc at install time)")
@pytest.mark.skipif(os.path.exists("/dev/nvidia0") or torch.cuda.is_available(),
                    reason="checks the no-GPU error path; this machine has a GPU")
def test_extension_without_a_gpu_raises_runtime_error():
    C = _backend.native_cuda()
    P = 1 << 20
    with pytest.raises(RuntimeError, match="seekr_kernels._C_cuda: .*failed"):
        C.attention_probs(P, P, P, P, P, P, 0, 1, 4, 2, 8, 16, 1, 2, 0, 0.25)


# ---- the kernels under the CPU emulation ---------------------------------------------------

def _cuda_include():
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


class _Emulated:
    """The same call surface as seekr_kernels._C_cuda, backed by the emulated build."""

    def __init__(self, path):
        P, I, F = ctypes.c_uint64, ctypes.c_int64, ctypes.c_double
        self.lib = ctypes.CDLL(path)
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.lib.emu_attention_kl_fwd.argtypes = [P, P, P, I, P, P, P, P, P, P, P] + [I] * 8 + [F, P]
        self.lib.emu_attention_kl_bwd.argtypes = [P, P, P, I] + [P] * 8 + [I] * 8 + [F, P, P]
        self.lib.emu_attention_probs.argtypes = [P] * 6 + [I] * 9 + [F, P]

    def _call(self, fn, args):
        rc = fn(*args)
        if rc == 1:
            raise ValueError(self.lib.emu_last_error().decode())
        if rc == 2:
            raise RuntimeError(self.lib.emu_last_error().decode())

    def attention_kl_fwd(self, *args):
        self._call(self.lib.emu_attention_kl_fwd, args)

    def attention_kl_bwd(self, *args):
        self._call(self.lib.emu_attention_kl_bwd, args)

    def attention_probs(self, *args):
        self._call(self.lib.emu_attention_probs, args)


@pytest.fixture(scope="session")
def emulated_lib(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("the CUDA emulation needs a C++20 compiler and the CUDA headers (cuda_fp16.h)")
    srcs = [os.path.join(ROOT, p) for p in ("csrc/attention_cuda.cu", "csrc/attention_cuda.cuh",
                                            "tests/cuda_emu/cuda_emu.h", "tests/cuda_emu/emu_entry.cpp")]
    tag = hashlib.sha1(b"".join(open(p, "rb").read() for p in srcs)
                       + os.environ.get("SEEKR_EMU_CXXFLAGS", "").encode()).hexdigest()[:12]
    out = str(tmp_path_factory.mktemp("cuda_emu") / f"libseekr_cuda_emu_{tag}.so")
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{inc}",
           f"-I{os.path.join(ROOT, 'tests', 'cuda_emu')}", '-DSEEKR_CUDA_EMULATE="cuda_emu.h"',
           os.path.join(ROOT, "tests", "cuda_emu", "emu_entry.cpp"), "-o", out]
    # e.g. SEEKR_EMU_CXXFLAGS="-fsanitize=address" (run with LD_PRELOAD=libasan.so) to catch
    # out-of-bounds accesses of the kernels in host memory.
    cmd[1:1] = os.environ.get("SEEKR_EMU_CXXFLAGS", "").split()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail("building the CUDA emulation failed:\n" + res.stderr[-4000:])
    return out


@pytest.fixture
def emu(emulated_lib, monkeypatch):
    """Route seekr_kernels._native_cuda to the emulated kernels, on CPU tensors."""
    mod = _Emulated(emulated_lib)

    @contextlib.contextmanager
    def on_device(dev):
        yield 0

    monkeypatch.setattr(_native_cuda, "_module", lambda: mod)
    monkeypatch.setattr(_native_cuda, "_require_cuda", lambda a, **kw: a.q.device)
    monkeypatch.setattr(_native_cuda, "_on_device", on_device)
    return mod


def _glue_vs_reference(case, tol, tmass=False, check_probs=True):
    """rows, dq, dk (and probs) from the glue vs autograd through the torch oracle."""
    q, k, t, heads, queries, mask = case
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    a = check_attention_args(q, k, heads, queries, mask)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if tmass:
        tm = torch.rand(a.B, a.S, a.Q, generator=torch.Generator().manual_seed(3), dtype=acc)
        rows, lse, T = _native_cuda.attention_kl_fwd(a, None, tm)
        ref = reference.attention_kl_rows(a, None, tm)
        teacher = None
    else:
        rows, lse, T = _native_cuda.attention_kl_fwd(a, t, None)
        ref = reference.attention_kl_rows(a, t)
        teacher = t
    assert rows.dtype == acc and lse.dtype == acc and T.dtype == acc
    assert torch.isfinite(rows).all() and torch.isfinite(lse).all()
    assert_close(rows, ref, tol, "rows")
    assert (rows[~a.row_active] == 0).all() and (lse[~a.row_active] == 0).all()
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=acc)
    dq, dk = _native_cuda.attention_kl_bwd(a, teacher, lse, T, g)
    gq, gk = torch.autograd.grad((ref * g).sum(), [q, k])
    assert dq.dtype == q.dtype and dk.dtype == k.dtype
    assert_close(dq.float(), gq.float(), 4 * tol, "dq")
    assert_close(dk.float(), gk.float(), 4 * tol, "dk")
    if check_probs:
        for out_dtype in {q.dtype, torch.float32}:
            p = _native_cuda.attention_probs(a, out_dtype)
            pr = reference.attention_probs(a, out_dtype)
            assert p.dtype == out_dtype and p.is_contiguous()
            assert_close(p.float(), pr.float(), max(tol, TOL.get(out_dtype, tol)), f"probs {out_dtype}")
    return rows, dq, dk


# The emulator is slow: per dtype, the shortest- and longest-sequence cases of the grid.
EMU_GRID = sorted({min((g for g in GRID if g[6] == dt), key=lambda g: g[2]) for dt in {g[6] for g in GRID}}
                  | {max((g for g in GRID if g[6] == dt), key=lambda g: g[2]) for dt in {g[6] for g in GRID}},
                  key=GRID.index)


@pytest.mark.parametrize("B,HK,L,D,Q,pad,dtype", EMU_GRID)
def test_emulated_kernels_match_torch(emu, B, HK, L, D, Q, pad, dtype):
    case = make_case(B, HK[0], HK[1], L, D, S=3, Q=Q, pad=pad, dtype=dtype, seed=L * 7 + D)
    _glue_vs_reference(case, TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("B,HK,L,D,Q,pad,dtype", [g for g in GRID if g not in EMU_GRID])
def test_emulated_kernels_match_torch_full_grid(emu, B, HK, L, D, Q, pad, dtype):
    case = make_case(B, HK[0], HK[1], L, D, S=3, Q=Q, pad=pad, dtype=dtype, seed=L * 7 + D)
    _glue_vs_reference(case, TOL[dtype])


@pytest.mark.parametrize("D", [20, 40, 72])
def test_emulated_float64_is_exact(emu, D):
    # fp64 inputs accumulate in fp64; head dims that are not multiples of 8 or 32 exercise
    # the padded q/k tiles and the partial column loops of the dq/dk updates.
    case = make_case(2, 4, 2, 37, D, S=2, Q=6, pad="left", dtype=torch.float64,
                     teacher_dtype=torch.float64, dup=True, seed=D)
    _glue_vs_reference(case, 1e-10)


def test_emulated_large_head_dim(emu):
    # D = 256: more than 48 KiB of dynamic shared memory per block (opt-in path).
    case = make_case(1, 2, 1, 40, 256, S=1, Q=None, pad="right", dtype=torch.bfloat16, empty=False)
    _glue_vs_reference(case, TOL[torch.bfloat16])


@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_emulated_teacher_dtypes_and_tmass_path(emu, teacher_dtype):
    case = make_case(2, 8, 2, 45, 8, S=3, Q=7, pad="right", teacher_dtype=teacher_dtype)
    _glue_vs_reference(case, 2e-5, check_probs=False)
    _glue_vs_reference(case, 2e-5, tmass=True, check_probs=False)


def test_emulated_repeated_queries_and_multi_step_gather(emu):
    # Q = 600 rows: the dq gather scans queries in several chunks of 128; repeated positions
    # must add up (in a fixed order), across chunks too.
    case = make_case(1, 2, 1, 150, 8, S=1, Q=600, pad="left", empty=False, dup=True, seed=5)
    _glue_vs_reference(case, 2e-5, check_probs=False)


def test_emulated_empty_and_fully_masked(emu):
    q, k, t, heads, queries, mask = make_case(2, 4, 4, 11, 16, S=2)
    mask[1] = 0                      # every token of sample 1 masked
    heads = torch.tensor([[-1, 2], [1, 3]])
    rows, dq, dk = _glue_vs_reference((q, k, t, heads, None, mask), 2e-5)
    assert (rows[1] == 0).all() and (rows[0, 0] == 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all()
    assert (dq[0, [0, 1, 3]] == 0).all()     # heads nobody selected: zeros, written in full


def test_emulated_head_dim_beyond_shared_memory_is_a_value_error(emu):
    q, k, t, heads, queries, mask = make_case(1, 2, 1, 4, 1024, S=1, Q=2)
    a = check_attention_args(q, k, heads, queries, mask)
    with pytest.raises(ValueError, match=r"q: head dim D=1024 needs \d+ bytes of shared memory"):
        _native_cuda.attention_kl_fwd(a, t, None)


@pytest.mark.parametrize("what", ["heads", "queries", "key_mask"])
def test_emulated_kernels_flag_bad_indices(emu, what):
    """check_values=False skips the Python scan; the kernels still refuse bad indices."""
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 9, 16, S=2, Q=3, empty=False)
    a = check_attention_args(q, k, heads, queries, mask, check_values=False)
    if what == "heads":
        a.heads = a.heads.clone()
        a.heads[1, 0] = 4
    elif what == "queries":
        a.queries = a.queries.clone()
        a.queries[0, 2] = -3
    else:
        a.key_mask = a.key_mask.clone()
        a.key_mask[:, :] = 2
    rows = torch.zeros(2, 2, 3)
    for call in [lambda: _native_cuda.attention_kl_fwd(a, t, None),
                 lambda: _native_cuda.attention_kl_bwd(a, t, rows, rows, rows),
                 lambda: _native_cuda.attention_probs(a, torch.float32)]:
        with pytest.raises(ValueError, match=what):
            call()


@pytest.mark.slow
def test_emulated_kernels_have_no_shared_memory_races(tmp_path):
    """ThreadSanitizer over the emulated kernels: a missing __syncthreads() is a data race."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("the CUDA emulation needs a C++20 compiler and the CUDA headers (cuda_fp16.h)")
    exe = str(tmp_path / "race_check")
    emu_dir = os.path.join(ROOT, "tests", "cuda_emu")
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", "-DSEEKR_EMU_THREADS",
                            f"-I{inc}",
                            f"-I{emu_dir}", '-DSEEKR_CUDA_EMULATE="cuda_emu.h"',
                            os.path.join(emu_dir, "race_check.cpp"), "-o", exe],
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        if "fsanitize" in build.stderr or "tsan" in build.stderr:
            pytest.skip("the compiler cannot build with -fsanitize=thread")
        pytest.fail("building race_check failed:\n" + build.stderr[-4000:])
    res = subprocess.run([exe], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TSAN_OPTIONS="halt_on_error=1"))
    if "unexpected memory mapping" in res.stderr or "FATAL: ThreadSanitizer" in res.stderr:
        pytest.skip("ThreadSanitizer cannot run here: " + res.stderr.strip().splitlines()[0])
    assert "WARNING: ThreadSanitizer" not in res.stderr, res.stderr[-6000:]
    assert res.returncode == 0 and "race_check OK" in res.stdout, res.stdout + res.stderr[-3000:]


# ---- on a GPU: the compiled kernels through the public ops --------------------------------

needs_ext = pytest.mark.skipif(not HAVE_CUDA_EXT, reason="seekr_kernels._C_cuda not built (needs nvcc at install time)")


def run(backend, q, k, teacher, heads, queries, mask, reduction="none", **kw):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    out = sk.attention_kl(q, k, teacher, heads, queries, mask, reduction=reduction, backend=backend, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device) \
        if out.dim() else torch.ones((), device=out.device)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("B,HK,L,D,Q,pad,dtype", GRID)
def test_gpu_grid(B, HK, L, D, Q, pad, dtype):
    case = make_case(B, HK[0], HK[1], L, D, S=3, Q=Q, pad=pad, dtype=dtype, seed=L * 7 + D, device="cuda")
    ref = run("torch", *case)
    got = run("cuda", *case)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    tol = TOL[dtype]
    assert_close(got[0], ref[0], tol, "rows")
    assert_close(got[1].float(), ref[1].float(), 4 * tol, "dq")
    assert_close(got[2].float(), ref[2].float(), 4 * tol, "dk")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_gpu_reductions_and_strides(reduction):
    q, k, t, heads, queries, mask = make_case(3, 8, 2, 23, 16, S=3, Q=6, pad="left", device="cuda",
                                              teacher_dtype=torch.bfloat16, dup=True)
    ref = run("torch", q, k, t, heads, queries, mask, reduction=reduction)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)     # non-contiguous views
    tt = t.transpose(2, 3).contiguous().transpose(2, 3)
    got = run("cuda", qt, k, tt, heads, queries, mask, reduction=reduction)
    for a, b, what in zip(got, ref, ["loss", "dq", "dk"]):
        assert_close(a, b, 1e-5, what)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("L,D,Q,dtype", [(2048, 128, None, torch.bfloat16), (2048, 128, 100, torch.float32),
                                         (8192, 128, 100, torch.bfloat16), (700, 256, None, torch.float16),
                                         (300, 80, None, torch.float32)])
def test_gpu_long_sequences(L, D, Q, dtype):
    case = make_case(1, 32, 8, L, D, S=4, Q=Q, pad="left", dtype=dtype, device="cuda",
                     teacher_dtype=torch.bfloat16)
    ref = run("torch", *case)
    got = run("cuda", *case)
    for a, b, what in zip(got, ref, ["rows", "dq", "dk"]):
        assert_close(a.float(), b.float(), 2 * TOL[dtype], what)


@pytest.mark.gpu
@needs_ext
def test_gpu_gradcheck_float64():
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 9, 16, S=2, Q=4, pad="right", dtype=torch.float64,
                                              teacher_dtype=torch.float64, device="cuda")
    q.requires_grad_()
    k.requires_grad_()
    f = lambda q, k: sk.attention_kl(q, k, t, heads, queries, mask, reduction="none", backend="cuda")
    assert torch.autograd.gradcheck(f, (q, k), atol=1e-8)


@pytest.mark.gpu
@needs_ext
def test_gpu_deterministic_and_stream_aware():
    case = make_case(2, 8, 2, 300, 64, S=3, Q=40, pad="left", device="cuda", dup=True)
    first = run("cuda", *case)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        again = run("cuda", *case)
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(first, again):
        assert torch.equal(a, b)   # no atomics: bitwise identical


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_attention_probs(out_dtype):
    from seekr_kernels.ops.attention_probs import attention_probs
    q, k, _, heads, queries, mask = make_case(2, 8, 2, 150, 64, S=3, Q=9, pad="left", device="cuda")
    for qq in (queries, None):
        got = attention_probs(q, k, heads, qq, mask, out_dtype=out_dtype, backend="cuda")
        ref = attention_probs(q, k, heads, qq, mask, out_dtype=out_dtype, backend="torch")
        assert got.dtype == out_dtype
        assert_close(got.float(), ref.float(), max(TOL.get(out_dtype, 2e-5), 2e-5), "probs")


@pytest.mark.gpu
@needs_ext
def test_gpu_kernels_flag_bad_indices():
    q, k, t, heads, queries, mask = make_case(2, 4, 2, 9, 16, S=2, Q=3, empty=False, device="cuda")
    bad = heads.clone()
    bad[1, 0] = 4
    with pytest.raises(ValueError, match="heads"):
        sk.attention_kl(q, k, t, bad, queries, mask, backend="cuda", check_values=False)
    # Out-of-range queries would already break check_attention_args' own gather on the GPU, so
    # hand the glue validated args and corrupt them afterwards.
    a = check_attention_args(q, k, heads, queries, mask, check_values=False)
    a.queries = a.queries.clone()
    a.queries[0, 0] = 9
    with pytest.raises(ValueError, match="queries"):
        _native_cuda.attention_kl_fwd(a, t, None)
    # The device is still usable afterwards.
    assert torch.isfinite(sk.attention_kl(q, k, t, heads, queries, mask, backend="cuda"))
