"""Continual fine-tuning over a sequence of tasks: sft, replay, replay+logits and SEEKR.

One :class:`ContinualTrainer` runs a whole task stream::

    from seekr_kernels.run.config import load_config
    from seekr_kernels.run.trainer import ContinualTrainer
    results = ContinualTrainer(load_config("run.yaml")).run()
    results["OP"], results["BWT"], results["matrix"]

It is a loop over :class:`~seekr_kernels.seekr.recipe.SeekrRecipe`, which holds the
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
4. every task seen so far is evaluated (a row of the accuracy matrix); the memory, a
   checkpoint and the run state are written atomically.

Checkpoints (:mod:`~seekr_kernels.run.checkpoint`): at every task end and every
``train.save_steps`` optimiser steps, a ``save_pretrained`` folder (sharded at
``train.max_shard_size``; LoRA: the adapters) plus optimiser, scheduler, gradient scaler,
RNG states, the position in the task and the replay schedule, the recipe's state and the
step counters, every file checksummed in a manifest written last. ``state.json`` names the
newest checkpoint (its commit point) and carries its own checksum.

Resume is explicit (``run(resume=True)``, ``seekr train --resume``): a run continues from
the newest checkpoint, also in the middle of a task, and ends bit-identical to an
uninterrupted run. The checkpoint is verified file by file first, and a config that
differs from the saved one in any key that changes results is refused with the keys
named (see :data:`RESUME_IGNORED` for the keys that may change). An output directory that
holds a run is never silently reused: without ``resume`` or ``overwrite`` it is refused.

The optimiser (``train.optimizer_scope``): ``task`` (default) builds a fresh AdamW and LR
schedule (with its warm-up) for every task, each task a fine-tuning run of its own;
``run`` keeps one AdamW and one constant schedule for the whole stream, as the published
code does (one DeepSpeed engine for all tasks; ``recipe: official`` sets it).

Distributed (``torchrun``): DDP by default, FSDP2 (``fully_shard`` per decoder layer) with
``distributed.strategy: fsdp``. Every rank draws the same global batches and replay
batches and takes its slice; losses are normalised by global counts so N processes give
the gradient of the single-process global batch; importance statistics are all-reduced
(through the recipe's :class:`~seekr_kernels.seekr.distributed.DistributedHooks`); only
rank 0 writes files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..seekr.batching import shard
from ..seekr.config import ConfigError
from ..seekr.distributed import DistributedHooks
from ..seekr.recipe import SeekrRecipe, task_seed
from ..seekr.stream import per_device_batches
from ..utils import store
from ..utils.store import atomic_save_json
from . import checkpoint, metrics
from .checkpoint import CheckpointError, is_peft_model
from .config import RunConfig, TaskSpec, task_name
from .data import EncodedDataset, epoch_batches, load_task
from .evaluate import GenerationOptions, evaluate_examples, resolve_metric_name
from .steps import TrainSteps, build_optimizer, load_optimizer
from .models import (apply_lora, build_model, build_tokenizer, model_state_dict, plain_state_dict, prepare_model,
                     save_model, seed_everything)
from .preflight import check_run, check_tasks, eval_split, model_max_positions, num_threads
from .rundir import TRAINER_KIND, RunDirectory, check_resume_config, data_digests, flatten
from .runlog import RunLogger

# ============================================================================ setup helpers


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


# ============================================================================ the trainer

class _Stop(Exception):
    """train.max_steps reached in the middle of a task (after its checkpoint)."""


@dataclass
class _TaskLoop:
    """Where the loop stands in the task being trained (what a mid-task checkpoint keeps)."""
    task: int
    total: int                       # optimiser steps of the whole task
    opt: object = None
    lr_scheduler: object = None
    replay: object = None            # the task's ReplayStream
    consumed: int = 0                # loop events done: optimiser steps, or micro-steps with in_accumulation
    task_step: int = 0               # optimiser steps done in this task


class ContinualTrainer:
    """Runs a task stream with one method and writes checkpoints, memory and results.

    A thin loop over :class:`~seekr_kernels.seekr.recipe.SeekrRecipe` (``self.recipe``):
    the loop owns data order, optimisation, evaluation and files; the recipe owns the
    replay memory, importance, heads and the replay loss.

    Args:
        config: a :class:`RunConfig` (validated here).
        model, tokenizer: optional; built from ``config.model`` otherwise. A PEFT model
            trains its adapters (``model.lora`` wraps a plain model).
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
        torch.set_num_threads(num_threads(config.train.num_threads, self.device.type)[0])   # README "Threads"
        self.quiet = quiet
        self.method = config.method
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config.model)
        self.tasks = tasks if tasks is not None else [
            load_task(ts.path, task_name(ts), ts.metric) for ts in config.tasks]
        for t in self.tasks:          # a Task passed in may say "auto": pick by its name
            if t.metric == "auto":
                t.metric = resolve_metric_name("auto", t.name)
        self.task_names = [t.name for t in self.tasks]
        check_tasks(config, self.tasks, self.tokenizer, world=self.dist.world,
                    max_positions=model_max_positions(config, model), warn=self.dist.main)
        self.model = model if model is not None else build_model(config.model, self.tokenizer, config.seed)
        if config.model.lora is not None and not is_peft_model(self.model):
            self.model = apply_lora(self.model, config.model.lora, config.seed)
        self.lora = is_peft_model(self.model)
        if self.lora and self.dist.world > 1 and config.distributed.strategy == "fsdp":
            raise ConfigError("model.lora: not supported with distributed.strategy: fsdp (use ddp: the adapters "
                              "are small)")
        self.out = config.output_dir
        self.rundir = RunDirectory(self.out, main=self.dist.main, say=self._print)
        tr = config.train
        if tr.batch_size < self.dist.world * tr.grad_accum:
            raise ValueError(f"train.batch_size={tr.batch_size} is smaller than world size x grad_accum "
                             f"= {self.dist.world * tr.grad_accum}")
        self.autocast = None
        if tr.precision == "bf16" or (tr.precision == "auto" and self.device.type == "cuda"):
            self.autocast = torch.bfloat16
        elif tr.precision == "fp16":
            self.autocast = torch.float16
            bad = sorted({str(p.dtype) for p in self.model.parameters() if p.requires_grad} - {"torch.float32"})
            if bad:
                raise ConfigError(f"train.precision: fp16 (autocast + gradient scaler) needs float32 trainable "
                                  f"weights, the model's are {bad} (model.dtype: float32, or LoRA adapters)")
        self.scaler = torch.amp.GradScaler(self.device.type) if tr.precision == "fp16" else None
        self.recipe = SeekrRecipe(config, model=self.model, pad_token_id=self.tokenizer.pad_token_id,
                                  device=self.device, autocast_dtype=self.autocast)
        self.budgets = self.recipe.budgets
        self.rows: list = []
        self.loglik_rows: list = []
        self.logger = None
        self.global_step = 0
        self._fsdp = False
        self._loop: Optional[_TaskLoop] = None
        self._run_opt = None              # optimizer_scope: run
        self._resume_ck = None            # checkpoint whose optimiser state the next optimiser takes
        self._resume_state = None         # its trainer_state.json while parts of it are pending
        self._resumed = None              # the trainer_state.json the run resumed from
        self._stop = False
        self._base_dir = None

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

    def _make_logger(self):
        return RunLogger(self.out, self.cfg.train.report_to, run_name=os.path.basename(os.path.abspath(self.out)),
                         config=self.cfg.to_dict(), main=self.dist.main)

    def log(self, **rec):
        """One record at the run's global optimiser step (``step``, monotonic over tasks)."""
        if not self.dist.main:
            return
        if self.logger is None:
            self.logger = self._make_logger()
        kind = rec.pop("kind", "train")
        step = rec.pop("global_step", self.global_step)
        self.logger.log(kind, step, **rec)

    def _log_eval(self, t: int, row, loglik, seconds: float):
        """The evaluation after task ``t``: its row, the matrix so far, OP/BWT at the end and
        (for the report_to backends) the heatmap."""
        if not self.dist.main:
            return
        res = self.results()
        heat = None
        if self.logger.backends:
            heat = metrics.plot_heatmap(res["matrix"], os.path.join(self.out, "heatmap.png"), self.task_names,
                                  title=self.method)
        self.logger.log_eval(t, self.global_step, names=self.task_names, row=row, matrix=res["matrix"],
                             op=res.get("OP"), bwt=res.get("BWT"), heatmap=heat, loglik=loglik,
                             train_seconds=round(seconds, 3))

    @property
    def base(self):
        """The plain model (under DDP the wrapped module; FSDP2 shards in place)."""
        m = self.train_model
        return m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m

    def _uses_patch(self):
        return self.method == "seekr"

    # ---------------------------------------------------------------- model preparation
    def _prepare_model(self):
        self._fsdp = self.dist.world > 1 and self.cfg.distributed.strategy == "fsdp"
        self.model, self.train_model = prepare_model(
            self.model, self.device, patch=self._uses_patch(), gradient_checkpointing=self.cfg.train.gradient_checkpointing,
            world=self.dist.world, fsdp=self._fsdp)
        self.steps = TrainSteps(self.train_model, self.recipe, self.cfg.train, self.dist, self.device,
                                self.tokenizer.pad_token_id, self.autocast, self.scaler)
        self.recipe.dist = DistributedHooks.from_torch(self.model, self.device, sharded=self._fsdp)

    # ---------------------------------------------------------------- run
    def run(self, resume=None, overwrite: bool = False, allow_config_change=()) -> dict:
        """Train (or resume) the whole stream; returns the results dict.

        ``resume``: None/False — start a new run; an output directory that already holds a
        run is refused (nothing is read or deleted). True — continue the run in
        ``output_dir`` from its newest checkpoint (start one if there is none yet). A path —
        continue from that checkpoint directory. ``overwrite``: delete the run in
        ``output_dir`` (only what a run writes) and start over. ``allow_config_change``:
        config keys (or sections: ``train``, ``tasks``) that may differ from the
        checkpoint's (every other difference is refused, see :data:`RESUME_IGNORED`).
        """
        cfg = self.cfg
        self.logger = self._make_logger()
        t0 = time.time()
        try:
            start = self._start(resume, overwrite, tuple(allow_config_change or ()))
            self._prepare_model()
            T = len(self.tasks)
            mid = self._resumed is not None and self._resumed["phase"] == "mid_task"
            if self._resumed is not None:
                where = (f"in task {start + 1}/{T} ({self.task_names[start]})" if mid
                         else f"after task {start}/{T}")
                self._print(f"resuming {where} at step {self.global_step} from {self._resume_ck}")
                self.log(kind="resume", completed=len(self.rows), checkpoint=self._resume_ck)
            if self.lora and self._resumed is None and self._base_path() == os.path.abspath(
                    os.path.join(self.out, "base")):
                self._save_base()
            if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                self._stop = True        # already there: raise train.max_steps (or 0) to go on
            for t in range(start, T):
                if self._stop:
                    break
                self._run_task(t, mid_task=mid and t == start)
            if len(self.rows) == T:
                self._write_final()
        except _Stop:
            pass
        finally:
            if self.logger is not None:
                self.logger.close()
        res = self.results()
        if self._stop and not res["complete"]:
            self._print(f"train.max_steps={cfg.train.max_steps} reached: stopped at step {self.global_step} "
                        f"({len(self.rows)}/{len(self.tasks)} tasks complete); resume to go on")
        res["seconds"] = time.time() - t0
        return res

    def results(self) -> dict:
        T = len(self.tasks)
        out = {"method": self.method, "tasks": self.task_names, "complete": len(self.rows) == T,
               "matrix": metrics.partial_matrix(self.rows, T), "loglik": metrics.partial_matrix(self.loglik_rows, T),
               "global_step": self.global_step}
        if len(self.rows) == T:
            out["OP"] = metrics.overall_performance(out["matrix"])
            out["BWT"] = metrics.backward_transfer(out["matrix"])
        elif self._stop:
            out["stopped"] = f"train.max_steps={self.cfg.train.max_steps}"
        return out

    # ---------------------------------------------------------------- one task
    def _run_task(self, t: int, mid_task: bool = False):
        cfg, task = self.cfg, self.tasks[t]
        tr = cfg.train
        ds = EncodedDataset(task.train, self.tokenizer, tr.max_prompt_len, tr.max_answer_len)
        if not mid_task:     # a resumed task has its replay subset, queries and snapshot
            seed_everything(task_seed(cfg.seed, t))
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
        self._save_task(t)

    # ---------------------------------------------------------------- training loop
    def _global_batches(self, n, epoch, t, bs):
        """The global batches of one epoch (``train.batching: global``); a short last
        batch is trained too (the steps give a process or micro-step without a sample a
        weight-0 one)."""
        ep = 0 if self.cfg.train.order == "fixed" else epoch
        return epoch_batches(n, bs, task_seed(self.cfg.seed, t), ep, shuffle=self.cfg.train.shuffle)

    def _device_batches(self, n, epoch, t):
        """``train.batching: per_device`` (published): the epoch's order cut by
        :func:`~seekr_kernels.seekr.stream.per_device_batches` into micro-batches of
        ``batch_size / (world x grad_accum)`` per process, the last one partial."""
        tr = self.cfg.train
        ep = 0 if tr.order == "fixed" else epoch
        order = epoch_batches(n, max(1, n), task_seed(self.cfg.seed, t), ep, shuffle=tr.shuffle)[0]
        W = self.dist.world
        return per_device_batches(order, W, tr.batch_size // (W * tr.grad_accum))

    def _start_loop(self, t: int, n_units: int, total_of) -> _TaskLoop:
        """The task's schedule, optimiser and LR schedule; on a resumed task, their saved
        state, the RNGs and the position (checked against the replay schedule's state)."""
        stream = self.recipe.replay_stream(n_units, per_device=self.cfg.train.batching == "per_device")
        total = total_of(stream)
        opt, sched = self._optimizer(total)
        loop = _TaskLoop(t, total, opt, sched, stream)
        self._loop = loop
        st = self._resume_state
        if st is not None and st["phase"] == "mid_task" and st["task"] == t:
            loop.consumed, loop.task_step = int(st["consumed"]), int(st["task_step"])
            if int(st["total"]) != total:
                raise CheckpointError(f"{self._resume_ck}: task {t} had {st['total']} optimiser steps, this run "
                                      f"makes {total} (the data or a batch setting changed)")
        return loop

    def _fast_forward(self, loop: _TaskLoop, events):
        """Skip the events a resumed task's checkpoint already did; then restore the RNGs."""
        for i in range(loop.consumed):
            if next(events, None) is None:
                raise CheckpointError(f"{self._resume_ck}: the checkpoint is {loop.consumed} steps into task "
                                      f"{loop.task}, which has only {i} (the data or a batch setting changed)")
        st = self._resume_state
        if st is not None and st["phase"] == "mid_task" and st["task"] == loop.task:
            if loop.replay.schedule.state_dict() != st["schedule"]:
                raise CheckpointError(f"{self._resume_ck}: the replay schedule at step {self.global_step} "
                                      "differs from the checkpoint's (the memory or a replay setting changed)")
            checkpoint.set_rng_state(store.read_json(os.path.join(self._resume_ck, checkpoint.RNG), "RNG state",
                                                     CheckpointError))
            self._resume_state = None
        return events

    def _optimizer(self, total: int):
        """AdamW + LR schedule: per task, or once per run (``train.optimizer_scope``); a
        resumed run loads the checkpoint's states into it."""
        tr = self.cfg.train
        if tr.optimizer_scope == "run" and self._run_opt is not None:
            return self._run_opt
        opt, sched = build_optimizer(self.base, tr, total)
        if self._resume_state is not None and self._resume_state.get("optimizer"):
            load_optimizer(opt, sched, self._resume_ck, tr, self.model if self._fsdp else None)
            if self._resume_state["phase"] == "task_end":
                self._resume_state = None
        if tr.optimizer_scope == "run":
            self._run_opt = (opt, sched)
        return opt, sched

    def _due(self, loop: _TaskLoop) -> bool:
        return self.global_step % self.cfg.log.every == 0 or loop.task_step == loop.total

    def _fit(self, t: int, ds: EncodedDataset, epochs: int):
        """Train task ``t`` over the recipe's replay stream. A train unit is a global batch
        (one optimiser step; its accumulation micro-steps run inside it), or with
        ``replay.in_accumulation`` (published, DeepSpeed) one micro-step: a replay
        micro-batch is then one of them, every ``grad_accum`` micro-steps (train or replay)
        make one optimiser step, each micro-step's loss its own mean / grad_accum as
        DeepSpeed scales it, and a window left incomplete at the task's end is stepped (the
        published engine would carry it into the next task). With ``train.batching:
        per_device`` (published) a unit is always one micro-step, every process's
        per-device micro-batch (:meth:`_device_batches`), and its loss the process's own
        mean. No training sample is dropped: a short last batch makes fewer (or partly
        filled) micro-steps. Checkpoints fall between windows, so a resumed task starts a
        fresh window."""
        tr = self.cfg.train
        W = self.dist.world
        per_device = tr.batching == "per_device"
        micro_loop = per_device or self.recipe.replays_in_accumulation
        A = tr.grad_accum if micro_loop else 1      # units per optimiser step
        self.train_model.train()

        def units(epoch):
            if per_device:
                return self._device_batches(len(ds), epoch, t)
            batches = self._global_batches(len(ds), epoch, t, tr.batch_size)
            if not micro_loop:
                return batches
            out = []      # micro-step k of a global batch: every rank's k-th micro-batch of it
            for gb in batches:
                ranks = [shard(gb, r, W) for r in range(W)]
                steps = ([i for r in ranks for i in shard(r, k, A)] for k in range(A))
                out += [u for u in steps if u]     # a short batch: fewer micro-steps
            return out

        n = len(units(0))
        if n == 0:
            raise ValueError(f"task {self.task_names[t]}: no training samples")
        loop = self._start_loop(t, n, lambda rs: -(-epochs * (n + rs.per_epoch) // A))
        opt, sched = loop.opt, loop.lr_scheduler
        bar = self._bar(t, loop.total, loop.task_step)
        losses = []
        for kind, epoch, step, x in self._fast_forward(loop, loop.replay.events(epochs, units)):
            if not micro_loop:
                loop.consumed += 1
                if kind == "replay":
                    self._after(loop, bar, "replay", epoch, step, self.steps.replay_step(x, opt, sched))
                else:
                    loss = self.steps.train_step([ds[i] for i in x], opt, sched)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    self._after(loop, bar, "train", epoch, step, {"loss": loss, "lr": sched.get_last_lr()[0]})
                continue
            boundary = (loop.consumed + 1) % A == 0
            if kind == "replay":
                rec = self.steps.replay_micro(x, boundary, 1.0 / A)
                # logged at the step its window makes (a resumed run restarts that window)
                if (self.global_step + 1) % self.cfg.log.every == 0:
                    self.log(kind="replay", task=t, epoch=epoch, batch=step, task_step=loop.task_step + 1,
                             global_step=self.global_step + 1, **rec)
            else:
                losses.append(self.steps.train_micro([ds[i] for i in x], boundary, 1.0 / A))
            loop.consumed += 1
            if boundary:
                self.steps.optimizer_step(opt, sched)
                rec = {"loss": sum(losses) / len(losses), "lr": sched.get_last_lr()[0]} if losses else {}
                losses = []
                self._after(loop, bar, "train" if rec else None, epoch, step, rec)
        if loop.consumed % A:
            self.steps.optimizer_step(opt, sched)
            self._after(loop, bar, None, None, None, {})
        bar.close()
        opt.zero_grad(set_to_none=True)
        self._loop = None

    def _after(self, loop: _TaskLoop, bar, kind, epoch, step, rec):
        """After every optimiser step: count it, log its record (``kind`` None: none) at
        its global step, then — the record already on disk — write a mid-task checkpoint
        every ``train.save_steps`` steps, or checkpoint and stop at ``train.max_steps``.
        The task's last step writes none: the task checkpoint follows right away."""
        self.global_step += 1
        loop.task_step += 1
        bar.update(1)
        if kind is not None and self._due(loop):
            self.log(kind=kind, task=loop.task, epoch=epoch, batch=step, task_step=loop.task_step,
                     global_step=self.global_step, **rec)
        tr = self.cfg.train
        last = loop.task_step >= loop.total
        if tr.max_steps and self.global_step >= tr.max_steps:
            self._stop = True            # at the last step the task ends first, then the run
            if not last:
                self._save_mid(loop)
                bar.close()
                raise _Stop
        elif tr.save_steps and self.global_step % tr.save_steps == 0 and not last:
            self._save_mid(loop)

    def _bar(self, t, total, initial=0):
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial,
                    desc=f"{self.method} {t + 1}/{len(self.tasks)} {self.task_names[t]}",
                    disable=not (self.dist.main and self.cfg.log.progress and not self.quiet), leave=False,
                    dynamic_ncols=True)

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
        self.recipe.dist.after_forward()
        return row, ll

    # ---------------------------------------------------------------- persistence: writing
    def _memory_digests(self, k: int) -> list:
        return [] if self.method == "sft" else self.rundir.memory_digests(k)

    def _base_path(self):
        """Where a LoRA run's base model lives (named in adapter_config.json): model.path,
        the local directory a PEFT model passed in was loaded from, or output_dir/base."""
        if self.cfg.model.path:
            return os.path.abspath(self.cfg.model.path)
        if self._base_dir is None:
            named = self.base.peft_config[self.base.active_adapter].base_model_name_or_path
            own = self.cfg.model.lora is not None      # built here from model.arch
            self._base_dir = (os.path.abspath(named) if not own and named and os.path.isfile(
                os.path.join(named, "config.json")) else os.path.abspath(os.path.join(self.out, "base")))
        return self._base_dir

    def _save_base(self):
        """A LoRA run on a model built from model.arch: its frozen base weights, once, so
        that every adapter folder of the run names a loadable base model."""
        if self.dist.main:
            base, sd = self.base.get_base_model(), plain_state_dict(self.base, merge=False)
            checkpoint.write(os.path.join(self.out, "base"),
                             lambda tmp: save_model(base, self.tokenizer, tmp, sd, self.cfg.train.max_shard_size),
                             meta={"what": "base model"})
        self.dist.barrier()

    def _save_model_files(self, d: str, sd):
        if self.lora:
            self.base.peft_config[self.base.active_adapter].base_model_name_or_path = self._base_path()
        save_model(self.base, self.tokenizer, d, sd, self.cfg.train.max_shard_size)

    def _trainer_state(self, phase: str, t: int, loop: Optional[_TaskLoop]) -> dict:
        st = {"format": 1, "kind": TRAINER_KIND, "phase": phase, "task": t, "completed": len(self.rows),
              "global_step": self.global_step, "rows": self.rows, "loglik_rows": self.loglik_rows,
              "memory": self._memory_digests(len(self.rows)), "data": data_digests(self.tasks),
              "config": self.cfg.to_dict(), "world_size": self.dist.world, "device_type": self.device.type,
              "lora": self.lora, "optimizer": loop is not None or self._run_opt is not None}
        if loop is not None:
            st.update(consumed=loop.consumed, task_step=loop.task_step, total=loop.total,
                      schedule=loop.replay.schedule.state_dict())
        return st

    def _checkpoint(self, name: str, phase: str, t: int, loop: Optional[_TaskLoop]):
        """Write checkpoint ``checkpoints/<name>`` (every rank calls: FSDP gathers), then
        commit it in state.json and drop the checkpoints it supersedes."""
        sd = None if self.lora else model_state_dict(self.model, self.base, self._fsdp)
        opt_sched = (loop.opt, loop.lr_scheduler) if loop is not None else self._run_opt
        opt_sd = None
        if opt_sched is not None:
            if self._fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
                opt_sd = get_optimizer_state_dict(self.model, opt_sched[0], options=StateDictOptions(
                    full_state_dict=True, cpu_offload=True))
            else:
                opt_sd = opt_sched[0].state_dict()
        if self.dist.main:
            path = self.rundir.write_checkpoint(
                name, {"phase": phase, "task": t, "global_step": self.global_step},
                model=lambda tmp: self._save_model_files(tmp, sd), recipe=self.recipe,
                trainer_state=self._trainer_state(phase, t, loop),
                optimizer=None if opt_sd is None else (opt_sd, opt_sched[1].state_dict()),
                scaler=None if self.scaler is None else self.scaler.state_dict())
            self._write_state(os.path.join("checkpoints", name))
            self.rundir.prune(name, phase, self.cfg.keep_checkpoints, self.cfg.train.save_total_limit)
            self.log(kind="saved", task=t, checkpoint=path)
        self.dist.barrier()

    def _save_mid(self, loop: _TaskLoop):
        self._checkpoint(f"step-{self.global_step:06d}", "mid_task", loop.task, loop)
        if self._stop:
            self._write_results()

    def _save_task(self, t: int):
        """Memory of task t, then its checkpoint (which lists the memory's checksums),
        then the results."""
        if self.dist.main and self.method != "sft":
            self.memory.save_task(os.path.join(self.out, "memory"), t)
        self.dist.barrier()
        self._checkpoint(f"task-{t:03d}", "task_end", t, None)
        self._write_results()

    def _write_results(self):
        if not self.dist.main:
            return
        res = self.results()
        atomic_save_json(os.path.join(self.out, "results.json"), res)
        if self.rows:
            metrics.plot_heatmap(res["matrix"], os.path.join(self.out, "heatmap.png"), self.task_names,
                           title=f"{self.method}")

    def _write_state(self, ck_rel: str, final: Optional[str] = None):
        c = self.cfg
        self.rundir.write_state({"method": c.method, "seed": c.seed, "tasks": self.task_names,
                                 "replay_ratio": c.replay.ratio, "completed": len(self.rows),
                                 "checkpoint": ck_rel, "global_step": self.global_step, "rows": self.rows,
                                 "loglik_rows": self.loglik_rows,
                                 "heads": {str(l): h.tolist() for l, h in self.heads.items()},
                                 "config": c.to_dict()}, ck_rel, final)

    def _write_final(self):
        """``output_dir/final``: the finished model as a loadable Hugging Face folder (full
        fine-tuning: the last task checkpoint's model files; LoRA: merged weights or the
        adapter, ``model.lora.save``) with the tokenizer."""
        if self.dist.main:
            def merged(tmp):
                save_model(self.base.get_base_model(), self.tokenizer, tmp, plain_state_dict(self.base, merge=True),
                           self.cfg.train.max_shard_size)
            lo = self.cfg.model.lora
            src = self.rundir.write_final(self.global_step, merged if self.lora and lo is not None
                                          and lo.save == "merged" else None)
            if src is not None:
                self._write_state(os.path.relpath(src, self.out), final="final")
        self.dist.barrier()

    # ---------------------------------------------------------------- persistence: resuming
    def _start(self, resume, overwrite: bool, allow: tuple) -> int:
        """Decide how the run starts (see :meth:`run`); load a checkpoint when resuming.
        Returns the index of the first task to train."""
        where = self.rundir.start(resume, overwrite, self.dist.barrier)
        if where is None:
            return 0
        if where == "restart":
            self.logger.rewind(0)        # killed before its first checkpoint: start over
            return 0
        path, ts = where
        self._check_config(ts, path, allow)
        self._load_checkpoint(path, ts)
        return int(ts["completed"]) if ts["phase"] == "task_end" else int(ts["task"])

    def _check_config(self, ts: dict, path: str, allow: tuple):
        diff = check_resume_config(ts, self.cfg.to_dict(), flatten(RunConfig().to_dict()), self.tasks,
                                   self.dist.world, self.device.type, path, allow)
        for k, a, b in diff:
            self._print(f"resume: {k} changed ({a!r} -> {b!r}), as allowed")

    def _load_checkpoint(self, path: str, ts: dict):
        """Weights, recipe state, memory, rows, counters and scaler of a verified checkpoint."""
        done = int(ts["completed"])
        checkpoint.load_model_weights(self.model, path)
        tasks = [] if self.method == "sft" else self.rundir.load_memory(ts.get("memory") or [], self.task_names[:done],
                                                                        path)
        try:
            self.recipe.load(os.path.join(path, checkpoint.SEEKR), memory=tasks)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        self.rows = [list(r) for r in ts["rows"]]
        self.loglik_rows = [list(r) for r in ts["loglik_rows"]]
        self.global_step = int(ts["global_step"])
        if self.scaler is not None and os.path.exists(os.path.join(path, checkpoint.SCALER)):
            self.scaler.load_state_dict(checkpoint.load_torch(os.path.join(path, checkpoint.SCALER)))
        self._resume_ck = path
        self._resumed = ts
        self._resume_state = ts if (ts["phase"] == "mid_task" or ts.get("optimizer")) else None
        # Checkpoints after this one belong to the abandoned continuation (or were never
        # committed): the run writes them again.
        if self.dist.main:
            self.rundir.discard_after(self.global_step, keep=path)
        self.logger.rewind(self.global_step)


def train(config: RunConfig, **kw) -> dict:
    """Run :class:`ContinualTrainer` on a config; returns its results."""
    return ContinualTrainer(config, **kw).run()
