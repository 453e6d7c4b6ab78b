"""Atomic file writes: a reader sees either the old file or the complete new one.

Every writer goes through :func:`atomic_path`: the content is written to a temporary file
in the *same directory* as the target (so the final ``os.replace`` is a rename within one
file system, which POSIX makes atomic), flushed and fsync'ed, then renamed over the
target, and the directory is fsync'ed so the rename itself survives a power loss. If the
writer raises, the temporary file is removed and the target is left untouched.
:func:`atomic_dir` does the same for a whole directory (two renames: old copy aside, new
copy in place).

Leftovers of killed writers. A process killed mid-write leaves its temporary
``.<name>.tmp-<owner>-*`` behind, and one killed between the two renames of
:func:`atomic_dir` leaves the previous copy as ``.<name>.old-<owner>-*`` with no ``<name>``.
``<owner>`` is ``<host tag>.<pid>``, so :func:`clean_leftovers` can tell a dead writer of
this host (its pid is gone) from a live one or one on another host sharing the file
system (both left alone). It removes dead writers' temporaries and, when ``<name>`` is
missing, renames the newest dead ``.old`` copy back. Every atomic write cleans the
leftovers of its own target first; loaders (teacher caches, replay memories) call it too.

Permissions: results get the mode a plain ``open()`` would give (0666 less the umask;
0777 less the umask for directories), also when a writer replaced the temporary file
with its own 0600 one (safetensors does).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Callable, Iterator, List

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_save_json", "atomic_save_torch",
           "atomic_dir", "clean_leftovers"]


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


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _owner() -> str:
    """Who writes a temporary: ``<host tag>.<pid>`` (the pid alone is ambiguous on a file
    system shared by several hosts)."""
    return f"{_host_tag()}.{os.getpid()}"


# .<name>.tmp-<host>.<pid>-<rand>  /  .<name>.old-<host>.<pid>-<rand>; and the pid-only
# directories .<name>.tmp-<pid> / .<name>.old-<pid> of earlier versions of atomic_dir.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[0-9a-f]{8})\.)?(?P<pid>\d+)"
                       r"(?:-[A-Za-z0-9_]+)?$")


def _writer_dead(host, pid: int) -> bool:
    if host is not None and host != _host_tag():
        return False                      # another machine's writer: cannot tell, keep it
    if pid == os.getpid():
        return False                      # this process (another thread may be writing)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:                       # EPERM: alive, someone else's
        return False
    return False


def _remove(p: str) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(p)


def clean_leftovers(path: str | os.PathLike, *, any_name: bool = False) -> List[str]:
    """Remove what killed writers of ``path`` left in its directory; recover ``.old``.

    Temporaries (``.<name>.tmp-*``) of dead writers on this host are deleted. A dead
    writer's ``.<name>.old-*`` copy is renamed back to ``<name>`` when ``<name>`` is
    missing (a kill between the two renames of :func:`atomic_dir`; the newest such copy
    wins) and deleted otherwise. ``any_name=True`` treats ``path`` as a directory and does
    this for every leftover in it. Best effort (errors are ignored: a read-only
    directory just keeps its leftovers). Returns the leftovers it handled.
    """
    path = os.fspath(path)
    if any_name:
        parent, want = path, None
    else:
        parent, want = os.path.split(os.path.abspath(path))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    done, olds = [], {}
    for e in entries:
        m = _LEFTOVER.match(e)
        if not m or (want is not None and m["name"] != want):
            continue
        p = os.path.join(parent, e)
        if m["host"] is None and not os.path.isdir(p):
            continue                      # a mkstemp name that merely looks like a pid
        if not _writer_dead(m["host"], int(m["pid"])):
            continue
        if m["kind"] == "tmp":
            _remove(p)
            done.append(p)
        else:
            olds.setdefault(m["name"], []).append(p)
    for name, ps in olds.items():
        final = os.path.join(parent, name)
        ps.sort(key=lambda p: os.stat(p).st_mtime if os.path.exists(p) else 0, reverse=True)
        if not os.path.exists(final):
            with contextlib.suppress(OSError):
                os.replace(ps[0], final)
                done.append(ps[0])
                ps = ps[1:]
                _fsync_dir(parent)
        for p in ps:
            _remove(p)
            done.append(p)
    return done


def _widen_mode(p: str, base: int) -> None:
    """Give ``p`` at least the permission bits a plain create would have (never removes
    bits): writers that replace their file create it 0600 whatever the umask."""
    with contextlib.suppress(OSError):
        mode = os.stat(p).st_mode & 0o7777
        want = mode | (base & ~_umask())
        if want != mode:
            os.chmod(p, want)


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
    clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-{_owner()}-", dir=d)
    os.close(fd)
    try:
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        _widen_mode(tmp, 0o666)           # the writer may have replaced the file (0600)
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
    file is fsynced (and given the umask's permissions), an existing `final` is moved
    aside, `tmp` is renamed to `final`, the parent is fsynced and the old copy removed.
    On an exception the temporary directory is removed and `final` is left as it was
    (also when the second rename fails: the old copy is moved back). A process killed
    between the two renames leaves no `final` but the old copy as ``.<name>.old-*``:
    :func:`clean_leftovers`, run by the next atomic_dir of `final` and by the loaders,
    renames it back.
    """
    final = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    clean_leftovers(final)
    owner = _owner()
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{owner}-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp creates 0700
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for dn in dirs:
                _widen_mode(os.path.join(root, dn), 0o777)
            for f in files:
                _widen_mode(os.path.join(root, f), 0o666)
                _fsync_file(os.path.join(root, f))
            _fsync_dir(root)
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{name}.old-{owner}-", dir=parent)
            os.rmdir(old)                 # a unique name; os.replace needs it free
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old:
                os.replace(old, final)
            raise
        _fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
