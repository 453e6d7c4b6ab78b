"""SEEKR inside the Hugging Face ``Trainer`` and TRL's ``SFTTrainer``.

One task is one ``trainer.train()`` call; SEEKR runs inside it::

    from seekr_kernels.hf import SeekrConfig, SeekrTrainer

    args = SeekrConfig(output_dir="run", per_device_train_batch_size=8, seekr_method="seekr",
                       replay_ratio=0.01, query_budget=100, report_to="tensorboard")
    trainer = SeekrTrainer(model=model, args=args, processing_class=tokenizer)
    for name, ds in tasks:                       # rows: input_ids + labels (-100 on the prompt)
        trainer.train_task(ds, name)             # begin_task, train() with replay, end_task
    trainer.recipe.save("run/seekr")             # memory, importance, heads (atomic)

What happens in ``train()`` (the moments of :class:`~seekr_kernels.SeekrRecipe`):

* when training begins (after accelerate/DeepSpeed/FSDP have wrapped the model), the
  recipe's ``begin_task`` draws the task's replay subset from ``train_dataset`` and keeps
  what forgettability needs of the pre-task model (trainable parameters on the host, so
  PEFT/LoRA adapters only; head rows under FSDP);
* the training dataloader is the Trainer's own, with replay batches interleaved: before
  every ``replay_cycle``-th optimiser step (the recipe's :class:`ReplaySchedule`) one
  optimiser step runs on a replay batch mixed from the memory of earlier tasks — the
  same global batch on every process, each taking its slice of every accumulation
  micro-step. The Trainer counts those steps like any other (learning-rate schedule,
  ``max_steps``, logging, checkpoints);
* :meth:`SeekrTrainerMixin.compute_loss` gives replay batches the recipe's
  ``(1 - a) CE + a logits-KL + b attention-KL`` and every other batch the Trainer's own
  loss (``super().compute_loss``: TRL's SFT loss under ``SeekrSFTTrainer``);
* after the last step ``end_task`` measures sensitivity and forgettability, reselects the
  heads, captures the teacher and adds the samples to the memory.

Every checkpoint holds the recipe state (``seekr_recipe/``); ``train(resume_from_checkpoint=...)``
restores it and resumes the task where it stopped, replay position included (while
``train()`` runs, the Trainer's ``skip_first_batches`` skips inside the replay loader).
A checkpoint is complete once ``seekr_recipe/manifest.json`` is written, last: the SEEKR
files with their SHA-256, the Trainer's files with their size (:func:`verify_checkpoint`).
``resume_from_checkpoint=True`` takes the newest complete checkpoint (one a kill left
half-written is skipped); an incomplete one passed by path is refused, naming the newest
complete one. ``save_total_limit`` rotates older checkpoints out only once the new one is
complete. ``train_task`` also saves each task's end (``<output_dir>/<task>/final``: model,
RNG, recipe state after ``end_task``, manifest), and ``train_tasks(tasks, resume=True)``
continues a killed sequence from those and the checkpoints (:meth:`SeekrTrainerMixin.train_tasks`).
Logs count one step across the sequence (:meth:`SeekrTrainerMixin.log`).

Loss normalisation follows transformers' convention: ``compute_loss`` keeps the
``num_items_in_batch`` argument and returns this process's share of the accumulated
global batch, scaled by the number of processes (DDP, FSDP and DeepSpeed average
gradients). A replay window's ``num_items_in_batch`` is the global replay batch's target
count (what the Trainer counts with ``average_tokens_across_devices=True``); passed
explicitly it is honoured. The replay terms reach the Trainer's ``log`` as
``replay_loss``, ``replay_ce``, ``replay_logits_kl`` and ``replay_attn_kl`` (the mean
over the replay steps since the last log of the global batch's values), so every
``report_to`` integration (TensorBoard, W&B, MLflow) records them. The Trainer's own
``loss`` stays the mean over all optimiser steps, replay steps included.

``replay_in_accumulation`` (published: DeepSpeed counts the replay batch as a micro-step)
makes a replay micro-batch one micro-step of the next accumulation window instead of an
optimiser step of its own; every micro-step's loss is then its own mean divided by the
accumulation steps, as DeepSpeed scales it (``num_items_in_batch`` is not used).

Distributed: ``torchrun`` with DDP, FSDP2 through accelerate (``fsdp=...``,
``fsdp_config={"version": 2}``) and DeepSpeed ZeRO-1/2 (``deepspeed=...``). The recipe's
statistics are all-reduced over the job's process group; under FSDP every process runs
the same forward passes and forgettability compares head rows. Under DeepSpeed the
recipe's own backward passes (task sensitivity) run with the parameters frozen, so the
ZeRO gradient hooks see nothing. ZeRO-3 is refused (parameters are partitioned outside
the engine's forward).
"""
import contextlib
import itertools
import logging
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..run import metrics
from ..seekr.config import ConfigError, RecipeConfig, recipe_from_dict
from ..seekr.batching import IGNORE_INDEX, Encoded, as_pair, collate, shard
from ..seekr.distributed import DistributedHooks
from ..seekr.recipe import SeekrRecipe
from ..utils import store

__all__ = ["SeekrArguments", "SeekrConfig", "SeekrTrainerMixin", "SeekrTrainer", "SeekrDataCollator",
           "SeekrSFTConfig", "SeekrSFTTrainer", "seekr_trainer_class", "task_samples", "REPLAY_KEY",
           "SeekrCheckpointError", "verify_checkpoint", "last_checkpoint"]

#: The key under which an interleaved replay batch travels through the Trainer.
REPLAY_KEY = "seekr_replay"
#: The recipe state inside each Trainer checkpoint directory.
RECIPE_DIR = "seekr_recipe"
#: A task's end inside its folder (``<output_dir>/<task>/final``).
FINAL_DIR = "final"
#: ``train_tasks``' score rows, in ``output_dir``.
SCORES_FILE = "seekr_scores.json"
SCORES_KIND = "seekr-hf-scores"

logger = logging.getLogger(__name__)


# ============================================================================ arguments

# The fields are generated from the recipe config's dataclasses (seekr_kernels.seekr.config),
# where each key and its help live: a new recipe key is a new field there and nothing here.
import dataclasses as _dc        # noqa: E402
import typing as _typing         # noqa: E402

from ..seekr import config as _rc  # noqa: E402

#: Field names of recipe keys: a ``replay`` key is ``replay_<key>``, a ``distill`` key and a
#: top-level key keep their name, except these (the names TrainingArguments or TRL's
#: SFTConfig would read otherwise).
_HF_NAMES = {"method": "seekr_method", "preset": "seekr_recipe", "pad_to_multiple_of": "replay_pad_to_multiple_of",
             "distill.backend": "seekr_backend"}
