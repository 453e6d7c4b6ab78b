"""Fuzz campaign over the ops: hypothesis-drawn specs run in subprocess workers.

Every case is seeded; a worker's native crash is counted (and the campaign goes on). The
test fails on any silently wrong result, wrong error or crash. CI runs a few hundred
cases; ``SEEKR_FUZZ=long`` (or ``SEEKR_FUZZ_CASES=N``) runs thousands. Figures go to
stdout (``-s``) and, with ``SEEKR_FUZZ_REPORT=file``, to a JSON-lines file.
"""
import pytest
from hypothesis import strategies as st

import fuzzlib

# (label, strategy, CI cases, long cases, seed): split so that pytest-xdist spreads them.
CAMPAIGNS = [
    ("attention-triton", lambda: fuzzlib.attention_specs(st, backends=("triton",)), 90, 1200, 11),
    ("attention-cpu-torch", lambda: fuzzlib.attention_specs(st, backends=("cpu", "torch")), 150, 1800, 12),
    ("logits", lambda: fuzzlib.logits_specs(st), 120, 1200, 13),
    ("linear", lambda: fuzzlib.linear_specs(st), 80, 800, 14),
]


@pytest.mark.parametrize("label,strategy,ci,long,seed", CAMPAIGNS, ids=[c[0] for c in CAMPAIGNS])
def test_fuzz_ops(label, strategy, ci, long, seed):
    specs = fuzzlib.draw_specs(strategy(), fuzzlib.n_cases(ci, long), seed)
    counts, failures = fuzzlib.run_campaign(specs, label=label)
    fuzzlib.assert_clean(label, counts, failures)
