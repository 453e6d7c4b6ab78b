"""TeacherCache save/load and the atomic-write helpers."""
import json
import os

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels import cache as cache_mod
from seekr_kernels.cache import TeacherCache, TeacherCacheError
from seekr_kernels.ops.teachers import TopK
from seekr_kernels.utils import store as sio

B, S, Q, L, V = 2, 3, 4, 6, 11


def rows(seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, S, Q, L, generator=g), -1).to(dtype)


def logits(seed=1, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, V, generator=g) * 3).to(dtype)


def make_cache(topk=False):
    att = {0: rows(0), 5: rows(1, torch.float32)}
    lg = logits()
    if topk:
        att[5] = TopK.from_dense(att[5], 3, kind="probs")
        lg = TopK.from_dense(lg, 4, kind="logits")
    heads = {0: torch.tensor([1, 4, -1], dtype=torch.int32),
             5: torch.tensor([[0, 2, 3], [7, -1, -1]], dtype=torch.int32)}
    queries = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]], dtype=torch.int32)
    extra = {"input_ids": torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(2)),
             "labels": torch.full((B, L), -100)}
    return TeacherCache(att, lg, heads, queries, extra, meta={"task": "demo", "k": [1, 2]})


def same(a, b):
    if a is None or b is None:
        assert a is None and b is None
    elif isinstance(a, TopK):
        assert isinstance(b, TopK) and a.kind == b.kind and a.full_size == b.full_size
        for f in ("values", "indices", "lse", "mass"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y)
    else:
        assert a.dtype == b.dtype and torch.equal(a, b)


def check_equal(c, d):
    assert c.layers == d.layers
    for l in c.layers:
        same(c.attention[l], d.attention[l])
        same(c.heads[l], d.heads[l])
    same(c.logits, d.logits)
    same(c.queries, d.queries)
    assert sorted(c.extra) == sorted(d.extra)
    for k in c.extra:
        same(c.extra[k], d.extra[k])
    assert c.meta == d.meta


@pytest.mark.parametrize("topk", [False, True])
def test_round_trip(tmp_path, topk):
    c = make_cache(topk)
    p = tmp_path / "sub" / "cache.safetensors"
    n = c.save(p)
    assert n == os.path.getsize(p) and n > c.nbytes
    d = TeacherCache.load(p)
    check_equal(c, d)
    # no temp files left beside it
    assert os.listdir(p.parent) == ["cache.safetensors"]
    assert sk.TeacherCache is TeacherCache


def test_round_trip_minimal_and_map_location(tmp_path):
    c = TeacherCache(logits=logits())
    c.save(tmp_path / "c")
    d = TeacherCache.load(tmp_path / "c", map_location="cpu")
    check_equal(c, d)
    assert d.attention == {} and d.queries is None
    TeacherCache().save(tmp_path / "empty")
    assert TeacherCache.load(tmp_path / "empty").logits is None


