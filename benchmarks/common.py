"""The one runner every benchmark script shares: command line, timer, memory measurement,
points in fresh processes, CSV writer, plotter, and ratios in words.

Run the scripts as modules from the repository root (no ``sys.path`` edits anywhere)::

    python -m benchmarks.bench_attention_kl --quick --out /tmp/x
    python -m benchmarks.studies.bench_demo_factors --quick --out /tmp/f

The shape of a script (Liger-Kernel's benchmarks): a ``point(...)`` function builds the
inputs of one measurement and returns one CSV row (a dict); ``main`` walks the grid with
``run_point`` (each point in a fresh interpreter), writes the rows with ``write_csv``,
prints the comparisons through ``ratio`` and draws the rows with ``plot_lines``::

    ap = argparse.ArgumentParser(...)
    common.add_sweep_args(ap, "run on CUDA", reps=3)   # --gpu, --lengths, --reps (a sweep over L)
    common.add_common_args(ap)      # --quick and --out DIR
    args = ap.parse_args()
    out = common.out_dir(args)      # the folder to write CSV / PNG files into (created)
    device, dtype, lengths, reps = common.sweep(args, cpu_lengths=[512, 1024], gpu_lengths=[1024, 4096])
    rows = [common.run_point("benchmarks.bench_x", "point", dict(method=m, L=L), label=...,
                             show=lambda r: f"{r['ms']:.2f} ms", isolated=not args.quick)
            for L in lengths for m in methods]
    common.write_csv(os.path.join(out, "x_cpu.csv"), rows)
    common.plot_lines(os.path.join(out, "x_cpu.png"), rows, x="L",
                      panels=[dict(y="ms", title="time (ms)"), dict(y="peak_mib", title="peak (MiB)")])

* ``--out DIR``: where the files go. Default ``./bench-out/`` (relative to the working
  directory), so that a run never overwrites the committed ``benchmarks/results/``; those
  are replaced only when asked with ``--out benchmarks/results``.
* ``--quick``: tiny shapes and one repetition; seconds, for tests and smoke checks. Its
  numbers say that the script runs, nothing about speed, so ``out_dir`` refuses to write
  them into ``benchmarks/results/``. Each script decides what "tiny" means for it, and
  passes ``isolated=not args.quick`` to ``run_point`` / ``run_isolated`` (one process for
  the whole run).

Time (``timings``, ``measure``): every call timed alone after ``warmup`` untimed calls; on
CUDA with events around the call, waited for (the autotuner's own method), on CPU with
``perf_counter``; scripts report the median (or the minimum, on a shared CPU).

Peak memory (``peak_memory``, ``peak_mib``, ``measure``): on CPU, PyTorch's allocator keeps
no peak statistics, so the measurement reads the kernel's resident-set high-water mark:
free heap is handed back to the OS (``malloc_trim``), VmHWM is reset to the current RSS
(writing 5 to ``/proc/self/clear_refs``), the workload runs, and the peak is VmHWM minus
the RSS before it. Large tensors are mmap-backed in glibc, so they show up in RSS when
touched and leave it when freed. Each point runs in a fresh Python process
(``run_isolated``) so that earlier points leave nothing behind. On CUDA the allocator's
``max_memory_allocated`` over the block, minus what was allocated before it.

``ratio(value, baseline, kind)``: every printed comparison goes through it, so that a
ratio reads "N x faster/less/smaller" only when N > 1 and "N x slower/more/larger" with the
inverse otherwise (never "0.4x less").

tests/test_benchmarks.py runs every script listed in its SCRIPTS with ``--quick --out TMP``
and checks the files named there, the ratios' wording and that results/ is untouched.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)                  # the repository root: where `-m benchmarks...` runs
RESULTS = os.path.join(HERE, "results")       # the committed results
DEFAULT_OUT = "bench-out"


# ============================================================================ memory

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


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def peak_memory(device="cpu"):
    """Peak extra memory (MiB) of the ``with`` block, in ``.mib`` of the yielded object
    once the block has ended (see the module docstring for how)."""
    import gc

    res = types.SimpleNamespace(mib=None)
    gc.collect()
    if _is_cuda(device):
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield res
        torch.cuda.synchronize()
        res.mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        _malloc_trim()
        reset_peak_rss()
        base = rss_mib()
        yield res
        res.mib = peak_rss_mib() - base


def peak_mib(fn, device="cpu", warmup=0):
    """Peak extra memory (MiB) of one call of fn, after ``warmup`` calls (which allocate
    .grad buffers and one-time state) and with their results freed."""
    for _ in range(warmup):
        fn()
    with peak_memory(device) as m:
        fn()
    return m.mib


# ============================================================================ time

def time_call(fn, device="cpu"):
    """(wall ms, process CPU ms) of one call of fn; on CUDA the wall time is event-timed and
    waited for, so it covers the device work the call queued."""
    c0 = time.process_time()
    if _is_cuda(device):
        import torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        wall = start.elapsed_time(end)
    else:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
    return wall, (time.process_time() - c0) * 1e3


def timings(fn, device="cpu", warmup=1, reps=5):
    """Wall milliseconds of each of ``reps`` calls of fn, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if _is_cuda(device):
        import torch
        torch.cuda.synchronize()
    return [time_call(fn, device)[0] for _ in range(reps)]


