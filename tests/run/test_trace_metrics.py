"""TRACE's metrics on hand-made examples with known scores, the task -> metric table, `auto`,
the shipped TRACE configs, and the error when a metric's package is missing."""
import math
import os
import shutil
import sys

import pytest

from seekr_kernels.run import trace_metrics as T
from seekr_kernels.seekr.config import ConfigError
from seekr_kernels.run.config import from_dict, load_config
from seekr_kernels.run.data import write_records
from seekr_kernels.run.evaluate import get_metric, resolve_metric_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, answer", [
    ("A\nReasoning: the text supports it", "A"),          # answer first, reasoning after
    ("6 + 3 = 9, minus 3\nAnswer: 6", "6"),               # reasoning first
    ("理由很多\n答案：B", "B"),                            # full-width colon, Chinese marker
    ("x\nAnswer: 1\nAnswer: 2", "1"),                     # up to a second marker
    ("  hawkish \n", "hawkish"),
    ("", " "), ("\n\n", " "),                             # empty -> " " (never matches)
])
def test_extract_answer(text, answer):
    assert T.extract_answer(text) == answer


def test_accuracy_metrics():
    assert T.accuracy_extract("6 + 3 = 9, minus 3\nAnswer: 6", "6") == 1.0
    assert T.accuracy_extract("6 apples", "6") == 0.0        # exact string after extraction
    assert T.accuracy_extract("6", "") == 0.0                # empty reference scores 0 (TRACE)
    assert T.accuracy_choice("B. hawkish", "B") == 1.0
    assert T.accuracy_choice("A\nReasoning: ...", "A\nBecause the wax ...") == 1.0   # ScienceQA
    assert T.accuracy_choice("C", "B") == 0.0
    assert T.accuracy_choice("", "A") == 0.0


# ----------------------------------------------------------------------------- ROUGE-L

def test_rouge_l_is_the_rouge_package_definition():
    # rouge 1.0.1 counts distinct words: pred {the cat sat on mat}, ref {the cat is on mat},
    # LCS "the cat on the mat" -> distinct {the cat on mat}: P = R = 4/5, F = 0.8 (the plain
    # LCS F1 over tokens would be 5/6).
    assert T.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)
    assert T.rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 / 1.75, abs=1e-7)
    assert T.rouge_l("", "a") == 0.0 and T.rouge_l("a", "") == 0.0
    assert T.rouge_l("...", "a b") == 0.0                    # no sentence: the package raises


def test_rouge_l_keeps_traces_argument_order():
    from rouge import Rouge
    pred, ref = ". d . e c e b b", ". e d e c d d ."         # an asymmetric pair
    f = lambda h, r: Rouge(metrics=["rouge-l"]).get_scores(h, r, avg=True)["rouge-l"]["f"]
    assert f(ref, pred) != pytest.approx(f(pred, ref), abs=0.1)
    assert T.rouge_l(pred, ref) == f(ref, pred)              # TRACE: score_rouge(target, prediction)


def test_rouge_l_long_generation_without_a_period():
    # The package rebuilds the LCS recursively (one frame per matched word): with a low
    # recursion limit it fails on 300 words, the metric must not.
    from rouge import Rouge
    text = " ".join(f"w{i}" for i in range(300))
    limit = sys.getrecursionlimit()
    depth, f = 0, sys._getframe()
    while f is not None:
        depth, f = depth + 1, f.f_back
    sys.setrecursionlimit(depth + 250)
    try:
        with pytest.raises(RecursionError):
            Rouge(metrics=["rouge-l"]).get_scores(text, text)
        assert T.rouge_l(text, text) == pytest.approx(1.0, abs=1e-7)
    finally:
        sys.setrecursionlimit(limit)


# ----------------------------------------------------------------------------- edit similarity

def test_edit_sim():
    # Indel distance d, summed length n: round(100 (1 - d/n)) / 100.
    assert T.edit_sim("abcd", "abce") == 0.75                # d = 2, n = 8
    assert T.edit_sim("kitten", "sitting") == 0.62           # LCS 4: d = 5, n = 13 -> 61.5 -> 62
    # 1 - 46/80 is 0.42500000000000004 in floats, so fuzz.ratio gives 43 (34/80 would give 42).
    assert T.edit_sim("x" * 17 + "y" * 23, "x" * 17 + "z" * 23) == 0.43
    assert T.edit_sim("", "a") == 0.0 and T.edit_sim("same", "same") == 1.0


