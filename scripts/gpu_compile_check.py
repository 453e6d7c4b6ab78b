"""Compile every GPU kernel of the package for sm_80 and sm_90 without a GPU, and check it.

Triton: every module of seekr_kernels/triton that has ``compile_specs()`` lists the
configurations its launcher runs with on CUDA (the defaults and the autotuning
candidates; see seekr_kernels/triton/_configs.py). Each spec is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and its binary read
back: registers per thread and spill bytes (ptxas' own report), shared memory (Triton's
dynamic allocation + the cubin's static part), and the tensor-core instructions in the
PTX (``mma.sync`` / ``wgmma``) and, with cuobjdump, the SASS (``HMMA`` / ``HGMMA``).

CUDA C++: csrc/attention_cuda.cu compiled by nvcc with ``-Xptxas -v`` for both targets
(every template instance), plus a host-side probe that includes the same source and
prints the dynamic shared memory the launchers request for D = 64, 96, 128, 256.

A spec fails on a compile error, any spill, shared memory over the target's per-block
limit (sm_80: 163 KB, sm_90: 227 KB with the opt-in), or a 16-bit dot that does not use
the tensor cores. A failing default configuration fails the run; a failing autotuning
candidate is pruned (the stored table seekr_kernels/triton/_tuned_configs.py lists the
survivors; ``--write-configs`` rewrites it, ``--check-configs`` fails when it is stale).

    python scripts/gpu_compile_check.py                          # check, print a summary
    python scripts/gpu_compile_check.py --out benchmarks/results  # + gpu_compile*.csv
    python scripts/gpu_compile_check.py --write-configs          # + rewrite the table

Exit status 0 when everything required passes. Runs the compilations in a process pool
(--jobs, default: all cores); ``--cache DIR`` keeps per-spec results keyed by the kernel
source, the specialisation, the options, the target and the Triton version.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import csv
import functools
import hashlib
import importlib
import io
import json
import multiprocessing as mp
import os
import pkgutil
import pprint
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TABLE_PATH = os.path.join(ROOT, "seekr_kernels", "triton", "_tuned_configs.py")
# Per-block shared memory with the opt-in attribute (CUDA programming guide, compute
# capabilities table): 163 KB on sm_80, 227 KB on sm_90.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCH_NAME = {80: "sm80", 90: "sm90"}
# Part of every cache key: bump it when what a result row holds or how it is read changes.
SCHEMA = 1


# ---- Triton -------------------------------------------------------------------------------

def triton_modules():
    import seekr_kernels.triton as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


@functools.lru_cache(maxsize=None)
def module_specs(module: str):
    """compile_specs() of seekr_kernels.triton.<module>, or () when it has none."""
    mod = importlib.import_module(f"seekr_kernels.triton.{module}")
    return tuple(mod.compile_specs()) if hasattr(mod, "compile_specs") else ()


def _spec_key(spec, arch):
    import triton
    fn = spec["kernel"]
    blob = json.dumps([SCHEMA, triton.__version__, fn.cache_key, spec["name"], spec["signature"],
                       {k: str(v) for k, v in spec["constexprs"].items()},
                       sorted((str(k), v) for k, v in spec["attrs"].items()),
                       spec["num_warps"], spec["num_stages"], arch], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tool(name):
    """A CUDA binary tool: Triton's bundled copy first (matches its ptxas), then PATH."""
    try:
        import triton.backends.nvidia as nv
        p = os.path.join(os.path.dirname(nv.__file__), "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which(name)


_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cpu_s():
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def compile_triton(module, index, arch):
    """Compile one spec for one target and measure it (runs in a pool worker)."""
    c0 = _cpu_s()
    out = _compile_triton(module, index, arch)
    out["cpu_s"] = round(_cpu_s() - c0, 2)     # this process and its ptxas / cuobjdump children
    return out


def _compile_triton(module, index, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = module_specs(module)[index]
    t0 = time.perf_counter()
    out = {"error": ""}
    with contextlib.suppress(AttributeError):
        triton.knobs.nvidia.dump_ptxas_log = True      # ptxas -v report, printed to stdout
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(spec["kernel"], spec["signature"], spec["constexprs"], spec["attrs"]),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    except Exception as e:  # noqa: BLE001 - a compile error is a result here
        lines = str(e).strip().splitlines() or [""]
        where = lines[0].split(" def ")[0][:40] if len(lines) > 1 else ""
        out["error"] = f"{type(e).__name__}: {where} {lines[-1][:300]}".strip()
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    ptx = k.asm["ptx"]
    out["wgmma_ptx"] = len(re.findall(r"\bwgmma\.mma_async", ptx))
    out["mma_ptx"] = len(re.findall(r"\bmma\.sync", ptx))
    out["smem_dynamic"] = int(k.metadata.shared)
    m = _PTXAS_PROPS.search(log.getvalue())
    r = _PTXAS_REGS.search(log.getvalue())
    if m and r:
        out.update(stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]), regs=int(r[1]))
    cuobjdump = _tool("cuobjdump")
    if cuobjdump:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            res = sass = subprocess.run([cuobjdump, "-res-usage", "-sass", path], capture_output=True,
                                        text=True).stdout
        u = _RES.search(res)
        if u:
            out["regs"] = int(u[1])     # the binary's own count (equals ptxas' report)
            out["smem_static"] = int(u[3])
            out["local_bytes"] = int(u[4])
            out.setdefault("stack_bytes", int(u[2]))
        out["hgmma_sass"] = len(re.findall(r"\bHGMMA\b", sass))
        out["hmma_sass"] = len(re.findall(r"\bHMMA\b", sass))
    return out


