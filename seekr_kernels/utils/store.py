"""The one checksummed, atomic store every file format of seekr_kernels goes through.

Digests (one function per kind of thing hashed, all SHA-256, hex):

* :func:`digest_bytes`, :func:`digest_file`: the bytes as they are;
* :func:`digest_tensor`: a tensor's raw bytes (row-major, native byte order; dtype and
  shape not included), :func:`digest_tensors`: a ``{name: tensor}`` mapping, names,
  dtypes and shapes included;
* :func:`digest_json`: canonical JSON, the one rule (:func:`canonical_json`: sorted keys,
  ``","`` / ``":"`` separators, non-ASCII escaped). :func:`seal` stores an object's digest
  in one of its own fields, :func:`is_sealed` / :func:`check_seal` verify it.

Files and folders:

* :func:`write_json` / :func:`read_json`: the JSON files of the formats (manifests, indexes,
  recipe state: indent 1, sorted keys); the reader names the file and checks kind and
  version (:func:`check_format`).
* :func:`write_manifest` / :func:`verify_dir`: a folder whose ``manifest.json`` lists every
  file with its size and digest, written last, sealed; :func:`check_file` checks one file
  against its entry.
* Versioned readers: each format keeps, next to its reader, the table of the versions it
  reads (``{version: what it holds}``) and passes it to :func:`check_format` /
  :func:`read_json`, which refuse any other version naming the file; the reader then
  branches on the table's entry, nowhere else.

Atomic writes: a reader sees either the old file or the complete new one.

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

Errors: the checking functions take ``error``, the exception class of the caller's format
(``CheckpointError``, ``ReplayMemoryError``, ...), and raise ``error("<file>: <what is
wrong>")``.
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
from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple, Type

__all__ = ["digest_bytes", "digest_file", "digest_tensor", "digest_tensors", "canonical_json", "digest_json",
           "seal", "is_sealed", "check_seal", "check_format", "read_json", "write_json", "list_files", "file_entry",
           "check_file", "write_manifest", "verify_dir", "MANIFEST",
           "atomic_path", "atomic_write", "atomic_write_bytes", "atomic_save_json", "atomic_save_torch",
           "atomic_dir", "clean_leftovers"]

#: The manifest of a folder written by :func:`write_manifest`.
MANIFEST = "manifest.json"


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


# ============================================================================ digests

_CHUNK = 1 << 22


def digest_bytes(*chunks: bytes) -> str:
    """SHA-256 (hex) of the concatenation of ``chunks``."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _hash_file(path) -> Tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                return n, h.hexdigest()
            n += len(b)
            h.update(b)


def digest_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the file's bytes, read in chunks (any size)."""
    return _hash_file(path)[1]


def _update_tensor(h, t) -> None:
    import torch
    b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    if b.numel():
        h.update(b.numpy())


def digest_tensor(t) -> str:
    """SHA-256 (hex) of a tensor's bytes: its elements in row-major order as they lie in
    memory (native byte order), on any device, of any layout. Neither the dtype nor the
    shape is hashed: store them next to the digest (the teacher cache header does)."""
    h = hashlib.sha256()
    _update_tensor(h, t)
    return h.hexdigest()


def digest_tensors(tensors: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a ``{name: tensor}`` mapping: for each name in sorted order
    ``"<name>:<dtype>:<shape>;"`` (e.g. ``"scores:torch.float64:[3, 2];"``) then the
    tensor's bytes as :func:`digest_tensor` reads them. A renamed, retyped or reshaped
    tensor changes it as much as a changed byte."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}:{t.dtype}:{list(t.shape)};".encode())
        _update_tensor(h, t)
    return h.hexdigest()


