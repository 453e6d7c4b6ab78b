"""The recipe's passes over a task's new replay samples at its end: task sensitivity and
forgettability per head (the importance statistics, under ``distill.sensitivity_padding``
/ ``forgettability_norm``), every head's rows for a sharded model's snapshot, and the
teacher capture (logits and the selected heads' attention rows) the memory keeps.

Each takes the :class:`~seekr_kernels.SeekrRecipe` whose configuration, process hooks and
padding it runs with; :class:`SeekrRecipe` exposes them as methods.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Optional, Sequence

import torch

from .batching import collate, encoded, shard
from .distributed import unwrap
from .samples import PendingSample, sample_seed


def _set_length(recipe, samples) -> int:
    """Length of the replay set collated as one batch (the published statistics' T)."""
    m = recipe.cfg.pad_to_multiple_of
    n = max(s.length for s in samples)
    return -(-n // m) * m

def _padded_rows(recipe, model, mask):
    """``distill.padded_rows`` around one forward pass of a statistics pass (the published
    code ran them on eager attention with transformers 4.31's mask)."""
    from ..llama import padded_rows
    return padded_rows(model, mask, recipe.cfg.distill.padded_rows)

def _sensitivity_chunks(recipe, samples, bs):
    """This process's share of the samples in chunks of ``bs``, plus weight-0 filler
    chunks so every process runs the same number of passes (FSDP needs matched
    collectives)."""
    n = len(samples)
    R, W = recipe.dist.rank, recipe.dist.world_size
    mine = [samples[i] for i in shard(list(range(n)), R, W)]
    chunks = [(mine[i:i + bs], 1.0) for i in range(0, len(mine), bs)]
    need = -(-(-(-n // W)) // bs)
    return chunks + [([samples[0]], 0.0)] * (need - len(chunks))

def sensitivity(recipe, model, samples) -> torch.Tensor:
    """Task sensitivity per head on the samples (mean over samples of the mean
    (dL/dA)^2 over each head's map; ``distill.sensitivity_padding``), normalised per
    layer as published. ``[n_layers, n_heads]`` fp32."""
    from .importance import measure_sensitivity, sensitivity_loss
    d = recipe.cfg.distill
    model = unwrap(model)
    dev = recipe._device_of(model)
    was = model.training
    model.eval()
    L, H = recipe.importance.shape
    official = d.sensitivity_padding == "official"
    pad_to = _set_length(recipe, samples) if official else 1
    sums = torch.zeros(L, H, dtype=torch.float64)
    for chunk, w in _sensitivity_chunks(recipe, samples, d.sensitivity_batch_size):
        b = collate(encoded(chunk), recipe.pad_token_id, pad_to)
        b = {k: v.to(dev) for k, v in b.items()}
        with measure_sensitivity(model, region=d.sensitivity_region,
                                 padding="padded" if official else "real") as m, \
                _padded_rows(recipe, model, b["attention_mask"]):
            with recipe._autocast(dev):
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            position_ids=b["position_ids"], use_cache=False)
            # Sum of per-sample mean CE: each sample gets the gradient it gets alone.
            sensitivity_loss(out.logits, b["labels"]).backward()
        if w:
            sums += m.sums.double().cpu()
        model.zero_grad(set_to_none=True)
    sens = recipe.dist.reduce(sums) / max(1, len(samples))
    model.train(was)
    return (sens / sens.sum(1, keepdim=True).clamp_min(1e-30)).float()

def forgettability(recipe, model, samples, before) -> torch.Tensor:
    """Mean (A_before - A_after)^2 per head over the samples' query rows
    (``distill.forgettability_norm``); ``before`` from :meth:`snapshot`."""
    L, H = recipe.importance.shape
    official = recipe.cfg.distill.forgettability_norm == "official"
    T = _set_length(recipe, samples)
    if isinstance(before, list):      # rows on the host (sharded parameters)
        after = all_head_rows(recipe, model, samples)
        acc = torch.zeros(L, H, dtype=torch.float64)
        for i, s in enumerate(samples):
            for l in range(L):
                sq = (before[i][l].double() - after[i][l].double()) ** 2     # [H, Q, n]
                if official:
                    rows = T if s.queries is None else s.queries.numel()
                    acc[l] += sq.sum((1, 2)) / (rows * T)
                else:
                    acc[l] += sq.mean((1, 2))
        return (acc / max(1, len(samples))).float()
    from .importance import ForgettabilityMeter
    model = unwrap(model)
    dev = recipe._device_of(model)
    was = model.training
    model.eval()
    meter = ForgettabilityMeter(normalize="official" if official else "sample", backend=recipe.cfg.distill.backend)
    before_model = before.module(model)
    n_local = 0
    mine = [samples[i] for i in shard(list(range(len(samples))), recipe.dist.rank, recipe.dist.world_size)]
    bs = recipe.cfg.capture_batch_size
    for i in range(0, len(mine), bs):
        chunk = mine[i:i + bs]
        b = collate(encoded(chunk), recipe.pad_token_id, T if official else 1)
        Lb = b["input_ids"].shape[1]
        inputs = {k: b[k].to(dev) for k in ("input_ids", "attention_mask", "position_ids")}
        inputs["use_cache"] = False
        if any(s.queries is not None for s in chunk):
            q, qm = _query_table(chunk, Lb)
            inputs["queries"], inputs["query_mask"] = q.to(dev), qm.to(dev)
        with recipe._autocast(dev), _padded_rows(recipe, model, inputs["attention_mask"]):
            meter.update(before_model, model, inputs)
        n_local += len(chunk)
    model.train(was)
    sc = meter.scores.double() if n_local else torch.zeros(L, H, dtype=torch.float64)
    return (recipe.dist.reduce(sc * n_local) / max(1, len(samples))).float()

def _query_table(chunk, Lb):
    """[B, Q] absolute query positions of left-padded samples, and which slots are real."""
    Qm = max(s.length if s.queries is None else s.queries.numel() for s in chunk)
    q = torch.zeros(len(chunk), Qm, dtype=torch.long)
    qm = torch.zeros(len(chunk), Qm, dtype=torch.bool)
    for j, s in enumerate(chunk):
        p = Lb - s.length
        rel = torch.arange(s.length) if s.queries is None else s.queries.long()
        q[j, :rel.numel()] = rel + p
        qm[j, :rel.numel()] = True
    return q, qm

@torch.no_grad()
def all_head_rows(recipe, model, samples) -> list:
    """Every head's attention rows at the samples' query rows: per sample {l: [H, Q, n]}."""
    from ..llama import capture_attention
    model = unwrap(model)
    dev = recipe._device_of(model)
    was = model.training
    model.eval()
    L, H = recipe.importance.shape
    heads = {l: torch.arange(H) for l in range(L)}
    out = []
    for s in samples:
        b = collate(encoded([s]), recipe.pad_token_id)
        b = {k: v.to(dev) for k, v in b.items()}
        q = None if s.queries is None else s.queries[None].to(dev)
        with capture_attention(model, heads, q, b["attention_mask"], device="cpu",
                               backend=recipe.cfg.distill.backend) as c, recipe._autocast(dev):
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                  position_ids=b["position_ids"], use_cache=False)
        out.append({l: r[0].float() for l, r in c.rows.items()})
    model.train(was)
    recipe.dist.after_forward()
    return out

@torch.no_grad()
def capture_teacher(recipe, model, samples: Sequence[PendingSample], heads: Optional[Mapping] = None) -> None:
    """Fill each pending sample's teacher from ``model`` (eval mode, no gradients).

    ``sample.logits``: the logits at the positions of ``distill.logits_positions`` —
    ``predict``: those that predict its answer tokens, position ``len(prompt) - 1 + j``
    predicts answer token ``j`` (the first answer token of a sample without prompt has
    no predicting position); ``published``: the answer tokens' own positions
    ``len(prompt) .. n - 1`` (eos included) — from ``sample.logits_start`` on, as ``[A, V]`` fp32
    (``distill.teacher_logits: dense``), a TopK of kind ``"logits"`` (``topk``) or a
    :class:`~seekr_kernels.SampledTeacher` (``sampled``; sample ``j`` of ``samples``
    drawn with seed :func:`sample_seed` (run seed, its task, ``j``), so a resumed run
    draws the same teacher) with ``distill.teacher_logits_k`` entries per position
    (at most V). ``sample.attn``: for each
    layer of ``heads`` (``{layer: 1-D heads}``; None/empty: logits only) the rows
    ``[S_l, Q, n]`` of those heads at the sample's query rows (all n rows when
    ``queries`` is None), over its n real keys. Samples run in batches of
    ``capture_batch_size``, left padded; rows and logits are cut back to each sample.
    """
    d = recipe.cfg.distill
    model = unwrap(model)
    dev = recipe._device_of(model)
    heads = dict(heads or {})
    was = model.training
    model.eval()
    kind, k = d.teacher_logits, d.teacher_logits_k
    bs = recipe.cfg.capture_batch_size
    for i in range(0, len(samples), bs):
        chunk = samples[i:i + bs]
        b = collate(encoded(chunk), recipe.pad_token_id)
        Lb = b["input_ids"].shape[1]
        b = {k: v.to(dev) for k, v in b.items()}
        pads = [Lb - s.length for s in chunk]
        ctx = contextlib.nullcontext()
        if heads:
            from ..llama import capture_attention
            all_rows = all(s.queries is None for s in chunk)
            q = None
            if not all_rows:
                Qm = max(Lb if s.queries is None else s.queries.numel() for s in chunk)
                q = torch.zeros(len(chunk), Qm, dtype=torch.long)
                for j, (s, p) in enumerate(zip(chunk, pads)):
                    rel = torch.arange(s.length) if s.queries is None else s.queries
                    q[j, :rel.numel()] = rel + p
                q = q.to(dev)
            ctx = capture_attention(model, {l: h.to(dev) for l, h in heads.items()}, q,
                                    b["attention_mask"], device="cpu", backend=d.backend)
        with ctx as c, recipe._autocast(dev):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=b["position_ids"], use_cache=False)
        logits = out.logits.float().cpu()
        for j, (s, p) in enumerate(zip(chunk, pads)):
            if d.logits_positions == "published":
                a0, A = p + len(s.prompt_ids), len(s.answer_ids)
            else:
                a0 = max(p, p + len(s.prompt_ids) - 1)
                A = len(s.answer_ids) - (0 if s.prompt_ids else 1)
            s.logits_start = a0 - p
            lg = logits[j, a0:a0 + A].clone()
            if kind == "topk":
                from ..ops.teachers import TopK
                s.logits = TopK.from_dense(lg, min(k, lg.shape[-1]), kind="logits")
            elif kind == "sampled":
                from ..ops.teachers import SampledTeacher
                s.logits = SampledTeacher.from_dense(lg, min(k, lg.shape[-1]),
                                                     seed=sample_seed(recipe.cfg.seed, s.task, i + j))
            else:
                s.logits = lg
            if heads:
                Q = s.length if s.queries is None else s.queries.numel()
                s.attn = {l: (r[j][:, p:, p:] if s.queries is None else r[j][:, :Q, p:]).clone().float()
                          for l, r in c.rows.items()}
    model.train(was)
    recipe.dist.after_forward()