#: Recipe keys the training arguments give (:meth:`SeekrArguments.seekr_recipe_config`):
#: seed, the global batch (per_device_train_batch_size x processes x accumulation steps),
#: gradient_accumulation_steps.
_FROM_TRAINING_ARGS = ("seed", "batch_size", "grad_accum")
#: Fields with the config's default; every other field defaults to None: the package
#: default, or the published value with seekr_recipe="official".
_KEEP_DEFAULT = ("method", "preset")


def _recipe_keys():
    """``(path, field, type)`` of every recipe key, in :class:`RecipeConfig`'s order."""
    hints = _typing.get_type_hints(RecipeConfig)
    for f in _dc.fields(RecipeConfig):
        if _dc.is_dataclass(hints[f.name]):
            sub = _typing.get_type_hints(hints[f.name])
            for g in _dc.fields(hints[f.name]):
                yield (f.name, g.name), g, sub[g.name]
        elif f.name not in _FROM_TRAINING_ARGS:
            yield (f.name,), f, hints[f.name]


def _hf_name(path) -> str:
    dotted = ".".join(path)
    if dotted in _HF_NAMES:
        return _HF_NAMES[dotted]
    return "replay_" + path[-1] if path[0] == "replay" else path[-1]


# field name -> path in the recipe config (recipe_from_dict)
_FIELDS = {_hf_name(path): path for path, _, _ in _recipe_keys()}
_BY_PATH = {".".join(v): k for k, v in _FIELDS.items()}


def _hf_names(text: str) -> str:
    """The dotted recipe keys in ``text`` under the field names of the arguments."""
    import re
    return re.sub(r"\b[a-z_]+(?:\.[a-z_]+)+\b", lambda m: _BY_PATH.get(m.group(0), m.group(0)), text)


def _help(text, package=None, official=None):
    if package is not None:
        text += f" Default: {package}" + (f" ({official} with seekr_recipe='official')." if official is not None
                                          else ".")
    return {"help": text}


def _recipe_field(path, f, tp):
    """The argument field of the recipe key ``path``: the config's help (keys under field
    names) with its default and the official one; ``Optional[type]`` defaulting to None
    unless the key is in :data:`_KEEP_DEFAULT` (a free-form key, typed Any, is a string)."""
    if _typing.get_origin(tp) is _typing.Union:     # Optional[X]
        tp = next(a for a in _typing.get_args(tp) if a is not type(None))
    base = str if tp is Any else tp
    text = _hf_names(f.metadata["help"])
    if ".".join(path) in _KEEP_DEFAULT:
        return base, field(default=f.default, metadata=_help(text))
    off = _rc.official_value(path)
    if f.default is None:     # the help says what the default is
        return Optional[base], field(default=None, metadata=_help(text))
    return Optional[base], field(default=None, metadata=_help(
        text, repr(f.default), None if off is _dc.MISSING or off == f.default else repr(off)))


def _with_recipe_fields(cls):
    """Adds one field per recipe key (:data:`_FIELDS`) to the dataclass-to-be ``cls``."""
    ann = dict(cls.__dict__.get("__annotations__", {}))
    for path, f, tp in _recipe_keys():
        name = _hf_name(path)
        ann[name], fld = _recipe_field(path, f, tp)
        setattr(cls, name, fld)
    cls.__annotations__ = ann
    return cls


@dataclass
@_with_recipe_fields
class SeekrArguments:
    """SEEKR's options as ``TrainingArguments`` fields (the recipe config under flat names,
    generated from :class:`~seekr_kernels.seekr.config.RecipeConfig`: ``replay_<key>`` for
    the replay section, the key itself for the distill section, and ``seekr_method``,
    ``seekr_recipe`` (the preset), ``seekr_backend``, ``replay_pad_to_multiple_of``).

    Mixed into :class:`SeekrConfig` (with ``TrainingArguments``) and ``SeekrSFTConfig``
    (with TRL's ``SFTConfig``). A field left at ``None`` takes the package default, or the
    published value with ``seekr_recipe="official"``; a value given explicitly always
    wins. The seed, the global batch (``per_device_train_batch_size x processes x
    gradient_accumulation_steps``) and the accumulation steps come from the training
    arguments.
    """

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self._check_checkpointing()
        self.seekr_recipe_config(batch_size=1, grad_accum=1)      # validate the SEEKR fields now

    def _check_checkpointing(self):
        if not (getattr(self, "activation_checkpointing", None) or getattr(self, "gradient_checkpointing", None)):
            return
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            kw = getattr(self, name, None)
            if isinstance(kw, dict) and kw.get("use_reentrant") is True:
                raise ValueError(f"{name}: use_reentrant=True runs the forward pass without gradients, so SEEKR's "
                                 "attention losses could not be backpropagated; use {'use_reentrant': False}")

    def seekr_dict(self) -> dict:
        """The SEEKR fields as a :func:`~seekr_kernels.seekr.config.recipe_from_dict` dict
        (fields left at None are omitted)."""
        out: Dict[str, Any] = {}
        for name, path in _FIELDS.items():
            v = getattr(self, name)
            if v is None:
                continue
            d = out
            for k in path[:-1]:
                d = d.setdefault(k, {})
            d[path[-1]] = v
        return out

    def seekr_recipe_config(self, batch_size: Optional[int] = None, grad_accum: Optional[int] = None) -> RecipeConfig:
        """The :class:`RecipeConfig` of these arguments (``ConfigError`` names the field)."""
        d = self.seekr_dict()
        ga = int(grad_accum if grad_accum is not None else getattr(self, "gradient_accumulation_steps", 1))
        if batch_size is None:
            world = int(getattr(self, "world_size", 1) or 1)
            batch_size = int(getattr(self, "per_device_train_batch_size", 1)) * world * ga
        d.update(batch_size=int(batch_size), grad_accum=ga, seed=int(getattr(self, "seed", 42)))
        try:
            return recipe_from_dict(d)
        except ConfigError as e:
            raise ConfigError(_field_message(str(e))) from None


def _field_message(msg: str) -> str:
    """A recipe ConfigError ("distill.query_budget: ...", "method: ...") in the field names
    of the arguments: the key it is about, and every dotted key it names."""
    key, sep, rest = msg.partition(": ")
    return _hf_names(_BY_PATH.get(key, key) + sep + rest)


