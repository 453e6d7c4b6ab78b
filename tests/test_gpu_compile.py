"""Every GPU kernel compiled for sm_80 and sm_90 on this GPU-less machine, and checked.

Runs scripts/gpu_compile_check.py (a separate process: compiling needs Triton's real JIT
functions, while this test session runs the interpreter):

* Triton: every configuration every module's compile_specs() lists (the launchers' CUDA
  defaults and the autotuning candidates) for both targets, fp32/bf16/fp16, head dims
  64/96/128, with and without a teacher: no compile error, no spill, shared memory within
  the per-block limit, tensor-core instructions for 16-bit inputs; and the stored
  autotuning table equals what the matrix finds;
* CUDA C++: every kernel of csrc/*.cu (every template instance) through nvcc -Xptxas -v
  for both targets: no spill, shared memory within the limit for D = 64, 96, 128.

Per-spec results are cached, keyed by everything that decides the compiled binary (the
kernel's source and the sources it calls, the specialisation, the options, the target, the
Triton / nvcc version): an unchanged kernel is not compiled again by the next run, on this
clone or another. The cache lives in ~/.cache/seekr-kernels/gpu-compile, or in
SEEKR_COMPILE_CACHE (=0: no cache, everything compiled: minutes of CPU time, measured in
benchmarks/results/README.md).
"""
from __future__ import annotations

import csv
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_compile_check.py")
# The script itself, loaded from its path (scripts/ is no package); it imports nothing heavy
# at module level.
_spec = importlib.util.spec_from_file_location("gpu_compile_check", SCRIPT)
gcc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gcc)


@pytest.fixture
def cache_args():
    where = os.environ.get("SEEKR_COMPILE_CACHE")
    if where == "0":
        return []
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return ["--cache", where or os.path.join(base, "seekr-kernels", "gpu-compile")]


def _run(args):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                       timeout=1500, cwd=ROOT)
    print(p.stdout[-6000:])
    return p


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_triton_compile_matrix(tmp_path, cache_args):
    pytest.importorskip("triton")
    p = _run(["--parts", "triton", "--out", str(tmp_path), "--check-configs", *cache_args])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    rows = _read(tmp_path / "gpu_compile.csv")

    # Every module that has compile_specs, every kernel it names, on both targets.
    expected = set()
    for m in gcc.triton_modules():
        mod = importlib.import_module(f"seekr_kernels.triton.{m}")
        if hasattr(mod, "compile_specs"):
            expected |= {(m, s["name"], s["dtype"]) for s in mod.compile_specs()}
    assert {"attention_kl", "attention_probs", "attention_sqdiff", "logits_kl", "linear_logits_kl"} <= \
        {m for m, _, _ in expected}
    for arch in ("sm80", "sm90"):
        got = {(r["module"], r["kernel"], r["dtype"]) for r in rows if r["arch"] == arch}
        assert got == expected, arch

    for r in rows:
        what = f"{r['kernel']} {r['arch']} {r['dtype']} D={r['head_dim']} teacher={r['teacher']} " \
               f"{r['block_m']}x{r['block_n']}"
        if r["role"] == "default":
            assert r["status"] == "ok", what + ": " + r["status"]
        if r["status"] != "ok":
            continue
        assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, what
        assert 0 < int(r["regs"]) <= 255, what
        assert int(r["smem_bytes"]) <= int(r["smem_limit"]), what
        if r["expect_mma"] == "True":
            assert r["tensor_cores"] in ("mma", "wgmma"), what
    # 16-bit (and tf32) dots use the tensor cores, exact fp32 ones multiply on the FMA units,
    # kernels without a dot have no tensor-core instruction.
    for r in rows:
        if r["status"] == "ok":
            prec = re.search(r"\bDOT_PREC=(\w+)", r["constexprs"])
            exact = prec is None or (r["dtype"] == "fp32" and prec[1] == "ieee")
            assert (r["tensor_cores"] == "none") == exact, f"{r['kernel']} {r['arch']} {r['constexprs']}"
    assert "stored autotuning table matches" in p.stdout


def _cuda_kernels():
    out = set()
    for name in os.listdir(os.path.join(ROOT, "csrc")):
        if name.endswith(".cu"):
            with open(os.path.join(ROOT, "csrc", name)) as f:
                out |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", f.read()))
    return out


def test_cuda_resource_table(tmp_path, cache_args):
    if gcc.find_nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME / PATH): the CUDA C++ kernels cannot be compiled here")
    p = _run(["--parts", "cuda", "--require-cuda", "--out", str(tmp_path), *cache_args])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    rows = _read(tmp_path / "gpu_compile_cuda.csv")
    kernels = _cuda_kernels()
    assert {"kl_fwd_kernel", "probs_kernel", "kl_dqrows_kernel", "kl_dqgather_kernel", "kl_dk_kernel"} <= kernels
    for arch in ("sm80", "sm90"):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels, arch
        # fp32, fp16, bf16 and fp64 instances of every input-typed kernel
        fwd = {r["template"] for r in rows if r["arch"] == arch and r["kernel"] == "kl_fwd_kernel"}
        assert len(fwd) == 4, fwd
    for r in rows:
        assert r["status"] == "ok", r
        assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0
        for D in (64, 96, 128):
            assert 0 < int(r[f"smem_D{D}"]) <= int(r["smem_limit"])
