"""One step of the package's trainer on this process's share of a global batch: a train or
replay optimiser step (its accumulation micro-steps, then clip and AdamW), or one
micro-step of an accumulation window, plus the optimiser and LR schedule they step.

Every loss is a sum over this process's share divided by the *global* batch's counts and
multiplied by the number of processes, so N data-parallel processes (DDP/FSDP average
gradients) give the gradient of the single-process global batch. With ``per_rank``
(``train.batching: per_device``, published) a micro-step's loss is instead this process's
own mean, which the processes' gradient average turns into the mean of their means, as
DeepSpeed does. A short last batch may leave a micro-step without a sample on some
process: that process runs one sample with weight 0 so every process runs the same
forward and backward passes (DDP's gradient all-reduce, FSDP's gathers); a micro-step
without a sample on every process is skipped. The loop that decides which step runs
when is :class:`~seekr_kernels.run.trainer.ContinualTrainer` over the recipe's
:class:`~seekr_kernels.seekr.stream.ReplayStream`.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from ..seekr.batching import Encoded, collate, shard
from ..seekr.losses import ce_sum
from . import checkpoint
from .checkpoint import CheckpointError


def lr_lambda(kind: str, warmup: int, total: int):
    """``train.schedule`` as a LambdaLR factor: linear warm-up over ``warmup`` steps, then
    constant, linear decay or cosine decay to 0 at ``total``."""
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


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices, none on norms, biases and vectors."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.dim() < 2 or "norm" in n.lower() or n.endswith(".bias")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def n_targets(e: Encoded) -> int:
    """Next-token targets of one example: every answer token that has a token before it."""
    return len(e.answer_ids) - (0 if e.prompt_ids else 1)


def build_optimizer(model, tr, total: int):
    """AdamW over ``model``'s trainable parameters and its LR schedule (``train`` section
    ``tr``; ``total`` optimiser steps for the decaying schedules)."""
    opt = torch.optim.AdamW(param_groups(model, tr.weight_decay), lr=tr.lr, betas=tuple(tr.betas))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr.schedule, tr.warmup_steps, total))


def load_optimizer(opt, sched, ck_dir: str, tr, sharded_model=None) -> None:
    """The optimiser and schedule states of checkpoint ``ck_dir`` (``sharded_model``: the
    FSDP model whose full optimiser state is loaded); the config's hyper-parameters
    (``tr``) win over the saved ones."""
    sd = checkpoint.load_torch(os.path.join(ck_dir, checkpoint.OPTIMIZER))
    try:
        if sharded_model is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(sharded_model, opt, sd, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(sd)
        sched.load_state_dict(checkpoint.load_torch(os.path.join(ck_dir, checkpoint.SCHEDULER)))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{os.path.join(ck_dir, checkpoint.OPTIMIZER)}: does not fit this model's trainable "
                              f"parameters ({e})") from None
    # Identical unless a change was allowed: lr through the schedule's base, betas and
    # weight decay per group.
    sched.base_lrs = [tr.lr for _ in opt.param_groups]
    for i, (g, lam) in enumerate(zip(opt.param_groups, sched.lr_lambdas)):
        g["initial_lr"] = tr.lr
        g["lr"] = tr.lr * lam(sched.last_epoch)
        g["betas"] = tuple(tr.betas)
        g["weight_decay"] = tr.weight_decay if i == 0 else 0.0
    sched._last_lr = [g["lr"] for g in opt.param_groups]


class TrainSteps:
    """The steps of one process (the trainer's per-step API).

    Args:
        model: the model that trains (DDP-wrapped, FSDP-sharded or plain).
        recipe: the :class:`~seekr_kernels.SeekrRecipe` (replay batches and loss).
        tr: the run's ``train`` section (accumulation, padding, clipping).
        dist: the process's place in the job (``rank``, ``world``, ``all_reduce``).
        device, pad_token_id, autocast (a dtype or None), scaler (fp16's GradScaler or None).
    """

    def __init__(self, model, recipe, tr, dist, device, pad_token_id: int, autocast=None, scaler=None):
        self.model, self.recipe, self.tr, self.dist = model, recipe, tr, dist
        self.device, self.pad_token_id, self.autocast, self.scaler = device, int(pad_token_id), autocast, scaler
        #: Micro-step losses are each process's own mean (``train.batching: per_device``).
        self.per_rank = getattr(tr, "batching", "global") == "per_device"

    @property
    def base(self):
        """The plain model (under DDP the wrapped module; FSDP2 shards in place)."""
        m = self.model
        return m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m

    def autocast_ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def forward(self, b):
        return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          position_ids=b["position_ids"], use_cache=False)

    def _sync(self, k, n):
        """DDP all-reduces gradients only on the last micro-step of a window."""
        if k < n - 1 and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _batch(self, items):
        b = collate(items, self.pad_token_id, self.tr.pad_to_multiple_of)
        return {k: v.to(self.device) for k, v in b.items()}

    def optimizer_step(self, opt, sched) -> None:
        """Clip the global gradient norm (``train.max_grad_norm``), step, zero."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)          # clip the true gradients
        if self.tr.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tr.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(opt)              # skipped when a gradient is inf/NaN
            self.scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def record(self, parts) -> dict:
        """The replay loss parts summed over processes (the global batch's values)."""
        sums = torch.tensor([float(parts.get(k, 0.0)) for k in ("ce", "logits_kl", "attn_kl")], dtype=torch.float64)
        sums = self.dist.all_reduce(sums)
        rec = {"ce": float(sums[0])}
        if "logits_kl" in parts:
            rec["logits_kl"] = float(sums[1])
        if "attn_kl" in parts:
            rec["attn_kl"] = float(sums[2])
        return rec

    def micro_plan(self, n: int) -> list:
        """This process's micro-batches of a global batch of ``n`` items (indices; the
        contiguous rank slice, then ``grad_accum`` micro-step slices of it), for the
        micro-steps some process has a sample in: ``[]`` where only this one has none (it
        runs a weight-0 sample), and a micro-step empty on every process (a short batch's
        last ones) left out."""
        W, A = self.dist.world, self.tr.grad_accum
        ranks = [shard(list(range(n)), r, W) for r in range(W)]
        steps = [[shard(m, k, A) for m in ranks] for k in range(A)]
        return [st[self.dist.rank] for st in steps if any(st)]

    def _ce_pass(self, items, idx, sync, weight: float):
        """Forward and backward of the CE sum of ``items[idx]`` times ``weight``; an empty
        ``idx`` runs ``items[0]`` with weight 0 (matched collectives). Returns the CE sum
        (0 for the weight-0 pass)."""
        b = self._batch([items[i] for i in (idx or [0])])
        with sync, self.autocast_ctx():
            s = ce_sum(self.forward(b).logits, b["labels"])
        self.backward(s * (weight if idx else 0.0))
        return s.detach().double().cpu() if idx else torch.zeros((), dtype=torch.float64)

    # ---------------------------------------------------------------- optimiser steps
    def train_step(self, items, opt, sched) -> float:
        """One optimiser step on a global train batch (``Encoded`` items; a short last
        batch too); returns its mean next-token CE."""
        N = max(1, sum(n_targets(e) for e in items))
        W = self.dist.world
        plan = self.micro_plan(len(items))
        total = torch.zeros((), dtype=torch.float64)
        for k, mb in enumerate(plan):
            total += self._ce_pass(items, mb, self._sync(k, len(plan)), W / N)
        self.optimizer_step(opt, sched)
        return float(self.dist.all_reduce(total)) / N

    def replay_step(self, keys, opt, sched) -> dict:
        """One optimiser step on a global replay batch (the recipe's loss per micro-batch)."""
        W = self.dist.world
        micro = self.recipe.micro_batches(keys, self.tr.grad_accum)
        sums = {}
        for k, mb in enumerate(micro):
            b = self.recipe.batch([keys[i] for i in mb], global_keys=keys)
            with self._sync(k, len(micro)), self.autocast_ctx():
                loss, parts = self.recipe.replay_loss(self.model, b)
            self.backward(loss * W)
            for name, v in parts.items():
                sums[name] = sums.get(name, 0.0) + float(v)
        self.optimizer_step(opt, sched)
        return self.record(sums)

    # ---------------------------------------------------------------- micro-steps (replay.in_accumulation)
    def train_micro(self, items, boundary: bool, scale: float) -> float:
        """One accumulation micro-step on a global micro-batch (this rank takes its slice);
        its loss is its own mean times ``scale`` (1 / grad_accum, as DeepSpeed scales it):
        the global micro-batch's mean, or with :attr:`per_rank` this rank's own mean (the
        published per-device loss, averaged over processes with the gradients). Returns
        the global micro-batch's mean CE."""
        N = max(1, sum(n_targets(e) for e in items))
        mine = shard(list(range(len(items))), self.dist.rank, self.dist.world)
        if self.per_rank:
            weight = scale / max(1, sum(n_targets(items[i]) for i in mine))
        else:
            weight = scale * self.dist.world / N
        s = self._ce_pass(items, mine, self._sync(0, 1 if boundary else 2), weight)
        return float(self.dist.all_reduce(s)) / N

    def replay_micro(self, keys, boundary: bool, scale: float) -> dict:
        """One replay micro-step inside an accumulation window (:attr:`per_rank`: this
        rank's replay loss normalised by its own counts, as :meth:`train_micro`)."""
        per_rank = self.per_rank
        mine = [keys[i] for i in shard(list(range(len(keys))), self.dist.rank, self.dist.world)]
        b = self.recipe.batch(mine, global_keys=mine if per_rank else keys)
        with self._sync(0, 1 if boundary else 2), self.autocast_ctx():
            loss, parts = self.recipe.replay_loss(self.model, b)
        self.backward(loss * (scale if per_rank else scale * self.dist.world))
        rec = self.record(parts)
        return {k: v / self.dist.world for k, v in rec.items()} if per_rank else rec
