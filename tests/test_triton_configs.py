"""Launch configurations of the Triton kernels (seekr_kernels/triton/_configs.py).

* correctness does not depend on the configuration: every kernel runs with several tile
  shapes through the interpreter (values and gradients against the torch oracle), among
  them the autotuner's stored candidates;
* the autotuner: picks the fastest candidate, caches it per key, skips candidates that
  fail or spill, keeps the default when nothing else runs, never tunes under CUDA-graph
  capture, and is turned off by SEEKR_AUTOTUNE=0;
* the stored table is well formed (its agreement with the compile matrix is checked in
  test_gpu_compile.py);
* `gpu` tests: on CUDA, autotuned and fixed launches agree with the oracle and the
  compiled kernels do not spill.
"""
from __future__ import annotations

import types

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels import _backend
from seekr_kernels.triton import _configs
from seekr_kernels.triton._configs import Tile

from cases import assert_close, make_case

pytest.importorskip("triton", reason="the Triton launch configurations need triton")
# CPU tensors through the Triton kernels need the interpreter (tests/conftest.py turns it on,
# except for `gpu` runs).
interp = pytest.mark.skipif(not _backend.available("triton", torch.device("cpu"))[0],
                            reason="TRITON_INTERPRET not set (a SEEKR_TEST_GPU run)")

KL = _configs.TUNED_KERNELS