def measure(fn, device="cpu", warmup=1, reps=5):
    """Peak extra memory (MiB) of one call of fn, then the median time (ms) of ``reps`` calls."""
    peak = peak_mib(fn, device)
    return peak, statistics.median(timings(fn, device, warmup, reps))


def matmul_gflops(device="cpu", dtype=None, n=1024, d=128, reps=20):
    """What a plain torch.matmul of the kernel's inner shape ([n, d] x [d, n]) reaches."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, d, device=device, dtype=dtype)
    b = torch.randn(d, n, device=device, dtype=dtype)
    # Best of several rounds: this is the machine's attainable rate, not a typical one.
    ms = min(statistics.median(timings(lambda: a @ b, device, warmup=3, reps=reps)) for _ in range(3))
    return 2 * n * n * d / (ms * 1e-3) / 1e9


def machine():
    import torch

    from seekr_kernels.run.demo import versions
    # The demo's record (library versions, CPU and the ISA ATen dispatches to): what
    # float-rounding-dependent numbers move with.
    info = {**versions(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return json.dumps(info)


# ============================================================================ points

def run_isolated(module, func, kwargs, timeout=900, isolated=True):
    """Run module.func(**kwargs) in a fresh interpreter; it must return a JSON-able value.

    ``module`` is a full module name (``benchmarks.bench_x``); the child finds it under the
    repository root, whatever the working directory. An exception becomes {"error": its
    last line}. isolated=False (what --quick passes) calls it in this process instead: a
    fresh interpreter's start-up (importing torch) would be most of a smoke run, and its
    peak-memory figures then also hold what earlier points left.
    """
    if not isolated:
        import importlib
        try:
            return json.loads(json.dumps(getattr(importlib.import_module(module), func)(**kwargs)))
        except Exception as e:  # the same contract as a failed child process
            return {"error": f"{type(e).__name__}: {e}"}
    code = (f"import json, sys, {module} as m; "
            f"print('__RESULT__' + json.dumps(m.{func}(**json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    p = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True,
                       text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("__RESULT__"):
            return json.loads(line[len("__RESULT__"):])
    tail = (p.stderr or p.stdout)[-2000:]
    return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {p.returncode}"}


def report(row, label, show):
    """Print one point: ``label`` then ``show(row)``, or ``label ERROR <error>``."""
    print(f"{label} ERROR {row['error']}" if "error" in row else f"{label} {show(row)}", flush=True)
    return row


def run_point(module, func, kwargs, *, label, show, ident=None, isolated=True, timeout=900):
    """One point of a grid: ``run_isolated``, the row tagged with ``ident`` (so that an
    error row still says which point it was), printed by ``report``; returns the row."""
    row = run_isolated(module, func, kwargs, timeout=timeout, isolated=isolated)
    if not isinstance(row, dict):
        row = {"value": row}
    row.update(ident or {})
    return report(row, label, show)


# ============================================================================ CSV

def write_csv(path, rows, say=True):
    """Write rows (dicts; columns in order of first appearance) to path, atomically."""
    if os.path.dirname(path):
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
    if say:
        print(f"wrote {path}")
    return path


def _number(v):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def read_csv(path):
    """The rows of a CSV that write_csv wrote, numbers as int / float (for --replot)."""
    with open(path) as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


# ============================================================================ plots

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


def figure(panels, figsize=None):
    """(figure, list of ``panels`` axes side by side), or (None, None) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None, None
    fig, axes = plt.subplots(1, panels, figsize=figsize or (5 * panels, 4), squeeze=False)
    return fig, list(axes[0])