def canonical_json(obj) -> bytes:
    """The canonical JSON of ``obj``, what :func:`digest_json` hashes: keys sorted at every
    level, no whitespace (``","`` and ``":"``), non-ASCII characters escaped. NaN and
    infinities come out as Python's ``json`` writes them (``NaN``, ``Infinity``); formats
    that refuse them check before."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest_json(obj: Mapping, skip: Optional[str] = None) -> str:
    """SHA-256 (hex) of :func:`canonical_json` of the object ``obj`` without its field
    ``skip`` (the field that holds the object's own digest, see :func:`seal`)."""
    return digest_bytes(canonical_json({k: v for k, v in obj.items() if k != skip}))


def seal(obj: dict, key: str = "sha256") -> dict:
    """Store in ``obj[key]`` the digest of ``obj`` without that field (:func:`digest_json`),
    so that an edit of any other field is detected by :func:`check_seal`; returns ``obj``
    (modified in place)."""
    obj[key] = digest_json(obj, skip=key)
    return obj


def is_sealed(obj: Mapping, key: str = "sha256", *, optional: bool = False) -> bool:
    """Whether ``obj[key]`` is the digest :func:`seal` stores (``obj`` unedited since).
    ``optional=True`` also accepts an object without ``key`` at all (a version of a format
    written before it was sealed: the caller's version table says which)."""
    if optional and key not in obj:
        return True
    return obj.get(key) == digest_json(obj, skip=key)


def check_seal(obj: Mapping, where: str, what: str, *, error: Type[Exception] = ValueError, key: str = "sha256",
               optional: bool = False) -> None:
    """:func:`is_sealed`, or raise ``error("<where>: <what> checksum mismatch (edited or
    damaged)")``."""
    if not is_sealed(obj, key, optional=optional):
        raise error(f"{where}: {what} checksum mismatch (edited or damaged)")


# ============================================================================ checked JSON

def _versions_text(versions) -> str:
    vs = [str(v) for v in versions]
    return vs[0] if len(vs) == 1 else ", ".join(vs[:-1]) + " or " + vs[-1]


def check_format(obj, where: str, what: str, *, error: Type[Exception] = ValueError, kind: Any = None,
                 kind_key: str = "kind", versions: Optional[Mapping] = None, version_key: str = "format"):
    """Check that ``obj`` is a ``what``: a dict whose ``obj[kind_key]`` is ``kind`` (when
    given) and whose ``obj[version_key]`` is one of ``versions`` (when given); returns
    ``versions[obj[version_key]]`` — the entry of the format's version table (a sequence
    of versions works too: the entry is then the version itself) — or None.

    ``versions`` is the versioned reader's table: the versions of the format this build
    reads, each with what it holds, kept next to the format's reader. Raises ``error``
    naming ``where``: ``not a <what> (<kind_key> <found>)``, or ``format <found>, this
    version reads format 1 or 2`` (``format <version_key> ...`` when the key is not
    ``"format"``, e.g. ``format version 9, ...``). A version must be an int or a str
    (``true`` and ``1.0`` are not version 1).
    """
    if not isinstance(obj, Mapping):
        raise error(f"{where}: not a {what} (expected a JSON object)")
    if kind is not None and obj.get(kind_key) != kind:
        raise error(f"{where}: not a {what} ({kind_key} {obj.get(kind_key)!r})")
    if versions is None:
        return None
    v = obj.get(version_key)
    label = "format" if version_key == "format" else f"format {version_key}"
    # type check: True == 1 and 1.0 == 1, but neither is a version
    if type(v) not in (int, str) or v not in versions:
        raise error(f"{where}: {label} {v!r}, this version reads {label} {_versions_text(versions)}")
    return versions[v] if isinstance(versions, Mapping) else v


def read_json(path: str | os.PathLike, what: str, error: Type[Exception] = ValueError, *, kind: Any = None,
              versions: Optional[Mapping] = None, version_key: str = "format", missing: Optional[str] = None,
              optional: bool = False):
    """The JSON object in file ``path``, a ``what`` (words for the messages).

    A missing file raises ``error(missing)`` (default ``"<path>: missing (<what>)"``), or
    returns None with ``optional=True``; an unreadable or truncated file, or one that holds
    no JSON object, raises ``error`` naming ``path``. ``kind`` / ``versions`` /
    ``version_key``: checked by :func:`check_format` (``obj["kind"]`` must be ``kind``).
    Reading does not verify a seal: :func:`check_seal` does.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        if optional:
            return None
        raise error(missing or f"{p}: missing ({what})") from None
    except (OSError, ValueError) as e:
        raise error(f"{p}: unreadable {what} ({type(e).__name__}: {e})") from None
    check_format(obj, p, what, error=error, kind=kind, versions=versions, version_key=version_key)
    return obj


def json_bytes(obj) -> bytes:
    """The bytes :func:`write_json` writes: indent 1, keys sorted, non-ASCII escaped, no
    final newline (the layout of every manifest, index and recipe state)."""
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` to ``path`` as :func:`json_bytes`, atomically (:func:`atomic_path`)."""
    atomic_write_bytes(path, json_bytes(obj))


# ============================================================================ manifests

def list_files(d: str | os.PathLike) -> List[str]:
    """Every file under directory ``d``, as ``/``-separated paths relative to ``d``;
    directories in sorted order, depth first, each directory's files sorted."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(dirs)
        for f in sorted(files):
            out.append(os.path.relpath(os.path.join(root, f), d).replace(os.sep, "/"))
    return out


def file_entry(path: str | os.PathLike) -> dict:
    """A manifest's entry for one file: ``{"bytes": size, "sha256": digest_file}`` (one
    read)."""
    n, h = _hash_file(path)
    return {"bytes": n, "sha256": h}


def check_file(path: str | os.PathLike, entry: Mapping, *, error: Type[Exception] = ValueError,
               manifest: str = MANIFEST, read: bool = False) -> Optional[bytes]:
    """Check file ``path`` against its manifest entry (:func:`file_entry`): it exists, has
    ``entry["bytes"]`` bytes and digest ``entry["sha256"]``; else raises ``error`` naming
    ``path``: ``missing (listed in <manifest>)``, ``<n> bytes, the manifest says <m>
    (truncated or replaced file)``, ``checksum mismatch (damaged file)``.

    ``read=True`` reads the file once and returns its bytes (what was checked is what the
    caller gets); otherwise the digest is computed in chunks and None returned.
    """
    p = os.fspath(path)
    info = entry if isinstance(entry, Mapping) else {}
    data = None
    if read:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise error(f"{p}: missing (listed in {manifest})") from None
        except OSError as e:
            raise error(f"{p}: unreadable ({e})") from None
        size = len(data)
    else:
        if not os.path.isfile(p):
            raise error(f"{p}: missing (listed in {manifest})")
        size = os.path.getsize(p)
    if size != info.get("bytes"):
        raise error(f"{p}: {size} bytes, the manifest says {info.get('bytes')} (truncated or replaced file)")
    if (digest_bytes(data) if read else digest_file(p)) != info.get("sha256"):
        raise error(f"{p}: checksum mismatch (damaged file)")
    return data


def write_manifest(d: str | os.PathLike, head: Mapping, *, name: str = MANIFEST, key: str = "sha256") -> dict:
    """Write ``d/<name>``, the manifest of directory ``d``: the fields of ``head``, then
    ``"files"``: :func:`file_entry` of every file under ``d`` (:func:`list_files`, the
    manifest itself left out), sealed under ``key`` (:func:`seal`), as :func:`write_json`.

    Call it last, once every file is in place: a directory whose manifest is missing or
    does not verify is an interrupted write. The manifest file is written atomically; for
    the whole directory to appear at once, build it inside :func:`atomic_dir`. Returns the
    manifest.
    """
    d = os.fspath(d)
    files = {rel: file_entry(os.path.join(d, rel)) for rel in list_files(d) if rel != name}
    man = seal({**head, "files": files}, key)
    write_json(os.path.join(d, name), man)
    return man


def verify_dir(d: str | os.PathLike, what: str, *, kind: Any, versions: Mapping, error: Type[Exception] = ValueError,
               name: str = MANIFEST, key: str = "sha256", missing: Optional[str] = None) -> dict:
    """Check directory ``d`` against the manifest :func:`write_manifest` wrote; returns it.

    Checked, in order, each failure an ``error`` naming the file: ``d`` is a directory;
    ``d/<name>`` exists (else ``missing``, default ``"<manifest>: missing (an interrupted
    write, or not a <what>)"``), is a JSON object of ``kind`` and a version in
    ``versions`` (:func:`read_json`); its seal under ``key`` (:func:`check_seal`: an edited
    manifest); every listed file (:func:`check_file`: missing, truncated, damaged); no
    file under ``d`` that the manifest does not list. Nothing of the directory is read
    beyond that: a caller reads its files after this returns.
    """
    d = os.fspath(d)
    if not os.path.isdir(d):
        raise error(f"{d}: no such {what} directory")
    mp = os.path.join(d, name)
    man = read_json(mp, f"{what} manifest", error, kind=kind, versions=versions,
                    missing=missing or f"{mp}: missing (an interrupted write, or not a {what})")
    check_seal(man, mp, "manifest", error=error, key=key)
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        raise error(f"{mp}: malformed file list")
    for rel, info in sorted(files.items()):
        check_file(os.path.join(d, rel), info, error=error, manifest=name)
    extra = [r for r in list_files(d) if r != name and r not in files]
    if extra:
        raise error(f"{os.path.join(d, extra[0])}: not part of the {what} (not in {name}; "
                    f"{len(extra)} such file(s))")
    return man