def triton_failures(row):
    """Why a compiled spec is unusable (empty: it passes)."""
    if row.get("error"):
        return ["compile error"]
    why = []
    if "regs" not in row:
        why.append("no resource report (neither ptxas -v nor cuobjdump)")
    spill = row.get("spill_stores")
    if spill is None:   # no ptxas report: local memory is where spills would go
        spill = row.get("local_bytes", 0) + row.get("stack_bytes", 0)
    if spill or row.get("spill_loads"):
        why.append(f"spills ({row.get('spill_stores')} B stores, {row.get('spill_loads')} B loads)")
    if row["smem_bytes"] > row["smem_limit"]:
        why.append(f"shared memory {row['smem_bytes']} B > {row['smem_limit']} B")
    if row["expect_mma"] and row["tensor_cores"] == "none":
        why.append("16-bit dot without tensor-core instructions")
    return why


def _tc(row, arch):
    if row.get("wgmma_ptx") or row.get("hgmma_sass"):
        return "wgmma"
    if row.get("mma_ptx") or row.get("hmma_sass"):
        return "mma"
    return "none"


TRITON_COLUMNS = ["module", "kernel", "arch", "dtype", "head_dim", "block_d", "vocab", "teacher", "role",
                  "block_m", "block_n", "num_warps", "num_stages", "constexprs", "regs", "spill_stores",
                  "spill_loads", "stack_bytes", "local_bytes", "smem_bytes", "smem_limit", "expect_mma",
                  "tensor_cores", "mma_ptx", "wgmma_ptx", "hmma_sass", "hgmma_sass", "compile_s", "cpu_s", "status",
                  "error"]


