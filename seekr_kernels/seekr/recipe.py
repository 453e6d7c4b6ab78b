"""The SEEKR recipe as one object that any training loop drives.

:class:`SeekrRecipe` holds everything SEEKR carries from task to task — the replay memory
with its teachers, the accumulated head importance, the current head selection and the
configuration — and offers the three moments of the method to a loop (the package's own
:class:`~seekr_kernels.run.trainer.ContinualTrainer`, the Hugging Face ``Trainer``,
an accelerate script, or the few lines below)::

    recipe = sk.SeekrRecipe({"method": "seekr", "replay": {"ratio": 0.01}}, model=model,
                            pad_token_id=tok.pad_token_id)
    for task in tasks:
        recipe.begin_task(model, task.train)          # replay subset, query rows, pre-task weights
        sched = recipe.replay_schedule(len(train_batches))
        for step, batch in enumerate(train_batches):
            if sched.is_replay_step(step):
                rb = recipe.batch(sched.next_batch())
                loss, parts = recipe.replay_loss(model, rb)
                loss.backward(); opt.step(); opt.zero_grad()
            ...ordinary training step on batch...
        recipe.end_task(model)                        # importance, heads, teachers, memory
        recipe.save("run/seekr")                      # atomic; SeekrRecipe.load(...) verifies

What happens when (the published recipe, jinghan1he/SEEKR ``training/seekr.py``):

* :meth:`SeekrRecipe.begin_task` draws the task's replay subset (``replay.ratio``,
  ``replay.subset``) and, for ``seekr``, its query rows (``distill.query_budget``,
  ``distill.query_sampling``) and keeps what forgettability needs of the pre-task model:
  its trainable parameters on the host (:class:`PreTaskWeights`; no copy of the model,
  so PEFT/LoRA models work and only the adapters are kept), or under a sharded model
  (FSDP) every head's attention rows at the query rows.
* :meth:`SeekrRecipe.replay_loss` is ``(1 - a) CE + a logits-KL + b attention-KL`` on a
  replay batch (``replay``: CE only; ``replay+logits``: b = 0), each term a sum over this
  process's share divided by the *global* batch's counts, so N data-parallel processes
  (each backpropagating ``loss * N``, as DDP/FSDP average gradients) give the gradient
  of the single-process global batch.
* :meth:`SeekrRecipe.end_task` measures task sensitivity and forgettability on the new
  replay samples, updates the importance, reselects heads under the budgets, captures the
  teacher (:meth:`SeekrRecipe.capture_teacher`) and adds the samples to the memory.

Distributed statistics go through :class:`DistributedHooks` (a sum all-reduce, a reshard
after forward-only passes of a sharded model, rank and world size); the recipe knows
nothing of the loop's process group, so the Hugging Face Trainer or accelerate can
provide their own.

Memory of the pre-task snapshot at Llama-2-7B shapes
----------------------------------------------------
Full fine-tuning (6.74 B trainable parameters in bf16): 13.5 GB on the host
(``snapshot_device="cpu"``, the default) for the whole task and nothing on the device;
while the forgettability passes run, the saved parameters sit on the device next to the
trained ones (+13.5 GB there for those passes; the task's optimiser states are gone by
then). LoRA (r = 8 on q/v of 32 layers: 4.2 M fp32 parameters): 17 MB. The model copy
this replaces cost 13.5 GB on the device for the whole task, and could not be built for
PEFT models. Under FSDP the snapshot is every head's rows at the query rows of every
replay sample, on the host in fp32: 50 samples (1% of a 5k-sample task) x 32 layers x 32
heads x Q x n x 4 B = 21 GB for Q = 100 and n = 1024 tokens (2.6 GB at n = 128); with
query budget 0 (Q = n) 210 GB at n = 1024 — use the query budget, or DDP, with FSDP.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .config import OFFICIAL_BUDGETS, ConfigError, RecipeConfig, RunWarning, check_vocabulary, recipe_from_dict
from . import passes, recipe_store
from .recipe_store import FORMAT, KIND
from .samples import PendingSample, sample_seed, task_seed  # noqa: F401  (sample_seed: part of this module's API)
from .distributed import DistributedHooks, unwrap
from .snapshot import PreTaskWeights, snapshot_from_tensors, snapshot_kind, snapshot_tensors
from .stream import ReplaySchedule, ReplayStream, replay_batch_size, replays_in_accumulation
from .batching import as_pair, shard
from .losses import ce_sum, distilled_rows, logits_kl_mean, replay_objective, shifted_teacher

__all__ = ["SeekrRecipe", "DistributedHooks", "PreTaskWeights", "PendingSample", "ReplaySchedule",
           "task_seed", "sample_seed"]



# ============================================================================ samples


def _targets(rs) -> int:
    """Next-token targets of a ReplaySample: answer tokens with a token before them."""
    return int(rs.answer_mask[1:].sum())


def _distilled(rs, positions) -> int:
    """Rows of a ReplaySample the logits term distils (``distill.logits_positions``): the
    targets' predicting positions, or (``published``) the answer tokens themselves."""
    return int(rs.answer_mask.sum()) if positions == "published" else _targets(rs)


