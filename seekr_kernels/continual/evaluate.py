"""Evaluation of a causal LM on task data: greedy generation + a per-task metric, and the
answer's mean log-likelihood under teacher forcing.

Metrics are functions ``metric(prediction: str, reference: str) -> float`` in [0, 1].
Built in: ``exact_match`` (after stripping whitespace), ``contains``, ``prefix`` (the
prediction starts with the reference, e.g. a letter answer followed by an explanation) and
``rouge_l`` (LCS F1 over whitespace tokens). Any ``"package.module:function"`` path names a
user metric.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Sequence

import torch

from .data import EncodedDataset, collate, position_ids


def exact_match(pred: str, ref: str) -> float:
    return float(pred.strip() == ref.strip())


def contains(pred: str, ref: str) -> float:
    return float(ref.strip() in pred)


def prefix(pred: str, ref: str) -> float:
    return float(pred.strip().startswith(ref.strip()))


def rouge_l(pred: str, ref: str) -> float:
    a, b = pred.split(), ref.split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


METRICS = {"exact_match": exact_match, "accuracy": exact_match, "contains": contains,
           "prefix": prefix, "rouge_l": rouge_l}


def get_metric(name) -> Callable[[str, str], float]:
    """A metric by built-in name, ``"module:function"`` path, or a callable (returned as is)."""
    if callable(name):
        return name
    if not isinstance(name, str):
        raise TypeError(f"metric: expected a name or a callable, got {type(name).__name__}")
    if name in METRICS:
        return METRICS[name]
    if ":" in name:
        mod, _, fn = name.partition(":")
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"metric: cannot load {name!r} ({e})") from None
        if not callable(f):
            raise ValueError(f"metric: {name!r} is not callable")
        return f
    raise ValueError(f"metric: unknown metric {name!r} (built in: {sorted(METRICS)}, "
                     "or 'package.module:function')")


def unwrap(model):
    """The plain module under DDP (``.module``); FSDP2 modules are used as they are."""
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def greedy_generate(model, input_ids, attention_mask, eos_token_id: int, pad_token_id: int,
                    max_new_tokens: int, early_stop: bool = True) -> list:
    """Greedy decoding of a left-padded prompt batch with the KV cache.

    Returns one list of generated ids per sample, eos excluded. ``early_stop=False`` runs
    all ``max_new_tokens`` steps even when every sample has finished (sharded models need
    every rank to run the same number of forward calls).
    """
    B = input_ids.shape[0]
    mask = attention_mask.long()
    pos = position_ids(mask)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].float().argmax(-1)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    gen = [[] for _ in range(B)]
    last_pos = pos[:, -1:]
    for step in range(max_new_tokens):
        for b in range(B):
            if not done[b] and int(nxt[b]) != eos_token_id:
                gen[b].append(int(nxt[b]))
        done |= nxt == eos_token_id
        if step == max_new_tokens - 1 or (early_stop and bool(done.all())):
            break
        tok = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)
        last_pos = last_pos + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=last_pos,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].float().argmax(-1)
    return gen


@torch.no_grad()
def answer_loglik(model, batch) -> torch.Tensor:
    """Per-sample mean log-probability of the answer tokens (teacher forcing), fp32 [B]."""
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, :-1].float()
    tgt = labels[:, 1:]
    valid = tgt != -100
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    lp = lp * valid
    return lp.sum(1) / valid.sum(1).clamp_min(1)


def _dist_info():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_examples(model, tokenizer, examples: Sequence, *, metric="exact_match",
                      max_prompt_len: int = 512, max_answer_len: int = 512, batch_size: int = 32,
                      max_new_tokens: int | None = None, device=None, autocast_dtype=None,
                      keep_predictions: int = 0, sharded_model: bool = False) -> dict:
    """Score a model on examples: {"score", "loglik", "n", "predictions"}.

    ``score`` is the mean metric over greedy generations, ``loglik`` the mean over samples
    of the answer's mean token log-likelihood. Under torch.distributed every rank scores
    its share of the examples and the sums are all-reduced, so every rank returns the
    same numbers. ``sharded_model`` (FSDP) makes every rank run the same number of forward
    calls.
    """
    metric_fn = get_metric(metric)
    model = unwrap(model)
    device = device or next(model.parameters()).device
    rank, world = _dist_info()
    ds = EncodedDataset(examples, tokenizer, max_prompt_len, max_answer_len)
    n = len(ds)
    mine = list(range(rank * n // world, (rank + 1) * n // world))
    if max_new_tokens is None:
        max_new_tokens = max_answer_len
    steps = -(-((n + world - 1) // world) // batch_size) if sharded_model else None
    was_training = model.training
    model.eval()
    score_sum = torch.zeros((), dtype=torch.float64)
    ll_sum = torch.zeros((), dtype=torch.float64)
    preds = []
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    n_real = len(batches)
    if steps is not None:
        # Ranks with fewer examples repeat one (weight 0) so collectives stay matched.
        filler = [0]
        batches = batches + [filler] * (steps - len(batches))
    ctx = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    try:
        with ctx:
            for k, idx in enumerate(batches):
                items = [ds[i] for i in idx]
                full = {kk: v.to(device) for kk, v in collate(items, tokenizer.pad_token_id).items()}
                prompt = {kk: v.to(device) for kk, v in
                          collate(items, tokenizer.pad_token_id, with_answer=False).items()}
                ll = answer_loglik(model, full).double().cpu()
                gen = greedy_generate(model, prompt["input_ids"], prompt["attention_mask"],
                                      tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens,
                                      early_stop=not sharded_model)
                if k >= n_real:
                    continue
                ll_sum += ll.sum()
                for i, g in zip(idx, gen):
                    text = tokenizer.decode(g)
                    s = float(metric_fn(text, ds.examples[i].answer))
                    score_sum += s
                    if len(preds) < keep_predictions:
                        preds.append({"prompt": ds.examples[i].prompt, "prediction": text,
                                      "answer": ds.examples[i].answer, "score": s})
    finally:
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist
        t = torch.stack([score_sum, ll_sum]).to(device)
        dist.all_reduce(t)
        score_sum, ll_sum = t.cpu()[0], t.cpu()[1]
    return {"score": float(score_sum / max(n, 1)), "loglik": float(ll_sum / max(n, 1)), "n": n,
            "predictions": preds}
