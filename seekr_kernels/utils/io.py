"""Atomic file writes: a reader sees either the old file or the complete new one.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file
in the *same directory* as the target (so the final ``os.replace`` is a rename within one
file system, which POSIX makes atomic), flushed and fsync'ed, then renamed over the
target, and the directory is fsync'ed so the rename itself survives a power loss. If the
writer raises, the temporary file is removed and the target is left untouched. A process
killed mid-write can leave a ``.<name>.tmp-*`` file behind, never a half-written target.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_save_json", "atomic_save_torch",
           "atomic_dir"]


def _fsync_dir(d: str) -> None:
    # Persist the rename. Not every platform can open a directory (Windows); the rename
    # is still atomic there, just not guaranteed durable, so this is best effort.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Context manager yielding a temporary path to write; on success it is fsync'ed and
    renamed to ``path``; on an exception it is deleted and ``path`` is left as it was.

    For writers that want a file name (``safetensors.torch.save_file``, ...)::

        with atomic_path("cache.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=d)
    os.close(fd)
    try:
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def atomic_write(path: str | os.PathLike, writer: Callable, *, binary: bool = True) -> None:
    """Call ``writer(f)`` with a file object open on a temporary file, then atomically
    replace ``path`` with it (see the module docstring). ``binary=False`` opens it in
    text mode (UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def atomic_save_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (NaN/inf are refused: they are not JSON)."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_save_torch(path: str | os.PathLike, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Build a directory in a temporary sibling and swap it into place on success.

    Usage: ``with atomic_dir(final) as tmp: write files into tmp``. On a clean exit every
    file is fsynced, an existing `final` is moved aside, `tmp` is renamed to `final`, the
    parent is fsynced and the old copy removed. On an exception the temporary directory
    is removed and `final` is left as it was. A crash between the two renames leaves no
    `final` (never a half-written one): readers then report it missing.
    """
    final = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for f in files:
                _fsync_file(os.path.join(root, f))
            _fsync_dir(root)
        old = None
        if os.path.exists(final):
            old = os.path.join(parent, f".{name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
