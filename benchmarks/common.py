"""Shared measurement helpers for the benchmark scripts.

Peak memory on CPU: PyTorch's CPU allocator keeps no peak statistics, so each measurement
runs in a fresh Python subprocess that builds its inputs, records its resident set size
(RSS), runs the workload once and reads the kernel's RSS high-water mark (VmHWM). The
difference is the peak extra memory of the workload. Large tensors are mmap-backed in
glibc, so they show up in RSS when touched and leave it when freed. On CUDA the
allocator's own `max_memory_allocated` is used instead.

Time: median of `reps` runs after `warmup` runs (CUDA: synchronised, events).
"""
from __future__ import annotations

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


def run_isolated(module, func, kwargs, timeout=900):
    """Run module.func(**kwargs) in a fresh interpreter; it must return a JSON-able dict."""
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
