"""Checks a run passes before it trains, so that no config or file fault surfaces after a
task of training.

:func:`check_run` (before anything is loaded): the device and the distillation backend
exist on this machine, ``model.path`` / ``model.tokenizer`` are model and tokenizer
folders, ``output_dir`` is a folder that is empty or holds a seekr run. That run's
``state.json`` is verified by the trainer when it decides how to start (resume,
overwrite: :mod:`seekr_kernels.run.rundir`).

:func:`check_tasks` (once the data and the tokenizer are loaded): every task has training
data and enough of it for one step; and warnings (:class:`RunWarning`) for what trains
but not quite as the config reads: a task smaller than ``train.batch_size``, a missing
evaluation split (evaluation falls back to another split), sequences longer than the
model's ``max_position_embeddings``, replay batches larger than the replay memory. A
replay method whose memory never fills one replay batch (it would train as ``sft``) is
refused.

Errors are :class:`~seekr_kernels.seekr.config.ConfigError` (naming the key),
:class:`~seekr_kernels.run.data.DataError` (naming the file); the ``seekr`` command
prints each as one line.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional, Sequence

from ..seekr.config import ConfigError, RunWarning
from ..seekr.stream import replay_batch_size, replay_count, replays_in_accumulation
from .config import RunConfig
from .rundir import RUN_ENTRIES


#: Files that make a folder a tokenizer folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "seekr_tokenizer.json", "spiece.model")


def _warn(msg: str) -> None:
    warnings.warn(msg, RunWarning, stacklevel=2)


# ============================================================================ before loading

def num_threads(setting: Optional[int], device_type: str = "cpu", local_processes: Optional[int] = None):
    """``(n, why)``: the torch CPU (intra-op) threads of this process for
    ``train.num_threads``.

    A number is used as it is. ``null`` keeps torch's current count (its default: the
    cores, or ``OMP_NUM_THREADS``) on a GPU (the CPU only feeds it) and when
    ``OMP_NUM_THREADS`` is set (torchrun sets 1 per process); on a CPU it takes this
    process's share of the cores (cores / processes on this machine), but 1 when the
    machine is already busy (the 1-minute load average is at least the number of
    cores): oversubscribed threads wait on each other, and on a loaded machine the
    default count was measured 2-30x slower than one thread. 1 vs 2 threads gave a
    bit-identical smoke run (``examples/smoke.yaml``), so the count decides speed only."""
    import torch
    if setting:
        return int(setting), "train.num_threads"
    now = torch.get_num_threads()
    if device_type != "cpu":
        return now, "torch's default (the model runs on a GPU)"
    if os.environ.get("OMP_NUM_THREADS"):
        return now, "OMP_NUM_THREADS"
    cores = os.cpu_count() or now
    if local_processes is None:           # torchrun's processes on this machine
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):       # no load average on this platform
        load = 0.0
    if load >= cores:
        return 1, f"the machine is busy (load average {load:.1f} on {cores} cores)"
    share = max(1, min(now, cores // max(1, int(local_processes))))
    return share, f"{share} of {cores} cores for each of {local_processes} process(es) here"


def check_start(output_dir: str, resume, overwrite: bool) -> None:
    """The run directory's start refusal (:meth:`RunDirectory.start`: a folder holding a
    run, and neither resume nor overwrite asked), before the model is built."""
    if resume or overwrite:
        return
    from .rundir import RunDirectory
    RunDirectory(output_dir, main=False).start(resume, overwrite)


def check_run(cfg: RunConfig) -> None:
    """Everything checkable before data and model are loaded."""
    check_device(cfg)
    check_backend(cfg)
    check_model_paths(cfg)
    check_output_dir(cfg.output_dir)
    # state.json is verified by the trainer when it decides how the run starts (checksum,
    # agreement with its checkpoint, the newest good checkpoint named on damage), so that
    # --overwrite still works on a damaged run.


def _device_type(cfg: RunConfig) -> str:
    import torch
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if cfg.device.startswith("cuda") else "cpu"


def check_device(cfg: RunConfig) -> None:
    """``device: cuda`` / ``cuda:N`` needs that CUDA device here."""
    import torch
    d = cfg.device
    if not d.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {d!r} but no CUDA device is available here (torch {torch.__version__}, "
                          f"CUDA {torch.version.cuda or 'not built'}); use device: auto or cpu")
    if ":" in d:
        idx = d.split(":", 1)[1]
        if not idx.isdigit():
            raise ConfigError(f"device: expected cuda:N with N a device index, got {d!r}")
        if int(idx) >= torch.cuda.device_count():
            raise ConfigError(f"device: {d!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")


#: Kernels a method runs with ``distill.backend`` (seekr: the attention KL, the teacher's
#: attention rows, forgettability), and which backends each op has.
_SEEKR_OPS = {"attention_kl": ("triton", "cpu", "cuda", "torch"),
              "attention_probs": ("triton", "cpu", "cuda", "torch"),
              "attention_sqdiff": ("triton", "torch")}


def check_backend(cfg: RunConfig) -> None:
    """An explicit ``distill.backend`` must exist here for the device the run uses and
    implement every kernel the method runs."""
    b = cfg.distill.backend
    if cfg.method != "seekr" or b in ("auto", "torch"):
        return
    import torch

    from .._backend import available
    dev = torch.device(_device_type(cfg))
    ok, why = available(b, dev)
    if not ok:
        extra = " (TRITON_INTERPRET=1 runs it on CPU tensors, slowly)" if b == "triton" and dev.type == "cpu" else ""
        raise ConfigError(f"distill.backend: {b!r} cannot run here: {why}{extra}; use auto or torch")
    missing = [op for op, has in _SEEKR_OPS.items() if b not in has]
    if missing:
        raise ConfigError(f"distill.backend: {b!r} has no {', '.join(missing)} kernel, which the seekr "
                          "method runs (forgettability); use auto, triton or torch")


def check_model_paths(cfg: RunConfig) -> None:
    """``model.path`` is a Hugging Face model folder, ``model.tokenizer`` (or the model
    folder, when it is the tokenizer's source) holds tokenizer files."""
    m = cfg.model
    if m.path:
        if not os.path.isdir(m.path):
            raise ConfigError(f"model.path: {m.path} is not a directory (models load from local Hugging Face "
                              "folders only)")
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ConfigError(f"model.path: {m.path} has no config.json (not a Hugging Face model folder)")
    tok, key = (m.tokenizer, "model.tokenizer") if m.tokenizer else (m.path, "model.path")
    if tok:
        if not os.path.isdir(tok):
            raise ConfigError(f"{key}: {tok} is not a directory")
        if not any(os.path.isfile(os.path.join(tok, f)) for f in _TOKENIZER_FILES):
            what = "model.tokenizer" if key == "model.path" else "a tokenizer folder"
            raise ConfigError(f"{key}: {tok} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); "
                              f"give {what}")


def check_output_dir(path: str, key: str = "output_dir") -> None:
    """``path`` can hold this run: it does not exist yet, is empty, or is a seekr run
    directory (:data:`RUN_ENTRIES`; whether it is *this* run is decided by the resume
    logic). A file, or a folder with other contents, is a :class:`ConfigError`."""
    if os.path.isfile(path) or (os.path.exists(path) and not os.path.isdir(path)):
        raise ConfigError(f"{key}: {path} is a file, not a directory")
    if os.path.isdir(path):
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
        if entries and not any(e in RUN_ENTRIES for e in entries):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(f"{key}: {path} is not empty and holds no seekr run (it has {shown}; no "
                              "state.json or log.jsonl); choose another output_dir")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"{key}: {path} cannot be created: {parent} is a file")


