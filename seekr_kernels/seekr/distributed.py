"""What the recipe needs from a data-parallel job (:class:`DistributedHooks`): rank, world
size, a sum all-reduce and a reshard after forward-only passes. The loop that owns the
process group builds them (the own trainer from its process group, the Hugging Face
integration from accelerate's); the recipe knows nothing of either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class DistributedHooks:
    """What the recipe needs from a data-parallel job, injected by the loop.

    Args:
        rank, world_size: this process and the number of processes.
        all_reduce: ``f(tensor) -> tensor`` summing over processes (required when
            ``world_size > 1``); the recipe passes CPU tensors and reads the result on
            the CPU.
        reshard: called after the recipe's forward-only passes (FSDP2 keeps the root's
            parameters gathered after a forward without backward).
        sharded: the parameters are sharded (FSDP): every process then runs the same
            forward passes (matched collectives) and the pre-task snapshot is attention
            rows instead of parameters.
    """
    rank: int = 0
    world_size: int = 1
    all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    reshard: Optional[Callable[[], None]] = None
    sharded: bool = False

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank/world_size: {self.rank}/{self.world_size} is not a valid position")
        if self.world_size > 1 and self.all_reduce is None:
            raise ValueError("all_reduce: required when world_size > 1 (statistics are summed over processes)")

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (identity in one process)."""
        return self.all_reduce(t) if self.world_size > 1 else t

    def after_forward(self) -> None:
        if self.reshard is not None:
            self.reshard()

    @classmethod
    def from_torch(cls, model=None, device=None, sharded: Optional[bool] = None) -> "DistributedHooks":
        """Hooks for the current ``torch.distributed`` process group (one process without
        one). Both loops build theirs here: the package's trainer and the Hugging Face
        integration.

        ``device``: where the collective runs (the NCCL device); ``model``: its FSDP2
        modules are resharded after forward-only passes (looked up at each call, so a
        model wrapped later is covered); ``sharded`` defaults to whether it holds any.
        """
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        dev = torch.device(device) if device is not None else torch.device("cpu")

        def all_reduce(t):
            x = t.to(dev)
            dist.all_reduce(x)
            return x.to(t.device)

        def fsdp_modules():
            try:
                from torch.distributed.fsdp import FSDPModule
            except ImportError:  # pragma: no cover - torch without FSDP2
                return []
            return [m for m in model.modules() if isinstance(m, FSDPModule)]

        def reshard():
            for m in fsdp_modules():
                m.reshard()
        if sharded is None:
            sharded = model is not None and bool(fsdp_modules())
        return cls(dist.get_rank(), dist.get_world_size(), all_reduce, reshard if model is not None else None,
                   bool(sharded))


def unwrap(model):
    """The module under a DDP wrapper; FSDP2 and PEFT models are used as they are."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
