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
    split = [float(rows[1][f"time_{k}_s"]) for k in ("train", "replay", "passes", "eval", "save")]
    assert split[0] > 0 and split[2] > 0 and sum(split) <= float(rows[1]["wall_s"]), split
    assert "| seekr-1% | 1 |" in stdout          # the summary table


def test_continual_combine(tmp_path):
    """--combine joins the CSVs of harnesses run on disjoint methods: one base row, every
    run row, and the summary's ratios against sft."""
    sys.path.insert(0, ROOT)
    from benchmarks import bench_real_continual as b
    from benchmarks import common
    split = {f"time_{k}_s": 1.0 for k in ("train", "replay", "passes", "eval", "save")}
    for d, m, cpu in (("a", "sft", 100.0), ("b", "seekr-1%", 120.0)):
        rows = [{"method": "base", "seed": "", "OP": ""}] + [
            {"method": m, "seed": s, "OP": 0.5 + s / 100, "BWT": -0.1, "general": 0.9, "general_kl": 0.01,
             "wall_s": cpu, "cpu_s": cpu, **split} for s in (0, 1)]
        common.write_csv(str(tmp_path / d / "real_continual.csv"), rows, say=False)
    assert b.main(["--combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    rows = _rows(tmp_path / "c" / "real_continual.csv")
    assert [r["method"] for r in rows] == ["base", "sft", "sft", "seekr-1%", "seekr-1%"]
    table = b.summary(common.read_csv(str(tmp_path / "c" / "real_continual.csv")))
    assert "| seekr-1% | 2 | 50.5 [50.0, 51.0] |" in table and "120 (1.20)" in table, table


def test_llama_step_real(smollm2_dir, tmp_path):
    """bench_llama_step --real runs the real model's replay step, the patched and the
    published way, on the same distillation problem. The losses differ by the published
    log(p + 1e-8) alone (the patched step takes the exact log): on a real model's sharp
    heads some student probabilities fall far below 1e-8, where the clipped log is larger,
    so the published KL is the smaller one, by a little (1.6% here; the exact equality of
    the two formulas with the same log is tests/real/test_real_attention.py's)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_llama_step", "--real", "--lengths", "32", "--reps",
                        "1", "--queries", "8", "--methods", "patched", "published", "--one-step", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=1500, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = {r["method"]: r for r in _rows(tmp_path / "llama_step_cpu_real.csv")}
    assert set(rows) == {"patched", "published"} and all(not r.get("error") for r in rows.values())
    assert rows["patched"]["model"] == "SmolLM2-135M-Instruct" and rows["patched"]["kernel"] == "cpu"
    a, b = float(rows["patched"]["attn_loss"]), float(rows["published"]["attn_loss"])
    assert a > 0.1 and 0.9 * a < b <= a * (1 + 1e-5), (a, b)
    assert "33 heads on" in p.stdout and all(float(r["ms"]) > 0 for r in rows.values())


def test_continual_variants_parse_and_set_dotted_keys():
    """--variant LABEL:KEY=VALUE,... sets dotted config keys (YAML values) in every run's
    config; a malformed one is an argparse error naming it."""
    import argparse

    import pytest
    sys.path.insert(0, ROOT)
    from benchmarks import bench_real_continual as b
    label, sets = b.parse_variant("cyc:replay.cycle=1,distill.attn_weight=100.0,preset=official")
    assert label == "cyc" and sets == {"replay.cycle": 1, "distill.attn_weight": 100.0, "preset": "official"}
    c = b.apply_sets({"replay": {"ratio": 0.01}}, sets)
    assert c == {"replay": {"ratio": 0.01, "cycle": 1}, "distill": {"attn_weight": 100.0}, "preset": "official"}
    for bad in ("nolabel", ":a=1", "x:", "x:a", "x:=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--variant"):
            b.parse_variant(bad)
