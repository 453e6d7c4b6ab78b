"""The TRACE benchmark as TRACE scores it: per-task metrics, the task -> metric table, and the
task orders of the SEEKR paper.

TRACE (Wang et al., 2023) has eight tasks; SEEKR (He et al., EMNLP 2024) reports OP/BWT on
them with TRACE's evaluation scripts, run after greedy generation and one answer-extraction
pass (SEEKR's ``re_eval.py``). This module reproduces that pipeline on one sample at a time:

1. **Answer extraction** (:func:`extract_answer`): full-width colons become ``:``; text
   before ``"\\nReasoning:"`` is kept, or text after ``"\\nAnswer:"`` / ``"\\n回答:"`` /
   ``"\\n答案:"``; whitespace is stripped; an empty answer becomes ``" "``.
2. **The task's metric** (``TRACE_TASKS``):

   ============  ====================  ===========================================
   task          metric                definition
   ============  ====================  ===========================================
   C-STANCE      ``accuracy_choice``   first character of the answer == reference's
   FOMC          ``accuracy_choice``   first character of the answer == reference's
   ScienceQA     ``accuracy_choice``   first character of the answer == reference's
   NumGLUE-cm    ``accuracy_extract``  extracted answer == reference (exact string)
   NumGLUE-ds    ``accuracy_extract``  extracted answer == reference (exact string)
   MeetingBank   ``rouge_l``           ROUGE-L F of the ``rouge`` package
   Py150         ``edit_sim``          fuzzy edit similarity (``fuzz.ratio``), after
                                       replacing Py150's ``<NUM_LIT:..>`` literals
   20Minuten     ``sari``              SARI against the prompt (the source text)
   ============  ====================  ===========================================

   ``trace:<task>`` names the whole pipeline (extraction + the task's metric); the bare
   names are the metrics on the raw strings. ``bleu1`` / ``bleu4`` are TRACE's secondary
   BLEU-n (reported by TRACE for MeetingBank, ScienceQA and 20Minuten, never in its OP/BWT).

**Scale.** Every metric returns a score in [0, 1] for one sample (TRACE's SARI and
``fuzz.ratio`` are 0-100 and are divided by 100, as SEEKR's ``show_results.py`` does before
its table); a task's score is the mean over its samples, an empty prediction or reference
scoring 0 as in TRACE (SARI excepted: TRACE scores every sample). Tables print them x 100,
which is the percent scale of the paper.

**Where this differs from the published scripts**, deliberately and only in corner cases:
``accuracy_choice`` compares the first character of the reference too (the published C-STANCE
and FOMC scripts compare it whole, which agrees on their one-letter answers and can never
score on longer ones); the sentence BLEU behind ``bleu1``/``bleu4`` is sacrebleu's without
smoothing, equal to NLTK's ``sentence_bleu`` except that a zero n-gram precision gives 0
instead of NLTK's ~1e-70.

The metrics need the ``trace`` extra (``pip install 'seekr-kernels[trace]'``: ``rouge``,
``rapidfuzz``, ``sacrebleu``); a metric used without its package raises
:class:`MissingMetricPackage` naming it.
"""
from __future__ import annotations

import importlib
import re
import sys
from collections import Counter
from typing import Optional, Sequence

# ----------------------------------------------------------------------------- packages

#: metric name -> the import name of the package it needs (same as its pip name here).
METRIC_PACKAGES = {"rouge_l": "rouge", "edit_sim": "rapidfuzz", "sari": "sacrebleu",
                   "bleu1": "sacrebleu", "bleu4": "sacrebleu", "bleu": "sacrebleu"}


class MissingMetricPackage(ImportError):
    """A TRACE metric was used without the package that defines it (the message names it)."""


def _package(name: str, metric: str, module: Optional[str] = None):
    """Import ``module`` (default: ``name``) of pip package ``name`` for ``metric``."""
    try:
        return importlib.import_module(module or name)
    except ImportError:
        raise MissingMetricPackage(
            f"metric {metric!r} needs the package {name!r}: pip install {name} "
            "(or pip install 'seekr-kernels[trace]' for every TRACE metric)") from None


