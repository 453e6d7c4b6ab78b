"""Teacher caches on disk: attention rows and logits of replayed samples, dense or TopK.

One cache is one ``.safetensors`` file. Its tensors:

=================================  ==================================================
``attention.<layer>.dense``        dense rows [B, S, Q, L] of one distilled layer
``attention.<layer>.values``       TopK (kind "probs"): values, int32 indices and,
``attention.<layer>.indices``      when kept, the dense row sums ``mass``
``attention.<layer>.mass``
``heads.<layer>``                  int heads of that layer, [S] or [B, S] (-1 = empty)
``queries``                        int query positions [B, Q] (absent = all rows)
``logits.dense``                   dense teacher logits [N, L, V]
``logits.values`` / ``.indices``   TopK (kind "logits") with the rows' ``lse``, or a
``logits.lse``                     SampledTeacher (kind "sampled": values = weights)
``extra.<name>``                   any caller tensors (input ids, labels, masks, ...)
=================================  ==================================================

Indices of TopK / sampled rows (version 3) are stored packed
(:func:`~seekr_kernels.ops.teachers.pack_indices`): ``<base>.indices16`` (int16, the low 16
bits) and, when the full size exceeds 65536, ``<base>.indices_hi`` (uint8, the high bits
bit-packed), instead of versions 1-2's int32 ``<base>.indices``; they are int32 again in
memory after loading. Files of versions 1 and 2 still load (a re-save writes version 3).

and one metadata entry, ``seekr_teacher_cache``, a JSON header kept inside the
safetensors header (so a cache is a single file that cannot lose its sidecar)::

    {"format": "seekr-teacher-cache", "version": 3,
     "attention": {"<layer>": {"kind": "dense"|"topk", "full_size": L, "k": k}},
     "logits": null | {"kind": "dense"|"topk"|"sampled", "full_size": V, "k": k},
     "tensors": {"<name>": {"dtype": "bfloat16", "shape": [...], "sha256": "..."}},
     "meta": {...caller JSON...},
     "header_sha256": "..."}

Integrity: writes are atomic (:func:`seekr_kernels.utils.store.atomic_path`), so a crash
leaves the old file or the new one, never a mix, and the temporaries of killed saves are
removed by the next save or load of the same path. On load, safetensors rejects a
truncated file (its header covers every byte); the JSON header must have the expected
structure and match its own SHA-256 (``header_sha256``, over the canonical JSON of
everything else, so an edited ``meta``, ``full_size`` or layer list is refused too);
every tensor must be listed in the header with the recorded dtype and shape, its bytes
must match the recorded SHA-256, and the shapes must agree with the header's sizes. Any
failure raises :class:`TeacherCacheError` naming the file; nothing is returned
half-checked. Version 1 files have no header checksum: they load with the structural
checks and the per-tensor checksums only (load and save one to add it). What each version
holds is the table :data:`READS`, which the loader follows; the digests are
:mod:`seekr_kernels.utils.store`'s (``digest_tensor`` per tensor, ``seal`` of the header).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Union

import torch

from ._checks import _fail
from .ops.teachers import SampledTeacher, TopK, pack_indices, unpack_indices
from .utils import store
from .utils.store import atomic_path, clean_leftovers

FORMAT = "seekr-teacher-cache"
#: The version this build writes.
VERSION = 3
_META_KEY = "seekr_teacher_cache"
_SEAL = "header_sha256"


class _Version(NamedTuple):
    sealed: bool      # the JSON header carries header_sha256
    packed: bool      # TopK / sampled indices as <base>.indices16 (+ .indices_hi), not int32 <base>.indices
    sampled: bool     # logits of kind "sampled" (SampledTeacher)


#: The versioned reader's table: the versions this build reads, and what each holds.
READS = {
    1: _Version(sealed=False, packed=False, sampled=False),   # 61b56de (tests/data/legacy/cache_v1_*)
    2: _Version(sealed=True, packed=False, sampled=False),    # 3575421 (cache_v2_*)
    3: _Version(sealed=True, packed=True, sampled=True),
}
READ_VERSIONS = tuple(READS)

Rows = Union[torch.Tensor, TopK]


class TeacherCacheError(ValueError):
    """A teacher cache file is truncated, corrupt, of another format version or inconsistent."""


def _check_header(h: dict) -> None:
    """Structure of a verified header; ValueError saying which field is wrong."""
    def entry(where, info):
        if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
            raise ValueError(f"{where}: expected an object with a 'kind'")
        for key in ("full_size", "k"):
            v = info.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{where}.{key}: expected a positive int, got {v!r}")
    att = h.get("attention")
    if not isinstance(att, dict):
        raise ValueError(f"attention: expected an object {{layer: entry}}, got {type(att).__name__}")
    for layer, info in att.items():
        if not (isinstance(layer, str) and layer.isdigit()):
            raise ValueError(f"attention: layer keys must be non-negative ints, got {layer!r}")
        entry(f"attention.{layer}", info)
    if h.get("logits") is not None:
        entry("logits", h["logits"])
    tensors = h.get("tensors")
    if not isinstance(tensors, dict):
        raise ValueError("tensors: expected an object {name: info}")
    for n, info in tensors.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list) and isinstance(info.get("sha256"), str)):
            raise ValueError(f"tensors.{n}: expected {{dtype, shape, sha256}}")
    if not isinstance(h.get("meta"), dict):
        raise ValueError("meta: expected an object")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _check_int(name, t):
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, f"expected an integer torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        _fail(TypeError, name, f"expected an integer dtype, got {t.dtype}")


@dataclass(eq=False)
class TeacherCache:
    """What the teacher did on a set of replayed samples.

    Args:
        attention: ``{layer: rows}``, rows dense [B, S, Q, L] (any float dtype) or a
            ``TopK`` of kind ``"probs"`` standing for them.
        logits: teacher logits [N, L, V] (dense), a ``TopK`` of kind ``"logits"`` or a
            :class:`~seekr_kernels.SampledTeacher`; or None.
        heads: ``{layer: heads}`` int [S] or [B, S] (-1 = empty slot); when given, one per
            attention layer, S matching the rows.
        queries: int [B, Q] query positions of the rows, or None (= all L rows).
        extra: any further named tensors to keep with the cache.
        meta: JSON-serialisable dict (task name, model id, ...).

    ``save(path)`` writes atomically; ``TeacherCache.load(path)`` verifies everything.
    """
    attention: Dict[int, Rows] = field(default_factory=dict)
    logits: Optional[Rows] = None
    heads: Dict[int, torch.Tensor] = field(default_factory=dict)
    queries: Optional[torch.Tensor] = None
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TeacherCache":
        """Shape/dtype/consistency checks; raises ValueError/TypeError naming the field."""
        if not isinstance(self.attention, dict):
            _fail(TypeError, "attention", f"expected a dict {{layer: rows}}, got {type(self.attention).__name__}")
        att = {}
        B = Lseq = S_by = Q_by = None
        for layer, rows in self.attention.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                _fail(TypeError, "attention", f"layer keys must be ints >= 0, got {layer!r}")
            name = f"attention[{layer}]"
            if isinstance(rows, TopK):
                if rows.kind != "probs":
                    _fail(ValueError, name, f"a TopK of attention rows must be of kind 'probs', got {rows.kind!r}")
                shape = tuple(rows.shape)
            elif isinstance(rows, torch.Tensor):
                if not rows.dtype.is_floating_point:
                    _fail(TypeError, name, f"expected floating-point rows, got {rows.dtype}")
                shape = tuple(rows.shape)
            else:
                _fail(TypeError, name, f"expected a tensor [B, S, Q, L] or a TopK, got {type(rows).__name__}")
            if len(shape) != 4:
                _fail(ValueError, name, f"expected rows of shape [B, S, Q, L], got {list(shape)}")
            if B is None:
                B, Q_by, Lseq = shape[0], shape[2], shape[3]
            elif (shape[0], shape[2], shape[3]) != (B, Q_by, Lseq):
                _fail(ValueError, name, f"shape {list(shape)} disagrees with another layer's [B, *, Q, L] = "
                      f"{[B, '*', Q_by, Lseq]}")
            att[layer] = rows
        self.attention = att
        heads = {}
        if not isinstance(self.heads, dict):
            _fail(TypeError, "heads", f"expected a dict {{layer: heads}}, got {type(self.heads).__name__}")
        if self.heads:
            if set(self.heads) != set(att):
                _fail(ValueError, "heads",
                      f"layers {sorted(self.heads)} differ from the attention layers {sorted(att)}")
            for layer, h in self.heads.items():
                _check_int(f"heads[{layer}]", h)
                S_by = att[layer].shape[1]
                if h.dim() not in (1, 2) or h.shape[-1] != S_by or (h.dim() == 2 and h.shape[0] != B):
                    _fail(ValueError, f"heads[{layer}]", f"expected shape [S={S_by}] or [B={B}, S={S_by}], got "
                          f"{list(h.shape)}")
                heads[layer] = h
        self.heads = heads
        if self.queries is not None:
            _check_int("queries", self.queries)
            if self.queries.dim() != 2:
                _fail(ValueError, "queries", f"expected shape [B, Q], got {list(self.queries.shape)}")
            if B is not None and tuple(self.queries.shape) != (B, Q_by):
                _fail(ValueError, "queries", f"shape {list(self.queries.shape)} does not match the rows' "
                      f"[B, Q] = {[B, Q_by]}")
        lg = self.logits
        if lg is not None:
            if isinstance(lg, TopK):
                if lg.kind not in ("logits", "sampled"):
                    _fail(ValueError, "logits",
                          f"a TopK of logits must be of kind 'logits' or 'sampled', got {lg.kind!r}")
            elif isinstance(lg, torch.Tensor):
                if not lg.dtype.is_floating_point:
                    _fail(TypeError, "logits", f"expected floating-point logits, got {lg.dtype}")
            else:
                _fail(TypeError, "logits", f"expected a tensor [N, L, V] or a TopK, got {type(lg).__name__}")
            if len(lg.shape) != 3:
                _fail(ValueError, "logits", f"expected shape [N, L, V], got {list(lg.shape)}")
            if B is not None and (lg.shape[0], lg.shape[1]) != (B, Lseq):
                _fail(ValueError, "logits", f"shape {list(lg.shape)} does not match the attention rows' "
                      f"batch and length [B, L] = {[B, Lseq]}")
        if not isinstance(self.extra, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in self.extra.items()):
            _fail(TypeError, "extra", "expected a dict {name: tensor}")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            _fail(TypeError, "meta", f"must be JSON-serialisable ({e})")
        return self

    # ------------------------------------------------------------------ properties
    @property
    def layers(self):
        return sorted(self.attention)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what the file holds, less its header)."""
        return sum(t.numel() * t.element_size() for t in self._tensors()[0].values())

    def to(self, device) -> "TeacherCache":
        """A copy with every tensor on ``device``."""
        mv = (lambda x: None if x is None else x.to(device))
        return TeacherCache({l: r.to(device) for l, r in self.attention.items()}, mv(self.logits),
                            {l: h.to(device) for l, h in self.heads.items()}, mv(self.queries),
                            {k: v.to(device) for k, v in self.extra.items()}, dict(self.meta))

    def __repr__(self):
        lg = None if self.logits is None else (repr(self.logits) if isinstance(self.logits, TopK)
                                               else f"dense{list(self.logits.shape)}")
        return f"TeacherCache(layers={self.layers}, logits={lg}, extra={sorted(self.extra)})"

    # ------------------------------------------------------------------ save
    def _tensors(self):
        tensors, att, logits = {}, {}, None

        seen = set()

        def put(name, t):
            t = t.detach().contiguous().cpu()
            if t.numel() and t.data_ptr() in seen:
                t = t.clone()       # safetensors refuses tensors that share memory
            if t.numel():
                seen.add(t.data_ptr())
            tensors[name] = t

        def put_indices(base, tk):
            packed = pack_indices(tk.indices, tk.full_size)
            put(f"{base}.indices16", packed["lo"])
            if "hi" in packed:
                put(f"{base}.indices_hi", packed["hi"])

        for layer, rows in self.attention.items():
            base = f"attention.{layer}"
            if isinstance(rows, TopK):
                put(f"{base}.values", rows.values)
                put_indices(base, rows)
                if rows.mass is not None:
                    put(f"{base}.mass", rows.mass)
                att[str(layer)] = {"kind": "topk", "full_size": rows.full_size, "k": rows.k}
            else:
                put(f"{base}.dense", rows)
                att[str(layer)] = {"kind": "dense", "full_size": rows.shape[-1]}
        for layer, h in self.heads.items():
            put(f"heads.{layer}", h)
        if self.queries is not None:
            put("queries", self.queries)
        lg = self.logits
        if isinstance(lg, TopK):
            put("logits.values", lg.values)
            put_indices("logits", lg)
            if lg.kind == "sampled":
                logits = {"kind": "sampled", "full_size": lg.full_size, "k": lg.k}
            else:
                put("logits.lse", lg.lse)
                logits = {"kind": "topk", "full_size": lg.full_size, "k": lg.k}
        elif lg is not None:
            put("logits.dense", lg)
            logits = {"kind": "dense", "full_size": lg.shape[-1]}
        for k, v in self.extra.items():
            put(f"extra.{k}", v)
        return tensors, att, logits

    def save(self, path: Union[str, os.PathLike]) -> int:
        """Write the cache to ``path`` atomically; returns the file size in bytes."""
        from safetensors.torch import save_file
        self.validate()
        tensors, att, logits = self._tensors()
        header = {
            "format": FORMAT, "version": VERSION, "attention": att, "logits": logits,
            "tensors": {n: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": store.digest_tensor(t)}
                        for n, t in tensors.items()},
            "meta": self.meta,
        }
        store.seal(header, _SEAL)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(header, allow_nan=False)})
        return os.path.getsize(path)

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location=None, verify: bool = True) -> "TeacherCache":
        """Read and verify a cache written by :meth:`save`.

        ``map_location``: device for the tensors (default CPU). ``verify=False`` skips the
        SHA-256 of the tensor bytes (the structural checks always run).
        Raises FileNotFoundError for a missing file, TeacherCacheError for anything else.
        """
        from safetensors import safe_open
        path = os.fspath(path)
        clean_leftovers(path)             # temporaries of killed saves of this cache
        if not os.path.exists(path):
            raise FileNotFoundError(f"teacher cache {path!r} does not exist")

        where = f"teacher cache {path!r}"

        def bad(msg):
            return TeacherCacheError(f"{where}: {msg}")

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                raw = meta.get(_META_KEY)
                if raw is None:
                    raise bad("not a seekr teacher cache (no '" + _META_KEY + "' header)")
                try:
                    header = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise bad(f"corrupt header ({e})") from None
                version = store.check_format(header, where, "seekr teacher cache", error=TeacherCacheError,
                                             kind=FORMAT, kind_key="format", versions=READS, version_key="version")
                # A version without the header checksum (1) is held to the structural checks
                # and the tensors to their own checksums only.
                if version.sealed:
                    store.check_seal(header, where, "header", error=TeacherCacheError, key=_SEAL)
                try:
                    _check_header(header)
                except ValueError as e:
                    raise bad(f"corrupt header ({e})") from None
                listed = header["tensors"]
                if set(listed) != names:
                    raise bad(f"tensors {sorted(names ^ set(listed))} are not both in the file and "
                              "in its header")
                tensors = {}
                for n in sorted(names):
                    t = f.get_tensor(n)
                    info = listed[n]
                    if _dtype_name(t.dtype) != info.get("dtype") or list(t.shape) != info.get("shape"):
                        raise bad(f"tensor {n!r} is {_dtype_name(t.dtype)}{list(t.shape)}, the header "
                                  f"says {info.get('dtype')}{info.get('shape')}")
                    if verify and store.digest_tensor(t) != info.get("sha256"):
                        raise bad(f"tensor {n!r} fails its checksum (the file is corrupt)")
                    tensors[n] = t
        except TeacherCacheError:
            raise
        except Exception as e:      # safetensors: truncated file, bad header, ...
            raise bad(f"unreadable ({type(e).__name__}: {e})") from e

        try:
            cache = cls._from_tensors(tensors, header, version)
        except TeacherCacheError:
            raise
        except Exception as e:      # KeyError, TypeError, AttributeError, ...: never a bare one
            raise bad(f"inconsistent contents ({type(e).__name__}: {e})") from e
        if map_location is not None:
            cache = cache.to(map_location)
        return cache

    @classmethod
    def _from_tensors(cls, tensors, header, version: _Version):
        used = set()

        def take(n):
            used.add(n)
            return tensors[n]

        def indices(base, full_size):
            if not version.packed:               # int32 indices before packing
                return take(f"{base}.indices")
            hi = take(f"{base}.indices_hi") if f"{base}.indices_hi" in tensors else None
            return unpack_indices(take(f"{base}.indices16"), hi, full_size)

        attention = {}
        for layer_s, info in header["attention"].items():
            layer, base = int(layer_s), f"attention.{layer_s}"
            if info["kind"] == "dense":
                attention[layer] = take(f"{base}.dense")
                _same_size(f"attention layer {layer}", info, attention[layer].shape[-1], None)
            elif info["kind"] == "topk":
                mass = take(f"{base}.mass") if f"{base}.mass" in tensors else None
                fs = int(info["full_size"])
                attention[layer] = TopK(take(f"{base}.values"), indices(base, fs), fs, "probs", mass=mass)
                _same_size(f"attention layer {layer}", info, None, attention[layer].k)
            else:
                raise ValueError(f"attention layer {layer}: unknown kind {info['kind']!r}")
        heads = {int(n.split(".", 1)[1]): take(n) for n in tensors if n.startswith("heads.")}
        queries = take("queries") if "queries" in tensors else None
        info = header.get("logits")
        logits = None
        if info is not None:
            if info["kind"] == "dense":
                logits = take("logits.dense")
                _same_size("logits", info, logits.shape[-1], None)
            elif info["kind"] == "topk":
                fs = int(info["full_size"])
                logits = TopK(take("logits.values"), indices("logits", fs), fs, "logits", lse=take("logits.lse"))
                _same_size("logits", info, None, logits.k)
            elif info["kind"] == "sampled" and version.sampled:
                fs = int(info["full_size"])
                logits = SampledTeacher(take("logits.values"), indices("logits", fs), fs, "sampled")
                _same_size("logits", info, None, logits.k)
            else:
                raise ValueError(f"logits: unknown kind {info['kind']!r}")
        extra = {n[len("extra."):]: take(n) for n in tensors if n.startswith("extra.")}
        if used != set(tensors):
            raise ValueError(f"unexpected tensors {sorted(set(tensors) - used)}")
        return cls(attention, logits, heads, queries, extra, header.get("meta") or {})


def _same_size(what, info, full_size, k):
    """The header's sizes must be the tensors' (a header/data mismatch is corruption)."""
    if full_size is not None and info.get("full_size") != full_size:
        raise ValueError(f"{what}: the header says full_size {info.get('full_size')!r}, the tensor has {full_size}")
    if k is not None and info.get("k") != k:
        raise ValueError(f"{what}: the header says k {info.get('k')!r}, the tensors keep {k}")
