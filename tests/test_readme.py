"""The README's Python examples run as written."""
import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert len(blocks) >= 2
    ns = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)
    assert torch.isfinite(ns["loss"]).all()
    assert ns["q"].grad is not None and ns["k"].grad is not None
