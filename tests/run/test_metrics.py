"""OP / BWT on hand-made accuracy matrices, JSON and heatmap outputs, evaluation metrics."""
import json
import math

import pytest

from seekr_kernels.run import metrics as M
from seekr_kernels.run.evaluate import exact_match, get_metric, rouge_l

# Rows: after task i; columns: task j.
MATRIX = [
    [0.80, None, None],
    [0.60, 0.90, None],
    [0.50, 0.70, 0.95],
]


def test_op_bwt_by_hand():
    # OP = (0.50 + 0.70 + 0.95) / 3; BWT = ((0.50 - 0.80) + (0.70 - 0.90)) / 2
    assert math.isclose(M.overall_performance(MATRIX), 2.15 / 3)
    assert math.isclose(M.backward_transfer(MATRIX), -0.25)
    s = M.summarize(MATRIX)
    assert s["matrix"][0][1] is None and math.isclose(s["BWT"], -0.25)


def test_no_forgetting_and_single_task():
    perfect = [[1.0, None], [1.0, 1.0]]
    assert M.backward_transfer(perfect) == 0.0 and M.overall_performance(perfect) == 1.0
    assert M.backward_transfer([[0.3]]) == 0.0 and M.overall_performance([[0.3]]) == 0.3
    # Upper-triangle values (forward transfer) do not enter OP/BWT of earlier tasks.
    assert M.backward_transfer([[0.5, 0.2], [0.7, 0.9]]) == pytest.approx(0.2)


def test_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        M.overall_performance([[1.0, None]])
    with pytest.raises(ValueError, match=r"\[1\]\[0\]"):
        M.backward_transfer([[1.0, None], [None, 1.0]])
    with pytest.raises(ValueError, match="empty"):
        M.overall_performance([])


def test_partial_matrix():
    assert M.partial_matrix([[0.5], [0.4, 0.6]], 3) == [[0.5, None, None], [0.4, 0.6, None], [None] * 3]


def test_json_and_heatmap(tmp_path):
    p = tmp_path / "r" / "results.json"
    M.write_json(str(p), {"methods": {"x": M.summarize(MATRIX)}})
    d = json.loads(p.read_text())
    assert d["methods"]["x"]["matrix"][2][2] == 0.95
    png = M.plot_heatmap(MATRIX, str(tmp_path / "h.png"), ["a", "b", "c"], title="t")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [x for x in tmp_path.iterdir() if ".tmp" in x.name]


def test_table():
    txt = M.format_table({"sft": {"OP": 0.25, "BWT": -0.5}, "seekr-1%": {"OP": 0.9, "BWT": -0.01}})
    assert "seekr-1%" in txt and "-50.0%" in txt and "90.0%" in txt


def test_eval_metrics():
    assert exact_match(" abc\n", "abc") == 1.0 and exact_match("abd", "abc") == 0.0
    assert get_metric("prefix")("A. dovish", "A") == 1.0
    assert get_metric("contains")("it is B", "B") == 1.0
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 1.0 * 0.75 / 1.75, abs=1e-7)  # rouge package: F1 + 1e-8
    f = get_metric("math:isclose")
    assert callable(f)
    with pytest.raises(ValueError, match="unknown metric"):
        get_metric("bleu9")
    with pytest.raises(ValueError, match="cannot load"):
        get_metric("no_such_module_xyz:f")
