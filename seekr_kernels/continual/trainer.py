"""Continual fine-tuning over a sequence of tasks: sft, replay, replay+logits and SEEKR.

One :class:`ContinualTrainer` runs a whole task stream::

    from seekr_kernels.continual.config import load_config
    from seekr_kernels.continual.trainer import ContinualTrainer
    results = ContinualTrainer(load_config("run.yaml")).run()
    results["OP"], results["BWT"], results["matrix"]

It is a loop over :class:`~seekr_kernels.continual.recipe.SeekrRecipe`, which holds the
method (replay memory, importance, heads, the replay loss). Per task t (the published
recipe, jinghan1he/SEEKR ``training/seekr.py``):

1. ``recipe.begin_task``: a seeded replay subset of task t's training data
   (``replay.ratio``) and, for SEEKR, its query rows (``distill.query_budget``) and the
   pre-task weights (for forgettability);
2. the model trains on task t (AdamW, warm-up + schedule, gradient accumulation, bf16
   autocast on CUDA, optional gradient checkpointing); every ``replay.cycle`` steps one
   extra optimiser step runs on a replay batch mixed from the memory of earlier tasks,
   with loss ``recipe.replay_loss`` = ``(1 - a) CE + a logits-KL + b attention-KL``
   (``replay``: CE only, ``replay+logits``: b = 0). Default cycle: train batches per
   epoch // replay batches. With ``replay.in_accumulation`` (published) a replay batch is
   instead one micro-step of the next accumulation window;
3. ``recipe.end_task``: task sensitivity and forgettability of every head on the new
   replay samples update the accumulated importance, heads are reselected under the
   layer/head budgets, and the teacher (logits and the selected heads' attention rows) is
   captured for the new samples, which join the memory;
4. every task seen so far is evaluated (a row of the accuracy matrix); the checkpoint,
   the memory and the run state are written atomically.

Resume: a run restarted with the same config and ``output_dir`` continues after the last
complete task. Every task reseeds all RNGs from (seed, task index) and builds a fresh
optimiser, and everything carried across tasks (weights, memory, importance) is saved
exactly, so a resumed run ends with the same weights and numbers as an uninterrupted one.

Distributed (``torchrun``): DDP by default, FSDP2 (``fully_shard`` per decoder layer) with
``distributed.strategy: fsdp``. Every rank draws the same global batches and replay
batches and takes its slice; losses are normalised by global counts so N processes give
the gradient of the single-process global batch; importance statistics are all-reduced
(through the recipe's :class:`~seekr_kernels.continual.recipe.DistributedHooks`); only
rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import string
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..utils.io import atomic_dir
from . import metrics as M
from .config import RunConfig, TaskSpec, task_name
from .data import (CharTokenizer, Encoded, EncodedDataset, collate, epoch_batches, load_task,
                   load_tokenizer, shard)
from .evaluate import GenerationOptions, evaluate_examples
from .losses import ce_sum
from .preflight import check_run, check_tasks, eval_split, model_max_positions
from .recipe import DistributedHooks, PendingSample, SeekrRecipe, task_seed
from .runlog import RunLogger

_Sample = PendingSample   # the name this module used before the recipe moved out

STATE_VERSION = 1
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"

#: The tiny Llama built when no model path is given.
TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                 tie_word_embeddings=True)


# ============================================================================ setup helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass


def build_tokenizer(mcfg):
    """The run's tokenizer: a local HF tokenizer, or the built-in char tokenizer."""
    if mcfg.tokenizer:
        return load_tokenizer(mcfg.tokenizer)
    if mcfg.path:
        return load_tokenizer(mcfg.path)
    return CharTokenizer(mcfg.alphabet or DEFAULT_ALPHABET)


