"""Run checkpoints: written atomically, every file checksummed, verified before use.

A checkpoint is a directory that ``from_pretrained`` can read (``config.json`` and
``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards and their index, or a
PEFT adapter), plus what a run needs to continue exactly where it stopped::

    checkpoints/step-000120/          a mid-task checkpoint (every train.save_steps steps)
        config.json, model.safetensors (or shards + model.safetensors.index.json)
        adapter_config.json, adapter_model.safetensors     (model.lora: adapters only)
        tokenizer files
        optimizer.pt, scheduler.pt, scaler.pt (fp16)       torch.load(weights_only=True)
        rng_state.json                  python, numpy, torch CPU and CUDA generators
        seekr/                          SeekrRecipe.save without the memory: importance,
                                        heads, the task in progress and its pre-task snapshot
        trainer_state.json              step counters, position in the task, replay
                                        schedule, accuracy rows, the resolved config
        manifest.json                   size and SHA-256 of every file above; written last
    checkpoints/task-002/             the same at the end of task 2 (no position)

:func:`write` builds the directory in a temporary sibling and renames it into place
(:func:`~seekr_kernels.utils.store.atomic_dir`), writing the manifest last
(:func:`~seekr_kernels.utils.store.write_manifest`): a directory without a valid manifest
is an interrupted write. :func:`verify` checks every file against the manifest
(:func:`~seekr_kernels.utils.store.verify_dir`: missing, truncated, extra or changed
files, and the manifest's own checksum) and raises :class:`CheckpointError` naming the
file; the trainer verifies a checkpoint completely before it reads any byte of it, so a
damaged checkpoint is refused, never loaded into a silently different run.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from typing import Callable, List, Optional, Tuple

import torch

from ..utils import store
from ..utils.store import _owner, _writer_dead, atomic_dir, clean_leftovers

__all__ = ["CheckpointError", "ResumeError", "write", "verify", "discard", "list_checkpoints",
           "rng_state", "set_rng_state", "save_torch", "load_torch",
           "load_model_weights", "is_peft_model", "clean_run_leftovers"]

FORMAT = 1
#: The manifest versions this build reads (the versioned reader's table).
READS = {1: "the first: files with size and SHA-256, run meta, sealed under 'sha256'"}
KIND = "seekr-checkpoint"
MANIFEST = store.MANIFEST
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
RNG = "rng_state.json"
SEEKR = "seekr"

_STEP = re.compile(r"^step-(\d+)$")
_TASK = re.compile(r"^task-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is damaged, incomplete or does not belong to this run (the
    message names the file)."""


class ResumeError(RuntimeError):
    """An output directory that cannot be resumed (or started) as asked: it holds a run
    and neither resume nor overwrite was asked, the config differs, the run state is
    damaged. The message says what to do."""


# ============================================================================ write / verify

def write(path: str, fill: Callable[[str], None], *, meta: Optional[dict] = None) -> dict:
    """Build checkpoint ``path`` atomically: ``fill(tmp)`` writes the files into a
    temporary directory, then the manifest (size and SHA-256 of each file, ``meta``) is
    written last and the directory renamed into place. Returns the manifest."""
    with atomic_dir(path) as tmp:
        fill(tmp)
        man = store.write_manifest(tmp, {"format": FORMAT, "kind": KIND, **(meta or {})})
    return man


def verify(path: str) -> dict:
    """Check every file of checkpoint ``path`` against its manifest; returns the manifest.

    Raises :class:`CheckpointError` naming the file: no manifest (an interrupted or
    foreign directory), an edited manifest, a missing file, a file of another size
    (truncated), a file whose SHA-256 differs (damaged), or a file the manifest does not
    list.
    """
    return store.verify_dir(path, "checkpoint", kind=KIND, versions=READS, error=CheckpointError,
                            missing=f"{os.path.join(path, MANIFEST)}: missing (an interrupted write, or not a "
                                    "seekr checkpoint)")