def check_packages(metric: str) -> None:
    """Raise :class:`MissingMetricPackage` if a built-in metric's package is not installed."""
    base = metric
    if metric.startswith("trace:"):
        base = TRACE_TASKS[canonical_task(metric[len("trace:"):], strict=True)]
    pkg = METRIC_PACKAGES.get(base)
    if pkg is not None:
        _package(pkg, metric)


# ----------------------------------------------------------------------------- extraction

# SEEKR's re_eval.py: an answer may come with its reasoning after it ("\nReasoning:") or
# before it ("\nAnswer:", and the two Chinese forms used by C-STANCE).
_ANSWER_BEFORE = "\nReasoning:"
_ANSWER_AFTER = ("\nAnswer:", "\n回答:", "\n答案:")


def extract_answer(text: str) -> str:
    """The short answer in a generated text, as SEEKR's ``re_eval.py`` extracts it."""
    text = text.replace("\uff1a", ":")
    if _ANSWER_BEFORE in text:
        text = text.split(_ANSWER_BEFORE)[0]
    else:
        for marker in _ANSWER_AFTER:
            if marker in text:
                text = text.split(marker)[1]   # up to a second marker, if any
                break
    return text.strip() or " "


# ----------------------------------------------------------------------------- metrics

def accuracy_extract(prediction: str, reference: str, prompt: Optional[str] = None) -> float:
    """1 if the extracted answer equals the reference string exactly (NumGLUE)."""
    if not reference:
        return 0.0
    return float(extract_answer(prediction) == reference)


def accuracy_choice(prediction: str, reference: str, prompt: Optional[str] = None) -> float:
    """1 if the extracted answer's first character equals the reference's (a letter choice:
    C-STANCE, FOMC, ScienceQA, whose references may carry an explanation after the letter)."""
    if not reference:
        return 0.0
    return float(extract_answer(prediction)[0] == reference[0])


_ROUGE = None


def rouge_l(prediction: str, reference: str, prompt: Optional[str] = None) -> float:
    """ROUGE-L F of the ``rouge`` package (summary level: sentences split at '.', union LCS
    over the reference's sentences), called as TRACE calls it.

    TRACE passes the reference as the package's hypothesis and the prediction as its
    reference; the union LCS runs over the second argument's sentences, so the order is
    kept. Text the package cannot score (no sentence) scores 0, as in SEEKR's scripts.
    """
    global _ROUGE
    if not prediction or not reference:
        return 0.0
    if _ROUGE is None:
        _ROUGE = _package("rouge", "rouge_l").Rouge(metrics=["rouge-l"])
    # The package rebuilds the LCS recursively (depth ~ words of one sentence pair): a long
    # generation without a '.' must not end a run with RecursionError.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 2 * (len(prediction.split()) + len(reference.split())) + 5000))
    try:
        return float(_ROUGE.get_scores(reference, prediction, avg=True)["rouge-l"]["f"])
    except ValueError:
        return 0.0
    finally:
        sys.setrecursionlimit(limit)


def edit_sim(prediction: str, reference: str, prompt: Optional[str] = None) -> float:
    """TRACE's fuzzy edit similarity: fuzzywuzzy's ``fuzz.ratio`` / 100.

    With python-Levenshtein installed (the published environment does), ``fuzz.ratio`` is
    round(100 x (1 - d / n)), d the insert/delete edit distance and n the summed lengths:
    rapidfuzz's normalised Indel similarity, rounded to whole percent the same way.
    """
    if not prediction or not reference:
        return 0.0
    indel = _package("rapidfuzz", "edit_sim", "rapidfuzz.distance").Indel
    return round(100 * indel.normalized_similarity(prediction, reference)) / 100


