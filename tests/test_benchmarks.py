"""Every benchmark script runs end to end with ``python -m benchmarks.<script> --quick --out
DIR``: it writes its CSV and PNG files there, prints ratios worded by common.ratio, and
leaves the committed results alone.

The numbers of a --quick run mean nothing (tiny shapes, one repetition); the scripts' real
runs are documented in benchmarks/results/README.md.
"""
import argparse
import csv
import hashlib
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if ROOT not in sys.path:        # a plain `pytest` (not `python -m pytest` from the root) lacks it
    sys.path.insert(0, ROOT)
from benchmarks import common  # noqa: E402

# module -> files it must write (CPU run)
SCRIPTS = {
    "benchmarks.bench_attention_kl": ["attention_kl_cpu.csv", "attention_kl_cpu.png"],
    "benchmarks.bench_importance": ["importance_cpu.csv", "importance_host.csv", "importance_cpu.png"],
    "benchmarks.bench_llama_step": ["llama_step_cpu.csv", "llama_step_cpu.png"],
    "benchmarks.bench_logits_kl": ["linear_logits_kl_cpu.csv", "linear_logits_kl_cpu.png"],
    "benchmarks.bench_teacher": ["teacher_capture.csv", "teacher_cache_bytes.csv", "teacher_topk_quality.csv",
                                 "teacher.png"],
}
# module -> why its --quick run is not part of the suite (each is imported below instead)
NOT_RUN = {
    "benchmarks.bench_autotune": "--quick runs the Triton interpreter on one point: ~6 s of CPU",
    "benchmarks.studies.bench_deviations": "trains the demo stream: ~12 s of CPU with --quick --stats",
    "benchmarks.studies.bench_demo_factors": "trains four demo runs in worker processes: ~15 s of CPU",
    "benchmarks.studies.bench_logits_positions": "trains the smoke run, each replay step twice: ~5 s of CPU",
    # the real-model scripts' --quick runs are in tests/real/test_real_benchmarks.py (they need the model)
    "benchmarks.bench_real_teacher_quality": "needs the SmolLM2 folder: tests/real runs its --quick",
    "benchmarks.bench_real_continual": "needs the SmolLM2 folder: tests/real runs its --quick",
}
RATIO = re.compile(r"(\d+(?:\.\d+)?)x (faster|slower|less|more|smaller|larger)\b")


