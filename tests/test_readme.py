"""The README's Python examples run as written."""
import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_examples_run():
    """Each block runs on its own, as a reader copies it (its own imports included)."""
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert len(blocks) >= 2
    seen = {}
    for i, block in enumerate(blocks):
        ns = {}
        exec(compile(block, f"README.md (python block {i + 1})", "exec"), ns)
        seen.update(ns)
    assert torch.isfinite(seen["loss"]).all()
    assert seen["q"].grad is not None and seen["k"].grad is not None


def test_readme_task_format_example_loads(tmp_path):
    """The JSON-lines task example of the README is what the loader reads."""
    from seekr_kernels.run.data import load_task
    blocks = re.findall(r"```jsonl\n(.*?)```", open(README).read(), re.S)
    assert len(blocks) == 1
    p = tmp_path / "reverse.jsonl"
    p.write_text(blocks[0])
    task = load_task(str(p))
    assert task.name == "reverse" and len(task.train) == 2 and len(task.test) == 1 and not task.eval
    assert (task.test[0].prompt, task.test[0].answer) == ("Reverse: dog =", "god")
