"""utils.store: the digests (each equal to the rule the formats used before they shared it),
checked JSON, manifests, and atomic_dir (a directory appears whole or not at all)."""
import hashlib
import json
import os

import pytest
import torch

from seekr_kernels.utils import store
from seekr_kernels.utils.store import atomic_dir


# ---------------------------------------------------------------- digests
# The rules as each module wrote them before issue 19 moved them here: the store's digests
# must stay these, byte for byte (files written by older versions verify with them).

def _old_json_digest(obj, skip):            # run/checkpoint.py, seekr/memory.py
    body = {k: v for k, v in obj.items() if k != skip}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _old_header_digest(header):             # cache.py (it refused NaN: a header never holds one)
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def _old_tensor_sha256(t):                  # cache.py
    h = hashlib.sha256()
    b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    if b.numel():
        h.update(b.numpy())
    return h.hexdigest()


def _old_tensor_digest(tensors):            # seekr/importance.py (also the recipe's tensors)
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


JSONS = [{}, {"sha256": "x"}, {"b": 1, "a": [1.5, None, True, "é", {"z": 0, "y": -1e300}], "sha256": "old"},
         {"manifest_sha256": "1", "format": 1, "files": {"data.safetensors": {"bytes": 3, "sha256": "ab"}},
          "meta": {"nan": float("nan"), "ü": "∑"}}]


@pytest.mark.parametrize("obj", JSONS)
def test_json_digest_is_the_old_rule(obj):
    for skip in ("sha256", "manifest_sha256", "header_sha256", None):
        assert store.digest_json(obj, skip=skip) == _old_json_digest(obj, skip)
    if "meta" not in obj:
        assert store.digest_json(obj, skip="header_sha256") == _old_header_digest(obj)
    want = b'{"a":null,"b":[1,{"c":"\\u00e9","d":2}]}'
    assert store.canonical_json({"b": [1, {"d": 2, "c": "é"}], "a": None}) == want


def test_tensor_digests_are_the_old_rules():
    g = torch.Generator().manual_seed(0)
    ts = {"f": torch.randn(3, 4, generator=g), "h": torch.randn(2, 5, generator=g).to(torch.bfloat16),
          "i": torch.randint(-9, 9, (7,), generator=g, dtype=torch.int16), "b": torch.rand(4, generator=g) > 0.5,
          "e": torch.zeros(0, 3), "t": torch.randn(4, 6, generator=g).t(), "d": torch.randn(2, 2).double()}
    for t in ts.values():
        assert store.digest_tensor(t) == _old_tensor_sha256(t)
        assert store.digest_tensor(t) == hashlib.sha256(t.contiguous().numpy().tobytes()
                                                         if t.dtype != torch.bfloat16 else
                                                         t.view(torch.int16).contiguous().numpy().tobytes()).hexdigest()
    assert store.digest_tensors(ts) == _old_tensor_digest(ts)
    assert store.digest_tensors({}) == _old_tensor_digest({}) == hashlib.sha256().hexdigest()
    # names, dtypes and shapes count
    f = ts["f"]
    assert len({store.digest_tensors({"f": f}), store.digest_tensors({"g": f}),
                store.digest_tensors({"f": f.double()}), store.digest_tensors({"f": f.reshape(4, 3)})}) == 4


def test_bytes_and_file_digests(tmp_path):
    data = os.urandom(5 << 20)                 # more than one read chunk
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert store.digest_file(p) == store.digest_bytes(data) == store.digest_bytes(data[:7], data[7:]) == want
    assert store.file_entry(p) == {"bytes": len(data), "sha256": want}
    assert store.digest_bytes() == hashlib.sha256().hexdigest()


def test_seal_and_check_seal():
    obj = store.seal({"b": 1, "a": [2]})
    assert obj["sha256"] == store.digest_json({"a": [2], "b": 1})
    store.check_seal(obj, "x.json", "index")
    assert store.is_sealed(obj) and not store.is_sealed({"a": 1}) and store.is_sealed({"a": 1}, optional=True)
    obj["b"] = 2
    assert not store.is_sealed(obj, optional=True)
    with pytest.raises(KeyError, match="x.json: index checksum mismatch"):
        store.check_seal(obj, "x.json", "index", error=KeyError)
    store.check_seal({"a": 1}, "m.json", "manifest", key="manifest_sha256", optional=True)
    with pytest.raises(ValueError, match="m.json: manifest checksum mismatch"):
        store.check_seal({"a": 1}, "m.json", "manifest", key="manifest_sha256")


