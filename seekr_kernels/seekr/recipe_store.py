"""The recipe's state on disk: a directory written atomically and verified on load.

``recipe.json`` (metadata with the sha256 of the tensors), ``tensors.safetensors``
(importance, the pre-task snapshot of a task in progress) and ``memory/`` (the replay
memory, one checksummed directory per task). :meth:`SeekrRecipe.save` and
:meth:`SeekrRecipe.load` call these.
"""
from __future__ import annotations

import os

from ..utils import store
from ..utils.store import atomic_dir

FORMAT = 1
KIND = "seekr-recipe"
_META = "recipe.json"
_TENSORS = "tensors.safetensors"
_MEMORY = "memory"


def save(recipe, path: str, *, memory: bool = True) -> None:
    """Write the state to directory ``path`` atomically (a reader sees the old one or
    the complete new one): ``recipe.json`` (metadata, with the sha256 of the tensors),
    ``tensors.safetensors`` (importance, pre-task snapshot) and ``memory/`` (one
    checksummed directory per task, :meth:`~seekr_kernels.ReplayMemory.save`). ``memory=False``
    leaves the memory out (a loop that keeps it elsewhere, e.g. the trainer's
    ``output_dir/memory``, passes it back to :func:`load`)."""
    from safetensors.torch import save as st_save

    from .memory import ReplayMemory
    sd = recipe.state_dict()
    tensors = {}
    if sd["importance"] is not None:
        tensors["importance"] = sd["importance"].contiguous()
    cur = sd["current"]
    if cur is not None:
        for k, v in (cur.pop("snapshot") or {}).items():
            tensors[f"snapshot/{k}"] = v.detach().cpu().contiguous()
    payload = st_save(tensors)
    meta = {k: v for k, v in sd.items() if k not in ("importance", "memory")}
    meta["heads"] = {str(l): h.tolist() for l, h in recipe.heads.items()}
    meta["tensors_sha256"] = store.digest_tensors(tensors)
    with atomic_dir(path) as tmp:
        with open(os.path.join(tmp, _TENSORS), "wb") as f:
            f.write(payload)
        if recipe.memory.tasks and memory:
            ReplayMemory(recipe.memory.tasks).save(os.path.join(tmp, _MEMORY))
        store.write_json(os.path.join(tmp, _META), meta)

def load(recipe, path: str, *, memory=None):
    """Restore a state written by :func:`save` into this recipe (same method and
    shape); a missing, corrupt or foreign file raises ``ValueError`` naming it.
    ``memory``: the replay memory (a ``ReplayMemory`` or its task list) of a state
    saved with ``memory=False``; its task names must be the state's."""
    from safetensors.torch import load as st_load

    from .memory import ReplayMemory
    meta_p = os.path.join(path, _META)
    meta = store.read_json(meta_p, "SeekrRecipe state", ValueError, kind=KIND,
                           missing=f"{meta_p}: missing (not a saved SeekrRecipe, or an interrupted write)")
    ten_p = os.path.join(path, _TENSORS)
    try:
        with open(ten_p, "rb") as f:
            tensors = st_load(f.read())
    except FileNotFoundError:
        raise ValueError(f"{ten_p}: missing") from None
    except Exception as e:  # safetensors raises its own types on a damaged header
        raise ValueError(f"{ten_p}: unreadable ({e})") from None
    if store.digest_tensors(tensors) != meta.get("tensors_sha256"):
        raise ValueError(f"{ten_p}: checksum mismatch (corrupt file)")
    mem_p = os.path.join(path, _MEMORY)
    if memory is not None:
        memory = list(getattr(memory, "tasks", memory))
        names = [t.name for t in memory]
        if recipe.uses_memory and names != list(meta.get("task_names") or []):
            raise ValueError(f"memory: holds tasks {names}, the state at {path} learned "
                             f"{meta.get('task_names')}")
    else:
        memory = ReplayMemory.load(mem_p, meta.get("task_names")).tasks if os.path.isdir(mem_p) else []
    sd = dict(meta)
    sd["importance"] = tensors.get("importance")
    sd["memory"] = memory
    cur = sd.get("current")
    if cur is not None:
        cur["snapshot"] = {k[len("snapshot/"):]: v for k, v in tensors.items() if k.startswith("snapshot/")}
    try:
        return recipe.load_state_dict(sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
