"""Launch configurations of the Triton kernels: the fixed CUDA defaults, the autotuned
choice among compile-proven candidates, and the compile specs the compile matrix checks.

One function decides what a launcher runs with on CUDA, so the launchers and
``compile_specs()`` (what ``scripts/gpu_compile_check.py`` compiles for sm_80 and sm_90)
cannot drift apart:

* ``default_tile(kernel, block_d, dtype, has_teacher)``: the fixed configuration (used
  when autotuning is off, and always the first candidate);
* ``candidates(kernel, block_d, dtype)``: what the autotuner may try, before pruning
  (the attention-KL kernels on bf16 only: see ``tuned``);
* ``_tuned_configs.TABLE``: the candidates that compiled for sm_80 / sm_90 without a
  spill, within the shared-memory limit and on tensor cores for 16-bit inputs. It is
  written by ``gpu_compile_check.py --write-configs`` and a test checks that it still
  matches what the compile matrix finds.

Autotuning (CUDA only) is on by default; ``SEEKR_AUTOTUNE=0`` turns it off, and then
every launch uses ``default_tile``. The first call for a key (kernel, GPU, dtype, head-dim
block, teacher or not, length bucket of L and of the selected rows) times every pruned
candidate on the real inputs (each kernel rewrites its whole output, so the trial runs
are harmless) and keeps the fastest for the rest of the process. The cost is a few
compilations and timed launches once per key; results differ between configurations
only by float rounding (tile shapes change the summation order). Under CUDA-graph capture
nothing is timed: a key seen before keeps its choice, a new key uses the default.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, NamedTuple

import torch
import triton


class Tile(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Kernels whose CUDA launch configuration this module decides. The attention-KL kernels
# run on every replay step and are autotuned; teacher capture (probs) and forgettability
# (sqdiff) run once per task and use their default only.
TUNED_KERNELS = ("attention_kl_fwd", "attention_kl_dq", "attention_kl_dk")
FIXED_KERNELS = ("attention_probs", "attention_sqdiff")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TUNED_DTYPES = (torch.bfloat16,)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}
# Head dims the compile matrix covers; 96 is padded to a 128 block (same compiled kernel).
HEAD_DIMS = (64, 96, 128)


def block_d_for(D: int) -> int:
    """tl.dot needs every block dimension >= 16: D padded to a power of two >= 16."""
    return max(16, triton.next_power_of_2(int(D)))


def default_tile(kernel: str, block_d: int, dtype: torch.dtype, has_teacher: bool = True) -> Tile:
    """The fixed CUDA configuration of ``kernel`` (also the autotuner's first candidate).

    Chosen with the compile matrix (scripts/gpu_compile_check.py): large tiles that
    compile for sm_80 and sm_90 without a spill, with and without a teacher. fp32 inputs
    multiply exactly ("ieee" dot on the FMA units, no tensor cores), which needs far more
    registers per tile than the 16-bit tensor-core path: small tiles, more warps. Past a
    BLOCK_D of 128 (not in the compile matrix) the tiles shrink further.
    """
    if kernel not in TUNED_KERNELS + FIXED_KERNELS:
        raise KeyError(f"kernel: no launch configuration for {kernel!r}")
    fp32 = dtype in (torch.float32, torch.float64)
    if block_d > 128:
        if fp32:
            return Tile(16, 16, 4, 2)
        return Tile(16, 32, 4, 3) if kernel == "attention_sqdiff" else Tile(32, 32, 4, 3)
    if fp32:
        if kernel == "attention_kl_dk":
            if block_d <= 64:
                return Tile(16, 16, 4, 2)
            return Tile(16, 32, 8, 2) if has_teacher else Tile(32, 16, 8, 2)
        wide = kernel == "attention_sqdiff" or (kernel == "attention_probs" and block_d > 64)
        return Tile(16, 32, 8 if wide else 4, 2)
    small = block_d <= 64
    if kernel == "attention_sqdiff":            # four operand tiles live at once
        return Tile(64, 64, 4, 3) if small else Tile(32, 64, 4, 3)
    if kernel == "attention_probs" or small:
        return Tile(64, 64, 4, 3)
    return Tile(64, 64, 8, 3) if kernel == "attention_kl_dk" else Tile(64, 32, 4, 3)


# Autotuning candidates besides the defaults, per (kernel, BLOCK_D), 16-bit inputs only:
# shapes that compiled cleanly for sm_80 and sm_90 in a wider sweep of the compile matrix.
_EXTRA = {
    ("attention_kl_fwd", 64): [Tile(128, 64, 8, 3), Tile(64, 128, 8, 3)],
    ("attention_kl_fwd", 128): [Tile(64, 64, 8, 3), Tile(128, 32, 8, 3)],
    ("attention_kl_dq", 64): [Tile(128, 64, 8, 3), Tile(128, 32, 8, 3)],
    ("attention_kl_dq", 128): [Tile(64, 64, 8, 3), Tile(128, 32, 8, 3)],
    ("attention_kl_dk", 64): [Tile(128, 64, 8, 3), Tile(64, 64, 8, 3)],
    ("attention_kl_dk", 128): [Tile(128, 32, 8, 3), Tile(128, 64, 8, 3)],
}


def tuned(kernel: str, block_d: int, dtype: torch.dtype) -> bool:
    """Whether launches of ``kernel`` are autotuned: the attention-KL kernels on bf16 (the
    training dtype) at head-dim blocks 64 and 128. fp16 and fp32 run their defaults, which
    keeps the compile matrix that proves every candidate within CI's time."""
    return kernel in TUNED_KERNELS and dtype in TUNED_DTYPES and (kernel, block_d) in _EXTRA


def candidates(kernel: str, block_d: int, dtype: torch.dtype) -> list[Tile]:
    """Configurations the autotuner may try, before compile pruning: the defaults (with and
    without a teacher) first; just the defaults where nothing is tuned."""
    defaults = list(dict.fromkeys(default_tile(kernel, block_d, dtype, t) for t in (True, False)))
    if not tuned(kernel, block_d, dtype):
        return defaults
    return defaults + [t for t in _EXTRA[(kernel, block_d)] if t not in defaults]


def interpreter_tile(Q: int, L: int) -> Tile:
    """CPU tensors under TRITON_INTERPRET=1: each program is numpy work, so fewer, larger
    tiles run faster; num_warps / num_stages mean nothing there."""
    return Tile(min(64, max(16, triton.next_power_of_2(Q))),
                min(64, max(16, triton.next_power_of_2(L))), 1, 1)


# ---- the pruned table and the autotuner ---------------------------------------------------

def arch_key(capability: tuple[int, int]) -> str | None:
    """Which column of the pruned table a GPU of this compute capability uses."""
    major, minor = capability
    if major >= 9:
        return "sm90"
    if major >= 8:
        return "sm80"
    return None


def pruned(kernel: str, arch: str | None, dtype: torch.dtype, block_d: int, has_teacher: bool = True,
           smem_limit: int | None = None) -> list[Tile]:
    """What the autotuner tries on a GPU: the default, then the stored table's compile-proven
    candidates. ``smem_limit`` drops candidates that need more shared memory than the device
    allows (sm_86 / sm_89 allow 99 KB, less than the sm_80 the table was built for)."""
    from ._tuned_configs import TABLE

    d = default_tile(kernel, block_d, dtype, has_teacher)
    rows = TABLE.get(kernel, {}).get(arch or "", {}).get(DTYPE_NAMES.get(dtype, ""), {}).get(block_d, [])
    return [d] + [Tile(*r[:4]) for r in rows
                  if Tile(*r[:4]) != d and (smem_limit is None or r[4] <= smem_limit)]


_OVERRIDE: dict[str, Tile] = {}
_TUNED: dict[tuple, Tile] = {}
TUNING_LOG: list[dict] = []   # one entry per tuned key: what was timed and what won


@contextlib.contextmanager
def use_tiles(**tiles: Tile):
    """Force launch configurations by kernel name (tests; also on the interpreter)."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update({k: Tile(*v) for k, v in tiles.items()})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def autotune_enabled() -> bool:
    """SEEKR_AUTOTUNE=0 (or false/off/no) turns autotuning off; it is on otherwise."""
    return os.environ.get("SEEKR_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def length_bucket(n: int) -> int:
    """Power-of-two bucket of a length, clamped to [64, 16384]: one tuning per bucket."""
    return min(16384, max(64, triton.next_power_of_2(max(1, int(n)))))


def autotune(key: tuple, cands: list[Tile], run: Callable[[Tile], object],
             timer: Callable[[Callable[[], object]], float]) -> Tile:
    """Time ``run(tile)`` for each candidate with ``timer`` and cache the fastest under key.

    A candidate that fails to launch (e.g. out of shared memory on a smaller GPU) or whose
    compiled kernel spills registers is skipped; the first candidate (the default) is the
    answer when nothing else runs.
    """
    if key in _TUNED:
        return _TUNED[key]
    times = {}
    for tile in cands:
        try:
            kernel = run(tile)                        # compiles, and warms up
            if getattr(kernel, "n_spills", 0) and tile != cands[0]:
                times[tile] = float("inf")
                continue
            times[tile] = timer(lambda: run(tile))
        except Exception as e:  # noqa: BLE001 - any failed trial just loses
            if tile == cands[0] and len(cands) == 1:
                raise
            times[tile] = float("inf")
            TUNING_LOG.append({"key": key, "tile": tuple(tile), "error": f"{type(e).__name__}: {e}"[:200]})
    best = min(times, key=lambda t: (times[t], cands.index(t)))
    if times[best] == float("inf"):
        best = cands[0]
    _TUNED[key] = best
    TUNING_LOG.append({"key": key, "best": tuple(best),
                       "ms": {tuple(t): ms for t, ms in times.items()}})
    return best


def cuda_timer(fn, reps=5):
    """Median milliseconds of fn() on the current stream (events; fn already warmed up)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def cpu_timer(fn, reps=1):
    """Wall-clock milliseconds of fn() (interpreter runs: only the tests use it)."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def choose(kernel: str, t: torch.Tensor, block_d: int, has_teacher: bool, L: int, rows: int,
           run: Callable[[Tile], object]) -> Tile:
    """The launch configuration of one call of ``kernel`` on tensors like ``t``.

    CPU (interpreter): the interpreter tile. CUDA: the default, or with autotuning on the
    fastest pruned candidate for (device, dtype, block_d, teacher, length buckets).
    ``run(tile)`` launches the kernel (for timing); ``use_tiles`` overrides everything.
    """
    if kernel in _OVERRIDE:
        return _OVERRIDE[kernel]
    if not t.is_cuda:
        return interpreter_tile(rows, L)
    d = default_tile(kernel, block_d, t.dtype, has_teacher)
    if not tuned(kernel, block_d, t.dtype) or not autotune_enabled():
        return d
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    key = (kernel, dev, t.dtype, block_d, has_teacher, length_bucket(L), length_bucket(rows))
    if key in _TUNED:
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        return d
    props = torch.cuda.get_device_properties(dev)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    cands = pruned(kernel, arch_key((props.major, props.minor)), t.dtype, block_d, has_teacher, limit)
    return autotune(key, cands, run, cuda_timer)


# ---- compile specs: what gpu_compile_check.py compiles ------------------------------------

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.float64: "*fp64", torch.int32: "*i32", torch.int8: "*i8", torch.int64: "*i64"}


def kernel_spec(fn, name: str, *, pointers: dict, ints: dict, floats=(), constexprs: dict,
                tile: Tile | None = None, num_warps: int | None = None, num_stages: int | None = None,
                dtype: torch.dtype, expect_mma: bool, **meta) -> dict:
    """One compile spec in the form gpu_compile_check.py reads.

    Every parameter of ``fn`` must be named in exactly one of pointers (name -> torch dtype
    of the tensor), ints (name -> the value of a representative CUDA call), floats or
    constexprs, so a spec cannot silently miss an argument the kernel gained. Integer
    arguments are specialised the way Triton's launcher does: a value of 1 becomes a
    constant, a multiple of 16 gets the divisibility hint; pointers (torch allocations)
    are 16-byte aligned.
    """
    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.arg_names):
        if sum(p in d for d in (pointers, ints, constexprs)) + (p in floats) != 1:
            raise KeyError(f"{name}: parameter {p!r} must be named exactly once in the spec")
        if p in pointers:
            signature[p] = _PTR[pointers[p]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p in floats:
            signature[p] = "fp32"
        elif p in constexprs:
            signature[p] = "constexpr"
            consts[p] = constexprs[p]
        else:
            v = int(ints[p])
            if v == 1:
                signature[p] = "constexpr"
                consts[p] = 1
            else:
                signature[p] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    unknown = set(pointers) | set(ints) | set(floats) | set(constexprs)
    unknown -= set(fn.arg_names)
    if unknown:
        raise KeyError(f"{name}: {sorted(unknown)} are not parameters of the kernel")
    if tile is not None:
        num_warps, num_stages = tile.num_warps, tile.num_stages
    return dict(kernel=fn, name=name, signature=signature, constexprs=consts, attrs=attrs,
                num_warps=int(num_warps), num_stages=int(num_stages), dtype=DTYPE_NAMES[dtype],
                expect_mma=bool(expect_mma), tile=tuple(tile) if tile else None, **meta)


def _example(D: int, B=2, H=32, Hkv=8, L=4096, S=4):
    """Arguments of a representative CUDA call: contiguous [B, H, L, D] q and k, a
    contiguous [B, S, L, L] teacher, all L rows selected, G = 4 (grouped-query attention)."""
    return dict(Hkv=Hkv, L=L, D=D, S=S, Qn=L, G=H // Hkv,
                q=(H * L * D, L * D, D, 1), k=(Hkv * L * D, L * D, D, 1), t=(S * L * L, L * L, L, 1))


def tile_kernel_specs(fn, name: str, strides: list, pointers: Callable, teachers=(False,)) -> list[dict]:
    """Compile specs of one selected-row tile kernel as its launcher runs it on CUDA: every
    dtype of DTYPES, head dim of HEAD_DIMS and teacher variant, each with the tiles of
    ``tiles_to_check``.

    strides: [(the kernel's four stride parameters of a tensor, "q" | "k" | "t")] (the
    teacher's are 0 without a teacher, as the launchers pass them); pointers(dtype,
    has_teacher) -> {pointer parameter: torch dtype}.
    """
    from ._tiles import dot_config

    args = set(fn.arg_names)
    specs = []
    for dtype in DTYPES:
        prec, up, acc = dot_config(dtype, on_cuda=True)
        for D in HEAD_DIMS:
            ex = _example(D)
            bd = block_d_for(D)
            for has_t in teachers:
                ints = {p: v for names, key in strides
                        for p, v in zip(names, ex[key] if key != "t" or has_t else (0,) * 4)}
                ints.update({p: ex[p] for p in ("Hkv", "L", "D", "S", "Qn", "G") if p in args})
                for tile, role in tiles_to_check(name, bd, dtype, has_t):
                    consts = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=bd, DOT_PREC=prec,
                                  UPCAST=up, ACC=acc, HAS_TEACHER=has_t)
                    specs.append(kernel_spec(
                        fn, name, pointers=pointers(dtype, has_t), ints=ints,
                        floats=[p for p in ("scale", "scale2") if p in args],
                        constexprs={k: v for k, v in consts.items() if k in args}, tile=tile, dtype=dtype,
                        expect_mma=dtype != torch.float32, head_dim=D, block_d=bd, teacher=has_t, role=role))
    return specs


def tiles_to_check(kernel: str, block_d: int, dtype: torch.dtype, has_teacher: bool = True):
    """(tile, role) pairs the compile matrix checks: the default must pass; a candidate
    that fails is pruned from the autotuner's table."""
    d = default_tile(kernel, block_d, dtype, has_teacher)
    if not tuned(kernel, block_d, dtype):
        return [(d, "default")]
    return [(d, "default")] + [(c, "candidate") for c in candidates(kernel, block_d, dtype) if c != d]