def run_triton(archs, jobs, cache_dir=None, only=None, defaults_only=False, log=print):
    """Compile all specs for all archs; rows in spec order (arch-major)."""
    import triton

    todo = []      # (module, index, spec)
    for module in triton_modules():
        for i, spec in enumerate(module_specs(module)):
            if only and not re.search(only, spec["name"]):
                continue
            if defaults_only and spec.get("role", "default") != "default":
                continue
            todo.append((module, i, spec))
    keys, unique = {}, {}
    for module, i, spec in todo:
        for arch in archs:
            key = _spec_key(spec, arch)
            keys[(module, i, arch)] = key
            unique.setdefault(key, (module, i, arch))
    results = {}
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        for key in list(unique):
            p = os.path.join(cache_dir, key + ".json")
            if os.path.exists(p):
                with open(p) as f:
                    results[key] = json.load(f)
    pending = [k for k in unique if k not in results]
    # Biggest kernels first (sm_80 compiles are the slower ones) so the pool ends together.
    pending.sort(key=lambda k: (not module_specs(unique[k][0])[unique[k][1]].get("block_d"),
                                unique[k][2]))
    log(f"triton {triton.__version__}: {len(todo)} specs x {len(archs)} targets = {len(keys)} "
        f"configurations, {len(unique)} distinct, {len(pending)} to compile on {jobs} processes")
    t0 = time.perf_counter()
    # A private Triton cache: a cache hit would skip ptxas and with it the spill report.
    with tempfile.TemporaryDirectory() as tcache:
        old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = tcache
        try:
            if jobs <= 1 or len(pending) <= 1:
                for key in pending:
                    results[key] = compile_triton(*unique[key])
            else:
                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                    futs = {pool.submit(compile_triton, *unique[key]): key for key in pending}
                    for fut in cf.as_completed(futs):
                        results[futs[fut]] = fut.result()
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old
    if pending:
        log(f"compiled {len(pending)} in {time.perf_counter() - t0:.1f} s")
    if cache_dir:
        for key in pending:
            with open(os.path.join(cache_dir, key + ".json"), "w") as f:
                json.dump(results[key], f)
    rows = []
    for arch in archs:
        for module, i, spec in todo:
            res = results[keys[(module, i, arch)]]
            tile = spec.get("tile")
            row = {"module": module, "kernel": spec["name"], "arch": ARCH_NAME.get(arch, f"sm{arch}"),
                   "dtype": spec["dtype"], "head_dim": spec.get("head_dim", ""), "block_d": spec.get("block_d", ""),
                   "vocab": spec.get("vocab", ""), "teacher": spec.get("teacher", ""),
                   "role": spec.get("role", "default"),
                   "block_m": tile[0] if tile else "", "block_n": tile[1] if tile else "",
                   "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                   "constexprs": " ".join(f"{k}={v}" for k, v in spec["constexprs"].items()),
                   "expect_mma": spec["expect_mma"], "smem_limit": SMEM_LIMIT.get(arch, 0), **res}
            row["smem_bytes"] = row.get("smem_dynamic", 0) + row.get("smem_static", 0)
            row["tensor_cores"] = _tc(row, arch) if not row.get("error") else ""
            why = triton_failures(row)
            row["status"] = "ok" if not why else ("FAIL: " if row["role"] == "default" else "pruned: ") + "; ".join(why)
            rows.append(row)
    return rows


def derive_table(rows):
    """The autotuning table: per tuned kernel, arch, dtype and BLOCK_D the tiles that passed
    in every variant (teacher or not, each head dim of the block), in candidate order (the
    default first), each with its largest shared memory for the runtime device-limit filter."""
    from seekr_kernels.triton._configs import DTYPE_NAMES, tuned

    dtypes = {v: k for k, v in DTYPE_NAMES.items()}
    tiles, failed, smem = {}, set(), {}
    for r in rows:
        if r["block_d"] == "" or not tuned(r["kernel"], int(r["block_d"]), dtypes[r["dtype"]]):
            continue
        key = (r["kernel"], r["arch"], r["dtype"], int(r["block_d"]))
        tile = (int(r["block_m"]), int(r["block_n"]), int(r["num_warps"]), int(r["num_stages"]))
        if tile not in tiles.setdefault(key, []):
            tiles[key].append(tile)
        if r["status"] != "ok":
            failed.add(key + (tile,))
        smem[key + (tile,)] = max(smem.get(key + (tile,), 0), int(r.get("smem_bytes") or 0))
    table = {}
    for (kern, arch, dt, bd), lst in tiles.items():
        table.setdefault(kern, {}).setdefault(arch, {}).setdefault(dt, {})[bd] = [
            t + (smem[(kern, arch, dt, bd, t)],) for t in lst if (kern, arch, dt, bd, t) not in failed]
    return table