def _kl(backend, case, tiles=None):
    q, k, t, heads, queries, mask = case
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    with _configs.use_tiles(**(tiles or {})):
        out = sk.attention_kl(q, k, t, heads, queries, mask, reduction="none", backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    with _configs.use_tiles(**(tiles or {})):
        (out * w).sum().backward()
    return out.detach(), q.grad, k.grad


def _table_tiles(block_d):
    """Distinct (BLOCK_M, BLOCK_N) the autotuner may hand the attention-KL kernels (bf16;
    the small fp32 tiles are covered by MIXED below)."""
    out = set()
    for kern in KL:
        for arch in ("sm80", "sm90"):
            for teacher in (True, False):
                out.update((t.block_m, t.block_n)
                           for t in _configs.pruned(kern, arch, torch.bfloat16, block_d, teacher))
    return sorted(out)


# Mixed shapes per kernel (rows and keys split differently in fwd, dq and dk), then every
# tile shape of the stored table at BLOCK_D 64.
MIXED = [dict(attention_kl_fwd=Tile(16, 32, 4, 2), attention_kl_dq=Tile(32, 16, 4, 2),
              attention_kl_dk=Tile(16, 16, 4, 2)),
         dict(attention_kl_fwd=Tile(32, 16, 4, 2), attention_kl_dq=Tile(16, 32, 4, 2),
              attention_kl_dk=Tile(32, 32, 4, 2))]


@interp
@pytest.mark.parametrize("tiles,teacher", [(MIXED[0], True), (MIXED[1], False)],
                         ids=["mixed-a-teacher", "mixed-b-topk"])
def test_attention_kl_configs_match_torch(tiles, teacher):
    case = make_case(2, 4, 2, 70, 24, S=3, Q=None, pad="left", seed=3)
    if not teacher:   # the TopK path: rows = tmass * lse, no teacher tensor in the kernels
        from seekr_kernels._checks import check_attention_args
        from seekr_kernels.ops.attention_kl import attention_kl_rows
        q, k, _, heads, queries, mask = case
        a = check_attention_args(q.requires_grad_(), k.requires_grad_(), heads, queries, mask)
        tm = torch.rand(a.B, a.S, a.Q, generator=torch.Generator().manual_seed(2))
        ref = attention_kl_rows(a, None, tm, "torch")
        rg = torch.autograd.grad(ref.sum(), (q, k))
        with _configs.use_tiles(**tiles):
            got = attention_kl_rows(a, None, tm, "triton")
            gg = torch.autograd.grad(got.sum(), (q, k))
        assert_close(got, ref, 2e-5, "rows")
        for x, y, what in zip(gg, rg, ("dq", "dk")):
            assert_close(x, y, 1e-4, what)
        return
    ref = _kl("torch", case)
    got = _kl("triton", case, tiles)
    for x, y, what in zip(got, ref, ("rows", "dq", "dk")):
        assert_close(x, y, 2e-5, what)


@interp
@pytest.mark.parametrize("bm,bn", _table_tiles(64))
def test_attention_kl_stored_tiles_match_torch(bm, bn):
    """Every tile shape the autotuner may pick at BLOCK_D 64 (num_warps / num_stages mean
    nothing in the interpreter), with GQA, left padding and repeated query rows."""
    case = make_case(2, 4, 2, 150, 64, S=2, Q=40, pad="left", seed=bm + bn, dup=True)
    tiles = {k: Tile(bm, bn, 4, 3) for k in KL}
    ref = _kl("torch", case)
    got = _kl("triton", case, tiles)
    for x, y, what in zip(got, ref, ("rows", "dq", "dk")):
        assert_close(x, y, 2e-5, what)


def test_default_config_differs_from_a_candidate():
    """The two-config tests above mean something only if the configs differ in shape."""
    assert len(_table_tiles(64)) >= 2
    for kern in KL:
        for bd in (64, 128):
            assert len({(t.block_m, t.block_n) for t in _configs.candidates(kern, bd, torch.bfloat16)}) >= 2


@interp
@pytest.mark.parametrize("tile", [Tile(16, 16, 4, 2), Tile(32, 64, 4, 3)])
def test_probs_and_sqdiff_configs_match_torch(tile):
    from seekr_kernels.ops.attention_sqdiff import attention_sqdiff
    q, k, _, heads, queries, mask = make_case(2, 4, 2, 90, 40, S=3, Q=11, pad="right", seed=5)
    qb, kb = q + 0.3 * torch.randn_like(q), k + 0.3 * torch.randn_like(k)
    ref_p = sk.attention_probs(q, k, heads, queries, mask, backend="torch")
    ref_s = attention_sqdiff(q, k, qb, kb, heads, queries, mask, backend="torch")
    with _configs.use_tiles(attention_probs=tile, attention_sqdiff=tile):
        got_p = sk.attention_probs(q, k, heads, queries, mask, backend="triton")
        got_s = attention_sqdiff(q, k, qb, kb, heads, queries, mask, backend="triton")
    assert_close(got_p, ref_p, 2e-5, "probs")
    assert_close(got_s, ref_s, 2e-5, "sqdiff")


# ---- the autotuner --------------------------------------------------------------------------

@pytest.fixture
def fresh_tuning(monkeypatch):
    monkeypatch.setattr(_configs, "_TUNED", {})
    monkeypatch.setattr(_configs, "TUNING_LOG", [])


def test_autotune_picks_the_fastest_and_caches(fresh_tuning):
    cands = [Tile(64, 64, 4, 3), Tile(128, 64, 8, 3), Tile(64, 128, 8, 3)]
    cost = {cands[0]: 3.0, cands[1]: 1.0, cands[2]: 2.0}
    ran = []

    def run(tile):
        ran.append(tile)
        return types.SimpleNamespace(n_spills=0)

    def timer(fn):
        before = len(ran)
        fn()
        assert len(ran) == before + 1
        return cost[ran[-1]]

    assert _configs.autotune(("k", 1), cands, run, timer) == cands[1]
    assert set(ran) == set(cands)
    n = len(ran)
    assert _configs.autotune(("k", 1), cands, run, timer) == cands[1]   # cached: nothing runs
    assert len(ran) == n
    assert _configs.TUNING_LOG[-1]["best"] == tuple(cands[1])


def test_autotune_skips_failing_and_spilling_candidates(fresh_tuning):
    cands = [Tile(64, 32, 4, 3), Tile(64, 64, 4, 3), Tile(128, 64, 8, 3)]

    def run(tile):
        if tile == cands[1]:
            raise RuntimeError("out of resources: shared memory")
        return types.SimpleNamespace(n_spills=16 if tile == cands[2] else 0)

    timer = lambda fn: (fn(), 5.0)[1]   # noqa: E731
    assert _configs.autotune(("k", 2), cands, run, timer) == cands[0]
    assert any("out of resources" in e.get("error", "") for e in _configs.TUNING_LOG)


def test_autotune_default_alone_reraises(fresh_tuning):
    def run(tile):
        raise RuntimeError("broken kernel")
    with pytest.raises(RuntimeError, match="broken kernel"):
        _configs.autotune(("k", 3), [Tile(64, 64, 4, 3)], run, _configs.cpu_timer)


@interp
def test_autotune_on_the_interpreter_gives_correct_results(fresh_tuning):
    """The tuner's trial launches write the real outputs: whatever wins, values are right."""
    case = make_case(1, 4, 2, 40, 16, S=2, Q=None, seed=7)
    a_tiles = [Tile(16, 16, 4, 2), Tile(32, 16, 4, 2)]
    ref = _kl("torch", case)
    orig = _configs.choose

    def tuned(kernel, t, block_d, has_teacher, L, rows, run):
        return _configs.autotune((kernel, block_d), a_tiles, run, _configs.cpu_timer)
    try:
        _configs.choose = tuned
        import seekr_kernels.triton.attention_kl as mod
        mod.choose = tuned
        got = _kl("triton", case)
    finally:
        _configs.choose = orig
        mod.choose = orig
    assert {e["key"][0] for e in _configs.TUNING_LOG if "best" in e} == set(KL)
    for x, y, what in zip(got, ref, ("rows", "dq", "dk")):
        assert_close(x, y, 2e-5, what)


class _FakeCuda:
    """Enough of a CUDA tensor for choose(): is_cuda, dtype, device."""
    is_cuda = True
    dtype = torch.bfloat16
    device = torch.device("cuda", 0)


def _fake_gpu(monkeypatch, capturing=False, major=9, optin=232448):
    props = types.SimpleNamespace(major=major, minor=0, shared_memory_per_block_optin=optin)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)