def save(fig, path, suptitle=None):
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    print(f"wrote {path}")


def line_panel(ax, rows, x, y, group="method", where=None, title=None, xlabel=None, ylabel=None,
               floor=None, xlog=2, ylog=True, legend=True):
    """One line per ``group`` value: ``y`` against ``x`` over the rows (those without an
    error, and ``where(row)`` when given), sorted by x; y clamped below at ``floor``."""
    ok = [r for r in rows if not r.get("error") and (where is None or where(r))]
    for g in sorted({r[group] for r in ok}, key=str):
        pts = sorted((float(r[x]), float(r[y])) for r in ok if r[group] == g)
        ax.plot([p[0] for p in pts], [p[1] if floor is None else max(p[1], floor) for p in pts],
                marker="o", label=str(g))
    if xlog:
        ax.set_xscale("log", base=xlog)
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend and ok:
        ax.legend()


def plot_lines(path, rows, x, panels, group="method", xlabel=None, suptitle=None, figsize=None):
    """The benchmark plot: one panel per ``panels`` item (keyword arguments of line_panel:
    y, title, where, floor, ...), each a line per ``group`` value against ``x``."""
    fig, axes = figure(len(panels), figsize)
    if fig is None:
        return
    for ax, p in zip(axes, panels):
        p = dict(p)
        line_panel(ax, rows, x, group=group, xlabel=p.pop("xlabel", xlabel), **p)
    save(fig, path, suptitle)


def bar_panel(ax, labels, series, title=None, ylabel=None, rotation=0, fontsize=7, ylog=True, legend=True):
    """Grouped bars: a group per label, in it one bar per ``series`` item (name -> values)."""
    w = 0.8 / max(1, len(series))
    for j, (name, ys) in enumerate(series.items()):
        ax.bar([i + j * w for i in range(len(labels))], ys, w, label=name)
    ax.set_xticks([i + w * (len(series) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=rotation, ha="right" if rotation else "center", fontsize=fontsize)
    if ylog:
        ax.set_yscale("log")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=7)


# ============================================================================ command line

def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--quick`` and ``--out DIR`` (see the module docstring) to a script's parser."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one repetition: a seconds-long smoke run whose numbers "
                             "mean nothing (for tests)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help=f"folder for the CSV and PNG files (default: ./{DEFAULT_OUT}/; the committed "
                             "results are replaced only with an explicit --out benchmarks/results)")
    return parser


def add_sweep_args(parser: argparse.ArgumentParser, gpu_help: str, reps: int) -> argparse.ArgumentParser:
    """A sweep over sequence lengths: ``--gpu``, ``--lengths`` and ``--reps`` (default ``reps``);
    ``sweep`` reads them back."""
    parser.add_argument("--gpu", action="store_true", help=gpu_help)
    parser.add_argument("--lengths", type=int, nargs="*", default=None,
                        help="sequence lengths L (default: the script's, per device; --quick 128)")
    parser.add_argument("--reps", type=int, default=None, help=f"timed repetitions (default {reps}; --quick 1)")
    parser.set_defaults(_default_reps=reps)
    return parser


def sweep(args, cpu_lengths, gpu_lengths):
    """(device, dtype, lengths, reps) of a sweep: CUDA in bf16 with --gpu, else CPU in fp32;
    --quick: L = 128 and one repetition unless given."""
    device, dtype = ("cuda", "bfloat16") if args.gpu else ("cpu", "float32")
    lengths = args.lengths or ([128] if args.quick else gpu_lengths if args.gpu else cpu_lengths)
    return device, dtype, lengths, args.reps or (1 if args.quick else args._default_reps)


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


# ============================================================================ ratios

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


def time_and_memory(row, base, time="ms", memory="peak_mib", floor=0.1):
    """``time <ratio>, memory <ratio>`` of one row against a baseline row (aligned columns)."""
    return (f"time {ratio(row[time], base[time], floor=1e-3):>14s}, "
            f"memory {ratio(row[memory], base[memory], 'memory', 1, floor=floor):>12s}")
