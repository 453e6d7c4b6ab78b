"""Evaluation of a causal LM on task data: generation (``model.generate``) scored by a
per-task metric, and the answer's mean log-likelihood under teacher forcing.

A metric is a function ``metric(prediction, reference, prompt=None) -> float`` scoring one
sample in [0, 1]; a task's score is the mean over its samples. ``prompt`` is the sample's
prompt (SARI needs the source text); a user metric that takes only ``(prediction,
reference)`` keeps working (it is called without the prompt).

Metric names (:func:`get_metric`):

- ``exact_match`` (alias ``accuracy``; after stripping whitespace), ``contains``, ``prefix``
  (the prediction starts with the reference, e.g. a letter answer followed by reasons);
- TRACE's metrics (:mod:`seekr_kernels.run.trace_metrics`): ``accuracy_extract``,
  ``accuracy_choice``, ``rouge_l``, ``edit_sim``, ``sari``, ``bleu1``, ``bleu4`` (= ``bleu``),
  and ``trace:<task>`` for a TRACE task's whole scoring (answer extraction + its metric);
- ``auto`` (the config default): ``trace:<task>`` for a task named like a TRACE task,
  ``exact_match`` otherwise (:func:`resolve_metric_name`);
- ``"package.module:function"``: a user metric.

Generation is greedy by default; :class:`GenerationOptions` gives the published repeated
inference (sampling with a temperature, ``num_repeats`` samples per prompt, seeded).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from typing import Callable, Optional, Sequence

import torch

from . import trace_metrics
from .data import EncodedDataset
from ..seekr.batching import IGNORE_INDEX, collate
from ..seekr.distributed import unwrap


def exact_match(pred: str, ref: str, prompt: Optional[str] = None) -> float:
    return float(pred.strip() == ref.strip())


def contains(pred: str, ref: str, prompt: Optional[str] = None) -> float:
    return float(ref.strip() in pred)


def prefix(pred: str, ref: str, prompt: Optional[str] = None) -> float:
    return float(pred.strip().startswith(ref.strip()))


METRICS = {"exact_match": exact_match, "accuracy": exact_match, "contains": contains,
           "prefix": prefix, **trace_metrics.TRACE_METRICS}
rouge_l = trace_metrics.rouge_l


def resolve_metric_name(metric: str, task_name: Optional[str]) -> str:
    """``auto`` -> ``trace:<task>`` when ``task_name`` is a TRACE task, else ``exact_match``;
    any other name is returned as it is."""
    if metric != "auto":
        return metric
    task = trace_metrics.canonical_task(task_name)
    return f"trace:{task}" if task else "exact_match"


def _with_prompt(f: Callable, name: str) -> Callable:
    """``f`` as ``metric(prediction, reference, prompt=None)``; a two-argument ``f`` is
    called without the prompt."""
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):   # some builtins have no signature
        params = ()
    if any(p.name == "prompt" or p.kind is p.VAR_KEYWORD for p in params):
        return f

    def metric(prediction, reference, prompt=None):
        return f(prediction, reference)

    metric.__name__ = getattr(f, "__name__", name)
    metric.__doc__ = getattr(f, "__doc__", None)
    return metric


def get_metric(name) -> Callable[..., float]:
    """A metric ``metric(prediction, reference, prompt=None)`` by name (see the module
    docstring), ``"module:function"`` path, or a callable (wrapped to take ``prompt``).

    Raises ``ValueError`` for an unknown name (``auto`` must be resolved first, with
    :func:`resolve_metric_name`) and :class:`~seekr_kernels.run.trace_metrics.MissingMetricPackage`
    when a TRACE metric's package is not installed.
    """
    if callable(name):
        return _with_prompt(name, "metric")
    if not isinstance(name, str):
        raise TypeError(f"metric: expected a name or a callable, got {type(name).__name__}")
    if name == "auto":
        raise ValueError("metric: 'auto' depends on the task name; resolve it with "
                         "resolve_metric_name(metric, task_name) first")
    if name in METRICS:
        trace_metrics.check_packages(name)
        return METRICS[name]
    if name.startswith("trace:"):
        try:
            trace_metrics.check_packages(name)
            return trace_metrics.trace_metric(name[len("trace:"):])
        except ValueError as e:
            raise ValueError(f"metric: {e}") from None
    if ":" in name:
        mod, _, fn = name.partition(":")
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"metric: cannot load {name!r} ({e})") from None
        if not callable(f):
            raise ValueError(f"metric: {name!r} is not callable")
        return _with_prompt(f, name)
    raise ValueError(f"metric: unknown metric {name!r} (built in: {sorted(METRICS)}, "
                     f"'trace:<task>' for {', '.join(trace_metrics.TRACE_TASKS)}, 'auto', "
                     "or 'package.module:function')")


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How answers are generated. The default is greedy decoding.

    ``do_sample`` samples with ``temperature``, ``top_p`` and ``top_k`` (0: off), drawing
    ``num_repeats`` answers per prompt (scored separately, then averaged) from the RNG
    seeded with ``seed`` (+ the rank) for the evaluation only: training randomness is left
    as it was. The published repeated inference (SEEKR's ``infer_multitimes.py``) is
    ``do_sample=True, temperature=0.1, num_repeats=2`` with Llama-2-chat's own
    ``top_p=0.9`` and transformers' ``top_k=50``.
    """
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    num_repeats: int = 1
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if self.num_repeats < 1:
            raise ValueError(f"num_repeats: must be >= 1, got {self.num_repeats}")
        if self.num_repeats > 1 and not self.do_sample:
            raise ValueError("num_repeats: repeats of greedy decoding are identical; set do_sample")

    @classmethod
    def from_config(cls, eval_cfg, default_seed: int = 0) -> "GenerationOptions":
        """From an :class:`~seekr_kernels.run.config.EvalConfig`; its ``seed`` None
        means ``default_seed`` (the run's seed)."""
        seed = getattr(eval_cfg, "seed", None)
        return cls(do_sample=eval_cfg.do_sample, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
                   top_k=eval_cfg.top_k, num_repeats=eval_cfg.num_repeats,
                   seed=default_seed if seed is None else seed)