def test_choose_on_cuda(monkeypatch, fresh_tuning):
    _fake_gpu(monkeypatch)
    seen = []

    def run(tile):
        seen.append(tile)
        return None
    monkeypatch.setattr(_configs, "cuda_timer", lambda fn: (fn(), -len(seen))[1])   # later = faster
    t = _FakeCuda()
    default = _configs.default_tile("attention_kl_fwd", 128, torch.bfloat16, True)
    monkeypatch.setenv("SEEKR_AUTOTUNE", "0")
    assert _configs.choose("attention_kl_fwd", t, 128, True, 4096, 4096, run) == default
    assert seen == []
    monkeypatch.delenv("SEEKR_AUTOTUNE")
    cands = _configs.pruned("attention_kl_fwd", "sm90", torch.bfloat16, 128)
    best = _configs.choose("attention_kl_fwd", t, 128, True, 4096, 4096, run)
    assert best in cands and set(seen) == set(cands)
    # same length bucket: cached; another bucket: tuned again
    n = len(seen)
    assert _configs.choose("attention_kl_fwd", t, 128, True, 4000, 3000, run) == best
    assert len(seen) == n
    _configs.choose("attention_kl_fwd", t, 128, True, 8192, 8192, run)
    assert len(seen) > n
    # the fixed kernels never tune
    assert _configs.choose("attention_probs", t, 128, False, 4096, 4096, run) == \
        _configs.default_tile("attention_probs", 128, torch.bfloat16, False)


def test_choose_under_graph_capture_uses_the_default(monkeypatch, fresh_tuning):
    _fake_gpu(monkeypatch, capturing=True)
    run = lambda tile: pytest.fail("no trial launch may happen during capture")   # noqa: E731
    got = _configs.choose("attention_kl_dk", _FakeCuda(), 64, True, 1024, 1024, run)
    assert got == _configs.default_tile("attention_kl_dk", 64, torch.bfloat16, True)


def test_smaller_gpus_drop_candidates_over_their_shared_memory(monkeypatch):
    every = _configs.pruned("attention_kl_dq", "sm80", torch.bfloat16, 128)
    small = _configs.pruned("attention_kl_dq", "sm80", torch.bfloat16, 128, smem_limit=1)
    assert small == [_configs.default_tile("attention_kl_dq", 128, torch.bfloat16, True)] and len(every) >= 1


@pytest.mark.parametrize("value,on", [("0", False), ("false", False), ("off", False), ("1", True),
                                      ("", True), (None, True)])
