"""Plain-PyTorch oracle for every op.

These functions materialise the selected rows ([B, S, Q, L]) — never [B, H, L, L] — and
are differentiable by autograd. They are the ground truth for tests and the last-resort
backend (`backend="torch"`). Accumulation is in fp32 (fp64 for fp64 input).
"""
from __future__ import annotations

import torch

from ._checks import AttnArgs


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def selected_logits(a: AttnArgs):
    """Scaled scores z [B, S, Q, L] of the selected rows and the validity mask [B, S, Q, L].

    Empty slots read head 0 (their rows are masked out as inactive).
    """
    acc = _acc_dtype(a.q.dtype)
    h = a.heads.long().clamp_min(0)                                  # [B, S]
    bidx = torch.arange(a.B, device=a.q.device).unsqueeze(1)
    qh = a.q[bidx, h]                                                # [B, S, L, D]
    qrows = torch.gather(qh, 2, a.queries.long()[:, None, :, None].expand(-1, a.S, -1, a.D))
    kh = a.k[bidx, h // a.group]                                     # [B, S, L, D]
    z = torch.matmul(qrows.to(acc), kh.to(acc).transpose(-1, -2)) * a.scale
    pos = a.queries.long()[:, None, :, None]                          # [B, 1, Q, 1]
    j = torch.arange(a.L, device=a.q.device)
    valid = (j <= pos) & a.key_mask.bool()[:, None, None, :] & a.row_active[..., None]
    return z, valid


def masked_log_softmax(z, valid):
    zm = z.masked_fill(~valid, float("-inf"))
    # Rows with no valid key would give NaN; give them a finite dummy and zero them later.
    any_valid = valid.any(-1, keepdim=True)
    zm = torch.where(any_valid, zm, torch.zeros_like(zm))
    return torch.log_softmax(zm, dim=-1).masked_fill(~valid, 0.0)


def attention_kl_rows(a: AttnArgs, teacher: torch.Tensor | None, tmass=None, log_eps: float = 0.0):
    """Per-row KL(teacher || softmax(z)) over the valid keys, [B, S, Q], 0 on inactive rows.

    With ``teacher=None`` the row value is ``tmass * lse`` (the part of the KL that depends
    on the student when the teacher-dependent terms are computed elsewhere, e.g. TopK).
    ``log_eps > 0``: ``sum t log t - sum t log(p + log_eps)`` over the valid keys, the
    published code's smoothed log (dense teacher only).
    """
    if log_eps:
        z, valid = selected_logits(a)
        t = teacher.to(z.dtype) * valid
        p = masked_log_softmax(z, valid).exp().masked_fill(~valid, 0.0)
        tlogt = torch.where(t > 0, t * torch.log(torch.where(t > 0, t, torch.ones_like(t))),
                            torch.zeros_like(t)).sum(-1)
        out = tlogt - (t * torch.log(p + log_eps)).sum(-1)
        return torch.where(a.row_active, out, torch.zeros_like(out))
    z, valid = selected_logits(a)
    zm = z.masked_fill(~valid, float("-inf"))
    any_valid = valid.any(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(any_valid, zm, torch.zeros_like(zm)), dim=-1)
    if teacher is None:
        out = tmass.to(z.dtype) * lse
    else:
        t = teacher.to(z.dtype) * valid
        T = t.sum(-1)
        tlogt = torch.where(t > 0, t * torch.log(torch.where(t > 0, t, torch.ones_like(t))),
                            torch.zeros_like(t)).sum(-1)
        tz = (t * z.masked_fill(~valid, 0.0)).sum(-1)
        out = tlogt - tz + T * lse
    return torch.where(a.row_active, out, torch.zeros_like(out))


def attention_probs(a: AttnArgs, out_dtype):
    z, valid = selected_logits(a)
    return masked_log_softmax(z, valid).exp().masked_fill(~valid, 0.0).to(out_dtype)


def published_attention_kl(student_probs, teacher_probs, heads, queries=None, attention_mask=None):
    """The published SEEKR attention loss, written the way the reference code computes it.

    student_probs: full eager attention [B, H, L, L] (softmax in fp32); teacher_probs
    [B, S, Q, L]. Per sample: index the selected heads and query rows, take
    log(p + 1e-8), KLDivLoss(reduction='batchmean') over that sample's active rows; the
    sum over samples is divided by B.
    """
    B, H, L, _ = student_probs.shape
    if heads.dim() == 1:
        heads = heads.unsqueeze(0).expand(B, -1)
    if queries is None:
        queries = torch.arange(L, device=student_probs.device).unsqueeze(0).expand(B, -1)
    mask = torch.ones(B, L, dtype=torch.bool, device=student_probs.device) \
        if attention_mask is None else attention_mask.bool()
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    total = student_probs.new_zeros((), dtype=torch.float32)
    for b in range(B):
        hb = heads[b][heads[b] >= 0]
        slots = (heads[b] >= 0).nonzero().flatten()
        qb = queries[b]
        keep = mask[b, qb]
        if hb.numel() == 0 or not bool(keep.any()):
            continue
        s = student_probs[b, hb][:, qb[keep]].float()                 # [S', Q', L]
        t = teacher_probs[b, slots][:, keep].float()
        total = total + kl(torch.log(s + 1e-8).reshape(-1, L), t.reshape(-1, L))
    return total / B