def build_model(mcfg, tokenizer, seed: int = 0):
    """A causal LM from a local HF directory, or a tiny Llama from ``mcfg.arch``."""
    dtype = getattr(torch, mcfg.dtype)
    if mcfg.path:
        from transformers import AutoModelForCausalLM
        if not os.path.isdir(mcfg.path):
            raise FileNotFoundError(f"model.path: {mcfg.path} is not a directory (models load from local "
                                    "Hugging Face directories only)")
        with _quiet_transformers():
            try:
                return AutoModelForCausalLM.from_pretrained(mcfg.path, local_files_only=True, dtype=dtype,
                                                            attn_implementation=mcfg.attn_implementation)
            except TypeError:  # transformers < 4.56 spells it torch_dtype
                return AutoModelForCausalLM.from_pretrained(mcfg.path, local_files_only=True, torch_dtype=dtype,
                                                            attn_implementation=mcfg.attn_implementation)
    from transformers import LlamaConfig, LlamaForCausalLM
    arch = {**TINY_ARCH, **(mcfg.arch or {}), "vocab_size": tokenizer.vocab_size,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    cfg = LlamaConfig(**arch)
    cfg._attn_implementation = mcfg.attn_implementation
    with _fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


@contextlib.contextmanager
def _quiet_transformers():
    """No 'Writing model shards' progress bar inside our own progress output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _fork_rng():
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@dataclass
class Dist:
    """Where this process stands in a torch.distributed job (world 1 when not launched)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returned on t's device; the collective runs on ``self.device``)."""
        if self.world > 1:
            x = t.to(self.device)
            torch.distributed.all_reduce(x)
            return x.to(t.device)
        return t

    def close(self):
        """Leave the process group (only if this object joined it); all ranks together."""
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def setup_distributed(cfg: RunConfig) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owned=True)


def _device(cfg: RunConfig, d: Dist) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if cfg.device == "cuda":
        return torch.device(f"cuda:{d.local_rank}")
    return torch.device(cfg.device)


def _schedule(kind: str, warmup: int, total: int):
    def f(step):
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.dim() < 2 or "norm" in n.lower() or n.endswith(".bias")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _n_targets(e: Encoded) -> int:
    """Next-token targets of one example: every answer token that has a token before it."""
    return len(e.answer_ids) - (0 if e.prompt_ids else 1)


# ============================================================================ SEEKR pieces

def _select_heads(importance: torch.Tensor, layer_budget: int, head_budget: int) -> dict:
    """Published rule (top layers by summed importance, then top heads across them)."""
    from .selection import select_heads
    return {int(l): torch.as_tensor(h).long() for l, h in select_heads(importance, layer_budget, head_budget).items()}


# ============================================================================ the trainer