def test_py150_literals():
    code = "x = <NUM_LIT> + <NUM_LIT:3> ; s = '<STR_LIT:hi>' + '<STR_LIT>' + <CHAR_LIT>"
    assert T.py150_literals(code) == "x = 0 + 3 ; s = 'hi' + '' + "
    py150 = get_metric("trace:Py150")
    assert py150("return <NUM_LIT:1>\n", "return 1") == 1.0  # literals resolved, then stripped


# ----------------------------------------------------------------------------- SARI

SARI_SOURCE = "About 95 species are currently accepted ."
SARI_REFS = ["About 95 species are currently known .", "About 95 species are now accepted .",
             "95 species are now accepted ."]


def test_sari_published_examples():
    # HF `evaluate` sari metric card (the implementation SEEKR's metrics.py loads) and the
    # EASSE README's sentence_sari: {'sari': 26.953601953601954} for this example.
    assert 100 * T.sari_score(SARI_SOURCE, "About 95 you now get in .", SARI_REFS) == \
        pytest.approx(26.953601953601954, abs=1e-12)
    # EASSE writes it without the space before '.': the 13a tokenizer splits it off.
    assert 100 * T.sari_score(SARI_SOURCE.replace(" .", "."), "About 95 you now get in.",
                              [r.replace(" .", ".") for r in SARI_REFS]) == \
        pytest.approx(26.953601953601954, abs=1e-12)


def test_sari_hand_examples():
    # The right edit (b -> c): keep, delete and add are all perfect at every order.
    assert T.sari("a c", "a c", prompt="a b") == 1.0
    # Copying the source "a b" when the reference is "a c":
    #   n=1: keep P = (1/1)/2 (a good, b not), R = 1 -> F 2/3; nothing deleted -> 1;
    #        nothing added but c addable -> add F 0
    #   n=2: keep "a b" not in reference -> F 0; delete 1; add F 0;  n=3,4: all 1 (0/0 = 1)
    #   keep 2/3, delete 1, add 1/2 -> (2/3 + 1 + 1/2) / 3 = 13/18
    assert T.sari("a b", "a c", prompt="a b") == pytest.approx(13 / 18)
    # Same output and reference, but the source is the reference: now "c" was wrongly
    # deleted and "b" wrongly added:
    #   n=1: keep P 1, R 1/2 -> 2/3; delete P 0; add P 0 -> 0;  n=2: keep R 0 -> 0; del 0; add 0
    #   keep 2/3, delete 1/2, add 1/2 -> 5/9
    assert T.sari("a b", "a c", prompt="a c") == pytest.approx(5 / 9)
    assert T.sari("A B", "a c", prompt="a b") == pytest.approx(13 / 18)    # lower-cased
    with pytest.raises(ValueError, match="needs the prompt"):
        T.sari("a b", "a c")
    with pytest.raises(ValueError, match="references"):
        T.sari_score("a", "a", "a")


# ----------------------------------------------------------------------------- BLEU

def test_bleu_hand_examples():
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    assert T.bleu1(hyp, ref) == pytest.approx(5 / 6)         # 'the' clipped to 1
    # p1..p4 = 5/6, 3/5, 2/4, 1/3 -> (1/12)^(1/4)
    assert T.bleu4(hyp, ref) == pytest.approx((1 / 12) ** 0.25)
    assert T.bleu1("the cat", ref) == pytest.approx(math.exp(1 - 6 / 2))   # brevity penalty
    assert T.bleu4("the cat", ref) == 0.0                    # no 3-grams: no smoothing
    assert T.bleu1("a.b", "a b") == 1.0                      # TRACE splits at '.' too
    assert T.bleu1("", ref) == 0.0 and get_metric("bleu") is T.bleu4


# ----------------------------------------------------------------------------- the table

