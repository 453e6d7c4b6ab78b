"""Shared measurement helpers for the benchmark scripts.

Peak memory on CPU: PyTorch's CPU allocator keeps no peak statistics, so each measurement
runs in a fresh Python subprocess that builds its inputs, records its resident set size
(RSS), runs the workload once and reads the kernel's RSS high-water mark (VmHWM). The
difference is the peak extra memory of the workload. Large tensors are mmap-backed in
glibc, so they show up in RSS when touched and leave it when freed. On CUDA the
allocator's own `max_memory_allocated` is used instead.

Time: median of `reps` runs after `warmup` runs (CUDA: synchronised, events).

Command line and output, shared by every ``bench_*.py`` script::

    ap = argparse.ArgumentParser(...)
    common.add_common_args(ap)      # --quick and --out DIR
    args = ap.parse_args()
    out = common.out_dir(args)      # the folder to write CSV / PNG files into (created)
    ...
    print(f"fused vs eager: time {common.ratio(fused_ms, eager_ms)}, "
          f"memory {common.ratio(fused_mib, eager_mib, 'memory', floor=0.1)}")

* ``--out DIR``: where the files go. Default ``./bench-out/`` (relative to the working
  directory), so that a run never overwrites the committed ``benchmarks/results/``; those
  are replaced only when asked with ``--out benchmarks/results``.
* ``--quick``: tiny shapes and one repetition; seconds, for tests and smoke checks. Its
  numbers say that the script runs, nothing about speed, so ``out_dir`` refuses to write
  them into ``benchmarks/results/``. Each script decides what "tiny" means for it, and
  passes ``isolated=not args.quick`` to ``run_isolated`` (one process for the whole run).
* ``ratio(value, baseline, kind)``: every printed comparison goes through it, so that a
  ratio reads "N x faster/less/smaller" only when N > 1 and "N x slower/more/larger" with
  the inverse otherwise (never "0.4x less").

tests/test_benchmarks.py runs every script listed in its SCRIPTS with ``--quick --out TMP``
and checks the files named there, the ratios' wording and that results/ is untouched.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0), so later peaks are this workload's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mib():
    return _status_kib("VmRSS") / 1024


def peak_rss_mib():
    return _status_kib("VmHWM") / 1024


def measure(fn, device="cpu", warmup=1, reps=5, sync=None):
    """Peak extra memory (MiB) of one call of fn, then the median time (ms) of `reps` calls."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        import gc
        gc.collect()
        reset_peak_rss()
        base = rss_mib()
        fn()
        peak = peak_rss_mib() - base
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return peak, statistics.median(times)


def run_isolated(module, func, kwargs, timeout=900, isolated=True):
    """Run module.func(**kwargs) in a fresh interpreter; it must return a JSON-able dict.

    An exception becomes {"error": its last line}. isolated=False (what --quick passes) calls
    it in this process instead: a fresh interpreter's start-up (importing torch) would be
    most of a smoke run, and its peak-memory figures then also hold what earlier points left.
    """
    if not isolated:
        import importlib
        try:
            return json.loads(json.dumps(getattr(importlib.import_module(module), func)(**kwargs)))
        except Exception as e:  # the same contract as a failed child process
            return {"error": f"{type(e).__name__}: {e}"}
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import {module} as m; print('__RESULT__' + json.dumps(m.{func}(**json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True,
                       text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("__RESULT__"):
            return json.loads(line[len("__RESULT__"):])
    tail = (p.stderr or p.stdout)[-2000:]
    return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {p.returncode}"}


def write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def matmul_gflops(device="cpu", dtype=None, n=1024, d=128, reps=20):
    """What a plain torch.matmul of the kernel's inner shape ([n, d] x [d, n]) reaches."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, d, device=device, dtype=dtype)
    b = torch.randn(d, n, device=device, dtype=dtype)
    # Best of several rounds: this is the machine's attainable rate, not a typical one.
    ms = min(measure(lambda: a @ b, device=device, warmup=3, reps=reps)[1] for _ in range(3))
    return 2 * n * n * d / (ms * 1e-3) / 1e9


def machine():
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return json.dumps(info)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) if missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt


# ============================================================================ command line

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")       # the committed results
DEFAULT_OUT = "bench-out"


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--quick`` and ``--out DIR`` (see the module docstring) to a script's parser."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one repetition: a seconds-long smoke run whose numbers "
                             "mean nothing (for tests)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help=f"folder for the CSV and PNG files (default: ./{DEFAULT_OUT}/; the committed "
                             "results are replaced only with an explicit --out benchmarks/results)")
    return parser


def out_dir(args) -> str:
    """The output folder of a run, created. --quick into benchmarks/results/ is refused (exit 2)."""
    path = os.path.abspath(args.out or DEFAULT_OUT)
    if args.quick and os.path.realpath(path) == os.path.realpath(RESULTS):
        print(f"{os.path.basename(sys.argv[0])}: error: --out {args.out}: --quick numbers are "
              "smoke-test numbers and never replace the committed results; give another folder",
              file=sys.stderr)
        raise SystemExit(2)
    os.makedirs(path, exist_ok=True)
    print(f"output folder: {path}" + ("   (--quick: smoke-test sizes)" if args.quick else ""))
    return path


_WORDS = {"time": ("faster", "slower", "same time"),
          "memory": ("less", "more", "same memory"),
          "size": ("smaller", "larger", "same size")}


def ratio(value, baseline, kind="time", digits=2, floor=1e-12) -> str:
    """How ``value`` compares with ``baseline``, in words; both are lower-is-better quantities.

    kind: "time" (faster / slower), "memory" (less / more) or "size" (smaller / larger).
    The number printed is always >= 1: ``ratio(10, 50)`` is "5.00x faster" and
    ``ratio(50, 10)`` is "5.00x slower"; equal at the shown precision reads "same time".
    ``floor`` clamps both values from below (an RSS delta can read 0 or slightly negative).
    """
    better, worse, same = _WORDS[kind]
    v, b = max(float(value), floor), max(float(baseline), floor)
    n = b / v
    if round(n, digits) == 1.0 or round(1 / n, digits) == 1.0:
        return same
    return f"{n:.{digits}f}x {better}" if n > 1 else f"{1 / n:.{digits}f}x {worse}"
