"""Fuzz campaign over damaged teacher caches and replay memories (flipped bits, truncation,
edited JSON, deleted or swapped files): each must be refused with TeacherCacheError /
ReplayMemoryError (FileNotFoundError for a deleted cache) or load exactly what was saved."""
from hypothesis import strategies as st

import fuzzlib


def test_fuzz_damaged_files():
    specs = fuzzlib.draw_specs(fuzzlib.file_specs(st), fuzzlib.n_cases(80, 1000), 21)
    counts, failures = fuzzlib.run_campaign(specs, label="files")
    fuzzlib.assert_clean("files", counts, failures)