# ---------------------------------------------------------------- checked JSON
def test_read_json_names_the_file_and_checks_kind_and_version(tmp_path):
    p = tmp_path / "m.json"
    reads = {1: "first", 2: "second"}
    assert store.read_json(p, "thing", optional=True) is None
    with pytest.raises(RuntimeError, match=r"m.json: missing \(thing\)"):
        store.read_json(p, "thing", RuntimeError)
    with pytest.raises(ValueError, match="^gone$"):
        store.read_json(p, "thing", missing="gone")
    p.write_text('{"kind": "k", "format"')
    with pytest.raises(ValueError, match=r"m.json: unreadable thing \(JSONDecodeError"):
        store.read_json(p, "thing")
    p.write_text("[1]")
    with pytest.raises(ValueError, match=r"m.json: not a thing \(expected a JSON object\)"):
        store.read_json(p, "thing")
    p.write_text('{"kind": "other", "format": 1}')
    with pytest.raises(ValueError, match=r"m.json: not a thing \(kind 'other'\)"):
        store.read_json(p, "thing", kind="k")
    for bad in ("3", "true", '"1"', "1.0", "null", "[1]"):
        p.write_text('{"kind": "k", "format": %s}' % bad)
        with pytest.raises(ValueError, match=r"m.json: format .*, this version reads format 1 or 2$"):
            store.read_json(p, "thing", kind="k", versions=reads)
    p.write_text('{"kind": "k", "format": 2}')
    assert store.read_json(p, "thing", kind="k", versions=reads) == {"kind": "k", "format": 2}
    assert store.check_format({"kind": "k", "format": 2}, "w", "thing", kind="k", versions=reads) == "second"
    assert store.check_format({"v": 2}, "w", "thing", versions=(1, 2), version_key="v") == 2
    with pytest.raises(ValueError, match="^w: format v 3, this version reads format v 1$"):
        store.check_format({"v": 3}, "w", "thing", versions=(1,), version_key="v")


def test_write_json_layout(tmp_path):
    obj = {"b": [1, 2], "a": {"é": None}}
    store.write_json(tmp_path / "o.json", obj)
    raw = (tmp_path / "o.json").read_bytes()
    assert raw == json.dumps(obj, indent=1, sort_keys=True).encode() == store.json_bytes(obj)
    assert not raw.endswith(b"\n") and raw.isascii()


# ---------------------------------------------------------------- manifests
def _fill(d):
    os.makedirs(os.path.join(d, "sub", "deep"))
    for rel, data in (("a.bin", b"abc"), ("sub/b.txt", b"hello"), ("sub/deep/c", b""), ("sub/manifest.json", b"{}")):
        with open(os.path.join(d, rel), "wb") as f:
            f.write(data)


def test_manifest_round_trip_and_every_refusal(tmp_path):
    d = tmp_path / "ck"
    with atomic_dir(d) as tmp:
        _fill(tmp)
        man = store.write_manifest(tmp, {"format": 1, "kind": "k", "step": 3})
    assert sorted(man["files"]) == ["a.bin", "sub/b.txt", "sub/deep/c", "sub/manifest.json"]
    assert man["files"]["sub/b.txt"] == {"bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    assert (d / "manifest.json").read_bytes() == store.json_bytes(man)
    assert man["sha256"] == store.digest_json(man, skip="sha256")
    verify = lambda: store.verify_dir(d, "box", kind="k", versions={1: ""}, error=RuntimeError)  # noqa: E731
    assert verify() == man

    def refused(match):
        with pytest.raises(RuntimeError, match=match):
            verify()

    (d / "extra").write_bytes(b"x")
    refused(r"ck/extra: not part of the box \(not in manifest.json; 1 such file\(s\)\)")
    os.unlink(d / "extra")
    (d / "sub" / "b.txt").write_bytes(b"hellO")
    refused("sub/b.txt: checksum mismatch")
    (d / "sub" / "b.txt").write_bytes(b"hell")
    refused("sub/b.txt: 4 bytes, the manifest says 5 .truncated")
    os.unlink(d / "sub" / "b.txt")
    refused(r"sub/b.txt: missing \(listed in manifest.json\)")
    (d / "sub" / "b.txt").write_bytes(b"hello")
    verify()
    raw = (d / "manifest.json").read_bytes()
    (d / "manifest.json").write_bytes(raw.replace(b'"step": 3', b'"step": 4'))
    refused("ck/manifest.json: manifest checksum mismatch")
    (d / "manifest.json").write_bytes(raw.replace(b'"format": 1', b'"format": 7'))
    refused("ck/manifest.json: format 7, this version reads format 1")
    (d / "manifest.json").write_bytes(raw[:-5])
    refused("ck/manifest.json: unreadable box manifest")
    os.unlink(d / "manifest.json")
    refused(r"ck/manifest.json: missing \(an interrupted write, or not a box\)")
    with pytest.raises(RuntimeError, match="nothing: no such box directory"):
        store.verify_dir(tmp_path / "nothing", "box", kind="k", versions={1: ""}, error=RuntimeError)


def test_check_file_read_returns_the_checked_bytes(tmp_path):
    p = tmp_path / "d.bin"
    p.write_bytes(b"payload")
    entry = store.file_entry(p)
    assert store.check_file(p, entry, read=True) == b"payload"
    assert store.check_file(p, entry) is None
    p.write_bytes(b"payloaD")
    with pytest.raises(ValueError, match="d.bin: checksum mismatch"):
        store.check_file(p, entry, read=True)
    with pytest.raises(ValueError, match="d.bin: 7 bytes, the manifest says None"):
        store.check_file(p, None)


# ---------------------------------------------------------------- atomic_dir
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