@dataclass
class _TaskState:
    index: int
    name: str
    indices: list
    samples: list
    before: object = None      # PreTaskWeights, per-sample rows (sharded), or None


# ============================================================================ the recipe

class SeekrRecipe:
    """SEEKR for any training loop: replay memory, importance, heads and the three moments.

    Args:
        config: a :class:`~seekr_kernels.seekr.config.RecipeConfig`, a ``RunConfig``
            (its recipe part is taken), a dict for
            :func:`~seekr_kernels.seekr.config.recipe_from_dict`, or None (defaults).
        model: the model (for its layer and head counts, and for budget checks now).
        num_layers, num_heads: the shape, when no model is given (else taken at
            :meth:`begin_task`).
        pad_token_id: padding token of every batch the recipe builds.
        device: where the recipe's own forward passes run (default: the model's).
        autocast_dtype: autocast dtype of those passes (e.g. ``torch.bfloat16``), or None.
        distributed: :class:`DistributedHooks` (default: one process).
        snapshot_device: where :class:`PreTaskWeights` keeps the pre-task parameters
            (``"cpu"``, or None for the parameters' own device).

    State carried across tasks: :attr:`memory` (:class:`~seekr_kernels.ReplayMemory`),
    :attr:`importance` (``[n_layers, n_heads]`` fp32), :attr:`heads` (``{layer: heads}``),
    :attr:`num_tasks` and :attr:`task_names` (tasks ended). :meth:`state_dict` /
    :meth:`save` include a task in progress (its samples, queries and pre-task snapshot),
    so a run can be checkpointed and resumed mid-task.
    """

    def __init__(self, config=None, *, model=None, num_layers: Optional[int] = None,
                 num_heads: Optional[int] = None, pad_token_id: int = 0, device=None, autocast_dtype=None,
                 distributed: Optional[DistributedHooks] = None, snapshot_device="cpu"):
        if config is None:
            config = RecipeConfig()
        if hasattr(config, "recipe_config"):     # a run's config (seekr_kernels.run.config.RunConfig)
            config = config.recipe_config()
        elif isinstance(config, Mapping):
            config = recipe_from_dict(dict(config))
        elif not isinstance(config, RecipeConfig):
            raise TypeError(f"config: expected a RecipeConfig, RunConfig, dict or None, got {type(config).__name__}")
        self.cfg = config.validate()
        self.method = self.cfg.method
        self.pad_token_id = int(pad_token_id)
        self.device = None if device is None else torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.dist = distributed or DistributedHooks()
        self.snapshot_device = snapshot_device
        from .memory import ReplayMemory
        self.memory = ReplayMemory()
        self.heads: Dict[int, torch.Tensor] = {}
        self.num_tasks = 0
        self.task_names: List[str] = []
        self.current: Optional[_TaskState] = None
        self.importance: Optional[torch.Tensor] = None
        self.budgets = None
        if model is not None:
            c = _model_config(model)
            num_layers, num_heads = c.num_hidden_layers, c.num_attention_heads
        if num_layers is not None and num_heads is not None:
            self._set_shape(int(num_layers), int(num_heads))

    # ---------------------------------------------------------------- shape and budgets
    def _set_shape(self, n_layers, n_heads):
        """The model's shape and the budgets: those set, else the defaults — the package's
        scaled to the model (3/4 of the layers, 1/8 of the heads), under ``preset:
        official`` the published script's 24 / 128 for every shape, clamped with a
        :class:`RunWarning` where the model has fewer layers or heads."""
        d = self.cfg.distill
        if self.cfg.preset == "official":
            lb = d.layer_budget or min(OFFICIAL_BUDGETS["layer_budget"], n_layers)
            hb = d.head_budget or min(OFFICIAL_BUDGETS["head_budget"], lb * n_heads)
        else:
            lb = d.layer_budget or max(1, round(0.75 * n_layers))
            hb = d.head_budget or max(1, (n_layers * n_heads) // 8)
        if lb > n_layers:
            raise ConfigError(f"distill.layer_budget: {lb} is more than the model's {n_layers} layers")
        if hb > lb * n_heads:
            raise ConfigError(f"distill.head_budget: {hb} is more than layer_budget x heads = "
                              f"{lb} x {n_heads}")
        if self.cfg.preset == "official":
            clamped = [f"distill.{k}: {OFFICIAL_BUDGETS[k]} -> {v}"
                       for k, v in (("layer_budget", lb), ("head_budget", hb))
                       if getattr(d, k) is None and v != OFFICIAL_BUDGETS[k]]
            if clamped:
                warnings.warn("; ".join(clamped) + f" (preset official's published budgets, clamped to the model's "
                              f"{n_layers} layers x {n_heads} heads)", RunWarning, stacklevel=3)
        self.num_layers, self.num_heads = n_layers, n_heads
        self.budgets = (lb, hb)
        if self.importance is None:
            self.importance = torch.zeros(n_layers, n_heads, dtype=torch.float32)

    def _ensure_shape(self, model):
        c = _model_config(model)
        if self.budgets is None:
            self._set_shape(c.num_hidden_layers, c.num_attention_heads)
        elif (c.num_hidden_layers, c.num_attention_heads) != (self.num_layers, self.num_heads):
            raise ValueError(f"model: {c.num_hidden_layers} layers x {c.num_attention_heads} heads, the recipe "
                             f"was built for {self.num_layers} x {self.num_heads}")

    def _device_of(self, model):
        if self.device is not None:
            return self.device
        return next(iter(model.parameters())).device

    def _autocast(self, device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    @property
    def uses_attention(self) -> bool:
        return self.method == "seekr"

    @property
    def uses_memory(self) -> bool:
        return self.method != "sft"

    # ---------------------------------------------------------------- begin task
    def begin_task(self, model, task_samples: Sequence, name: Optional[str] = None) -> List[int]:
        """Start a task: draw its replay subset (and, for ``seekr``, the query rows and the
        pre-task snapshot of ``model``). Returns the indices of the replay samples.

        ``task_samples``: the task's training samples, a sequence (``len`` and indexing;
        only the drawn ones are read) of :class:`~seekr_kernels.seekr.batching.Encoded`,
        of mappings with ``prompt_ids``/``answer_ids``, or of mappings with ``input_ids``
        and ``labels`` (-100 on the prompt). Call before training on the task; ``seekr``
        patches ``model`` (:func:`~seekr_kernels.patch_llama`) if it is not yet. Uses no
        global RNG: the draws are seeded by (``seed``, task index).
        """
        if self.current is not None:
            raise RuntimeError(f"begin_task: task {self.current.name!r} is in progress; call end_task first")
        t = self.num_tasks
        name = f"task-{t}" if name is None else str(name)
        if name in self.task_names:
            raise ValueError(f"name: task {name!r} was already learned (task names must be unique)")
        idx, new, before = [], [], None
        if self.uses_memory:
            try:
                n = len(task_samples)
            except TypeError:
                raise TypeError("task_samples: expected a sequence (len and indexing)") from None
            if n < 1:
                raise ValueError("task_samples: the task has no training sample")
            from .memory import ReplayMemory
            idx = ReplayMemory.sample_indices(n, self.cfg.replay.ratio, task_seed(self.cfg.seed, t) + 1,
                                              mode=self.cfg.replay.subset)
            new = [PendingSample(*as_pair(task_samples[i], i), t) for i in idx]
        if self.uses_memory and self.cfg.distill.fused_lm_head == "true":
            self.fused_lm_head(model)       # refused now, not at the first replay step
        check_vocabulary(self.cfg, unwrap(model))     # the vocabulary is known only here
        if self.uses_attention:
            self._ensure_shape(model)
            _ensure_patched(model)
            self._choose_queries(new, t)
            before = self.snapshot(model, new)
        self.current = _TaskState(t, name, idx, new, before)
        return idx

    def _choose_queries(self, samples, t):
        from .memory import ReplayMemory
        d = self.cfg.distill
        qs = ReplayMemory.choose_queries([x.length for x in samples], d.query_budget,
                                         task_seed(self.cfg.seed, t) + 2, mode=d.query_sampling)
        for x, q in zip(samples, qs):
            x.queries = q

    def snapshot(self, model, samples):
        """What forgettability compares against: :class:`PreTaskWeights` of ``model``, or
        (sharded parameters) every head's rows at the samples' query rows on the host."""
        if self.dist.sharded:
            return passes.all_head_rows(self, model, samples)
        return PreTaskWeights.capture(unwrap(model), self.snapshot_device)

    # ---------------------------------------------------------------- replay batches
    def replay_stream(self, n_train_batches: int, per_device: bool = False) -> ReplayStream:
        """The current task's :class:`ReplayStream` (the interleaver every loop consumes)
        over :meth:`replay_schedule`."""
        return ReplayStream(lambda: self.replay_schedule(n_train_batches, per_device))

    def replay_schedule(self, n_train_batches: int, per_device: bool = False) -> ReplaySchedule:
        """The current task's :class:`ReplaySchedule` over the memory of earlier tasks.

        ``n_train_batches``: train steps per epoch — optimiser steps, or micro-steps when
        :attr:`replays_in_accumulation`. Replay batches hold ``replay.batch_size`` samples
        (default: the train batch, or one micro-batch of it in accumulation).
        ``per_device``: the published per-device batching (the package trainer's
        ``train.batching: per_device``): each process's share of a replay batch is its
        own ``DistributedSampler`` batch (:func:`~seekr_kernels.seekr.stream.per_device_batches`),
        the last one of a pass partial.
        """
        rc, c = self.cfg.replay, self.cfg
        t = self.current.index if self.current is not None else self.num_tasks
        bs, need = replay_batch_size(c, self.dist.world_size)
        if bs < need:
            raise ConfigError(f"replay.batch_size: {bs} is smaller than the {need} samples a replay batch needs "
                              "(one per process and accumulation micro-step)")
        W = self.dist.world_size
        if per_device and bs % W:
            raise ConfigError(f"replay.batch_size: {bs} is not a multiple of the {W} processes (per-device "
                              "batching gives each the same share)")
        keys = self.memory.keys() if self.uses_memory else []
        return ReplaySchedule(keys, bs, n_train_batches, cycle=rc.cycle, min_batch=need, order=rc.order,
                              outnumbered=rc.outnumbered, seed=task_seed(c.seed, t) + 3,
                              per_device=W if per_device else 0)

    @property
    def replays_in_accumulation(self) -> bool:
        """A replay batch is one micro-step of an accumulation window (``replay.in_accumulation``
        with ``grad_accum`` > 1) rather than an optimiser step of its own."""
        return replays_in_accumulation(self.cfg)

    def micro_batches(self, items: Sequence, grad_accum: Optional[int] = None) -> List[list]:
        """This process's micro-batches of a global batch: indices into ``items``, one list
        per accumulation micro-step (contiguous rank slices, then micro-step slices)."""
        mine = shard(list(range(len(items))), self.dist.rank, self.dist.world_size)
        acc = self.cfg.grad_accum if grad_accum is None else grad_accum
        return [shard(mine, k, acc) for k in range(acc)]

    def distill_layers(self, keys) -> list:
        """Distilled layers of a (global) replay batch: every layer some sample's task names."""
        ls = set()
        for k in keys:
            t = self.memory.tasks[k[0]]
            if t.has_attention:
                ls.update(t.heads)
        return sorted(ls)

    def batch(self, keys: Sequence, *, global_keys: Optional[Sequence] = None) -> dict:
        """A left-padded replay batch of ``keys`` (:meth:`ReplayMemory.batch` with the
        recipe's padding and teachers) plus the normalisers of the global batch:
        ``num_items_in_batch`` (next-token targets), ``num_samples_in_batch`` and
        ``distill_layers``; under ``distill.logits_positions: published`` also
        ``num_logits_in_batch`` (the rows the logits term distils: answer tokens, eos
        included). ``global_keys``: the whole global batch this process's ``keys`` are
        part of (default: ``keys`` is the global batch)."""
        gk = list(keys if global_keys is None else global_keys)
        layers = self.distill_layers(gk) if self.uses_attention else []
        b = self.memory.batch(list(keys), self.pad_token_id, self.cfg.pad_to_multiple_of,
                              logits=self.method in ("replay+logits", "seekr"), attention=bool(layers),
                              layers=layers or None)
        b["num_items_in_batch"] = sum(_targets(self.memory.sample(k)) for k in gk)
        if self.cfg.distill.logits_positions == "published":
            b["num_logits_in_batch"] = sum(_distilled(self.memory.sample(k), "published") for k in gk)
        b["num_samples_in_batch"] = len(gk)
        b["distill_layers"] = layers
        b["counts_are_global"] = True
        return b

    def dataset(self):
        """The memory as a :class:`torch.utils.data.Dataset` of sample keys; batch it with
        :meth:`collate_fn` (works with a ``DistributedSampler``)."""
        return self.memory.dataset()

    def collate_fn(self, keys) -> dict:
        """DataLoader ``collate_fn`` for :meth:`dataset`: :meth:`batch` of this process's
        keys, with per-process counts that :meth:`replay_loss` all-reduces."""
        b = self.batch([tuple(k) for k in keys])
        b["counts_are_global"] = False
        return b

    def _global_counts(self, batch):
        """(targets, samples, layers, distilled logits rows) of the global batch for a
        batch built from local keys (the rows are the targets' count unless
        ``distill.logits_positions`` is 'published')."""
        published = self.cfg.distill.logits_positions == "published"
        if batch.get("counts_are_global", True) or self.dist.world_size == 1:
            N = batch["num_items_in_batch"]
            return (N, batch["num_samples_in_batch"], list(batch["distill_layers"]),
                    batch.get("num_logits_in_batch", N) if published else N)
        L = self.num_layers or 0
        v = torch.zeros(2 + L + published, dtype=torch.float64)
        v[0], v[1] = batch["num_items_in_batch"], batch["num_samples_in_batch"]
        for l in batch["distill_layers"]:
            v[2 + l] = 1
        if published:
            v[-1] = batch.get("num_logits_in_batch", batch["num_items_in_batch"])
        v = self.dist.reduce(v)
        return int(v[0]), int(v[1]), [l for l in range(L) if v[2 + l] > 0], int(v[-1] if published else v[0])

    # ---------------------------------------------------------------- replay loss
    def replay_loss(self, model, batch: Mapping, *, num_items_in_batch: Optional[int] = None):
        """The replay objective of one (micro-)batch from :meth:`batch`: ``(loss, parts)``.

        ``loss = (1 - a) CE + a logits-KL + b attention-KL`` (``replay``: CE; ``replay+logits``:
        b = 0), every term this process's share of the global batch: CE and logits-KL are
        sums over the batch's target tokens divided by the global target count, the
        attention KL is the mean over the global batch's distilled layers of 'batchmean'
        KL times this batch's share of the global samples. Summed over micro-steps and
        processes it is the loss of the global batch; under DDP/FSDP (gradients averaged
        over processes) backpropagate ``loss * world_size``. ``parts`` holds the detached
        ``ce``, ``logits_kl`` and ``attn_kl`` shares that the method uses.

        ``model`` runs the forward pass (a DDP wrapper is fine; autocast is the caller's);
        ``num_items_in_batch`` overrides the global target count (Hugging Face style).
        The logits term comes from :meth:`logits_loss`, the CE from :meth:`ce_loss`, or,
        where ``distill.fused_lm_head`` applies (:meth:`fused_lm_head`), both from one
        :func:`~seekr_kernels.linear_logits_kl` call on the final hidden states and the
        ``lm_head`` weight, so no ``[B, L, V]`` logits are materialised (the same loss
        and gradients up to float rounding).
        """
        d = self.cfg.distill
        N, B, layers, M = self._global_counts(batch)
        if num_items_in_batch is not None:
            # the logits rows follow where they are the targets (every sample has a prompt)
            M = int(num_items_in_batch) if M == N else M
            N = int(num_items_in_batch)
        dev = self._device_of(model)
        inputs = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "position_ids", "labels")}
        head = self.fused_lm_head(model)
        cap = _LmHeadInput(head) if head is not None else contextlib.nullcontext()
        attn = None
        if layers and self.uses_attention:
            from ..llama import distill_attention
            heads, teacher, q = self._attention_targets(batch, layers, dev)
            backend = "torch" if d.attn_log_eps else d.backend
            with distill_attention(model, heads, q, teacher, inputs["attention_mask"], backend=backend,
                                   log_eps=d.attn_log_eps) as dctx, cap:
                out = _forward(model, inputs)
            attn = dctx.loss() * (inputs["input_ids"].shape[0] / B)
        else:
            with cap:
                out = _forward(model, inputs)
        uses_logits = self.method in ("replay+logits", "seekr")
        if uses_logits:
            self._check_positions(batch.get("logits_positions", d.logits_positions), "the replay batch's")
        combined = None
        if head is not None:
            combined, ce, lkl = self._fused_terms(head, cap.hidden(inputs["input_ids"]), inputs,
                                                  batch["teacher_logits"] if uses_logits else None, N, M)
        else:
            ce = self.ce_loss(out, inputs, N)
            lkl = None
            if uses_logits:
                lkl = self.logits_loss(out, {**inputs, "teacher_logits": batch["teacher_logits"]}, M)
        loss = replay_objective(self.method, ce, lkl, attn, d.logits_weight, d.attn_weight, combined)
        parts = {"ce": ce.detach()}
        if lkl is not None:
            parts["logits_kl"] = lkl.detach()
        if attn is not None:
            parts["attn_kl"] = attn.detach()
        return loss, parts

    def ce_loss(self, outputs, batch: Mapping, num_items_in_batch: int) -> torch.Tensor:
        """Next-token CE summed over this batch's targets / the global target count."""
        return ce_sum(outputs.logits, batch["labels"]) / num_items_in_batch

    def logits_loss(self, outputs, batch: Mapping, num_items_in_batch: int) -> torch.Tensor:
        """The logits-distillation term (published: CE of the student against
        softmax(teacher logits), mean over the distilled rows), as this batch's share: its
        mean times its distilled rows / the global count of them (``num_items_in_batch``;
        the target count, or under ``distill.logits_positions: published`` the answer
        tokens' count). The rows: the positions that predict answer tokens, or
        (``published``) the answer tokens' own positions, as ``logits[labels != -100]``.

        The one place that reads the student's logits for distillation (``outputs.logits``
        and ``batch["teacher_logits"]``, aligned by :meth:`batch`): a loop that computes
        the term from final hidden states and the ``lm_head`` weight instead of
        materialised logits overrides this method.
        """
        labels = batch["labels"]
        tl = batch["teacher_logits"].to(labels.device)
        pos = self.cfg.distill.logits_positions
        n_loc = int(distilled_rows(labels, pos).sum())
        return logits_kl_mean(outputs.logits, tl, labels, pos) * (n_loc / num_items_in_batch)

    # ---------------------------------------------------------------- fused lm_head
    def fused_lm_head(self, model) -> Optional[torch.nn.Linear]:
        """The ``lm_head`` :meth:`replay_loss` fuses with its CE and logits terms, or None
        (materialised logits), by ``distill.fused_lm_head``: ``auto`` fuses where it
        applies, ``true`` raises :class:`ConfigError` saying why where it does not,
        ``false`` never fuses. It applies to a causal LM whose output embeddings
        (``get_output_embeddings()``, through DDP and PEFT wrappers) are a plain
        ``nn.Linear`` (not LoRA-adapted, no hooks) with unsharded weights (not FSDP /
        ZeRO-3), whose logits the model does not rescale, and when neither
        :meth:`ce_loss` nor :meth:`logits_loss` is overridden."""
        mode = self.cfg.distill.fused_lm_head
        if mode == "false":
            return None
        head, why = _fusable_lm_head(self, model)
        if head is None and mode == "true":
            raise ConfigError(f"distill.fused_lm_head: true, but {why}; use auto (materialised logits where "
                              "the fused lm_head does not apply) or false")
        return head

    def _fused_terms(self, head, hidden, inputs, teacher, N, M=None):
        """(combined, ce, logits_kl) of the fused path: ``combined`` with gradients, the
        two terms detached (for ``parts``), each this batch's share of the global batch
        (``N`` targets; ``M`` distilled logits rows, default ``N``). With
        ``distill.logits_positions: published`` the logits term's rows (the answer
        tokens' own positions, against the teacher there) are not the CE's (the
        positions before them): one call per term over the same hidden states, the
        answer rows' logits computed twice."""
        from ..ops.linear_logits_kl import linear_logits_kl
        d = self.cfg.distill
        M = N if M is None else M
        W, bias, dt, ac = self._lm_head_dtype(head, hidden)
        h, labels = hidden.to(dt), inputs["labels"]
        hard = (h[:, :-1], labels[:, 1:], N)                 # the CE's rows, and its normaliser
        if teacher is None:
            hw, sw, soft = 1.0, 0.0, None
        else:
            hw, sw = 1.0 - d.logits_weight, float(d.logits_weight)
            t = teacher.to(h.device)
            if d.logits_positions == "published":
                soft = (h, labels, M, t)
            else:
                soft = (*hard, shifted_teacher(t))
        kw = dict(bias=bias, reduction="sum", backend="triton" if d.backend == "triton" else "auto")
        parts = {}
        with torch.autocast(h.device.type, enabled=False) if ac else contextlib.nullcontext():
            if soft is None or soft[0] is hard[0]:     # one call: both terms on the same rows
                t = None if soft is None else soft[3]
                combined = linear_logits_kl(hard[0], W, t, hard[1], hard_weight=hw, soft_weight=sw, _parts=parts,
                                            **kw) / N
            else:
                combined = 0.0
                if hw:
                    combined = linear_logits_kl(hard[0], W, None, hard[1], hard_weight=hw, soft_weight=0.0,
                                                _parts=parts, **kw) / N
                if sw:
                    combined = combined + linear_logits_kl(soft[0], W, soft[3], soft[1], hard_weight=0.0,
                                                           soft_weight=sw, _parts=parts, **kw) / M
            with torch.no_grad():   # a term of weight 0 is still logged
                if "hard" not in parts:
                    linear_logits_kl(hard[0], W, None, hard[1], hard_weight=1.0, soft_weight=0.0, _parts=parts, **kw)
                if soft is not None and "soft" not in parts:
                    linear_logits_kl(soft[0], W, soft[3], soft[1], hard_weight=0.0, soft_weight=1.0, _parts=parts,
                                     **kw)
        lkl = None if soft is None else (parts["soft"] / soft[2]).float()
        return combined.float(), (parts["hard"] / N).float(), lkl

    def _lm_head_dtype(self, head, hidden):
        """(weight, bias, dtype, autocast on) of the fused lm_head call: the dtype the
        lm_head's F.linear would run in (autocast's, else the weight's)."""
        W, bias = head.weight, head.bias
        dt = hidden.dtype
        ac = torch.is_autocast_enabled(hidden.device.type)
        if ac:
            dt = torch.get_autocast_dtype(hidden.device.type)
        elif W.dtype != dt:
            dt = W.dtype
        return W.to(dt), None if bias is None else bias.to(dt), dt, ac

    def _check_positions(self, positions, what):
        """Refuse teacher logits captured at other positions than ``distill.logits_positions``."""
        want = self.cfg.distill.logits_positions
        if positions != want:
            raise ConfigError(f"distill.logits_positions: {want!r}, but {what} teacher logits were captured at the "
                              f"{positions!r} positions (a replay memory of a run under the other option); use "
                              f"distill.logits_positions: {positions} with this memory")

    @staticmethod
    def _attention_targets(b, layers, dev):
        """heads / teacher / queries of a replay micro-batch on ``dev``, with an empty
        [B, 1] slot table for global-batch layers none of its samples distils."""
        heads = dict(b.get("heads") or {})
        teacher = dict(b.get("teacher_attention") or {})
        q = b.get("queries")
        Bm, L = b["input_ids"].shape
        Q = L if q is None else q.shape[1]
        for l in layers:
            if l not in heads:
                heads[l] = torch.full((Bm, 1), -1, dtype=torch.long)
                teacher[l] = torch.zeros(Bm, 1, Q, L)
        return ({l: heads[l].to(dev) for l in layers}, {l: teacher[l].to(dev) for l in layers},
                None if q is None else q.to(dev))

    # ---------------------------------------------------------------- end task
    def end_task(self, model) -> dict:
        """Finish the task: sensitivity and forgettability of every head on the new replay
        samples update the importance, heads are reselected, the teacher is captured and
        the samples join the memory (``seekr``; ``replay+logits`` captures logits only,
        ``replay`` keeps the samples, ``sft`` only counts the task).

        Every process calls it (statistics are all-reduced through the hooks). Returns
        ``{"task", "name", "heads", "sensitivity", "forgettability"}`` (the last three for
        ``seekr``) for logging.
        """
        st = self.current
        if st is None:
            raise RuntimeError("end_task: no task in progress; call begin_task first")
        info = {"task": st.index, "name": st.name}
        if self.uses_attention:
            sens = self.sensitivity(model, st.samples)
            forget = self.forgettability(model, st.samples, st.before)
            st.before = None
            self.importance += sens * forget
            from .selection import select_heads
            self.heads = {int(l): torch.as_tensor(h).long()
                          for l, h in select_heads(self.importance, *self.budgets,
                                                   ties=self.cfg.distill.head_selection).items()}
            info.update(heads=self.heads, sensitivity=sens, forgettability=forget)
        if self.method in ("replay+logits", "seekr"):
            self.capture_teacher(model, st.samples, self.heads if self.uses_attention else {})
        if self.uses_memory:
            self.memory.add_task(st.name, [x.to_replay() for x in st.samples],
                                 self.heads if self.uses_attention else {},
                                 logits_positions=self.cfg.distill.logits_positions)
        self.num_tasks += 1
        self.task_names.append(st.name)
        self.current = None
        return info

    # ---------------------------------------------------------------- statistics and teacher (seekr/passes.py)
    def sensitivity(self, model, samples) -> torch.Tensor:
        """Task sensitivity per head on the samples, normalised per layer as published
        (:func:`seekr_kernels.seekr.passes.sensitivity`). ``[n_layers, n_heads]`` fp32."""
        return passes.sensitivity(self, model, samples)

    def forgettability(self, model, samples, before) -> torch.Tensor:
        """Mean (A_before - A_after)^2 per head over the samples' query rows
        (:func:`seekr_kernels.seekr.passes.forgettability`); ``before`` from :meth:`snapshot`."""
        return passes.forgettability(self, model, samples, before)

    def capture_teacher(self, model, samples: Sequence[PendingSample], heads: Optional[Mapping] = None) -> None:
        """Fill each pending sample's teacher (logits, and the rows of ``heads``) from
        ``model`` (:func:`seekr_kernels.seekr.passes.capture_teacher`)."""
        passes.capture_teacher(self, model, samples, heads)

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Everything carried across tasks, and the task in progress, by reference:
        ``format``, ``config``, ``shape``, ``num_tasks``, ``task_names``, ``importance``,
        ``heads``, ``memory`` (the :class:`ReplayTask` list) and ``current`` (None, or
        the task's index, name, replay indices, samples and pre-task snapshot)."""
        cur = None
        if self.current is not None:
            st = self.current
            cur = {"index": st.index, "name": st.name, "indices": list(st.indices),
                   "samples": [{"prompt_ids": s.prompt_ids, "answer_ids": s.answer_ids,
                                "queries": None if s.queries is None else s.queries.tolist()} for s in st.samples],
                   "snapshot": snapshot_tensors(st.before), "snapshot_kind": snapshot_kind(st.before)}
        return {"format": FORMAT, "kind": KIND, "config": self.cfg.to_dict(),
                "shape": None if self.budgets is None else [self.num_layers, self.num_heads],
                "num_tasks": self.num_tasks, "task_names": list(self.task_names),
                "importance": None if self.importance is None else self.importance,
                "heads": dict(self.heads), "memory": list(self.memory.tasks), "current": cur}

    def load_state_dict(self, sd: Mapping) -> "SeekrRecipe":
        """Restore :meth:`state_dict` output (checked: format, method, shape)."""
        if not isinstance(sd, Mapping) or sd.get("kind") != KIND:
            raise ValueError("state_dict: not a SeekrRecipe state")
        if sd.get("format") != FORMAT:
            raise ValueError(f"state_dict: format {sd.get('format')!r}, this version reads {FORMAT}")
        method = (sd.get("config") or {}).get("method")
        if method != self.method:
            raise ValueError(f"state_dict: holds a {method!r} recipe, this one is {self.method!r}")
        shape = sd.get("shape")
        if shape is not None:
            if self.budgets is None:
                self._set_shape(*shape)
            elif list(shape) != [self.num_layers, self.num_heads]:
                raise ValueError(f"state_dict: shape {shape}, this recipe is [{self.num_layers}, {self.num_heads}]")
            imp = sd.get("importance")
            if not isinstance(imp, torch.Tensor) or list(imp.shape) != list(shape):
                raise ValueError(f"state_dict['importance']: expected a tensor of shape {list(shape)}")
            self.importance = imp.detach().to("cpu", torch.float32).clone()
        from .memory import ReplayMemory
        self.memory = ReplayMemory(sd.get("memory") or [])
        if self.method in ("replay+logits", "seekr"):
            for t in self.memory.tasks:
                if any(s.logits is not None for s in t.samples):
                    self._check_positions(t.logits_positions, f"task {t.name!r}'s")
        self.heads = {int(l): torch.as_tensor(h).long() for l, h in (sd.get("heads") or {}).items()}
        self.num_tasks = int(sd.get("num_tasks", 0))
        self.task_names = [str(n) for n in sd.get("task_names", [])]
        if len(self.task_names) != self.num_tasks:
            raise ValueError(f"state_dict: {len(self.task_names)} task names for {self.num_tasks} tasks")
        if self.uses_memory and len(self.memory.tasks) != self.num_tasks:
            raise ValueError(f"state_dict: memory holds {len(self.memory.tasks)} tasks, {self.num_tasks} were learned")
        cur = sd.get("current")
        self.current = None
        if cur is not None:
            samples = []
            for s in cur["samples"]:
                ps = PendingSample(list(s["prompt_ids"]), list(s["answer_ids"]), int(cur["index"]))
                ps.queries = None if s.get("queries") is None else torch.tensor(s["queries"], dtype=torch.long)
                samples.append(ps)
            self.current = _TaskState(int(cur["index"]), str(cur["name"]), list(cur["indices"]), samples,
                                      snapshot_from_tensors(cur.get("snapshot_kind"), cur.get("snapshot"),
                                                             len(samples)))
        return self

    def save(self, path: str, *, memory: bool = True) -> None:
        """Write the state to directory ``path`` atomically (a reader sees the old one or
        the complete new one); ``memory=False`` leaves the replay memory out (a loop that
        keeps it elsewhere passes it back to :meth:`load`). See
        :mod:`seekr_kernels.seekr.recipe_store` for the files."""
        recipe_store.save(self, path, memory=memory)

    def load(self, path: str, *, memory=None) -> "SeekrRecipe":
        """Restore a state written by :meth:`save` into this recipe (same method and
        shape); a missing, corrupt or foreign file raises ``ValueError`` naming it.
        ``memory``: the replay memory (a ``ReplayMemory`` or its task list) of a state
        saved with ``memory=False``; its task names must be the state's."""
        return recipe_store.load(self, path, memory=memory)


# ============================================================================ helpers

def _fusable_lm_head(recipe, model):
    """(lm_head, None) when :meth:`SeekrRecipe.replay_loss` can run it fused, else (None,
    why not)."""
    d = recipe.cfg.distill
    if type(recipe).ce_loss is not SeekrRecipe.ce_loss or type(recipe).logits_loss is not SeekrRecipe.logits_loss:
        return None, f"{type(recipe).__name__} overrides ce_loss or logits_loss"
    if d.backend == "torch":
        return None, "distill.backend is torch (the plain-PyTorch reference materialises the logits)"
    if recipe.dist.sharded:
        return None, "the model is sharded (FSDP): its lm_head weight is gathered only inside its forward"
    m = unwrap(model)
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        if any(isinstance(x, (FSDPModule, FullyShardedDataParallel)) for x in m.modules()):
            return None, "the model is sharded (FSDP): its lm_head weight is gathered only inside its forward"
    except ImportError:   # pragma: no cover - torch without distributed
        pass
    get = getattr(m, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None, "the model has no output embeddings (get_output_embeddings() is None: not a causal LM?)"
    if type(head) is not torch.nn.Linear:
        return None, (f"the lm_head is a {type(head).__name__}, not a plain nn.Linear (adapted by LoRA, wrapped "
                      "or quantised)")
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook") or "forward" in vars(head):
        return None, "the lm_head has forward hooks or a replaced forward"
    W = head.weight
    try:
        from torch.distributed.tensor import DTensor
        sharded = isinstance(W, DTensor)
    except ImportError:   # pragma: no cover
        sharded = False
    if sharded or hasattr(W, "ds_id"):
        return None, "the lm_head weight is sharded (FSDP / ZeRO-3)"
    if not W.dtype.is_floating_point:
        return None, f"the lm_head weight is {W.dtype}"
    cfg = getattr(m, "config", None)
    for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        v = getattr(cfg, k, None)
        if v not in (None, 1, 1.0):
            return None, f"the model rescales its logits (config.{k} = {v})"
    return head, None


class _LmHeadInput:
    """Inside the context the lm_head records its input (the final hidden states) and
    returns a ``[..., 0]`` stand-in for the logits: the replay loss computes them chunk by
    chunk from the hidden states instead. The stand-in is computed from the input and the
    weight, so the forward's outputs still reach every parameter (DDP's search for unused
    parameters)."""

    def __init__(self, head):
        self.head = head
        self.inputs = []

    def __enter__(self):
        head, seen = self.head, self.inputs

        def forward(x):
            seen.append(x)
            return torch.nn.functional.linear(x, head.weight[:0], None if head.bias is None else head.bias[:0])
        head.forward = forward
        return self

    def __exit__(self, *exc):
        del self.head.forward

    def hidden(self, input_ids):
        """The recorded final hidden states [B, L, Hd] of the batch ``input_ids`` [B, L]."""
        if len(self.inputs) != 1 or tuple(self.inputs[0].shape[:-1]) != tuple(input_ids.shape):
            got = [tuple(x.shape) for x in self.inputs]
            raise RuntimeError(f"distill.fused_lm_head: the model called its lm_head with {got}, expected one call "
                               f"on hidden states {list(input_ids.shape)} + [hidden]; set distill.fused_lm_head: "
                               "false for this model")
        return self.inputs[0]

def _model_config(model):
    c = getattr(unwrap(model), "config", None)
    if c is None or not hasattr(c, "num_hidden_layers") or not hasattr(c, "num_attention_heads"):
        raise TypeError("model: expected a transformers model with config.num_hidden_layers and "
                        "config.num_attention_heads")
    return c


def _ensure_patched(model):
    from ..llama import is_patched, patch_llama
    if not is_patched(model):
        patch_llama(unwrap(model))


def _forward(model, inputs):
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 position_ids=inputs["position_ids"], use_cache=False)