def _results_digest():
    h = {}
    for f in sorted(os.listdir(common.RESULTS)):
        with open(os.path.join(common.RESULTS, f), "rb") as fh:
            h[f] = hashlib.sha256(fh.read()).hexdigest()
    return h


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_run_writes_csv_png_and_ratios(script, tmp_path):
    before = _results_digest()
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)            # as a user runs it: real backends on CPU
    # One torch thread: the test runs beside other pytest workers, where a second spinning
    # OpenMP thread only slows a run of tiny shapes down.
    env["OMP_NUM_THREADS"] = "1"
    # Run as a module, as documented; the working directory stays elsewhere so that a write
    # to the default ./bench-out/ would show.
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    p = subprocess.run([sys.executable, "-m", script, "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "ERROR" not in p.stdout and "failed" not in p.stdout, log[-4000:]
    for name in SCRIPTS[script]:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{script} did not write {name}\n{log[-3000:]}"
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        else:
            with open(path) as f:
                rows = list(csv.DictReader(f))
            assert rows, f"{name} has no rows"
            assert not [r for r in rows if r.get("error")], f"{name}: {[r['error'] for r in rows if r.get('error')]}"
    ratios = RATIO.findall(p.stdout)
    assert ratios, f"{script} printed no ratio\n{p.stdout[-3000:]}"
    assert all(float(n) >= 1 for n, _ in ratios), [r for r in ratios if float(r[0]) < 1]
    assert not re.search(r"\bx\d", p.stdout), "an unworded 'xN' ratio is left"
    assert _results_digest() == before, "benchmarks/results/ changed"
    assert not os.path.exists(tmp_path / common.DEFAULT_OUT), "wrote to the default folder despite --out"


@pytest.mark.parametrize("value,baseline,kind,text", [
    (10, 50, "time", "5.00x faster"),
    (50, 10, "time", "5.00x slower"),
    (1, 4, "memory", "4.00x less"),
    (4, 1, "memory", "4.00x more"),
    (2, 5, "size", "2.50x smaller"),
    (5, 2, "size", "2.50x larger"),
    (3, 3, "time", "same time"),
    (1.0001, 1, "memory", "same memory"),
    (0, 0.2, "memory", "2.00x less"),        # 0 clamped to the floor 0.1 below
])
def test_ratio_wording(value, baseline, kind, text):
    floor = 0.1 if value == 0 else 1e-12
    assert common.ratio(value, baseline, kind, floor=floor) == text


def test_ratio_rejects_unknown_kind():
    with pytest.raises(KeyError):
        common.ratio(1, 2, "speed")


@pytest.mark.parametrize("isolated", [True, False])
def test_run_isolated_result_and_error(isolated):
    # --quick calls the points in-process; both ways must answer alike.
    r = common.run_isolated("benchmarks.common", "_status_kib", {"field": "VmRSS"}, isolated=isolated)
    assert isinstance(r, int) and r > 0
    r = common.run_isolated("benchmarks.common", "_status_kib", {"field": "NoSuchField"}, isolated=isolated)
    assert r == {"error": "RuntimeError: NoSuchField not in /proc/self/status"}


def test_out_dir_default_and_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ap = common.add_common_args(argparse.ArgumentParser())
    assert common.out_dir(ap.parse_args([])) == str(tmp_path / common.DEFAULT_OUT)
    assert (tmp_path / common.DEFAULT_OUT).is_dir()
    assert common.out_dir(ap.parse_args(["--out", "x/y"])) == str(tmp_path / "x" / "y")
    # The committed results only on request, and never with smoke-test numbers.
    assert common.out_dir(ap.parse_args(["--out", common.RESULTS])) == common.RESULTS
    with pytest.raises(SystemExit) as e:
        common.out_dir(ap.parse_args(["--quick", "--out", common.RESULTS]))
    assert e.value.code == 2
    assert "never replace the committed results" in capsys.readouterr().err


def _modules():
    pkgs = [("benchmarks", BENCH), ("benchmarks.studies", os.path.join(BENCH, "studies"))]
    return {f"{pkg}.{m.name}" for pkg, path in pkgs for m in pkgutil.iter_modules([path]) if not m.ispkg}


def test_layout_every_script_accounted_for_and_importable():
    # Every script is smoke-run above or says why not; all import as modules of the
    # benchmarks package (a rename in seekr_kernels that breaks one shows here).
    scripts = _modules() - {"benchmarks.common"}
    assert scripts == set(SCRIPTS) | set(NOT_RUN)
    assert not set(SCRIPTS) & set(NOT_RUN)
    for name in sorted(NOT_RUN):
        assert callable(importlib.import_module(name).main), name


def test_no_sys_path_edits_and_no_tooling_in_benchmarks():
    for dirpath, _, files in os.walk(BENCH):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f)) as fh:
                    assert not re.search(r"sys\.path\s*(\.\w+\(|\[|=)", fh.read()), os.path.join(dirpath, f)
    # Build tooling lives in scripts/, not among the benchmarks.
    assert not {"gpu_compile_check.py", "gpu_check.sh"} & set(os.listdir(BENCH))
    assert os.path.isfile(os.path.join(ROOT, "scripts", "gpu_compile_check.py"))
    assert os.path.isfile(os.path.join(ROOT, "scripts", "gpu_check.sh"))


def test_timer_and_peak_memory():
    calls = []
    ms = common.timings(lambda: calls.append(1), "cpu", warmup=2, reps=3)
    assert len(ms) == 3 and len(calls) == 5 and all(t >= 0 for t in ms)
    wall, cpu = common.time_call(lambda: sum(range(10**5)), "cpu")
    assert wall > 0 and cpu >= 0
    import torch
    n = 64 * 2**20 // 4                   # a 64 MiB tensor, touched, shows in the peak
    peak = common.peak_mib(lambda: torch.ones(n), "cpu")
    assert 48 < peak < 256, peak


def test_csv_round_trip(tmp_path, capsys):
    rows = [{"method": "a", "L": 128, "ms": 1.5}, {"method": "b", "L": 128, "ms": 3.0, "note": "x"},
            {"method": "a", "L": 256, "ms": 2.5, "error": ""}]
    path = common.write_csv(str(tmp_path / "r.csv"), rows)
    assert f"wrote {path}" in capsys.readouterr().out
    back = common.read_csv(path)
    assert [r["L"] for r in back] == [128, 128, 256] and back[0]["ms"] == 1.5 and back[1]["note"] == "x"
    assert back[0]["note"] == "" and back[2]["error"] == ""


def test_sweep_defaults():
    ap = common.add_common_args(common.add_sweep_args(argparse.ArgumentParser(), "CUDA", reps=7))
    assert common.sweep(ap.parse_args([]), [1], [2]) == ("cpu", "float32", [1], 7)
    assert common.sweep(ap.parse_args(["--gpu"]), [1], [2]) == ("cuda", "bfloat16", [2], 7)
    assert common.sweep(ap.parse_args(["--quick"]), [1], [2]) == ("cpu", "float32", [128], 1)
    assert common.sweep(ap.parse_args(["--quick", "--lengths", "64", "--reps", "2"]), [1], [2]) == \
        ("cpu", "float32", [64], 2)