def test_autotune_switch(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("SEEKR_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("SEEKR_AUTOTUNE", value)
    assert _configs.autotune_enabled() is on


def test_length_buckets():
    assert [_configs.length_bucket(n) for n in (1, 64, 65, 1000, 1024, 4097, 10**6)] == \
        [64, 64, 128, 1024, 1024, 8192, 16384]


# ---- the stored table -------------------------------------------------------------------------

def test_stored_table_is_well_formed():
    from seekr_kernels.triton._tuned_configs import TABLE
    limits = {"sm80": 163 * 1024, "sm90": 227 * 1024}
    assert set(TABLE) == set(KL)
    for kern, by_arch in TABLE.items():
        assert set(by_arch) == set(limits)
        for arch, by_dtype in by_arch.items():
            assert set(by_dtype) == {"bf16"}    # fp16 and fp32 run their defaults
            for dt, by_bd in by_dtype.items():
                dtype = torch.bfloat16
                assert set(by_bd) == {64, 128}
                for bd, rows in by_bd.items():
                    cands = _configs.candidates(kern, bd, dtype)
                    tiles = [Tile(*r[:4]) for r in rows]
                    assert tiles == [c for c in cands if c in tiles], "candidate order kept"
                    assert len(_configs.pruned(kern, arch, dtype, bd)) >= 2, "something to tune"
                    assert all(0 < r[4] <= limits[arch] for r in rows)


def test_kernel_spec_specialises_like_triton():
    """kernel_spec's integer/pointer rules against Triton's own launcher specialisation."""
    jit = pytest.importorskip("triton.runtime.jit")
    native = getattr(jit, "native_specialize_impl", None)
    if native is None:
        pytest.skip("this triton has no native_specialize_impl to compare with")
    from triton.backends.nvidia.compiler import CUDABackend
    for v in (1, 2, 16, 96, 4096 * 128, 2**31 + 16, 7):
        kind, attr = native(CUDABackend, v, False, True, True)
        spec = _spec_of_int(v)
        if kind == "constexpr":
            assert spec == ("constexpr", None), v
        else:
            assert spec == (kind, attr == "D"), v
    kind, attr = native(CUDABackend, torch.zeros(4, dtype=torch.bfloat16), False, True, True)
    assert (kind, attr) == ("*bf16", "D")


def _spec_of_int(v):
    fn = types.SimpleNamespace(arg_names=["X", "n"])
    s = _configs.kernel_spec(fn, "k", pointers=dict(X=torch.float32), ints=dict(n=v), constexprs={},
                             num_warps=4, num_stages=3, dtype=torch.float32, expect_mma=False)
    if s["signature"]["n"] == "constexpr":
        return ("constexpr", None)
    return (s["signature"]["n"], (1,) in s["attrs"])


def test_kernel_spec_rejects_a_missing_or_unknown_argument():
    from seekr_kernels.triton import attention_kl as mod
    spec = mod.compile_specs()[0]
    fn = spec["kernel"]
    with pytest.raises(KeyError, match="must be named exactly once"):
        _configs.kernel_spec(fn, "x", pointers={}, ints={}, constexprs={}, num_warps=4, num_stages=3,
                             dtype=torch.float32, expect_mma=False)


def test_compile_specs_use_the_launch_defaults():
    """Every module's default specs carry exactly default_tile's configuration."""
    from seekr_kernels.triton import attention_kl, attention_probs, attention_sqdiff
    for mod in (attention_kl, attention_probs, attention_sqdiff):
        for s in mod.compile_specs():
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s["dtype"]]
            want = _configs.default_tile(s["name"], s["block_d"], dtype, s["teacher"])
            if s["role"] == "default":
                assert Tile(*s["tile"]) == want
                assert (s["num_warps"], s["num_stages"]) == (want.num_warps, want.num_stages)
            assert s["constexprs"]["BLOCK_M"] == s["tile"][0] and s["constexprs"]["BLOCK_N"] == s["tile"][1]


# ---- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 96, 128])
def test_gpu_autotuned_and_fixed_agree_with_torch(monkeypatch, dtype, D):
    from cases import TOL
    case = make_case(2, 8, 2, 1500, D, S=3, Q=None, pad="left", dtype=dtype, device="cuda",
                     teacher_dtype=dtype, seed=D)
    ref = _kl("torch", case)
    for setting in ("0", "1"):
        monkeypatch.setenv("SEEKR_AUTOTUNE", setting)
        got = _kl("triton", case)
        for x, y, what in zip(got, ref, ("rows", "dq", "dk")):
            assert_close(x.float(), y.float(), 4 * TOL[dtype], f"{what} (SEEKR_AUTOTUNE={setting})")
    if dtype == torch.bfloat16:   # the tuned dtype: all three kernels went through the tuner
        bd = _configs.block_d_for(D)
        tuned = [e for e in _configs.TUNING_LOG if "best" in e and e["key"][2] == dtype and e["key"][3] == bd]
        assert {e["key"][0] for e in tuned} == set(KL)
        for e in tuned:
            assert Tile(*e["best"]) in _configs.pruned(e["key"][0], "sm90", dtype, bd, e["key"][4]) + \
                _configs.pruned(e["key"][0], "sm80", dtype, bd, e["key"][4])


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["0", "1"])
def test_gpu_compiled_kernels_do_not_spill(monkeypatch, setting):
    """The kernels the launchers compiled on this GPU (its Triton, its ptxas), defaults and
    tuned choices alike, hold no spilled registers."""
    from seekr_kernels.triton import attention_kl as mod
    monkeypatch.setenv("SEEKR_AUTOTUNE", setting)
    handles = []

    def spy(kernel, t, block_d, has_teacher, L, rows, run):
        tile = _configs.choose(kernel, t, block_d, has_teacher, L, rows, run)
        handles.append((kernel, tile, run(tile)))      # launching returns the compiled kernel
        return tile
    monkeypatch.setattr(mod, "choose", spy)
    for D, dtype in ((128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float32)):
        _kl("triton", make_case(1, 8, 2, 600, D, S=2, Q=None, dtype=dtype, device="cuda"))
    assert {k for k, _, _ in handles} == set(KL)
    for kernel, tile, compiled in handles:
        assert getattr(compiled, "n_spills", 0) == 0, (kernel, tile, compiled.n_regs, compiled.n_spills)