def test_loaded_topk_logits_feed_logits_kl(tmp_path):
    t = logits(dtype=torch.float32)
    c = TeacherCache(logits=TopK.from_dense(t, V, kind="logits"))
    c.save(tmp_path / "c")
    d = TeacherCache.load(tmp_path / "c")
    s = torch.randn(B, L, V)
    labels = torch.zeros(B, L, dtype=torch.long)
    torch.testing.assert_close(sk.logits_kl(s, d.logits, labels), sk.logits_kl(s, t, labels))


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "cache.safetensors"
    old = make_cache()
    old.save(p)
    before = p.read_bytes()

    import safetensors.torch as st
    real = st.save_file

    def crashing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:          # half the bytes are on disk ...
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt("simulated crash")    # ... when the process is interrupted

    monkeypatch.setattr(st, "save_file", crashing)
    with pytest.raises(KeyboardInterrupt):
        make_cache(topk=True).save(p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["cache.safetensors"]
    check_equal(old, TeacherCache.load(p))


def test_killed_writer_leaves_only_a_temp_file(tmp_path):
    # A process killed between writing and renaming leaves a temp file; the target is intact
    # and loading never looks at the temp file.
    p = tmp_path / "cache.safetensors"
    make_cache().save(p)
    gen = sio.atomic_path(p)
    tmp = gen.__enter__()
    with open(tmp, "wb") as f:
        f.write(b"partial")
    # (no __exit__: the process "died" here)
    assert os.path.basename(tmp).startswith(".cache.safetensors.tmp-")
    check_equal(make_cache(), TeacherCache.load(p))


def test_truncated_files(tmp_path):
    p = tmp_path / "cache.safetensors"
    make_cache(topk=True).save(p)
    data = p.read_bytes()
    for cut in (0, 5, 40, len(data) // 2, len(data) - 1):
        q = tmp_path / f"cut{cut}.safetensors"
        q.write_bytes(data[:cut])
        with pytest.raises(TeacherCacheError, match=f"cut{cut}.safetensors"):
            TeacherCache.load(q)


def test_corrupt_tensor_bytes(tmp_path):
    p = tmp_path / "cache.safetensors"
    make_cache().save(p)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF                           # last bytes belong to some tensor
    q = tmp_path / "bad.safetensors"
    q.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="bad.safetensors.*checksum"):
        TeacherCache.load(q)
    TeacherCache.load(q, verify=False)         # structure is fine; the caller opted out


def _rewrite_header(src, dst, edit, reseal=True):
    """Edit a cache's header; ``reseal`` recomputes its checksum, as a buggy writer with a
    consistent digest would, so the structural checks behind the digest are exercised."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    header = json.loads(meta[cache_mod._META_KEY])
    if edit(header, tensors, meta) != "drop":
        if reseal:
            sio.seal(header, "header_sha256")
        meta[cache_mod._META_KEY] = json.dumps(header)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("edit,resealed", [
    (lambda h: h["meta"].update(task="other"), None),
    (lambda h: h["attention"]["5"].update(full_size=h["attention"]["5"]["full_size"] + 1),
     "inconsistent contents"),
    (lambda h: h.update(attention=[]), "corrupt header"),
    (lambda h: h.update(logits=None), "unexpected tensors"),
    (lambda h: h["tensors"]["queries"].update(sha256="0" * 64), "'queries' fails its checksum"),
], ids=["meta", "full_size", "attention_list", "logits_null", "tensor_sha"])
def test_header_edits_are_refused(tmp_path, edit, resealed):
    """Issue 15 item 4: every part of the JSON header is covered by its checksum; with a
    recomputed checksum the structural checks still refuse all but a harmless meta edit."""
    p = tmp_path / "cache.safetensors"
    make_cache(topk=True).save(p)
    q = tmp_path / "edited.safetensors"
    _rewrite_header(p, q, lambda h, t, m: edit(h), reseal=False)
    with pytest.raises(TeacherCacheError, match="edited.safetensors.*header checksum mismatch"):
        TeacherCache.load(q)
    _rewrite_header(p, q, lambda h, t, m: edit(h), reseal=True)
    if resealed is None:
        assert TeacherCache.load(q).meta["task"] == "other"
    else:
        with pytest.raises(TeacherCacheError, match="edited.safetensors.*" + resealed):
            TeacherCache.load(q)


def test_structurally_wrong_headers_are_cache_errors(tmp_path):
    p = tmp_path / "cache.safetensors"
    make_cache(topk=True).save(p)
    for name, edit, msg in [
        ("list", lambda h: h.update(attention=[]), r"corrupt header \(attention: expected an object"),
        ("layer", lambda h: h["attention"].update({"x": {"kind": "dense"}}), "layer keys"),
        ("size", lambda h: h["attention"]["5"].update(full_size=-3), "full_size: expected a positive int"),
        ("meta", lambda h: h.update(meta=[1]), "meta: expected an object"),
        ("fs", lambda h: h["attention"]["0"].update(full_size=99), "header says full_size 99"),
    ]:
        q = tmp_path / f"{name}.safetensors"
        _rewrite_header(p, q, lambda h, t, m: edit(h))
        with pytest.raises(TeacherCacheError, match=msg):
            TeacherCache.load(q)


def test_mismatched_header(tmp_path):
    p = tmp_path / "cache.safetensors"
    make_cache(topk=True).save(p)
    cases = {
        "version": (lambda h, t, m: h.update(version=99), "format version 99"),
        "format": (lambda h, t, m: h.update(format="other"), "not a seekr teacher cache"),
        "nohdr": (lambda h, t, m: m.pop(cache_mod._META_KEY) and "drop", "not a seekr teacher cache"),
        "extra_tensor": (lambda h, t, m: t.update(stray=torch.zeros(2)), "stray"),
        "shape": (lambda h, t, m: h["tensors"]["queries"].update(shape=[9]), "queries"),
        "kind": (lambda h, t, m: h["attention"]["5"].update(kind="weird"), "unknown kind"),
        "topk_shape": (lambda h, t, m: t.update({"logits.lse": torch.zeros(3)}) or
                       h["tensors"]["logits.lse"].update(shape=[3], sha256=sio.digest_tensor(torch.zeros(3))),
                       "inconsistent contents"),
    }
    for name, (edit, msg) in cases.items():
        q = tmp_path / f"{name}.safetensors"
        _rewrite_header(p, q, edit)
        with pytest.raises(TeacherCacheError, match=msg) as ei:
            TeacherCache.load(q)
        assert f"{name}.safetensors" in str(ei.value)
    # corrupt JSON inside the header
    q = tmp_path / "json.safetensors"
    from safetensors.torch import save_file
    save_file({"queries": torch.zeros(1)}, str(q), metadata={cache_mod._META_KEY: "{not json"})
    with pytest.raises(TeacherCacheError, match="corrupt header"):
        TeacherCache.load(q)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        TeacherCache.load(tmp_path / "nope")


def test_construction_errors():
    r = rows()
    with pytest.raises(ValueError, match=r"attention\[1\]"):
        TeacherCache({0: r, 1: r[:, :, :2]})
    with pytest.raises(ValueError, match=r"attention\[0\]"):
        TeacherCache({0: TopK.from_dense(r.float(), 2, kind="logits")})
    with pytest.raises(TypeError, match="attention"):
        TeacherCache({"a": r})
    with pytest.raises(ValueError, match="heads"):
        TeacherCache({0: r}, heads={1: torch.zeros(S, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"heads\[0\]"):
        TeacherCache({0: r}, heads={0: torch.zeros(S + 1, dtype=torch.int32)})
    with pytest.raises(TypeError, match=r"heads\[0\]"):
        TeacherCache({0: r}, heads={0: torch.zeros(S)})
    with pytest.raises(ValueError, match="queries"):
        TeacherCache({0: r}, queries=torch.zeros(B, Q + 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="logits"):
        TeacherCache({0: r}, logits=torch.zeros(B, L + 1, V))
    with pytest.raises(ValueError, match="logits"):
        TeacherCache(logits=TopK.from_dense(r, 2, kind="probs"))
    with pytest.raises(TypeError, match="meta"):
        TeacherCache(meta={"x": object()})


def test_atomic_helpers(tmp_path):
    p = tmp_path / "a" / "x.json"
    sio.atomic_save_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    with pytest.raises(ValueError):
        sio.atomic_save_json(p, {"a": float("nan")})
    assert json.loads(p.read_text()) == {"a": 1}
    sio.atomic_write_bytes(tmp_path / "b.bin", b"abc")
    assert (tmp_path / "b.bin").read_bytes() == b"abc"
    sio.atomic_save_torch(tmp_path / "t.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "t.pt")["w"], torch.arange(3))

    def boom(f):
        f.write(b"half")
        raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError):
        sio.atomic_write(tmp_path / "b.bin", boom)
    assert (tmp_path / "b.bin").read_bytes() == b"abc"
    assert sorted(os.listdir(tmp_path)) == ["a", "b.bin", "t.pt"]
    m = os.stat(tmp_path / "b.bin").st_mode & 0o777
    assert m == 0o666 & ~sio._umask()


# ---------------------------------------------------------------- compact teachers (issue 13)
LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy")


@pytest.mark.parametrize("V", [11, 70000, 128256])
def test_packed_indices_and_sampled_round_trip(tmp_path, V):
    from safetensors import safe_open
    g = torch.Generator().manual_seed(3)
    lg = torch.randn(B, L, V, generator=g)
    lg[..., -3:] += 6                                       # large indices among the kept ones
    for teacher in (TopK.from_dense(lg, 4, kind="logits"), sk.SampledTeacher.from_dense(lg, 5, seed=2)):
        c = TeacherCache({3: TopK.from_dense(rows(), 3)}, teacher.to(dtype=torch.bfloat16))
        c.save(tmp_path / "c.safetensors")
        with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
            names = set(f.keys())
            assert f.get_tensor("logits.indices16").dtype == torch.int16
            assert f.get_tensor("attention.3.indices16").dtype == torch.int16
            idx_bytes = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names
                            if n.startswith("logits.indices"))
            header = json.loads(f.metadata()[cache_mod._META_KEY])
        assert header["version"] == cache_mod.VERSION == 3
        assert "logits.indices" not in names and ("logits.indices_hi" in names) == (V > 65536)
        assert header["logits"]["kind"] == ("sampled" if teacher.kind == "sampled" else "topk")
        back = TeacherCache.load(tmp_path / "c.safetensors")
        same(c.logits, back.logits)
        same(c.attention[3], back.attention[3])
        assert type(back.logits) is type(teacher)
        k = teacher.k
        assert idx_bytes == B * L * (2 * k + (-(-k // 8) if V > 65536 else 0))    # not 4 bytes an index


@pytest.mark.parametrize("version, commit", [(1, "61b56de"), (2, "3575421")])
def test_older_versions_still_load(version, commit):
    """tests/data/legacy/cache_v1_* were written at 61b56de (version 1: int32 indices, no
    header checksum), cache_v2_* at 3575421 (version 2: header checksum, int32 indices);
    make_legacy.py there shows how. Their contents are recomputed here the same way."""
    g = torch.Generator().manual_seed(0)
    att = torch.softmax(torch.randn(2, 2, 3, 5, generator=g), -1)
    lg = (torch.randn(2, 5, 40, generator=g) * 3).to(torch.bfloat16)
    path = os.path.join(LEGACY, f"cache_v{version}_dense.safetensors")
    header = json.loads(__import__("safetensors").safe_open(path, "pt").metadata()[cache_mod._META_KEY])
    assert header["version"] == version and ("header_sha256" in header) == (version >= 2)
    c = TeacherCache.load(path)
    assert c.meta == {"written_by": commit} and c.layers == [1]
    assert torch.equal(c.logits, lg)
    same(c.attention[1], TopK.from_dense(att, 3))
    assert torch.equal(c.extra["ids"], torch.arange(10).reshape(2, 5))
    c = TeacherCache.load(os.path.join(LEGACY, f"cache_v{version}_topk.safetensors"))
    same(c.logits, TopK.from_dense(lg, 6, kind="logits"))
    assert torch.equal(c.attention[1], att.to(torch.bfloat16))
    labels = torch.zeros(2, 5, dtype=torch.long)
    s = torch.randn(2, 5, 40, generator=g)
    torch.testing.assert_close(sk.logits_kl(s, c.logits, labels),
                               sk.logits_kl(s, TopK.from_dense(lg, 6, kind="logits"), labels))
    # re-saved (the current version) and read back: the same teacher
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        c.save(os.path.join(d, "c.safetensors"))
        same(TeacherCache.load(os.path.join(d, "c.safetensors")).logits, c.logits)
