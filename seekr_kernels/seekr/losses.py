"""Loss terms of continual fine-tuning and SEEKR replay.

Every term here is written as a *sum* over this rank's tokens or samples divided by a
*global* count (tokens or samples of the whole optimiser batch across ranks and
accumulation micro-steps). Summed over micro-steps and ranks this gives exactly the loss
of one big batch, so a run on N processes matches a single-process run of the same global
batch (DDP / FSDP average gradients over ranks; the trainer multiplies by the world size).

Replay objective (the published SEEKR loss, a = logits weight, b = attention weight):

    (1 - a) * CE(replay) + a * logits KL + b * attention KL

``replay`` uses CE only, ``replay+logits`` sets b = 0, ``seekr`` uses all three.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import IGNORE_INDEX


def shifted(logits: torch.Tensor, labels: torch.Tensor):
    """Align predictions with targets: logits at p predict the token at p + 1."""
    return logits[:, :-1], labels[:, 1:]


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over answer tokens (fp32 scalar)."""
    lg, lb = shifted(logits, labels)
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), lb.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _torch_logits_kl(student_logits, teacher_logits, labels):
    """Published logits distillation: CE(student, softmax(teacher)) averaged over label tokens."""
    sel = labels != IGNORE_INDEX
    if not bool(sel.any()):
        return student_logits.float().sum() * 0.0
    s = student_logits[sel].float()
    t = teacher_logits[sel].float()
    return -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()


def shifted_teacher(teacher):
    """The teacher ([B, L, V] dense or a TopK of it) at the positions that predict a
    next token (all but the last), as :func:`shifted` does for the student."""
    from ..ops.teachers import TopK
    if isinstance(teacher, TopK):
        return TopK(teacher.values[:, :-1], teacher.indices[:, :-1], teacher.full_size, teacher.kind,
                    None if teacher.lse is None else teacher.lse[:, :-1],
                    None if teacher.mass is None else teacher.mass[:, :-1])
    return teacher[:, :-1]


def distilled_rows(labels: torch.Tensor, positions: str = "predict") -> torch.Tensor:
    """``[B, L]`` bool: the rows the logits term distils (``distill.logits_positions``):
    ``predict``, the positions whose next token is an answer token (the replay CE's
    rows); ``published``, the answer tokens' own positions (``labels != -100``, the one
    after eos included, as the published ``logits[labels != -100]``)."""
    if positions == "published":
        return labels != IGNORE_INDEX
    if positions != "predict":
        raise ValueError(f"positions: must be 'predict' or 'published', got {positions!r}")
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return rows


def logits_kl_mean(student_logits: torch.Tensor, teacher, labels: torch.Tensor,
                   positions: str = "predict") -> torch.Tensor:
    """Logits distillation, mean over the distilled rows (:func:`distilled_rows`):
    ``positions="predict"`` the positions that predict answer tokens, ``"published"`` the
    answer tokens' own positions (the published term, no shift).

    ``teacher`` is aligned with ``student_logits`` ([B, L, V] dense, or a TopK of it) and
    holds the teacher's logits at the same positions. Uses the fused
    ``seekr_kernels.ops.logits_kl`` when available, the plain formula otherwise.
    """
    if positions == "published":
        s, lb, t = student_logits, labels, teacher
    elif positions == "predict":
        s, lb = shifted(student_logits, labels)
        t = shifted_teacher(teacher)
    else:
        raise ValueError(f"positions: must be 'predict' or 'published', got {positions!r}")
    try:
        from ..ops.logits_kl import logits_kl
    except ImportError:
        logits_kl = None
    from ..ops.teachers import TopK
    if logits_kl is not None:
        return logits_kl(s, t, lb)
    if isinstance(t, TopK):
        raise RuntimeError("teacher logits as TopK need seekr_kernels.ops.logits_kl")
    return _torch_logits_kl(s, t, lb)


def replay_objective(method: str, ce: torch.Tensor, logits_kl: torch.Tensor | None,
                     attn_kl: torch.Tensor | None, logits_weight: float, attn_weight: float,
                     combined: torch.Tensor | None = None) -> torch.Tensor:
    """Combine the replay terms for a method (see the module docstring). ``combined``:
    the CE and logits terms already weighted and summed (``(1 - a) CE + a logits-KL``, or
    the CE for ``replay``), as the fused lm_head computes them; ``ce`` and ``logits_kl``
    are then not read."""
    if combined is not None:
        loss = combined
    elif method == "replay":
        return ce
    else:
        a = logits_weight
        loss = (1 - a) * ce + a * logits_kl
    if method == "seekr" and attn_kl is not None and attn_weight:
        loss = loss + attn_weight * attn_kl
    return loss