def table_source(table):
    import triton
    return ('"""Autotuning candidates that compiled cleanly (no spill, shared memory within the\n'
            'per-block limit, tensor cores for 16-bit inputs), per kernel, target, dtype and BLOCK_D:\n'
            '(BLOCK_M, BLOCK_N, num_warps, num_stages, shared-memory bytes), the default first.\n\n'
            'Generated by `python scripts/gpu_compile_check.py --write-configs` '
            f'(triton {triton.__version__}); do not edit.\n'
            'tests/test_gpu_compile.py checks that it matches what the compile matrix finds.\n"""\n'
            f"TABLE = {pprint.pformat(table, width=100, sort_dicts=True)}\n")


# ---- CUDA C++ -----------------------------------------------------------------------------

_PROBE = r"""
#include "%s"
#include <cstdio>
// Dynamic shared memory (bytes) each launcher asks for, per head dim and accumulator type.
int main() {
  using namespace seekr_cuda;
  for (int D : {64, 96, 128, 256}) {
    const Dims d = check_dims(1, 32, 8, 4096, D, 4, 4096, 0, 0.1);
    const std::size_t e[4] = {fwd_smem_elems(d), dqrows_smem_elems(d), dqgather_smem_elems(d), dk_smem_elems(d)};
    const char* n[4] = {"fwd", "dqrows", "dqgather", "dk"};
    for (int i = 0; i < 4; ++i) std::printf("%%s %%d %%zu %%zu\n", n[i], D, e[i] * sizeof(float), e[i] * sizeof(double));
  }
  return 0;
}
"""
# Which launcher's shared-memory size each kernel template uses (csrc/attention_cuda.cu, run_*).
CUDA_SMEM_OF = {"kl_fwd_kernel": "fwd", "probs_kernel": "fwd", "kl_dqrows_kernel": "dqrows",
                "kl_dqgather_kernel": "dqgather", "kl_dk_kernel": "dk"}
CUDA_HEAD_DIMS = (64, 96, 128, 256)
CUDA_CHECKED_DIMS = (64, 96, 128)    # D = 256 is recorded; the launcher refuses it cleanly if too big