@dataclass
class SeekrConfig(SeekrArguments, TrainingArguments):
    """``TrainingArguments`` plus SEEKR's fields (:class:`SeekrArguments`), for
    :class:`SeekrTrainer`. ``remove_unused_columns`` defaults to False: a dataset may hold
    ``prompt_ids``/``answer_ids`` rows that :class:`SeekrDataCollator` turns into model
    inputs (a column the model does not take must reach the collator). Gradient
    checkpointing must be non-reentrant (transformers' default)."""
    remove_unused_columns: bool = field(default=False, metadata=_help(
        "Drop dataset columns the model's forward does not take (False: SEEKR's collator reads "
        "prompt_ids/answer_ids)."))


# ============================================================================ data

def _row_pair(row, i=0):
    """(prompt_ids, answer_ids) of one dataset row: ``prompt_ids``/``answer_ids``;
    ``input_ids`` with ``labels`` (-100 on the prompt), ``completion_mask`` or
    ``assistant_masks`` (TRL: 1 on the supervised suffix); or ``input_ids`` alone (every
    token supervised)."""
    if isinstance(row, Encoded) or not isinstance(row, Mapping):
        return as_pair(row, i)
    if "prompt_ids" in row and "answer_ids" in row:
        return as_pair(row, i)
    if "input_ids" not in row:
        raise ValueError(f"task_samples[{i}]: expected prompt_ids/answer_ids or input_ids (+ labels, "
                         f"completion_mask or assistant_masks), got {sorted(row)}")
    ids = torch.as_tensor(row["input_ids"]).reshape(-1)
    if row.get("labels") is not None:
        lab = row["labels"]
    else:
        m = None
        for k in ("completion_mask", "assistant_masks"):
            if row.get(k) is not None:
                m = torch.as_tensor(row[k]).reshape(-1).bool()
                if m.shape != ids.shape:
                    raise ValueError(f"task_samples[{i}]: {k} differs in length from input_ids")
                break
        lab = ids.clone() if m is None else torch.where(m, ids, torch.full_like(ids, IGNORE_INDEX))
    return as_pair({"input_ids": ids, "labels": lab, "attention_mask": row.get("attention_mask")}, i)


class task_samples(Sequence):
    """A task's rows as the recipe reads them, converted when indexed (``begin_task`` reads
    only the drawn replay samples). Rows: see :func:`_row_pair`."""

    def __init__(self, dataset):
        try:
            self._n = len(dataset)
        except TypeError:
            raise TypeError("train_dataset: SEEKR draws each task's replay samples by index; an iterable "
                            "dataset without len() cannot be used (convert it to a map-style dataset)") from None
        self.dataset = dataset

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        p, a = _row_pair(self.dataset[i], i)
        return Encoded(p, a)


class SeekrDataCollator:
    """Left-padded causal-LM batches (``input_ids``, ``attention_mask``, ``position_ids``
    counting real tokens, ``labels`` -100 on prompt and padding) from rows with
    ``prompt_ids``/``answer_ids`` or ``input_ids`` (+ ``labels`` / ``completion_mask``),
    the layout of the package's own trainer and of replay batches."""

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int = 8):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of)

    def __call__(self, features):
        return collate([Encoded(*_row_pair(f, i)) for i, f in enumerate(features)], self.pad_token_id,
                       self.pad_to_multiple_of)


# ============================================================================ replay stream

class _Replay:
    """A replay micro-batch travelling through the Trainer (opaque to ``_prepare_inputs``:
    the teachers keep their dtype and are moved by the recipe)."""
    __slots__ = ("batch", "in_accumulation")

    def __init__(self, batch, in_accumulation):
        self.batch = batch
        self.in_accumulation = in_accumulation


