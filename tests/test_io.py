"""utils.io.atomic_dir: a directory appears whole or not at all."""
import os

import pytest

from seekr_kernels.utils.store import atomic_dir


def _read(d):
    return {f: open(os.path.join(d, f)).read() for f in sorted(os.listdir(d))}


def test_atomic_dir_replaces_on_success(tmp_path):
    final = tmp_path / "task-000"
    with atomic_dir(final) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    assert _read(final) == {"a": "1"}
    with atomic_dir(final) as tmp:
        open(os.path.join(tmp, "b"), "w").write("2")
    assert _read(final) == {"b": "2"}
    assert sorted(os.listdir(tmp_path)) == ["task-000"]   # no temporary or old copies left


def test_atomic_dir_keeps_old_on_error(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        open(os.path.join(tmp, "a"), "w").write("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            open(os.path.join(tmp, "a"), "w").write("half")
            raise RuntimeError("crash mid-write")
    assert _read(final) == {"a": "old"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