# ============================================================================ after loading data

def eval_split(task, split: str, warn: bool = False, where: str = ""):
    """The examples a task is evaluated on: ``split``, else the first non-empty of eval,
    test, train (the fallback named in a :class:`RunWarning` when ``warn``)."""
    exs = task.split(split)
    if exs:
        return exs
    for other in ("eval", "test", "train"):
        if other != split and task.split(other):
            if warn:
                what = "its training data (scores then measure memorisation)" if other == "train" \
                    else f"its {other!r} split"
                _warn(f"{where or 'task ' + task.name}: no {split!r} split (eval.split); evaluation uses {what}")
            return task.split(other)
    return []


def model_max_positions(cfg: RunConfig, model=None) -> Optional[int]:
    """``max_position_embeddings`` of the run's model (the object, its folder's
    config.json, or the tiny architecture built from ``model.arch``)."""
    if model is not None:
        return getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if cfg.model.path:
        try:
            with open(os.path.join(cfg.model.path, "config.json"), encoding="utf-8") as f:
                v = json.load(f).get("max_position_embeddings")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        return v if isinstance(v, int) else None
    from .models import TINY_ARCH
    return {**TINY_ARCH, **(cfg.model.arch or {})}.get("max_position_embeddings")


def check_tasks(cfg: RunConfig, tasks: Sequence, tokenizer=None, *, world: int = 1,
                max_positions: Optional[int] = None, warn: bool = True) -> None:
    """Data-level checks once ``tasks`` (:class:`~seekr_kernels.run.data.Task`) are
    loaded: errors for a task without training data or with fewer samples than one step
    needs; :class:`RunWarning` for the cases in the module docstring (``warn=False``: the
    errors only, e.g. on all ranks but the first)."""
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", RunWarning)
        _check_tasks(cfg, tasks, tokenizer, world, max_positions)