_PY150_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def py150_literals(code: str) -> str:
    """Py150's literal placeholders as TRACE evaluates them: ``<NUM_LIT>`` -> ``0``, bare
    ``<STR_LIT>``/``<CHAR_LIT>`` -> nothing, ``<KIND_LIT:value>`` -> ``value``."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in _PY150_LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


_TOK13A = None


def _sari_tokens(text: str) -> list:
    # HF `sari` (the one SEEKR loads): lower-case, sacrebleu's 13a tokenizer, split on " ".
    global _TOK13A
    if _TOK13A is None:
        _TOK13A = _package("sacrebleu", "sari", "sacrebleu.tokenizers.tokenizer_13a").Tokenizer13a()
    return _TOK13A(text.lower()).split(" ")


def _grams(tokens: list, n: int) -> list:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _sari_order(src: list, out: list, refs: list) -> tuple:
    """(keep F1, deletion precision, addition F1) for one n-gram order.

    Source and output counts are scaled by the number of references so they compare with
    the pooled reference counts; an empty denominator counts as a perfect score (0/0 = 1),
    the convention of tensor2tensor / HF ``sari`` that SEEKR's numbers use.
    """
    k = len(refs)
    ref = Counter(g for r in refs for g in r)
    s = Counter({g: c * k for g, c in Counter(src).items()})
    o = Counter({g: c * k for g, c in Counter(out).items()})

    kept = s & o
    kept_good = kept & ref
    kept_possible = s & ref
    keep_p = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(kept_possible.values()) if kept_possible else 1.0

    deleted = s - o
    deleted_good = deleted - ref
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0

    added = set(o) - set(s)
    added_good = added & set(ref)
    addable = set(ref) - set(s)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(addable) if addable else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_score(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI (Xu et al., 2016) of one prediction, in [0, 1]: the mean over n = 1..4 of keep
    F1, deletion precision and addition F1, as HF ``evaluate``'s ``sari`` defines it (with
    its fixed keep recall and 0/0 = 1), divided by 100."""
    if isinstance(references, str) or not references:
        raise ValueError("references: expected a non-empty list of strings")
    src, out = _sari_tokens(source), _sari_tokens(prediction)
    refs = [_sari_tokens(r) for r in references]
    total = 0.0
    for n in range(1, 5):
        total += sum(_sari_order(_grams(src, n), _grams(out, n), [_grams(r, n) for r in refs]))
    return total / 12


def sari(prediction: str, reference: str, prompt: Optional[str] = None) -> float:
    """SARI of a prediction against one reference, the prompt being the source text (TRACE
    passes the whole prompt of 20Minuten as the source)."""
    if prompt is None:
        raise ValueError("metric 'sari' needs the prompt (the source text): call it as "
                         "sari(prediction, reference, prompt=...)")
    return sari_score(prompt, prediction, [reference])


def _bleu_tokens(text: str) -> list:
    # TRACE's BLEU tokenisation: split on whitespace and on '.', drop empty pieces.
    return [t for t in re.split(r"\s|\.", text) if t]


_BLEU = {}


def bleu(prediction: str, reference: str, order: int = 4) -> float:
    """TRACE's sentence BLEU-``order`` in [0, 1] (uniform weights, brevity penalty, no
    smoothing) on TRACE's tokens, computed with sacrebleu."""
    if not prediction or not reference:
        return 0.0
    if order not in _BLEU:
        sb = _package("sacrebleu", f"bleu{order}", "sacrebleu.metrics")
        # corpus_score of one segment: the sentence statistics without sentence_score's
        # effective-order advice; tokenize="none" keeps TRACE's tokens as they are.
        _BLEU[order] = sb.BLEU(max_ngram_order=order, smooth_method="none", tokenize="none")
    hyp, ref = _bleu_tokens(prediction), _bleu_tokens(reference)
    if not hyp:
        return 0.0
    score = _BLEU[order].corpus_score([" ".join(hyp)], [[" ".join(ref)]]).score / 100
    return min(score, 1.0)   # sacrebleu's percent can exceed 100 by an ulp


def bleu1(prediction: str, reference: str, prompt: Optional[str] = None) -> float:
    """TRACE's BLEU-1 (see :func:`bleu`)."""
    return bleu(prediction, reference, 1)


