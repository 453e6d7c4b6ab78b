"""`seekr demo` over several seeds: per-seed and summary results, the printed table, the
README's demo table in the printed format, and the helpers' arithmetic."""
import json
import os
import re

import pytest

from seekr_kernels.cli import main
from seekr_kernels.run import demo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ["sft", "replay-1%", "replay-10%", "seekr-1%"]
# One row of the table the demo prints: OP and BWT as mean [min, max] in percent.
ROW = re.compile(r"^\| (\S+) \| (\d+\.\d)% \[(\d+\.\d), (\d+\.\d)\] \| ([+-]\d+\.\d)% \[([+-]\d+\.\d), ([+-]\d+\.\d)\] \|$")


def _table(lines):
    """The rows of the demo table that follows TABLE_HEADER in ``lines``."""
    i = lines.index(demo.TABLE_HEADER)
    assert lines[i + 1] == "| --- | --- | --- |"
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


def test_quick_demo_over_two_seeds_in_two_processes(tmp_path, capsys):
    """Two seeds x two methods in two worker processes (the other two methods run the same
    code as these: sft's loop and seekr's replay)."""
    out = tmp_path / "demo"
    methods = ["sft", "seekr-1%"]
    assert main(["demo", "--quick", "--seeds", "2", "--jobs", "2", "--methods", *methods,
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and list(res["methods"]) == methods and res["jobs"] == 2
    assert set(res["versions"]) >= {"torch", "transformers", "triton", "python", "cpu"}
    assert res["cpu_seconds"] > 0 and 0 < res["idle_seconds_estimate"] <= res["cpu_seconds"]
    for seed in (0, 1):
        per = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert per["seed"] == seed and list(per["methods"]) == methods
        assert per["methods"] == res["per_seed"][str(seed)]
        assert (out / "data" / f"seed-{seed}" / "rev" / "train.json").is_file()
    for n in methods:
        runs = [res["per_seed"][str(s)][n] for s in (0, 1)]
        for key in ("OP", "BWT"):
            vals = [r[key] for r in runs]
            st = res["methods"][n][key]
            assert st["min"] == min(vals) and st["max"] == max(vals)
            assert st["mean"] == pytest.approx(sum(vals) / 2)
        m = res["methods"][n]["matrix"]
        assert len(m) == 3 and m[0][1] is None
        assert m[2][0] == pytest.approx((runs[0]["matrix"][2][0] + runs[1]["matrix"][2][0]) / 2)
        png = f"heatmap-{n.replace('%', 'pct')}.png"
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert (out / "seed-0" / png).is_file() and (out / "seed-1" / png).is_file()
    # the printed table is exactly the summary's, one row per method in the format below
    rows = _table(text.splitlines())
    assert "\n".join([demo.TABLE_HEADER, "| --- | --- | --- |"] + rows) == demo.format_summary_table(res["methods"])
    assert len(rows) == len(methods)
    for n, row in zip(methods, rows):
        g = ROW.match(row)
        assert g and g.group(1) == n, row
        assert float(g.group(2)) == pytest.approx(100 * res["methods"][n]["OP"]["mean"], abs=0.051)
    assert "seekr-1% vs sft: higher OP on" in text
    assert demo.format_versions(res["versions"]) in text


def test_readme_demo_table_has_the_printed_format():
    """README numbers are pasted from a demo run: the table must be the one the demo prints
    (same header, every method, mean [min, max] per column) under the versions it was taken
    with. (The numbers themselves depend on the library versions and the CPU's kernels.)"""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = _table(lines)
    got = []
    for row in rows:
        g = ROW.match(row)
        assert g, f"README demo table row not in the demo's format: {row!r}"
        op, op_lo, op_hi, bwt, bwt_lo, bwt_hi = map(float, g.groups()[1:])
        assert op_lo <= op <= op_hi and bwt_lo <= bwt <= bwt_hi, row
        got.append(g.group(1))
    assert got == NAMES
    i = lines.index(demo.TABLE_HEADER)
    before = " ".join(lines[max(0, i - 6):i])
    for lib in ("torch", "transformers", "triton", "python"):
        assert re.search(lib + r" \d", before), f"README demo table: no {lib} version above it"


#: The three recorded runs of `seekr demo` (defaults: 3 seeds, 4 methods), same versions, three
#: CPU kernel sets (benchmarks/results/README.md names the settings and machines). README's
#: table is the first one's; README also shows the others'.
RECORDED = ("demo_results.json", "demo_results_kernels_default.json", "demo_results_avx512.json")


def _recorded(name):
    with open(os.path.join(ROOT, "benchmarks", "results", name), encoding="utf-8") as f:
        return json.load(f)


def _pins():
    """{name: version} of the NAME==VERSION lines of scripts/constraints.txt."""
    pins = {}
    with open(os.path.join(ROOT, "scripts", "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, sep, version = line.partition("==")
                assert sep and version, f"scripts/constraints.txt: not NAME==VERSION: {line!r}"
                pins[name.strip().lower()] = version.strip()
    return pins


def test_readme_demo_table_is_the_recorded_run():
    """The README's table is, line for line, what `seekr demo` printed for the run recorded
    in benchmarks/results/demo_results.json, and names that run's library versions; the
    other recorded runs' tables are in the README too."""
    res = _recorded(RECORDED[0])
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert res["seeds"] == [0, 1, 2] and not res["quick"] and list(res["methods"]) == NAMES
    assert demo.format_summary_table(res["methods"]) in readme
    v = res["versions"]
    assert f"torch {v['torch']}, transformers {v['transformers']}, triton {v['triton']}, python {v['python']}" in readme
    # the table the test above reads is the first one in the README
    assert readme.index(demo.format_summary_table(res["methods"])) == readme.index(demo.TABLE_HEADER)
    for name in RECORDED[1:]:
        other = _recorded(name)
        assert demo.format_summary_table(other["methods"]).split("\n", 2)[2] in readme, name


def test_recorded_demo_runs_use_the_pinned_versions_and_the_demo_settings():
    """Every recorded run was taken with the versions scripts/constraints.txt pins (the ones
    scripts/setup.sh installs), the same python and the demo's current settings, each on its
    own CPU kernel set."""
    pins = _pins()
    assert {"torch", "transformers"} <= set(pins)
    runs = [_recorded(n) for n in RECORDED]
    for res in runs:
        v = res["versions"]
        assert v["torch"].split("+")[0] == pins["torch"] and v["transformers"] == pins["transformers"], v
        assert res["seeds"] == [0, 1, 2] and not res["quick"] and list(res["methods"]) == NAMES
        assert res["settings"] == json.loads(json.dumps({k: x for k, x in demo.FULL.items() if k != "tasks"}))
        assert res["tasks"] == list(demo.FULL["tasks"])
    same = lambda v: {k: x for k, x in v.items() if k != "cpu_capability"}
    assert all(same(r["versions"]) == same(runs[0]["versions"]) for r in runs)
    assert len({r["versions"]["cpu_capability"] for r in runs}) == len(runs)
    with open(os.path.join(ROOT, "scripts", "setup.sh"), encoding="utf-8") as f:
        setup = f.read()
    assert "scripts/constraints.txt" in setup and "-c .venv/seekr-constraints.txt" in setup


def test_readme_demo_claims_hold_on_every_recorded_run():
    """README's claims about the demo, on the recorded runs: what it says holds on every
    seed holds on every seed of each, and its counts over the 9 runs of a seed are these."""
    runs = [_recorded(n)["per_seed"] for n in RECORDED]
    seeds = [r for per_seed in runs for r in per_seed.values()]
    assert len(seeds) == 9
    for r in seeds:
        for key in ("OP", "BWT"):
            assert r["seekr-1%"][key] > r["sft"][key], (key, r)
            assert r["replay-10%"][key] > r["replay-1%"][key] and r["replay-10%"][key] > r["sft"][key], (key, r)
        # "sequential fine-tuning keeps little more than the last task (OP 22-26%, BWT -94% or lower)"
        assert 0.22 <= r["sft"]["OP"] <= 0.26 and r["sft"]["BWT"] <= -0.94
    # "SEEKR-1% beats replay-1% on the mean of every table and on 8 of the 9 runs of a seed,
    # OP and BWT"; "SEEKR-1% leads [replay-10%] on 2 of the 9"
    for per_seed in runs:
        mean = lambda n: sum(per_seed[s][n]["OP"] for s in per_seed) / len(per_seed)
        assert mean("seekr-1%") > mean("replay-1%")
    for key in ("OP", "BWT"):
        assert sum(r["seekr-1%"][key] > r["replay-1%"][key] for r in seeds) == 8, key
    assert sum(r["seekr-1%"]["OP"] > r["replay-10%"]["OP"] for r in seeds) == 2


def test_spread_makespan_and_seed_wins():
    s = demo.spread([0.2, 0.5, 0.8])
    assert s["mean"] == pytest.approx(0.5) and (s["min"], s["max"], s["n"]) == (0.2, 0.8, 3)
    assert s["std"] == pytest.approx(0.3)
    assert demo.spread([0.4])["std"] == 0.0
    # two workers, each takes the next job when free: [5], [3, 2, 2] -> 7
    assert demo.makespan([5, 3, 2, 2], 2) == 7
    assert demo.makespan([5, 3, 2, 2], 1) == 12
    per = {0: {"a": {"OP": 0.5}, "b": {"OP": 0.4}}, 1: {"a": {"OP": 0.3}, "b": {"OP": 0.3}}}
    assert demo.seed_wins(per, "a", "b") == 1 and demo.seed_wins(per, "b", "a") == 0
    one = demo.format_summary_table({"sft": {"OP": demo.spread([0.25]), "BWT": demo.spread([-0.5])}})
    assert one.splitlines()[-1] == "| sft | 25.0% | -50.0% |"
    two = demo.format_summary_table({"sft": {"OP": demo.spread([0.25, 0.5]), "BWT": demo.spread([-0.5, 0.0])}})
    assert ROW.match(two.splitlines()[-1])


def test_bad_seeds_and_jobs_are_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="seeds: a seed appears twice"):
        demo.run_demo(str(tmp_path), quick=True, seeds=[1, 1])
    with pytest.raises(ValueError, match="seeds: need at least 1"):
        demo.run_demo(str(tmp_path), quick=True, seeds=0)
    with pytest.raises(ValueError, match="jobs: must be >= 1"):
        demo.run_demo(str(tmp_path), quick=True, jobs=0)
    with pytest.raises(ValueError, match="methods: unknown demo method"):
        demo.run_demo(str(tmp_path), quick=True, methods=["replay-5%"])
    assert main(["demo", "--quick", "--seed-list", "2", "2", "--out", str(tmp_path)]) == 2
    assert "--seed-list: a seed appears twice" in capsys.readouterr().err
    for bad in (["--seeds", "0"], ["--jobs", "0"], ["--seeds", "2", "--seed-list", "1"]):
        with pytest.raises(SystemExit) as e:
            main(["demo", "--quick", *bad])
        assert e.value.code == 2


def test_a_failed_run_in_a_worker_raises_here(tmp_path):
    """An error in a worker process reaches the caller (and nothing hangs)."""
    from seekr_kernels.seekr.config import ConfigError
    cfg = demo.demo_config("sft", 0.01, str(tmp_path / "run"), str(tmp_path / "data"), demo.QUICK, 0)
    cfg["train"]["lr"] = -1.0
    with pytest.raises(ConfigError, match="train.lr"):
        demo.run_configs({"bad": cfg}, jobs=2)