def find_nvcc():
    cand = [shutil.which("nvcc")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cand.append(os.path.join(os.environ[env], "bin", "nvcc"))
    cand.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in cand if c and os.path.exists(c)), None)


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def run_cuda(archs, cache_dir=None, log=print):
    """ptxas resource usage of every kernel in csrc/*.cu for each target; None without nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    src = os.path.join(ROOT, "csrc", "attention_cuda.cu")
    h = hashlib.sha256(json.dumps([SCHEMA, archs, _PROBE, CUDA_SMEM_OF]).encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    for name in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        with open(os.path.join(ROOT, "csrc", name), "rb") as f:
            h.update(name.encode() + f.read())
    cached = os.path.join(cache_dir, f"cuda-{h.hexdigest()[:20]}.json") if cache_dir else None
    if cached and os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    rows = _run_cuda(nvcc, src, archs, log)
    if cached:
        os.makedirs(cache_dir, exist_ok=True)
        with open(cached, "w") as f:
            json.dump(rows, f)
    return rows


def _run_cuda(nvcc, src, archs, log):
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        probe = os.path.join(d, "probe.cu")
        with open(probe, "w") as f:
            f.write(_PROBE % src)
        exe = os.path.join(d, "probe")
        # The flags of the CMake Release build of _C_cuda (CMakeLists.txt); ptxas -v reports.
        cmd = [nvcc, "-O3", "-DNDEBUG", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-v",
               "--threads", str(len(archs))]
        for a in archs:
            cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        p = subprocess.run(cmd + [probe, "-o", exe], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"nvcc failed ({p.returncode}):\n{p.stderr[-4000:]}")
        smem = {}
        for line in subprocess.run([exe], capture_output=True, text=True, check=True).stdout.splitlines():
            name, D, f32, f64 = line.split()
            smem[(name, int(D), "float")] = int(f32)
            smem[(name, int(D), "double")] = int(f64)
    log(f"nvcc: compiled csrc/attention_cuda.cu for {', '.join(f'sm_{a}' for a in archs)} "
        f"in {time.perf_counter() - t0:.1f} s")
    entries, cur = [], None
    for line in p.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
        if m:
            cur = {"mangled": m[1], "arch": int(m[2])}
            entries.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            cur.update(stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?", line)
        if m:
            cur.update(regs=int(m[1]), smem_static=int(m[3] or 0))
    names = _demangle([e["mangled"] for e in entries])
    rows = []
    for e in entries:
        full = names[e["mangled"]]
        m = re.search(r"(\w+_kernel)<([^>]*)>", full)
        base, targs = (m[1], [t.strip() for t in m[2].split(",")]) if m else (full, [])
        acc = targs[-1] if targs else "float"
        row = {"kernel": base, "template": ", ".join(targs), "arch": ARCH_NAME.get(e["arch"], f"sm{e['arch']}"),
               "regs": e.get("regs"), "spill_stores": e.get("spill_stores"), "spill_loads": e.get("spill_loads"),
               "stack_bytes": e.get("stack_bytes"), "smem_static": e.get("smem_static", 0),
               "smem_limit": SMEM_LIMIT.get(e["arch"], 0), "symbol": e["mangled"]}
        why = []
        which = CUDA_SMEM_OF.get(base)
        if which is None:
            why.append(f"unknown kernel {base!r}: add it to CUDA_SMEM_OF")
        for D in CUDA_HEAD_DIMS:
            total = row["smem_static"] + smem.get((which, D, acc), 0)
            row[f"smem_D{D}"] = total
            if D in CUDA_CHECKED_DIMS and total > row["smem_limit"]:
                why.append(f"shared memory {total} B > {row['smem_limit']} B at D={D}")
        if row["regs"] is None or row["spill_stores"] is None:
            why.append("no ptxas report")
        elif row["spill_stores"] or row["spill_loads"]:
            why.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads)")
        row["status"] = "ok" if not why else "FAIL: " + "; ".join(why)
        rows.append(row)
    rows.sort(key=lambda r: (r["arch"], r["kernel"], r["template"]))
    return rows


CUDA_COLUMNS = ["kernel", "template", "arch", "regs", "spill_stores", "spill_loads", "stack_bytes", "smem_static",
                *[f"smem_D{D}" for D in CUDA_HEAD_DIMS], "smem_limit", "status"]


# ---- reporting ----------------------------------------------------------------------------

def write_csv(path, rows, columns):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def triton_summary(rows):
    """One line per (kernel, arch, dtype): configurations, pass/pruned/fail, max regs/smem."""
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"], r["dtype"]), []).append(r)
    lines = [f"{'kernel':21s} {'arch':5s} {'dtype':5s} {'cfgs':>4s} {'ok':>3s} {'pruned':>6s} {'FAIL':>4s} "
             f"{'regs':>8s} {'smem KB':>11s} {'tensor cores':12s}"]
    for (k, a, dt), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        regs = [r["regs"] for r in rs if r.get("regs") is not None]
        sm = [r["smem_bytes"] / 1024 for r in rs if not r.get("error")]
        tcs = sorted({r["tensor_cores"] for r in ok}) or ["-"]
        lines.append(f"{k:21s} {a:5s} {dt:5s} {len(rs):4d} {len(ok):3d} "
                     f"{sum(r['status'].startswith('pruned') for r in rs):6d} "
                     f"{sum(r['status'].startswith('FAIL') for r in rs):4d} "
                     f"{(f'{min(regs)}-{max(regs)}' if regs else '-'):>8s} "
                     f"{(f'{min(sm):.0f}-{max(sm):.0f}' if sm else '-'):>11s} {'/'.join(tcs):12s}")
    return "\n".join(lines)


def cuda_summary(rows):
    lines = [f"{'kernel':20s} {'template':24s} {'arch':5s} {'regs':>4s} {'spill':>5s} "
             f"{'smem KB D=64/96/128/256':>24s} status"]
    for r in rows:
        sm = "/".join(f"{r[f'smem_D{D}'] / 1024:.1f}" for D in CUDA_HEAD_DIMS)
        lines.append(f"{r['kernel']:20s} {r['template']:24s} {r['arch']:5s} {r['regs']:4d} "
                     f"{r['spill_stores'] + r['spill_loads']:5d} {sm:>24s} {r['status']}")
    return "\n".join(lines)


def _compile_mode():
    """Real JIT functions (not the interpreter's) must exist before seekr_kernels.triton is
    imported, so TRITON_INTERPRET goes before anything imports triton."""
    if "seekr_kernels.triton.attention_kl" in sys.modules and os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("gpu_compile_check: run it as a script, not inside a TRITON_INTERPRET=1 process")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # triton 3.9's default, without its warning


def main(argv=None):
    _compile_mode()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write gpu_compile.csv and gpu_compile_cuda.csv into this directory "
                                  f"(the committed tables live in {os.path.relpath(RESULTS, ROOT)})")
    ap.add_argument("--parts", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    ap.add_argument("--archs", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="regex: only Triton kernels whose name matches")
    ap.add_argument("--defaults-only", action="store_true", help="skip the autotuning candidates")
    ap.add_argument("--cache", help="directory of per-spec results to reuse between runs")
    ap.add_argument("--write-configs", action="store_true", help=f"rewrite {os.path.relpath(TABLE_PATH, ROOT)}")
    ap.add_argument("--check-configs", action="store_true", help="fail if the stored table differs from the derived one")
    ap.add_argument("--require-cuda", action="store_true", help="fail (instead of skipping) without nvcc")
    args = ap.parse_args(argv)

    failed = False
    if "triton" in args.parts:
        rows = run_triton(args.archs, args.jobs, args.cache, args.only, args.defaults_only)
        print(triton_summary(rows))
        for r in rows:
            if r["status"].startswith("FAIL"):
                failed = True
                print(f"FAIL {r['kernel']} {r['arch']} {r['dtype']} D={r['head_dim'] or r['vocab']} "
                      f"teacher={r['teacher']} tile={r['block_m']}x{r['block_n']} w{r['num_warps']} "
                      f"s{r['num_stages']}: {r['status'][6:]} {r.get('error', '')}")
        pruned = [r for r in rows if r["status"].startswith("pruned")]
        for r in pruned:
            print(f"pruned {r['kernel']} {r['arch']} {r['dtype']} BLOCK_D={r['block_d']} teacher={r['teacher']} "
                  f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']}: {r['status'][8:]}")
        if args.out:
            path = os.path.join(args.out, "gpu_compile.csv")
            write_csv(path, rows, TRITON_COLUMNS)
            print(f"wrote {path}")
        full = not args.only and not args.defaults_only and sorted(args.archs) == [80, 90]
        if args.write_configs or args.check_configs:
            if not full:
                ap.error("--write-configs / --check-configs need the whole matrix (no --only, both archs)")
            src = table_source(derive_table(rows))
            if args.write_configs:
                with open(TABLE_PATH, "w") as f:
                    f.write(src)
                print(f"wrote {TABLE_PATH}")
            else:
                from seekr_kernels.triton._tuned_configs import TABLE
                if TABLE != derive_table(rows):
                    failed = True
                    print(f"FAIL {os.path.relpath(TABLE_PATH, ROOT)} is stale: run "
                          "`python scripts/gpu_compile_check.py --write-configs`")
                else:
                    print("stored autotuning table matches the compile matrix")
    if "cuda" in args.parts:
        rows = run_cuda(args.archs, args.cache)
        if rows is None:
            print("SKIP CUDA C++: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
            failed |= args.require_cuda
        else:
            print(cuda_summary(rows))
            failed |= any(r["status"] != "ok" for r in rows)
            if args.out:
                path = os.path.join(args.out, "gpu_compile_cuda.csv")
                write_csv(path, rows, CUDA_COLUMNS)
                print(f"wrote {path}")
    print("RESULT: " + ("FAIL" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