class ContinualTrainer:
    """Runs a task stream with one method and writes checkpoints, memory and results.

    A thin loop over :class:`~seekr_kernels.continual.recipe.SeekrRecipe` (``self.recipe``):
    the loop owns data order, optimisation, evaluation and files; the recipe owns the
    replay memory, importance, heads and the replay loss.

    Args:
        config: a :class:`RunConfig` (validated here).
        model, tokenizer: optional; built from ``config.model`` otherwise.
        tasks: optional list of :class:`Task`; loaded from ``config.tasks`` otherwise.
        quiet: no progress bars or prints (the JSON-lines log is still written).
    """

    def __init__(self, config: RunConfig, model=None, tokenizer=None, tasks: Optional[list] = None,
                 quiet: bool = False):
        self.cfg = config
        if tasks is not None and not config.tasks:
            config.tasks = [TaskSpec(name=t.name, path=f"<{t.name}>", metric=t.metric) for t in tasks]
        config.validate()
        check_run(config)       # device, backend, model and output folders, state.json: before any loading
        self.dist = setup_distributed(config)
        self.device = _device(config, self.dist)
        self.dist.device = self.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.quiet = quiet
        self.method = config.method
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config.model)
        self.tasks = tasks if tasks is not None else [
            load_task(ts.path, task_name(ts), ts.metric) for ts in config.tasks]
        self.task_names = [t.name for t in self.tasks]
        check_tasks(config, self.tasks, self.tokenizer, world=self.dist.world,
                    max_positions=model_max_positions(config, model), warn=self.dist.main)
        self.model = model if model is not None else build_model(config.model, self.tokenizer, config.seed)
        self.out = config.output_dir
        tr = config.train
        if tr.batch_size < self.dist.world * tr.grad_accum:
            raise ValueError(f"train.batch_size={tr.batch_size} is smaller than world size x grad_accum "
                             f"= {self.dist.world * tr.grad_accum}")
        self.autocast = None
        if tr.precision == "bf16" or (tr.precision == "auto" and self.device.type == "cuda"):
            self.autocast = torch.bfloat16
        self.recipe = SeekrRecipe(config, model=self.model, pad_token_id=self.tokenizer.pad_token_id,
                                  device=self.device, autocast_dtype=self.autocast)
        self.budgets = self.recipe.budgets
        self.rows: list = []
        self.loglik_rows: list = []
        self.logger = RunLogger(self.out, config.train.report_to, main=self.dist.main, config=config.to_dict(),
                                run_name=os.path.basename(os.path.normpath(self.out)))
        self._fsdp = False

    # The state carried across tasks lives in the recipe.
    @property
    def memory(self):
        return self.recipe.memory

    @property
    def importance(self) -> torch.Tensor:
        return self.recipe.importance

    @property
    def heads(self) -> dict:
        return self.recipe.heads

    # ---------------------------------------------------------------- small utilities
    def _print(self, *a):
        if self.dist.main and not self.quiet:
            print(*a, flush=True)

    def log(self, **rec):
        """One record to the run's logs (:class:`RunLogger`): ``kind`` and ``global_step``
        (default: the last step logged) are its coordinates, the rest its fields."""
        step = rec.pop("global_step", None)
        self.logger.log(rec.pop("kind", "train"), self.logger.step if step is None else step, **rec)

    def _log_eval(self, t: int, row, loglik, seconds: float):
        """The evaluation after task ``t``: its row, the matrix so far, OP/BWT at the end and
        (for the report_to backends) the heatmap."""
        if not self.dist.main:
            return
        res = self.results()
        heat = None
        if self.logger.backends:
            heat = M.plot_heatmap(res["matrix"], os.path.join(self.out, "heatmap.png"), self.task_names,
                                  title=self.method)
        self.logger.log_eval(t, getattr(self, "global_step", self.logger.step), names=self.task_names, row=row,
                             matrix=res["matrix"], op=res.get("OP"), bwt=res.get("BWT"), heatmap=heat,
                             loglik=loglik, train_seconds=round(seconds, 3))

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    @property
    def base(self):
        """The plain model (under DDP the wrapped module; FSDP2 shards in place)."""
        m = self.train_model
        return m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m

    def _uses_patch(self):
        return self.method == "seekr"

    # ---------------------------------------------------------------- model preparation
    def _prepare_model(self):
        m = self.model.to(self.device)
        if self._uses_patch():
            from ..llama import patch_llama
            m = patch_llama(m)
        if self.cfg.train.gradient_checkpointing:
            # Non-reentrant: the attention losses need gradients in the first forward pass.
            kw = {"use_reentrant": False}
            if hasattr(m, "activation_checkpointing_enable"):     # transformers >= 5.x name
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        m.config.use_cache = False
        self.model = m
        if self.dist.world > 1:
            if self.cfg.distributed.strategy == "fsdp":
                from torch.distributed.fsdp import fully_shard
                for layer in m.model.layers:
                    fully_shard(layer)
                fully_shard(m)
                self.train_model = m
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP
                self.train_model = DDP(m, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.train_model = m
        self._fsdp = self.dist.world > 1 and self.cfg.distributed.strategy == "fsdp"
        self.recipe.dist = DistributedHooks(self.dist.rank, self.dist.world, self.dist.all_reduce, self._reshard,
                                            sharded=self._fsdp)

    def _reshard(self):
        """FSDP2 keeps the root's parameters gathered after a forward with no backward (it
        expects one); reshard them so the next training step all-gathers fresh weights."""
        if not getattr(self, "_fsdp", False):
            return
        from torch.distributed.fsdp import FSDPModule
        for mod in self.model.modules():
            if isinstance(mod, FSDPModule):
                mod.reshard()

    def _state_dict(self):
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))
            if getattr(self.model.config, "tie_word_embeddings", False):
                # The gathered dict names the tied output embedding twice; save it once, like
                # an unsharded model (its load path re-ties it).
                sd.pop("lm_head.weight", None)
            return sd
        return {k: v.detach().cpu() for k, v in self.base.state_dict().items()}

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        """Train (or resume) the whole stream; returns the results dict."""
        start = self._resume()
        self._prepare_model()
        T = len(self.tasks)
        if start:
            self._print(f"resuming after task {start}/{T} ({self.task_names[start - 1]})")
            self.log(kind="resume", completed=start)
        t0 = time.time()
        try:
            for t in range(start, T):
                self._run_task(t)
        finally:
            self.logger.close()
        res = self.results()
        res["seconds"] = time.time() - t0
        return res

    def results(self) -> dict:
        T = len(self.tasks)
        out = {"method": self.method, "tasks": self.task_names, "complete": len(self.rows) == T,
               "matrix": M.partial_matrix(self.rows, T), "loglik": M.partial_matrix(self.loglik_rows, T)}
        if len(self.rows) == T:
            out["OP"] = M.overall_performance(out["matrix"])
            out["BWT"] = M.backward_transfer(out["matrix"])
        return out

    # ---------------------------------------------------------------- one task
    def _run_task(self, t: int):
        cfg, task = self.cfg, self.tasks[t]
        seed_everything(task_seed(cfg.seed, t))
        tr = cfg.train
        ds = EncodedDataset(task.train, self.tokenizer, tr.max_prompt_len, tr.max_answer_len)
        self.recipe.begin_task(self.train_model, ds.items, name=task.name)
        epochs = cfg.tasks[t].epochs or tr.epochs
        t_start = time.time()
        self._fit(t, ds, epochs)
        info = self.recipe.end_task(self.train_model)
        if "heads" in info:
            self.log(kind="heads", task=t, heads={str(l): h.tolist() for l, h in info["heads"].items()})
        row, ll = self._evaluate_upto(t)
        self.rows.append(row)
        self.loglik_rows.append(ll)
        self._log_eval(t, row, ll, time.time() - t_start)
        self._print(f"[{self.method}] after task {t + 1}/{len(self.tasks)} ({task.name}): "
                    + ", ".join(f"{n}={s:.3f}" for n, s in zip(self.task_names, row)))
        self._save(t)

    # ---------------------------------------------------------------- training loop
    def _global_batches(self, n, epoch, t, bs):
        ep = 0 if self.cfg.train.order == "fixed" else epoch
        bl = epoch_batches(n, bs, task_seed(self.cfg.seed, t), ep, shuffle=self.cfg.train.shuffle)
        need = self.dist.world * self.cfg.train.grad_accum
        if bl and len(bl[-1]) < need:   # every rank and micro-step needs a sample
            bl.pop()
        return bl

    def _fit(self, t: int, ds: EncodedDataset, epochs: int):
        if self.recipe.replays_in_accumulation:
            return self._fit_in_accumulation(t, ds, epochs)
        cfg, tr = self.cfg, self.cfg.train
        model = self.train_model
        model.train()
        opt = torch.optim.AdamW(_param_groups(self.base, tr.weight_decay), lr=tr.lr, betas=tuple(tr.betas))
        n_batches = len(self._global_batches(len(ds), 0, t, tr.batch_size))
        if n_batches == 0:
            raise ValueError(f"task {self.task_names[t]}: {len(ds)} training samples make no batch of "
                             f"{self.dist.world * tr.grad_accum}+ samples")
        rs = self.recipe.replay_schedule(n_batches)
        total = epochs * (n_batches + rs.per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(tr.schedule, tr.warmup_steps, total))
        bar = self._bar(t, total)
        gstep = 0
        for epoch in range(epochs):
            rs.start_epoch(epoch)
            for step, gb in enumerate(self._global_batches(len(ds), epoch, t, tr.batch_size)):
                if rs.is_replay_step(step):
                    rec = self._replay_step(rs.next_batch(), opt, sched)
                    gstep += 1
                    bar.update(1)
                    if gstep % cfg.log.every == 0:
                        self.log(kind="replay", task=t, epoch=epoch, step=step, global_step=gstep, **rec)
                loss = self._train_step([ds[i] for i in gb], opt, sched)
                gstep += 1
                bar.update(1)
                if gstep % cfg.log.every == 0 or gstep == total:
                    self.log(kind="train", task=t, epoch=epoch, step=step, global_step=gstep, loss=loss,
                             lr=sched.get_last_lr()[0])
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.close()
        opt.zero_grad(set_to_none=True)

    def _bar(self, t, total):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=f"{self.method} {t + 1}/{len(self.tasks)} {self.task_names[t]}",
                    disable=not (self.dist.main and self.cfg.log.progress and not self.quiet), leave=False,
                    dynamic_ncols=True)

    def _fit_in_accumulation(self, t: int, ds: EncodedDataset, epochs: int):
        """``replay.in_accumulation`` (published, DeepSpeed): the loop runs micro-steps; a
        replay micro-batch is one of them, and every ``grad_accum`` micro-steps (train or
        replay) make one optimiser step. Each micro-step's loss is its own mean / grad_accum,
        as DeepSpeed scales it. A window left incomplete at the end of the task is stepped
        (the published engine would carry it into the next task)."""
        cfg, tr = self.cfg, self.cfg.train
        A, W = tr.grad_accum, self.dist.world
        model = self.train_model
        model.train()
        opt = torch.optim.AdamW(_param_groups(self.base, tr.weight_decay), lr=tr.lr, betas=tuple(tr.betas))

        def micro_steps(epoch):
            # Micro-step k of a global batch: every rank's k-th micro-batch of it.
            out = []
            for gb in self._global_batches(len(ds), epoch, t, tr.batch_size):
                ranks = [shard(gb, r, W) for r in range(W)]
                for k in range(A):
                    out.append([i for r in ranks for i in shard(r, k, A)])
            return out

        n_micro = len(micro_steps(0))
        if n_micro == 0:
            raise ValueError(f"task {self.task_names[t]}: {len(ds)} training samples make no batch of "
                             f"{W * A}+ samples")
        rs = self.recipe.replay_schedule(n_micro)
        total = -(-epochs * (n_micro + rs.per_epoch) // A)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(tr.schedule, tr.warmup_steps, total))
        bar = self._bar(t, total)
        state = {"micro": 0, "gstep": 0, "losses": []}

        def after_micro(epoch, step):
            state["micro"] += 1
            if state["micro"] % A == 0:
                self._optimizer_step(opt, sched)
                state["gstep"] += 1
                bar.update(1)
                if state["losses"] and (state["gstep"] % cfg.log.every == 0 or state["gstep"] == total):
                    loss = sum(state["losses"]) / len(state["losses"])
                    self.log(kind="train", task=t, epoch=epoch, step=step, global_step=state["gstep"], loss=loss,
                             lr=sched.get_last_lr()[0])
                state["losses"] = []

        for epoch in range(epochs):
            rs.start_epoch(epoch)
            for step, mb in enumerate(micro_steps(epoch)):
                if rs.is_replay_step(step):
                    boundary = (state["micro"] + 1) % A == 0
                    rec = self._replay_micro(rs.next_batch(), boundary, 1.0 / A)
                    if state["gstep"] % cfg.log.every == 0:
                        self.log(kind="replay", task=t, epoch=epoch, step=step, global_step=state["gstep"], **rec)
                    after_micro(epoch, step)
                boundary = (state["micro"] + 1) % A == 0
                state["losses"].append(self._train_micro([ds[i] for i in mb], boundary, 1.0 / A))
                after_micro(epoch, step)
        if state["micro"] % A:
            self._optimizer_step(opt, sched)
        bar.close()
        opt.zero_grad(set_to_none=True)

    def _train_micro(self, items, boundary: bool, scale: float) -> float:
        """One accumulation micro-step on a global micro-batch (this rank takes its slice)."""
        N = sum(_n_targets(e) for e in items)
        mine = shard(list(range(len(items))), self.dist.rank, self.dist.world)
        b = collate([items[i] for i in mine], self.tokenizer.pad_token_id, self.cfg.train.pad_to_multiple_of)
        b = {k: v.to(self.device) for k, v in b.items()}
        with self._sync_ctx(0, 1 if boundary else 2), self._autocast():
            s = ce_sum(self._forward(b).logits, b["labels"])
        (s * (scale * self.dist.world / N)).backward()
        return float(self.dist.all_reduce(s.detach().double().cpu())) / N

    def _replay_micro(self, keys, boundary: bool, scale: float) -> dict:
        """One replay micro-step inside an accumulation window."""
        mine = [keys[i] for i in shard(list(range(len(keys))), self.dist.rank, self.dist.world)]
        b = self.recipe.batch(mine, global_keys=keys)
        with self._sync_ctx(0, 1 if boundary else 2), self._autocast():
            loss, parts = self.recipe.replay_loss(self.train_model, b)
        (loss * (scale * self.dist.world)).backward()
        return self._replay_record(parts)

    def _replay_record(self, parts):
        sums = torch.tensor([float(parts.get(k, 0.0)) for k in ("ce", "logits_kl", "attn_kl")], dtype=torch.float64)
        sums = self.dist.all_reduce(sums)
        rec = {"ce": float(sums[0])}
        if "logits_kl" in parts:
            rec["logits_kl"] = float(sums[1])
        if "attn_kl" in parts:
            rec["attn_kl"] = float(sums[2])
        return rec

    def _micro(self, items):
        """This rank's micro-batches of a global batch (list of lists)."""
        return self.recipe.micro_batches(items, self.cfg.train.grad_accum)

    def _sync_ctx(self, k, n):
        m = self.train_model
        if k < n - 1 and isinstance(m, torch.nn.parallel.DistributedDataParallel):
            return m.no_sync()
        return contextlib.nullcontext()

    def _optimizer_step(self, opt, sched):
        tr = self.cfg.train
        if tr.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), tr.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def _forward(self, b):
        return self.train_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                position_ids=b["position_ids"], use_cache=False)

    def _train_step(self, items, opt, sched) -> float:
        N = sum(_n_targets(e) for e in items)
        W = self.dist.world
        micro = self._micro(items)
        total = torch.zeros((), dtype=torch.float64)
        for k, mb in enumerate(micro):
            b = collate([items[i] for i in mb], self.tokenizer.pad_token_id, self.cfg.train.pad_to_multiple_of)
            b = {kk: v.to(self.device) for kk, v in b.items()}
            with self._sync_ctx(k, len(micro)), self._autocast():
                out = self._forward(b)
                s = ce_sum(out.logits, b["labels"])
            (s * (W / N)).backward()
            total += s.detach().double().cpu()
        self._optimizer_step(opt, sched)
        return float(self.dist.all_reduce(total)) / N

    def _replay_step(self, keys, opt, sched) -> dict:
        """One optimiser step on a global replay batch (the recipe's loss per micro-batch)."""
        W = self.dist.world
        micro = self._micro(keys)
        sums = {}
        for k, mb in enumerate(micro):
            b = self.recipe.batch([keys[i] for i in mb], global_keys=keys)
            with self._sync_ctx(k, len(micro)), self._autocast():
                loss, parts = self.recipe.replay_loss(self.train_model, b)
            (loss * W).backward()
            for name, v in parts.items():
                sums[name] = sums.get(name, 0.0) + float(v)
        self._optimizer_step(opt, sched)
        return self._replay_record(sums)

    # ---------------------------------------------------------------- evaluation
    def _evaluate_upto(self, t: int):
        e, tr = self.cfg.eval, self.cfg.train
        row, ll = [], []
        for j in range(t + 1):
            task = self.tasks[j]
            exs = eval_split(task, e.split)     # a fallback split was warned about at the start
            if e.max_samples:
                exs = exs[: e.max_samples]
            r = evaluate_examples(self.base, self.tokenizer, exs, metric=task.metric,
                                  max_prompt_len=tr.max_prompt_len, max_answer_len=tr.max_answer_len,
                                  batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, device=self.device,
                                  autocast_dtype=self.autocast, keep_predictions=e.keep_predictions,
                                  sharded_model=self._fsdp,
                                  generation=GenerationOptions.from_config(e, self.cfg.seed))
            row.append(r["score"])
            ll.append(r["loglik"])
            if j == t and r["predictions"]:
                self.log(kind="samples", task=t, predictions=r["predictions"])
        self._reshard()
        return row, ll

    # ---------------------------------------------------------------- persistence
    def _state_path(self):
        return os.path.join(self.out, "state.json")

    def _fingerprint(self):
        c = self.cfg
        return {"method": c.method, "seed": c.seed, "tasks": self.task_names,
                "replay_ratio": c.replay.ratio}

    def _save(self, t: int):
        sd = self._state_dict()           # collective under FSDP: every rank calls it
        if self.dist.main:
            ck_root = os.path.join(self.out, "checkpoints")
            os.makedirs(ck_root, exist_ok=True)
            name = f"task-{t:03d}"
            final = os.path.join(ck_root, name)
            with atomic_dir(final) as tmp:
                with _quiet_transformers():
                    self.base.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
                self.tokenizer.save(tmp)
                from safetensors.torch import save_file
                save_file({"importance": self.importance.contiguous()},
                          os.path.join(tmp, "seekr_state.safetensors"))
            mem_bytes = 0
            if self.method != "sft":
                mem_bytes = self.memory.save_task(os.path.join(self.out, "memory"), t)
            prev = None
            if os.path.exists(self._state_path()):
                with open(self._state_path(), encoding="utf-8") as f:
                    prev = json.load(f).get("checkpoint")
            M.write_json(self._state_path(), {
                "version": STATE_VERSION, **self._fingerprint(), "completed": t + 1,
                "checkpoint": os.path.join("checkpoints", name), "rows": self.rows,
                "loglik_rows": self.loglik_rows,
                "heads": {str(l): h.tolist() for l, h in self.heads.items()},
                "config": self.cfg.to_dict()})
            if prev and prev != os.path.join("checkpoints", name) and self.cfg.keep_checkpoints == "last":
                shutil.rmtree(os.path.join(self.out, prev), ignore_errors=True)
            self.log(kind="saved", task=t, checkpoint=final, memory_bytes=mem_bytes)
            res = self.results()
            M.write_json(os.path.join(self.out, "results.json"), res)
            M.plot_heatmap(res["matrix"], os.path.join(self.out, "heatmap.png"), self.task_names,
                           title=f"{self.method}")
        self.dist.barrier()

    def _resume(self) -> int:
        p = self._state_path()
        if not os.path.exists(p):
            return 0
        with open(p, encoding="utf-8") as f:
            st = json.load(f)
        fp = self._fingerprint()
        for k, v in fp.items():
            if st.get(k) != v:
                raise RuntimeError(f"{p}: output_dir holds a run with {k}={st.get(k)!r}, this config has "
                                   f"{v!r}; use another output_dir (or delete it) to start over")
        k = int(st["completed"])
        ck = os.path.join(self.out, st["checkpoint"])
        from safetensors.torch import load_file
        sd = load_file(os.path.join(ck, "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"{ck}: checkpoint does not match the model (missing {sorted(missing)}, "
                               f"unexpected {sorted(unexpected)})")
        if tied:
            self.model.tie_weights()
        from .replay import ReplayMemory
        memory = ReplayMemory()
        if self.method != "sft":
            for ti in range(k):
                memory.add(memory.load_task(os.path.join(self.out, "memory"), ti, self.task_names[ti]))
        rc = self.recipe
        rc.load_state_dict({**rc.state_dict(), "num_tasks": k, "task_names": self.task_names[:k],
                            "importance": load_file(os.path.join(ck, "seekr_state.safetensors"))["importance"],
                            "heads": {int(l): torch.tensor(h, dtype=torch.long)
                                      for l, h in st.get("heads", {}).items()},
                            "memory": memory.tasks, "current": None})
        self.rows = [list(r) for r in st["rows"]][:k]
        self.loglik_rows = [list(r) for r in st["loglik_rows"]][:k]
        return k


def train(config: RunConfig, **kw) -> dict:
    """Run :class:`ContinualTrainer` on a config; returns its results."""
    return ContinualTrainer(config, **kw).run()
