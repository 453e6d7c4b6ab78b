"""The real-model benchmark scripts run end to end with ``--quick --out DIR`` (as
tests/test_benchmarks.py does for the others): they write their CSV (and PNG) there, report
no error, and leave the committed results alone. Their numbers mean nothing at this size.
"""
import csv
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(BENCH, "results")


def _digest():
    out = {}
    for f in sorted(os.listdir(RESULTS)):
        with open(os.path.join(RESULTS, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _run(script, out, *extra, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    module = "benchmarks." + script[:-len(".py")]          # run as the README says: python -m benchmarks.<name>
    p = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=1500, cwd=cwd)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_teacher_quality_quick(smollm2_dir, tmp_path):
    before = _digest()
    stdout = _run("bench_real_teacher_quality.py", tmp_path / "out", cwd=tmp_path)
    rows = _rows(tmp_path / "out" / "real_topk_quality.csv")
    assert {r["teacher"] for r in rows} == {"topk", "sampled", "sampled mean"}
    assert {r["k"] for r in rows} == {"32", "256"} and "x smaller" in stdout
    assert _digest() == before and not (tmp_path / "bench-out").exists()


def test_continual_quick(smollm2_dir, tmp_path):
    before = _digest()
    stdout = _run("bench_real_continual.py", tmp_path / "out", "--methods", "seekr-1%", cwd=tmp_path)
    rows = _rows(tmp_path / "out" / "real_continual.csv")
    assert [r["method"] for r in rows] == ["base", "seekr-1%"], stdout
    assert all(not r.get("error") for r in rows), [r.get("error") for r in rows]
    for r in rows[1:]:
        assert r["OP"] and r["BWT"] and float(r["wall_s"]) > 0 and float(r["peak_rss_mib"]) > 0
        assert float(r["general_kl"]) >= 0
    assert "base model" in stdout and "ERROR" not in stdout
    assert (tmp_path / "out" / "real_continual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _digest() == before and not (tmp_path / "bench-out").exists()