def discard(path: str) -> None:
    """Delete a checkpoint (or any run directory) so that a kill midway leaves nothing
    that looks like one: it is renamed to a temporary name first, which the next
    :func:`clean_run_leftovers` removes if this process dies."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".{name}.tmp-{_owner()}-del")
    try:
        os.replace(path, tmp)
    except OSError:
        tmp = path
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def list_checkpoints(root: str) -> List[Tuple[str, int, str]]:
    """Checkpoint directories under ``root`` as ``(kind, number, path)``, kind ``"step"``
    or ``"task"`` (complete or not: :func:`verify` says)."""
    out = []
    with contextlib.suppress(OSError):
        for n in os.listdir(root):
            p = os.path.join(root, n)
            m = _STEP.match(n) or _TASK.match(n)
            if m and os.path.isdir(p):
                out.append(("step" if n.startswith("step") else "task", int(m.group(1)), p))
    return out


# Temporaries of an older write_json: ".<name>.tmp<pid>" (no owner tag).
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def clean_run_leftovers(out: str) -> List[str]:
    """What killed writers left in a run directory: temporaries and swapped-out copies
    of checkpoints, memory tasks, state and result files (see
    :func:`~seekr_kernels.utils.store.clean_leftovers`), and ``.<name>.tmp<pid>`` files of
    dead processes. Returns what it removed or recovered."""
    done = []
    for d in (out, os.path.join(out, "checkpoints"), os.path.join(out, "memory")):
        if os.path.isdir(d):
            done += clean_leftovers(d, any_name=True)
    with contextlib.suppress(OSError):
        for n in os.listdir(out):
            m = _LEGACY_TMP.match(n)
            p = os.path.join(out, n)
            if m and os.path.isfile(p) and _writer_dead(None, int(m["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(p)
                    done.append(p)
    return done


# ============================================================================ small files

def save_torch(path: str, obj) -> None:
    """``torch.save`` of plain state (tensors, numbers, strings, lists, dicts)."""
    torch.save(obj, path)


def load_torch(path: str):
    """Load a verified state file with ``weights_only=True`` (no code runs on load)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pragma: no cover - the manifest was checked first
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def rng_state() -> dict:
    """Python, numpy, torch CPU and (every device's) CUDA generator states, as JSON."""
    v, st, gauss = random.getstate()
    out = {"python": [v, list(st), gauss], "torch_cpu": torch.get_rng_state().numpy().tobytes().hex()}
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [kind, [int(x) for x in keys], int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(st: dict) -> None:
    """Restore :func:`rng_state` output (CUDA states only when the device count matches)."""
    v, s, gauss = st["python"]
    random.setstate((v, tuple(s), gauss))
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(st["torch_cpu"]), dtype=torch.uint8).clone())
    if "numpy" in st:
        import numpy as np
        kind, keys, pos, has_gauss, cached = st["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = st.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8).clone()
                                      for h in cuda])


# ============================================================================ model files

def is_peft_model(model) -> bool:
    """A PEFT model (checked without importing peft)."""
    return any(c.__module__.split(".")[0] == "peft" and c.__name__ == "PeftModel" for c in type(model).__mro__)


def _read_safetensors(p: str) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(p)
    except Exception as e:  # pragma: no cover - the manifest was checked first
        raise CheckpointError(f"{p}: unreadable ({type(e).__name__}: {e})") from None


def model_files(path: str) -> List[str]:
    """The weight files ``save_pretrained`` wrote in ``path`` (one file or the shards its
    index names)."""
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        wm = store.read_json(idx, "shard index", CheckpointError).get("weight_map")
        if not isinstance(wm, dict):
            raise CheckpointError(f"{idx}: no weight_map")
        return [os.path.join(path, f) for f in sorted(set(wm.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: holds no model.safetensors or model.safetensors.index.json")


def load_model_weights(model, path: str) -> None:
    """Load the weights of checkpoint ``path`` into ``model`` in place: a PEFT model
    takes ``adapter_model.safetensors``, any other model ``model.safetensors`` or its
    shards (tied output embeddings re-tied). Every parameter must be found."""
    if is_peft_model(model):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        p = os.path.join(path, "adapter_model.safetensors")
        if not os.path.exists(p):
            raise CheckpointError(f"{p}: missing (the run trains LoRA adapters; this checkpoint holds a full model)")
        sd = _read_safetensors(p)
        want = set(get_peft_model_state_dict(model))
        if set(sd) != want:
            raise CheckpointError(f"{p}: adapters do not match the model (missing {sorted(want - set(sd))[:5]}, "
                                  f"unexpected {sorted(set(sd) - want)[:5]}); another model.lora setting?")
        set_peft_model_state_dict(model, sd)
        return
    if os.path.exists(os.path.join(path, "adapter_model.safetensors")):
        raise CheckpointError(f"{path}: holds LoRA adapters, the run trains the full model (model.lora is not set)")
    sd = {}
    for f in model_files(path):
        sd.update(_read_safetensors(f))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