def _generation_config(opts: GenerationOptions, tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig
    kw = dict(max_new_tokens=max_new_tokens, do_sample=opts.do_sample, num_return_sequences=opts.num_repeats,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if tokenizer.bos_token_id is not None:
        kw["bos_token_id"] = tokenizer.bos_token_id
    if opts.do_sample:   # set only when sampling: greedy with a temperature is a warning
        kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)
    return GenerationConfig(**kw)


@torch.no_grad()
def generate_answers(model, input_ids, attention_mask, tokenizer, max_new_tokens: int,
                     options: Optional[GenerationOptions] = None, synced_gpus: bool = False) -> list:
    """Answers to a left-padded prompt batch through ``model.generate``.

    Returns, per sample, ``options.num_repeats`` lists of generated ids (eos and what
    follows it removed). ``synced_gpus`` keeps every rank stepping until all ranks are done
    (sharded models run collectives in every forward call).
    """
    opts = options or GenerationOptions()
    gc = _generation_config(opts, tokenizer, max_new_tokens)
    # transformers 5 fills every unset field of a passed config from the model's own
    # generation_config (a chat model's sampling defaults, max_length): the model sees ours
    # for the call, so nothing but these options shapes the answers.
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = hf.generation_config
    hf.generation_config = gc
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask.long(), generation_config=gc,
                             synced_gpus=synced_gpus)
    finally:
        hf.generation_config = saved
    new = out[:, input_ids.shape[1]:].tolist()
    eos, R = tokenizer.eos_token_id, opts.num_repeats
    answers = []
    for b in range(input_ids.shape[0]):
        reps = []
        for row in new[b * R:(b + 1) * R]:
            reps.append(row[:row.index(eos)] if eos in row else row)
        answers.append(reps)
    return answers


@torch.no_grad()
def answer_loglik(model, batch) -> torch.Tensor:
    """Per-sample mean log-probability of the answer tokens (teacher forcing), fp32 [B]."""
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, :-1].float()
    tgt = labels[:, 1:]
    valid = tgt != IGNORE_INDEX
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
                      keep_predictions: int = 0, sharded_model: bool = False,
                      generation: Optional[GenerationOptions] = None) -> dict:
    """Score a model on examples: {"score", "scores", "loglik", "n", "predictions"}.

    ``score`` is the mean metric over generated answers (greedy unless ``generation`` says
    otherwise; with ``num_repeats`` > 1 the mean over repeats of each repeat's mean, whose
    values are ``scores``), ``loglik`` the mean over samples of the answer's mean token
    log-likelihood. ``metric`` is a name or callable (:func:`get_metric`; resolve ``auto``
    first). Under torch.distributed every rank scores its share of the examples and the sums
    are all-reduced, so every rank returns the same numbers. ``sharded_model`` (FSDP) makes
    every rank run the same number of forward calls: the same number of batches, and
    generation synchronised across ranks (``synced_gpus``) so no rank stops early.
    ``predictions`` holds the first ``keep_predictions`` samples of this rank (first repeat).
    """
    metric_fn = get_metric(metric)
    opts = generation or GenerationOptions()
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
    R = opts.num_repeats
    sums = torch.zeros(R + 1, dtype=torch.float64)   # per-repeat score sums, then loglik
    preds = []
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    n_real = len(batches)
    if steps is not None:
        # Ranks with fewer examples repeat one (weight 0) so collectives stay matched.
        filler = [0]
        batches = batches + [filler] * (steps - len(batches))
    ctx = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    rng = contextlib.nullcontext()
    if opts.do_sample:
        dev = torch.device(device)
        rng = torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else [])
    try:
        with ctx, rng:
            if opts.do_sample:
                torch.manual_seed(opts.seed + 1000003 * rank)
            for k, idx in enumerate(batches):
                items = [ds[i] for i in idx]
                full = {kk: v.to(device) for kk, v in collate(items, tokenizer.pad_token_id).items()}
                prompt = {kk: v.to(device) for kk, v in
                          collate(items, tokenizer.pad_token_id, with_answer=False).items()}
                ll = answer_loglik(model, full).double().cpu()
                gen = generate_answers(model, prompt["input_ids"], prompt["attention_mask"], tokenizer,
                                       max_new_tokens, opts, synced_gpus=sharded_model and world > 1)
                if k >= n_real:
                    continue
                sums[R] += ll.sum()
                for i, reps in zip(idx, gen):
                    ex = ds.examples[i]
                    for r, ids in enumerate(reps):
                        text = tokenizer.decode(ids)
                        s = float(metric_fn(text, ex.answer, prompt=ex.prompt))
                        sums[r] += s
                        if r == 0 and len(preds) < keep_predictions:
                            preds.append({"prompt": ex.prompt, "prediction": text, "answer": ex.answer,
                                          "score": s})
    finally:
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist
        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    scores = [float(v / max(n, 1)) for v in sums[:R]]
    return {"score": sum(scores) / R, "scores": scores, "loglik": float(sums[R] / max(n, 1)), "n": n,
            "predictions": preds}