@pytest.mark.parametrize("task, prediction, reference, prompt, score", [
    ("C-STANCE", "B\nReasoning: 反对", "B", None, 1.0),
    ("FOMC", "A. dovish", "A", None, 1.0),
    ("ScienceQA", "C\nBecause ...", "B\nBecause ...", None, 0.0),
    ("NumGLUE-cm", "so\nAnswer: 12", "12", None, 1.0),
    ("NumGLUE-ds", "12.0", "12", None, 0.0),
    ("MeetingBank", "the cat sat on the mat", "the cat is on the mat", None, 0.8),
    ("Py150", "abcd", "abce", None, 0.75),
    ("20Minuten", "a b", "a c", "a b", 13 / 18),
])
def test_each_trace_task_scores_with_its_metric(task, prediction, reference, prompt, score):
    f = get_metric(resolve_metric_name("auto", task))
    assert f(prediction, reference, prompt=prompt) == pytest.approx(score, abs=1e-7)


def test_auto_and_names():
    assert set(T.TRACE_TASKS) == {t for order in T.TRACE_ORDERS.values() for t, _ in order}
    assert resolve_metric_name("auto", "FOMC") == "trace:FOMC"
    assert resolve_metric_name("auto", "numglue_cm") == "trace:NumGLUE-cm"
    assert resolve_metric_name("auto", "reverse") == "exact_match"
    assert resolve_metric_name("rouge_l", "FOMC") == "rouge_l"
    with pytest.raises(ValueError, match="unknown TRACE task 'Nope'.*C-STANCE"):
        get_metric("trace:Nope")
    with pytest.raises(ValueError, match="resolve_metric_name"):
        get_metric("auto")
    tasks = [{"name": "MeetingBank", "path": "x"}, {"name": "other", "path": "y"},
             {"name": "FOMC", "path": "z", "metric": "prefix"}]
    cfg = from_dict({"tasks": tasks})
    assert [t.metric for t in cfg.tasks] == ["trace:MeetingBank", "exact_match", "prefix"]
    with pytest.raises(ConfigError, match=r"tasks\[1\].metric: unknown metric 'bleu9'"):
        from_dict({"tasks": [tasks[0], {"path": "y", "metric": "bleu9"}]})


def test_seekr_bwt():
    m = [[0.8, None], [0.4, 0.9]]                            # BWT = 0.4 - 0.8 over 1 task
    assert T.seekr_bwt(m) == pytest.approx(-0.2)             # show_results: over both tasks


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge", None)          # `import rouge` now fails
    monkeypatch.setattr(T, "_ROUGE", None)
    with pytest.raises(T.MissingMetricPackage, match=r"'rouge'.*seekr-kernels\[trace\]"):
        get_metric("rouge_l")
    with pytest.raises(T.MissingMetricPackage, match="'rouge'"):
        T.rouge_l("a", "a")
    with pytest.raises(ConfigError, match=r"tasks\[0\].metric: metric 'trace:MeetingBank' needs the package 'rouge'"):
        from_dict({"tasks": [{"name": "MeetingBank", "path": "x"}]})


# ----------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("order", [1, 2])
def test_shipped_trace_configs_load(tmp_path, order):
    for name, _ in T.TRACE_ORDERS[order]:                    # a fake TRACE download
        for split in ("train", "eval", "test"):
            write_records(str(tmp_path / "data" / "TRACE" / name / f"{split}.json"),
                          [{"prompt": f"{name} {split} prompt", "answer": "A"}])
    cfg_path = tmp_path / f"trace-order{order}.yaml"
    shutil.copy(os.path.join(ROOT, "examples", f"trace-order{order}.yaml"), cfg_path)
    cfg = load_config(str(cfg_path))
    assert [(t.name, t.epochs) for t in cfg.tasks] == list(T.TRACE_ORDERS[order])
    assert [t.metric for t in cfg.tasks] == [f"trace:{t}" for t, _ in T.TRACE_ORDERS[order]]
    for t in cfg.tasks:                                      # resolved against the config's folder
        assert os.path.samefile(t.path, tmp_path / "data" / "TRACE" / t.name)
    assert (cfg.method, cfg.seed, cfg.train.batch_size, cfg.train.lr, cfg.replay.ratio) == \
        ("seekr", 1234, 128, 1e-5, 0.01)
    assert (cfg.distill.layer_budget, cfg.distill.head_budget, cfg.distill.query_budget) == (24, 128, 0)
    assert not cfg.eval.do_sample
    # The order is the one the helper builds from the table.
    assert [{"name": t.name, "epochs": t.epochs} for t in cfg.tasks] == \
        [{"name": d["name"], "epochs": d["epochs"]} for d in T.order_tasks(order)]