def bleu4(prediction: str, reference: str, prompt: Optional[str] = None) -> float:
    """TRACE's BLEU-4 (see :func:`bleu`)."""
    return bleu(prediction, reference, 4)


#: TRACE's metrics by name; all take ``(prediction, reference, prompt=None)``.
TRACE_METRICS = {"accuracy_extract": accuracy_extract, "accuracy_choice": accuracy_choice,
                 "rouge_l": rouge_l, "edit_sim": edit_sim, "sari": sari,
                 "bleu1": bleu1, "bleu4": bleu4, "bleu": bleu4}

# ----------------------------------------------------------------------------- tasks

#: TRACE task -> the metric of its column in the OP/BWT table (SEEKR's show_results.py).
TRACE_TASKS = {
    "C-STANCE": "accuracy_choice",
    "FOMC": "accuracy_choice",
    "MeetingBank": "rouge_l",
    "Py150": "edit_sim",
    "ScienceQA": "accuracy_choice",
    "NumGLUE-cm": "accuracy_extract",
    "NumGLUE-ds": "accuracy_extract",
    "20Minuten": "sari",
}

#: The SEEKR paper's task orders with their epochs (scripts/exp_seq_seekr.sh, "tracer1" and
#: "tracer2"; the replay baselines use the same).
TRACE_ORDERS = {
    1: (("C-STANCE", 5), ("FOMC", 5), ("MeetingBank", 5), ("Py150", 5), ("ScienceQA", 5),
        ("NumGLUE-cm", 5), ("NumGLUE-ds", 10), ("20Minuten", 5)),
    2: (("NumGLUE-cm", 10), ("NumGLUE-ds", 10), ("FOMC", 10), ("20Minuten", 5), ("C-STANCE", 5),
        ("Py150", 5), ("MeetingBank", 5), ("ScienceQA", 5)),
}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_CANONICAL = {_key(t): t for t in TRACE_TASKS}


def canonical_task(name: Optional[str], strict: bool = False) -> Optional[str]:
    """The TRACE task a name refers to (case and ``-``/``_`` ignored), or None.

    ``strict=True`` raises ``ValueError`` listing the TRACE tasks instead of returning None.
    """
    t = _CANONICAL.get(_key(name)) if name else None
    if t is None and strict:
        raise ValueError(f"unknown TRACE task {name!r} (TRACE tasks: {', '.join(TRACE_TASKS)})")
    return t


def trace_metric(task: str):
    """The whole TRACE scoring of one task: answer extraction, then the task's metric."""
    task = canonical_task(task, strict=True)
    base = TRACE_METRICS[TRACE_TASKS[task]]
    if base in (accuracy_extract, accuracy_choice):   # they extract themselves
        return base

    def metric(prediction: str, reference: str, prompt: Optional[str] = None) -> float:
        answer = extract_answer(prediction)
        if task == "Py150":
            answer, reference = py150_literals(answer), py150_literals(reference)
        return base(answer, reference, prompt=prompt)

    metric.__name__ = f"trace:{task}"
    metric.__doc__ = f"TRACE's {task} score: answer extraction, then {TRACE_TASKS[task]}."
    return metric


def order_tasks(order: int, root: str = "data/TRACE") -> list:
    """The tasks of TRACE order ``order`` as config entries ``{name, path, epochs}``."""
    if order not in TRACE_ORDERS:
        raise ValueError(f"order: TRACE orders are {sorted(TRACE_ORDERS)}, got {order!r}")
    return [{"name": t, "path": f"{root.rstrip('/')}/{t}", "epochs": e} for t, e in TRACE_ORDERS[order]]


def seekr_bwt(matrix) -> float:
    """BWT as SEEKR's ``show_results.py`` prints it: the mean of final - just-learned over
    *all* T tasks (the last contributes 0), i.e. (T-1)/T x the TRACE definition that
    :func:`seekr_kernels.run.metrics.backward_transfer` computes. For comparing with
    the SEEKR paper's BWT column."""
    from .metrics import backward_transfer, _as_matrix
    T = len(_as_matrix(matrix))
    return backward_transfer(matrix) * (T - 1) / T