def _check_tasks(cfg, tasks, tokenizer, world, max_positions):
    from .data import DataError
    tr = cfg.train
    A = tr.grad_accum
    if tr.batch_size < world * A:
        raise ConfigError(f"train.batch_size: {tr.batch_size} is smaller than world size x train.grad_accum = "
                          f"{world} x {A}: every process and accumulation micro-step needs a sample")
    if tr.batching == "per_device" and tr.batch_size % (world * A):
        raise ConfigError(f"train.batch_size: {tr.batch_size} is not a multiple of world size x train.grad_accum = "
                          f"{world} x {A}, which train.batching: per_device needs (a per-device batch)")
    where = [f"tasks[{i}] ({t.name})" for i, t in enumerate(tasks)]
    for w, t in zip(where, tasks):
        n = len(t.train)
        if n == 0:
            raise DataError(f"{w}: no training samples")
        if n < tr.batch_size:
            _warn(f"train.batch_size: {w} has {n} training sample(s), fewer than train.batch_size="
                  f"{tr.batch_size}: each epoch is a single, short step")
        eval_split(t, cfg.eval.split, warn=True, where=w)
    if tokenizer is not None and max_positions:
        _check_lengths(cfg, tasks, where, tokenizer, max_positions)
    if cfg.method != "sft" and len(tasks) > 1:
        _check_replay_batches(cfg, tasks, world)


def _check_lengths(cfg, tasks, where, tokenizer, max_positions):
    from .data import encode_example
    tr = cfg.train
    if tr.max_prompt_len + tr.max_answer_len <= max_positions:
        return
    for w, t in zip(where, tasks):
        exs = list(t.train) + list(eval_split(t, cfg.eval.split))
        lens = [len(e.prompt_ids) + len(e.answer_ids) for e in
                (encode_example(x, tokenizer, tr.max_prompt_len, tr.max_answer_len) for x in exs)]
        over = [n for n in lens if n > max_positions]
        if over:
            _warn(f"train.max_prompt_len/max_answer_len: {len(over)} of {len(lens)} sequences of {w} are longer "
                  f"than the model's max_position_embeddings={max_positions} (up to {max(over)} tokens); the "
                  "positions beyond it were never trained: lower train.max_prompt_len + train.max_answer_len")


def _check_replay_batches(cfg, tasks, world):
    rc = cfg.replay
    in_acc = replays_in_accumulation(cfg)
    bs, need = replay_batch_size(cfg, world)
    what = f"replay batches of {bs} samples" + ("" if rc.batch_size else " (the default: train.batch_size"
                                                + (" / train.grad_accum)" if in_acc else ")"))
    if bs < need:     # the recipe refuses it at the first replay step: say it now
        raise ConfigError(f"replay.batch_size: {what} are fewer than the {need} samples a replay batch needs "
                          "(one per process and accumulation micro-step)")
    mem, short, none, replays = 0, [], [], False
    for i, t in enumerate(tasks):
        if i:
            if mem < need:
                none.append(t.name)
            elif mem < bs:
                short.append((t.name, mem))
            replays = replays or mem >= need
        mem += replay_count(len(t.train), rc.ratio)
    if not replays:
        raise ConfigError(f"replay.ratio: the replay memory never holds the {need} samples a replay batch needs "
                          f"(one per process and accumulation micro-step): method {cfg.method} would never "
                          "replay; raise replay.ratio")
    if none:
        _warn(f"replay.ratio: no replay before task(s) {', '.join(none)}: the memory holds fewer than the {need} "
              "samples a replay batch needs")
    if short:
        name, m = short[0]
        more = f" (and {len(short) - 1} later task(s))" if len(short) > 1 else ""
        _warn(f"replay.batch_size: {what}, but the replay memory holds only {m} before task {name}{more}: "
              "those replay batches are the whole memory")