class _ReplayLoader:
    """The Trainer's training dataloader with the task's replay micro-batches interleaved.

    The interleaving is the recipe's :class:`~seekr_kernels.seekr.stream.ReplayStream`
    (the package's trainer consumes the same one) over train units of ``group``
    micro-batches (the accumulation steps, or 1 micro-step with
    ``replay_in_accumulation``): a replay unit yields this process's replay micro-batches
    of the global replay batch, a train unit its micro-batches. Replay windows are whole
    accumulation windows, so the Trainer's optimiser steps line up with them. Everything
    else is the inner loader's.
    """

    def __init__(self, trainer, loader):
        self.loader = loader
        self._trainer = trainer
        rc = trainer.recipe
        self.in_accumulation = rc.replays_in_accumulation
        A = int(trainer.args.gradient_accumulation_steps)
        self.group = 1 if self.in_accumulation else A
        trainer._seekr_group = self.group        # micro-batches per replay step, for the logs
        try:
            self.n = len(loader)
        except TypeError:
            raise TypeError("train_dataset: replay needs a dataloader with a length (a map-style dataset)") from None
        self.steps = -(-self.n // self.group)
        self.stream = rc.replay_stream(self.steps)
        self.epoch = 0
        self._skip = 0           # micro-batches to drop at the next __iter__ (a resume)

    def __len__(self):
        return self.n + self.stream.per_epoch * self.group

    def __getattr__(self, name):     # dataset, sampler, batch_sampler, ... of the Trainer's loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def _replay_batches(self, keys):
        rc = self._trainer.recipe
        if self.in_accumulation:
            mine = shard(list(range(len(keys))), rc.dist.rank, rc.dist.world_size)
            micro = [mine]
        else:
            micro = rc.micro_batches(keys)
        for mb in micro:
            b = rc.batch([keys[i] for i in mb], global_keys=keys)
            yield {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                   REPLAY_KEY: _Replay(b, self.in_accumulation)}

    def skip_first(self, num_batches: int) -> "_ReplayLoader":
        """The Trainer's ``skip_first_batches`` for this loader (a resume mid-epoch): the
        next epoch's stream drops its first ``num_batches`` micro-batches, replay ones
        included, and the replay schedule still draws them, so the batches after the
        skip are the uninterrupted run's."""
        self._skip = int(num_batches)
        return self

    def _units(self):
        it = iter(self.loader)
        while True:
            chunk = list(itertools.islice(it, self.group))
            if not chunk:
                return
            yield chunk

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for kind, _, x in self.stream.epoch(self.epoch, self._units()):
            for b in (self._replay_batches(x) if kind == "replay" else x):
                if skip:
                    skip -= 1
                    continue
                yield b


_SKIP_ORIG = "_seekr_skip_first_batches_orig"


@contextlib.contextmanager
def _replay_aware_skip():
    """While a SEEKR ``train()`` runs, the Trainer's ``skip_first_batches`` (its resume
    mid-epoch) skips inside a :class:`_ReplayLoader` instead of rebuilding a plain
    DataLoader from the dataset, which would lose the replay batches. Everything else
    about the resume stays the Trainer's: the step and epoch counters, and the RNG state
    it restores after the first batches of the resumed epoch."""
    import transformers.trainer as hf_trainer
    orig = getattr(hf_trainer, "skip_first_batches", None)
    if orig is None or hasattr(orig, _SKIP_ORIG):      # not this Trainer's mechanism, or nested
        yield
        return

    def skip_first_batches(dataloader, num_batches=0):
        if isinstance(dataloader, _ReplayLoader):
            return dataloader.skip_first(num_batches)
        return orig(dataloader, num_batches)
    setattr(skip_first_batches, _SKIP_ORIG, orig)
    hf_trainer.skip_first_batches = skip_first_batches
    try:
        yield
    finally:
        if hf_trainer.skip_first_batches is skip_first_batches:
            hf_trainer.skip_first_batches = orig


# ============================================================================ checkpoints

#: ``checkpoint-N/seekr_recipe/manifest.json``: written last, so a checkpoint without a
#: valid one is an interrupted save.
CHECKPOINT_KIND = "seekr-hf-checkpoint"
#: The manifest versions this build reads (the versioned reader's table).
CHECKPOINT_READS = {1: "the SEEKR files with size and SHA-256, the Trainer's files with their size"}
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class SeekrCheckpointError(ValueError):
    """A checkpoint that is incomplete (an interrupted save), damaged, or not written by
    a SEEKR trainer; the message names the file."""


def _seal_checkpoint(d: str, head: Mapping) -> dict:
    """The manifest of checkpoint ``d``, written last (the recipe state is in place): the
    SEEKR files with size and SHA-256 (``store.write_manifest``), the Trainer's files
    (weights or adapter, optimizer, scheduler, RNG, trainer_state.json, ...) with their
    size. Those are not hashed: they are the Trainer's, read by the Trainer, and hashing
    tens of GB of weights and optimizer state at every save would cost more than the save."""
    trainer_files = {rel: os.path.getsize(os.path.join(d, rel)) for rel in store.list_files(d)
                     if not rel.startswith(RECIPE_DIR + "/")}
    return store.write_manifest(os.path.join(d, RECIPE_DIR), {"format": 1, "kind": CHECKPOINT_KIND, **head,
                                                                "trainer_files": trainer_files})


def verify_checkpoint(path: str) -> dict:
    """Check a checkpoint written by a SEEKR trainer (``checkpoint-N`` or a task's
    ``final``) before anything of it is read; returns its manifest.

    Raises :class:`SeekrCheckpointError` naming the file: no manifest (an interrupted save,
    or a checkpoint not written by a SEEKR trainer), an edited manifest, a SEEKR file
    missing, truncated, damaged or not listed, a Trainer file missing or of another size.
    """
    path = os.fspath(path)
    rdir = os.path.join(path, RECIPE_DIR)
    mp = os.path.join(rdir, store.MANIFEST)
    if not os.path.isdir(path):
        raise SeekrCheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(mp):
        raise SeekrCheckpointError(f"{mp}: missing (an interrupted save, or a checkpoint not written by a "
                                   "SEEKR trainer)")
    man = store.verify_dir(rdir, "SEEKR checkpoint", kind=CHECKPOINT_KIND, versions=CHECKPOINT_READS,
                           error=SeekrCheckpointError)
    files = man.get("trainer_files")
    if not isinstance(files, dict):
        raise SeekrCheckpointError(f"{mp}: malformed trainer_files")
    for rel, n in sorted(files.items()):
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            raise SeekrCheckpointError(f"{p}: missing (listed in {mp})")
        if os.path.getsize(p) != n:
            raise SeekrCheckpointError(f"{p}: {os.path.getsize(p)} bytes, {mp} says {n} (truncated or replaced)")
    return man


def _checkpoint_step(path: str) -> int:
    """The global step of the Trainer checkpoint ``path`` (its trainer_state.json)."""
    st = store.read_json(os.path.join(path, "trainer_state.json"), "Trainer state", SeekrCheckpointError)
    return int(st.get("global_step", 0))


@contextlib.contextmanager
def _rng_kept():
    """The global RNGs (Python, NumPy, torch CPU and CUDA) as they were before the block:
    scoring between tasks must not change what the next task draws, or a resumed
    sequence (which does not score the tasks it skips) would train differently."""
    import random

    import numpy as np
    st = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
          torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(st[0])
        np.random.set_state(st[1])
        torch.set_rng_state(st[2])
        if st[3] is not None:
            torch.cuda.set_rng_state_all(st[3])


def _checkpoints(folder: str) -> List[str]:
    """``checkpoint-N`` directories of ``folder``, newest (highest N) first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names
             if (m := _CHECKPOINT_RE.match(n)) and os.path.isdir(os.path.join(folder, n))]
    return [os.path.join(folder, n) for _, n in sorted(found, reverse=True)]


def last_checkpoint(folder: str) -> Optional[str]:
    """The newest complete checkpoint (:func:`verify_checkpoint`) in ``folder``, or None.
    Incomplete ones (a job killed during a save) are skipped with a warning naming why."""
    for c in _checkpoints(folder):
        try:
            verify_checkpoint(c)
        except SeekrCheckpointError as e:
            logger.warning("seekr: skipping %s: %s", c, e)
            continue
        return c
    return None


# ============================================================================ the trainer

def _world(trainer) -> int:
    acc = getattr(trainer, "accelerator", None)
    n = getattr(acc, "num_processes", None)
    return int(n) if n else int(getattr(trainer.args, "world_size", 1) or 1)


def _is_deepspeed(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def _zero_stage(trainer) -> int:
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return 0
    try:
        return int(plugin.zero_stage)
    except (AttributeError, TypeError, ValueError):
        return int((plugin.deepspeed_config or {}).get("zero_optimization", {}).get("stage", 0) or 0)


class SeekrTrainerMixin:
    """SEEKR for a ``transformers.Trainer`` class (put it first in the bases)::

        class MyTrainer(SeekrTrainerMixin, SomeTrainer): ...

    Keyword arguments taken here: ``recipe`` (an existing :class:`~seekr_kernels.SeekrRecipe`,
    e.g. loaded from disk; default: one built from the arguments' SEEKR fields, or the
    package defaults when the arguments have none). Attributes: ``recipe`` (the state
    carried across tasks), ``seekr_history`` (``end_task`` info per task).
    """

    def __init__(self, *args, recipe: Optional[SeekrRecipe] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._seekr_setup(recipe)

    # ---------------------------------------------------------------- setup
    def _seekr_setup(self, recipe):
        a = self.args
        if recipe is None:
            seekr_args = a if isinstance(a, SeekrArguments) else SeekrArguments()
            cfg = seekr_args.seekr_recipe_config(
                batch_size=int(a.per_device_train_batch_size) * int(a.world_size) * int(a.gradient_accumulation_steps),
                grad_accum=int(a.gradient_accumulation_steps))
            recipe = SeekrRecipe(cfg, model=self.model, pad_token_id=self._seekr_pad_id(),
                                 device=a.device, autocast_dtype=self._seekr_autocast())
        elif not isinstance(recipe, SeekrRecipe):
            raise TypeError(f"recipe: expected a SeekrRecipe, got {type(recipe).__name__}")
        else:
            if recipe.cfg.grad_accum != int(a.gradient_accumulation_steps):
                raise ValueError(f"recipe: built for grad_accum={recipe.cfg.grad_accum}, the arguments have "
                                 f"gradient_accumulation_steps={a.gradient_accumulation_steps}")
            recipe.device = torch.device(a.device)
            if recipe.autocast_dtype is None:
                recipe.autocast_dtype = self._seekr_autocast()
        self.recipe = recipe
        self.seekr_history: List[dict] = []
        self._seekr_task_name: Optional[str] = None
        self._seekr_sums = torch.zeros(4, dtype=torch.float64)
        self._seekr_micro = 0
        self._seekr_group = 1
        self._seekr_warned: dict = {}        # warnings shown once per trainer
        #: optimiser steps of the tasks finished before this one: logs count one step across
        #: the sequence (the Trainer's global_step restarts in every task)
        self._seekr_step_offset = 0
        self._seekr_user_optimizer = getattr(self, "optimizer", None) is not None
        if _is_deepspeed(self) and _zero_stage(self) >= 3:
            raise ValueError("deepspeed: ZeRO stage 3 partitions the parameters outside the engine's forward, "
                             "which SEEKR's pre-task snapshot and statistics read; use stage 1 or 2")
        if recipe.uses_attention and self.model is not None:
            from ..llama import patch_llama
            patch_llama(self.model)
        for m in ([self.model] if self.model is not None else []):
            for mod in m.modules():
                fn = getattr(mod, "_gradient_checkpointing_func", None)
                kw = getattr(fn, "keywords", None) or {}
                if getattr(mod, "gradient_checkpointing", False) and kw.get("use_reentrant") is True:
                    raise ValueError("model: gradient checkpointing with use_reentrant=True cannot backpropagate "
                                     "SEEKR's attention losses; enable it with {'use_reentrant': False}")
        self._seekr_check_columns()
        self.add_callback(_SeekrCallback(self))

    def _seekr_pad_id(self) -> int:
        tok = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        tok = getattr(tok, "tokenizer", tok)          # a processor wraps its tokenizer
        for src in (tok, getattr(getattr(self, "model", None), "config", None)):
            for name in ("pad_token_id", "eos_token_id"):
                v = getattr(src, name, None)
                if isinstance(v, (list, tuple)):
                    v = v[0] if v else None
                if v is not None:
                    return int(v)
        return 0

    def _seekr_autocast(self):
        a = self.args
        if getattr(a, "bf16", False):
            return torch.bfloat16
        if getattr(a, "fp16", False):
            return torch.float16
        return None

    def _seekr_check_columns(self, dataset=None):
        ds = self.train_dataset if dataset is None else dataset
        cols = getattr(ds, "column_names", None)
        if not self.args.remove_unused_columns or cols is None:
            return
        if "input_ids" not in cols and {"prompt_ids", "answer_ids"} <= set(cols):
            raise ValueError("remove_unused_columns: the dataset holds prompt_ids/answer_ids, which the Trainer "
                             "would drop before the collator sees them; set remove_unused_columns=False "
                             "(SeekrConfig's default)")

    def _seekr_hooks(self) -> DistributedHooks:
        """The recipe's view of this job: the Trainer's processes, a sum all-reduce on the
        job's device, and FSDP2 reshards after the recipe's forward-only passes."""
        if _world(self) <= 1:
            return DistributedHooks()
        return DistributedHooks.from_torch(self.model, self.args.device,
                                           sharded=bool(getattr(self, "is_fsdp_enabled", False)))

    # ---------------------------------------------------------------- tasks
    def train(self, *args, **kwargs):
        """``Trainer.train`` as one SEEKR task: ``begin_task`` when training begins, replay
        steps inside, ``end_task`` after the last step. ``resume_from_checkpoint`` also
        restores the recipe state saved in the checkpoint (the task in progress with its
        pre-task snapshot, the memory, importance and heads); the Trainer restores the
        optimiser, schedule, counters and RNG, and the replay loader skips the micro-batches
        already trained (replay ones included), so a task resumed mid-epoch ends bit for
        bit where the uninterrupted run ends (``tests/test_hf.py``)."""
        args = list(args)
        ckpt = kwargs.pop("resume_from_checkpoint", args.pop(0) if args else None)
        if ckpt is not None and ckpt is not False:
            ckpt = self._seekr_resume(ckpt)
        else:
            ckpt = None
        engine = getattr(self, "model_wrapped", None)
        if _is_deepspeed(self) and engine is not None and engine is not self.model:
            # A later task: the Trainer would keep the previous task's engine (freed by
            # accelerate) instead of building one; release its ZeRO hooks and start afresh.
            if hasattr(engine, "destroy"):
                engine.destroy()
            self.model_wrapped = self.model
        at = _checkpoint_step(ckpt) if ckpt is not None else None
        with _replay_aware_skip():
            out = super().train(ckpt, *args, **kwargs)
        if at is not None and self.state.global_step <= at:
            # Resumed at the task's last step: the Trainer ran no epoch, so it did not restore
            # the RNG; end_task and the next task must start from the uninterrupted run's.
            self._load_rng_state(ckpt)
        self._seekr_end()
        return out

    def train_task(self, train_dataset=None, name: Optional[str] = None, **train_kwargs):
        """Learn one task: set ``train_dataset``, start a fresh optimiser and learning-rate
        schedule (unless the Trainer was given its own optimiser), ``train()`` with SEEKR,
        and end the task. ``name`` defaults to ``task-<index>``; the task's checkpoints go
        to ``<output_dir>/<name>/`` (the Trainer's global step restarts in every task; logs
        count one step across the sequence: :meth:`log`) and, unless
        ``save_strategy="no"``, the task's end to ``<output_dir>/<name>/final/`` (the
        model as ``save_model`` writes it, the recipe state after ``end_task``, the
        manifest last), from which :meth:`train_tasks` resumes a sequence.
        ``resume_from_checkpoint=True`` with no complete checkpoint of the task yet (a job
        killed before its first save) starts the task from its beginning. Returns
        ``train()``'s ``TrainOutput``."""
        rc = self.recipe
        name = f"task-{rc.num_tasks}" if name is None else str(name)
        if name in rc.task_names:
            raise ValueError(f"name: task {name!r} was already learned (task names must be unique)")
        if train_dataset is not None:
            self.train_dataset = self._seekr_prepare_dataset(train_dataset, name)
            self._seekr_check_columns()
        if not self._seekr_user_optimizer:
            self.optimizer, self.lr_scheduler = None, None
        self._seekr_task_name = name
        base = self.args.output_dir
        self._seekr_one_log_dir(base)
        self.args.output_dir = os.path.join(base, name) if base else base
        try:
            out = self.train(**train_kwargs)
            self._seekr_step_offset += int(self.state.global_step)
            if self._seekr_saves():
                self._seekr_save_final(os.path.join(self.args.output_dir, FINAL_DIR))
            return out
        finally:
            self.args.output_dir = base
            self._seekr_task_name = None

    def train_tasks(self, tasks, score: Optional[Callable[["SeekrTrainerMixin", str], float]] = None,
                    resume: bool = False) -> dict:
        """Learn a task sequence: ``tasks`` is a mapping ``name -> train_dataset`` or a list of
        ``(name, train_dataset)``. With ``score(trainer, name) -> float`` every task learned
        so far is scored after each task, and the result holds the accuracy ``matrix``, ``OP``
        and ``BWT`` (TRACE's definitions, :mod:`seekr_kernels.run.metrics`); the rows are
        kept in ``<output_dir>/seekr_scores.json``.

        ``resume=True`` (a requeued job running the same command again) continues the
        sequence where it stopped, into a fresh trainer: the tasks whose ``final/`` is
        complete are skipped (the model and the recipe state restored from the last of
        them), the first other task resumes from its newest complete checkpoint, or starts
        from its beginning when it has none. A ``tasks`` list that does not start with the
        tasks already learned there is refused."""
        items = list(tasks.items()) if isinstance(tasks, Mapping) else [tuple(t) for t in tasks]
        names = [str(n) for n, _ in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tasks: task names must be unique ({', '.join(dup)} repeated)")
        start, rows = (self._seekr_restore(names) if resume else (0, []))
        if score is not None and len(rows) < start - 1:
            raise ValueError(f"score: {os.path.join(self.args.output_dir, SCORES_FILE)} lacks the rows of tasks "
                             f"{names[len(rows):start - 1]}, whose models are gone (was the run scored?)")
        if score is not None and start and len(rows) < start:     # killed while scoring the last task learned
            with _rng_kept():
                rows.append([float(score(self, n)) for n in names[:start]])
            self._seekr_save_scores(names[:start], rows)
        for i in range(start, len(items)):
            self.train_task(items[i][1], names[i], **({"resume_from_checkpoint": True} if resume and i == start
                                                      else {}))
            if score is not None:
                with _rng_kept():
                    rows.append([float(score(self, n)) for n in names[:i + 1]])
                self._seekr_save_scores(names[:i + 1], rows)
        out: Dict[str, Any] = {"tasks": names}
        if score is not None:
            out.update(metrics.summarize(metrics.partial_matrix(rows, len(names))))
        return out

    # ---------------------------------------------------------------- a sequence's progress
    def _seekr_saves(self) -> bool:
        return str(getattr(self.args.save_strategy, "value", self.args.save_strategy)) != "no"

    def _seekr_save_final(self, d):
        """The task's end: the model (``save_model``), the RNG state, the recipe state after
        ``end_task``, the manifest last (:func:`verify_checkpoint`)."""
        self._seekr_clear(d)
        self.save_model(d)
        self._save_rng_state(d)        # what the next task draws from (dropout, sampling)
        self._seekr_seal(d, global_step=int(self.state.global_step), step_offset=self._seekr_step_offset,
                         task_names=list(self.recipe.task_names),
                         history=self.seekr_history)

    def _seekr_save_scores(self, names, rows):
        if self.args.should_save:
            store.write_json(os.path.join(self.args.output_dir, SCORES_FILE),
                             store.seal({"format": 1, "kind": SCORES_KIND, "tasks": list(names), "rows": rows}))

    def _seekr_restore(self, names):
        """``train_tasks(resume=True)``: restore the tasks learned in ``output_dir``; returns
        how many, and the score rows saved for them."""
        if self.recipe.num_tasks or self.recipe.current is not None:
            raise ValueError("resume: this trainer has learned tasks already; resume=True restores a sequence "
                             "into a fresh trainer")
        if not self._seekr_saves():
            raise ValueError("resume: save_strategy='no' saves no checkpoints to resume from")
        base = self.args.output_dir
        last, man = None, None
        for i, name in enumerate(names):
            d = os.path.join(base, name, FINAL_DIR)
            if not os.path.exists(d):
                break
            try:
                m = verify_checkpoint(d)
            except SeekrCheckpointError as e:
                logger.warning("seekr: %s is incomplete (%s); task %r is resumed", d, e, name)
                break
            if m.get("task_names") != names[:i + 1]:
                raise ValueError(f"tasks: {d} ends the sequence {m.get('task_names')}, tasks starts with "
                                 f"{names[:i + 1]} (resume runs the same task list again)")
            last, man = d, m
        k = 0 if man is None else len(man["task_names"])
        if last is not None:
            self.recipe.load(os.path.join(last, RECIPE_DIR))
            self._load_from_checkpoint(last)
            self._load_rng_state(last)
            self._seekr_step_offset = int(man.get("step_offset", 0))
            self.seekr_history = [dict(h, heads={int(l): v for l, v in h.get("heads", {}).items()})
                                  for h in man.get("history", [])]
        rows: list = []
        p = os.path.join(base, SCORES_FILE)
        saved = store.read_json(p, "SEEKR score rows", SeekrCheckpointError, kind=SCORES_KIND, versions=(1,),
                                optional=True)
        if saved is not None and k:
            store.check_seal(saved, p, "score rows", error=SeekrCheckpointError)
            n = min(k, len(saved["rows"]))
            if saved["tasks"][:n] != names[:n]:
                raise ValueError(f"tasks: {p} holds the scores of {saved['tasks']}, tasks starts with {names[:n]}")
            rows = [list(r) for r in saved["rows"][:n]]
        return k, rows

    def _seekr_prepare_dataset(self, dataset, name):
        """Hook for trainers that tokenise datasets themselves (TRL)."""
        return dataset

    def _seekr_begin(self):
        rc = self.recipe
        rc.dist = self._seekr_hooks()
        if rc.current is not None:           # resumed inside a task
            return
        if self.train_dataset is None:
            raise ValueError("train_dataset: SEEKR needs the task's training data")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            rc.begin_task(self.model, task_samples(self.train_dataset), name=self._seekr_task_name)
        for w in seen:       # the recipe's warnings name config keys: here, the arguments' fields
            warnings.warn_explicit(_field_message(str(w.message)), w.category, w.filename, w.lineno,
                                   registry=self._seekr_warned)

    def _seekr_end(self):
        rc = self.recipe
        if rc.current is None:
            return
        rc.dist = self._seekr_hooks()
        with self._seekr_frozen():
            info = rc.end_task(self.model)
        self.seekr_history.append({"task": info["task"], "name": info["name"],
                                   "heads": {int(l): h.tolist() for l, h in info.get("heads", {}).items()}})
        return info

    @contextlib.contextmanager
    def _seekr_frozen(self):
        """Under DeepSpeed the recipe's backward passes run with no parameter requiring a
        gradient: ZeRO's reduction hooks fire on any backward that reaches a parameter,
        and task sensitivity needs only dL/dA (it keeps its own graph alive)."""
        if not _is_deepspeed(self):
            yield
            return
        ps = [p for p in self.model.parameters() if p.requires_grad]
        for p in ps:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in ps:
                p.requires_grad_(True)

    # ---------------------------------------------------------------- data
    def get_train_dataloader(self):
        """The Trainer's dataloader, with this task's replay batches interleaved."""
        dl = super().get_train_dataloader()
        rc = self.recipe
        if not rc.uses_memory or len(rc.memory) == 0:
            return dl
        rc.dist = self._seekr_hooks()
        return _ReplayLoader(self, dl)

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """A replay window's ``num_items_in_batch`` is the global replay batch's target count;
        with ``replay_in_accumulation`` every window uses per-micro-step means (None)."""
        if not self.recipe.uses_memory or len(self.recipe.memory) == 0:
            return super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        batches = list(itertools.islice(epoch_iterator, num_batches))
        replay = [b for b in batches if isinstance(b, Mapping) and REPLAY_KEY in b]
        if self.recipe.replays_in_accumulation:
            return batches, None
        if replay:
            if len(replay) != len(batches):     # cannot happen: replay windows are whole
                raise RuntimeError("seekr: a replay micro-batch shares an accumulation window with train batches")
            n = int(replay[0][REPLAY_KEY].batch["num_items_in_batch"])
            return batches, torch.tensor(n, device=self.args.device)
        return super().get_batch_samples(iter(batches), len(batches), *args, **kwargs)

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Replay batches: the recipe's replay objective (this process's share of the global
        replay batch x the number of processes; ``num_items_in_batch`` overrides the global
        target count). Other batches: the Trainer's own loss."""
        rb = inputs.get(REPLAY_KEY) if isinstance(inputs, Mapping) else None
        if rb is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, parts = self.replay_loss(model, rb, num_items_in_batch)
        return (loss, parts) if return_outputs else loss

    def replay_loss(self, model, replay: "_Replay", num_items_in_batch=None):
        """The loss ``compute_loss`` returns for a replay micro-batch, and its parts."""
        rc = self.recipe
        n = None
        if num_items_in_batch is not None and not replay.in_accumulation:
            n = int(num_items_in_batch)
        share, parts = rc.replay_loss(model, replay.batch, num_items_in_batch=n)
        scale = float(_world(self))
        if replay.in_accumulation:
            scale /= float(self.args.gradient_accumulation_steps)
        if self._seekr_trainer_divides(num_items_in_batch):
            scale *= float(getattr(self, "current_gradient_accumulation_steps", 1) or 1)
        v = torch.stack([parts.get(k, share.detach() * 0) for k in ("ce", "logits_kl", "attn_kl")]
                        + [share.detach()]).double().cpu()
        self._seekr_sums += rc.dist.reduce(v)
        self._seekr_micro += 1
        return share * scale, parts

    def _seekr_trainer_divides(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` will divide this loss by the accumulation steps."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is None:
            flag = ((bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)
        return not flag

    # ---------------------------------------------------------------- logging
    def log(self, logs, *args, **kwargs):
        """Adds ``replay_loss`` / ``replay_ce`` / ``replay_logits_kl`` / ``replay_attn_kl``
        (mean over the replay steps since the last training log) to training logs, and
        logs at the sequence's step: the optimiser steps of the tasks learned before plus
        this task's ``global_step``, so ``report_to`` integrations (which read
        ``state.global_step``) and ``log_history`` see one increasing step across tasks."""
        if self._seekr_micro and not any(str(k).startswith(("eval_", "test_")) for k in logs):
            steps = self._seekr_micro / max(1, self._seekr_group)
            s = (self._seekr_sums / steps).tolist()
            logs = dict(logs)
            logs["replay_loss"] = s[3]
            logs["replay_ce"] = s[0]
            if self.recipe.method in ("replay+logits", "seekr"):
                logs["replay_logits_kl"] = s[1]
            if self.recipe.uses_attention:
                logs["replay_attn_kl"] = s[2]
            self._seekr_sums.zero_()
            self._seekr_micro = 0
        off = self._seekr_step_offset
        self.state.global_step += off
        try:
            return super().log(logs, *args, **kwargs)
        finally:
            self.state.global_step -= off

    def _seekr_one_log_dir(self, base):
        """One TensorBoard event stream for the sequence, in ``<output_dir>/runs/<date>_<host>``
        (HF's default name; ``TENSORBOARD_LOGGING_DIR`` still wins). transformers 5 derives
        the folder from ``output_dir`` when training first begins, which ``train_task`` has
        pointed at the first task's folder. And its callback closes the writer after every
        ``train()`` and writes the arguments at step 0 into a new event file at the next
        one: TensorBoard takes a step going back as a restart and drops every later step
        of the earlier tasks. So the writer stays open across the tasks."""
        try:
            from transformers.integrations import TensorBoardCallback
            from transformers.integrations.integration_utils import default_logdir
        except ImportError:
            return
        for cb in self.callback_handler.callbacks:
            if not isinstance(cb, TensorBoardCallback) or getattr(cb, "_seekr_sequence", False):
                continue
            if getattr(cb, "logging_dir", "") is None and base:
                cb.logging_dir = os.path.join(base, default_logdir())
            cb._seekr_sequence = True
            first_begin = cb.on_train_begin

            def on_train_begin(args, state, control, _cb=cb, _first=first_begin, **kw):
                if _cb.tb_writer is None:          # the first task: the writer, arguments, model config
                    return _first(args, state, control, **kw)

            def on_train_end(args, state, control, _cb=cb, **kw):
                if _cb.tb_writer is not None:
                    _cb.tb_writer.flush()
            cb.on_train_begin, cb.on_train_end = on_train_begin, on_train_end

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """The Trainer's checkpoint, then the recipe state and the manifest (written last:
        :func:`verify_checkpoint`). Older checkpoints are rotated out (``save_total_limit``)
        only once this one is complete, so a kill during the save always leaves a complete
        one behind."""
        ckpt = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._seekr_clear(ckpt)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self.args.save_total_limit = limit
        self._seekr_seal(ckpt, global_step=int(self.state.global_step), step_offset=self._seekr_step_offset)
        if limit and self.args.should_save:
            self._seekr_rotate(self._get_output_dir(trial=trial), limit)

    def _seekr_rotate(self, run_dir, limit):
        rotate = getattr(self, "_rotate_checkpoints", None)
        if rotate is not None:                 # transformers 4.x
            rotate(use_mtime=True, output_dir=run_dir)
            return
        from transformers.trainer_utils import rotate_checkpoints
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _seekr_barrier(self):
        acc = getattr(self, "accelerator", None)
        if acc is not None:
            acc.wait_for_everyone()

    def _seekr_clear(self, d):
        """Remove what a killed job left at ``d`` (the Trainer writes into an existing
        folder, and a stale file would be listed in the new manifest)."""
        if self.args.should_save and os.path.isdir(d):
            shutil.rmtree(d)
        self._seekr_barrier()

    def _seekr_seal(self, d, **head):
        """Every process has written its part of ``d``: the recipe state, then the manifest."""
        self._seekr_barrier()
        if self.args.should_save:
            from ..run.models import sort_adapter_config
            sort_adapter_config(d)          # PEFT writes target_modules in hash order
            self.recipe.save(os.path.join(d, RECIPE_DIR))
            _seal_checkpoint(d, {"task": self._seekr_task_name, **head})
        self._seekr_barrier()

    def _seekr_resume(self, ckpt):
        """The checkpoint to resume from, its recipe state loaded; None to start afresh
        (``True`` and no complete checkpoint yet: a job killed before its first save)."""
        folder = self.args.output_dir
        if ckpt is True:
            found = last_checkpoint(folder)
            if found is None:
                logger.warning("seekr: resume_from_checkpoint=True: no complete checkpoint in %s; the task "
                               "starts from its beginning", folder)
                return None
            ckpt = found
        ckpt = os.fspath(ckpt)
        try:
            man = verify_checkpoint(ckpt)
        except SeekrCheckpointError as e:
            newest = last_checkpoint(os.path.dirname(os.path.abspath(ckpt)))
            raise SeekrCheckpointError(f"resume_from_checkpoint: {e}; " + (
                f"the newest complete checkpoint there is {newest}" if newest else
                "there is no complete checkpoint next to it")) from None
        name = self._seekr_task_name
        if name is not None and man.get("task") is not None and man["task"] != name:
            raise ValueError(f"resume_from_checkpoint: {ckpt} is a checkpoint of task {man['task']!r}, "
                             f"not of {name!r}")
        self.recipe.load(os.path.join(ckpt, RECIPE_DIR))
        self._seekr_step_offset = int(man.get("step_offset", self._seekr_step_offset))
        return ckpt


class _SeekrCallback(TrainerCallback):
    """begin_task once the model is wrapped (the recipe state goes into every checkpoint
    through :meth:`SeekrTrainerMixin._save_checkpoint`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kw):
        self.trainer._seekr_begin()


class SeekrTrainer(SeekrTrainerMixin, Trainer):
    """``transformers.Trainer`` with SEEKR (see the module docstring and
    :class:`SeekrTrainerMixin`). ``args``: a :class:`SeekrConfig` (any ``TrainingArguments``
    gives the package defaults). Without a ``data_collator``, :class:`SeekrDataCollator`."""

    def __init__(self, model=None, args=None, data_collator=None, *a, recipe=None, **kw):
        if data_collator is None:
            pad = 0
            tok = kw.get("processing_class") or kw.get("tokenizer")
            for src in (tok, getattr(model, "config", None)):
                for name in ("pad_token_id", "eos_token_id"):
                    v = getattr(src, name, None)
                    if isinstance(v, int):
                        pad = v
                        break
                else:
                    continue
                break
            mult = getattr(args, "replay_pad_to_multiple_of", None) or 8
            data_collator = SeekrDataCollator(pad, mult)
        super().__init__(model, args, data_collator, *a, recipe=recipe, **kw)


def seekr_trainer_class(base):
    """A SEEKR subclass of any ``transformers.Trainer`` class (``SeekrTrainerMixin`` first)."""
    return type(f"Seekr{base.__name__}", (SeekrTrainerMixin, base), {"__module__": __name__})


# ============================================================================ TRL

_LAZY: Dict[str, Any] = {}


def _trl_classes():
    if _LAZY:
        return _LAZY
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        raise ImportError("SeekrSFTTrainer needs TRL: pip install 'seekr-kernels[hf]'") from e

    @dataclass
    class SeekrSFTConfig(SeekrArguments, SFTConfig):
        """TRL's ``SFTConfig`` plus SEEKR's fields (:class:`SeekrArguments`)."""

        def __post_init__(self):
            super().__post_init__()
            if getattr(self, "packing", False):
                raise ValueError("packing: SEEKR's replay samples are single sequences (a packed row mixes "
                                 "several); set packing=False")

    class SeekrSFTTrainer(SeekrTrainerMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` with SEEKR. ``train_task`` datasets in any format
        ``SFTTrainer`` takes (text, prompt/completion, messages) are tokenised by TRL; the
        ``train_dataset`` given to the constructor (which ``SFTTrainer`` tokenises there)
        is not tokenised a second time when ``train_task`` gets the same object."""

        def __init__(self, *args, **kwargs):
            raw = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
            super().__init__(*args, **kwargs)
            self._seekr_given = None if raw is None else (raw, self.train_dataset)

        def _seekr_prepare_dataset(self, dataset, name):
            given = getattr(self, "_seekr_given", None)
            if given is not None and dataset is given[0]:
                return given[1]
            cols = getattr(dataset, "column_names", None)
            if cols is None or "input_ids" in cols:
                return dataset
            return self._prepare_dataset(dataset, self.processing_class, self.args, self.args.packing,
                                         None, str(name))

    # Module-level names, so that pickle finds them: the Trainer torch.saves its arguments
    # (training_args.bin) into every checkpoint, and pickle stores a class by module and
    # qualified name; a name with "<locals>" in it cannot be pickled.
    for cls in (SeekrSFTConfig, SeekrSFTTrainer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls
        _LAZY[cls.__name__] = cls
    return _LAZY


def __getattr__(name):
    # TRL is imported on first use (it takes seconds); unpickling a SeekrSFTConfig lands here too.
    if name in ("SeekrSFTConfig", "SeekrSFTTrainer"):
        return _trl_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
