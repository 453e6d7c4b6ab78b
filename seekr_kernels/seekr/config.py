"""The SEEKR recipe's configuration: :class:`RecipeConfig` and its ``replay`` / ``distill``
sections, the ``recipe: official`` preset (:data:`OFFICIAL`) and the key-checked builder
every config of the package goes through.

Every unknown key and every value of the wrong type or out of range is a
:class:`ConfigError` naming the key by its dotted path (``distill.head_budget``). A run of
the package's own trainer extends this with model, train, eval and log sections
(:mod:`seekr_kernels.run.config`); the Hugging Face fields are generated from the same
dataclasses (:mod:`seekr_kernels.integrations.hf`).

``recipe: official`` switches every place where the package's definitions differ from the
published code (jinghan1he/SEEKR) to the published choice at once; see :data:`OFFICIAL`
for the keys it sets and README.md "Deviations from the published code" for what each
changes. A key set explicitly always wins over the preset.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


METHODS = ("sft", "replay", "replay+logits", "seekr")


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type or out of range (message names it)."""


@dataclass
class ReplayConfig:
    """Replay memory and schedule.

    ``ratio`` < 1 is a fraction of each task's training set, >= 1 a count. ``cycle`` 0 means
    the published default: train batches per epoch // replay batches.

    ``subset``: which samples of a task are kept: ``random`` (a seeded random subset of at
    least 1) or ``first`` (the first ``int(N x ratio)`` samples, as published).
    ``in_accumulation``: with ``train.grad_accum`` > 1, a replay batch is one micro-batch
    inside the accumulation window of the next optimiser step (published: DeepSpeed counts
    it as a micro-step) instead of an optimiser step of its own; ``batch_size`` is then the
    replay micro-batch (default ``train.batch_size / train.grad_accum``).
    ``order``: ``reshuffle`` (each pass over the memory in a fresh order, continuing across
    epochs) or ``fixed`` (one order per task, restarted at every epoch, as published).
    ``outnumbered``: when replay batches outnumber train batches (so the default cycle is
    0): ``every_step`` (replay before every train step) or ``skip`` (no replay in that
    task, as published).
    """
    ratio: float = 0.01
    cycle: int = 0
    batch_size: Optional[int] = None    # default: train.batch_size (a micro-batch with in_accumulation)
    subset: str = "random"              # random | first
    in_accumulation: bool = False
    order: str = "reshuffle"            # reshuffle | fixed
    outnumbered: str = "every_step"     # every_step | skip


@dataclass
class DistillConfig:
    """SEEKR losses, budgets and statistics.

    Budgets ``None`` follow the published Llama-2-7B setting scaled to the model: 3/4 of
    the layers, 1/8 of all heads; ``query_budget`` 0 = all rows.

    Published-code switches (``recipe: official`` sets all of them):

    ``attn_log_eps``: the attention KL uses ``log(p + eps)`` for the student (published
    1e-8; 0 = the exact log-softmax). With eps > 0 the term runs on the plain-PyTorch
    backend (selected rows only), see :func:`seekr_kernels.attention_kl`.
    ``forgettability_norm``: ``sample`` (per sample, mean over its Q query rows x n real
    keys) or ``official`` (every sample padded to the replay set's length T: mean over Q x
    T, and with query budget 0 the T rows include the padding rows).
    ``sensitivity_padding``: ``real`` (mean of (dL/dA)^2 over the sample's n x n map) or
    ``official`` (over the T x T map of the sample padded to the replay set's length,
    padding keys included).
    ``query_sampling``: ``subset`` (a sample with n <= Q tokens distils all n rows) or
    ``official`` (Q rows drawn with replacement, then sorted, when n < Q).

    Logits teacher and student (README "Logits distillation without logits"):

    ``teacher_logits``: what the replay memory keeps of the teacher's logits: ``dense``
    (``[A, V]`` fp32 per sample, as published), ``topk`` (the ``teacher_logits_k``
    largest logits and the row log-sum-exp, a :class:`~seekr_kernels.TopK`) or
    ``sampled`` (``teacher_logits_k`` positions drawn by priority sampling with
    importance weights, an unbiased :class:`~seekr_kernels.SampledTeacher`, seeded by
    the run's seed, the task and the sample). ``teacher_logits_k``: k for ``topk`` /
    ``sampled`` (default 256, the measured recommendation); not allowed with ``dense``.
    ``teacher_logits_topk: K`` is the older spelling of ``teacher_logits: topk`` with
    k = K (0: dense); it may be combined only with ``topk`` and the same k.
    ``fused_lm_head``: ``auto`` (default) computes the replay CE and logits term from
    the final hidden states and the ``lm_head`` weight
    (:func:`~seekr_kernels.linear_logits_kl`) without materialising ``[B, L, V]``
    logits, wherever that applies (an unsharded ``nn.Linear`` lm_head, not adapted by
    LoRA, no logits post-processing); ``true`` refuses to run where it does not;
    ``false`` always materialises the logits.
    """
    logits_weight: float = 0.5
    attn_weight: float = 1000.0
    layer_budget: Optional[int] = None
    head_budget: Optional[int] = None
    query_budget: int = 100
    sensitivity_region: str = "full"     # full | causal
    sensitivity_batch_size: int = 1
    teacher_logits: str = "dense"        # dense | topk | sampled
    teacher_logits_k: Optional[int] = None   # k of topk / sampled (default 256)
    teacher_logits_topk: int = 0         # older spelling: K > 0 = teacher_logits topk, k = K
    fused_lm_head: Any = "auto"          # auto | true | false
    backend: str = "auto"
    attn_log_eps: float = 0.0
    forgettability_norm: str = "sample"  # sample | official
    sensitivity_padding: str = "real"    # real | official
    query_sampling: str = "subset"       # subset | official


@dataclass
class RecipeConfig:
    """What :class:`seekr_kernels.SeekrRecipe` needs, without the rest of a run.

    ``batch_size`` is the global train batch (the default replay batch), ``grad_accum``
    the accumulation micro-steps per optimiser step, ``pad_to_multiple_of`` the padding
    of replay batches (and of the replay set under the official statistics),
    ``capture_batch_size`` the samples per forward pass of teacher capture and
    forgettability. Built from a run with :meth:`RunConfig.recipe_config`, from a dict
    with :func:`recipe_from_dict` (``recipe: official`` applies as in a run config).
    """
    method: str = "seekr"
    recipe: str = "package"
    seed: int = 42
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    batch_size: int = 16
    grad_accum: int = 1
    pad_to_multiple_of: int = 8
    capture_batch_size: int = 32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    _preset_applied = False

    def validate(self) -> "RecipeConfig":
        """Check values; raise :class:`ConfigError` naming the key."""
        _choice("recipe", self.recipe, RECIPES)
        if self.recipe == "official" and not self._preset_applied:
            _apply_preset_to_defaults(self)
        _choice("method", self.method, METHODS)
        for k in ("batch_size", "grad_accum", "pad_to_multiple_of", "capture_batch_size"):
            _positive(k, getattr(self, k))
        if self.batch_size % self.grad_accum:
            _err("grad_accum", f"must divide batch_size={self.batch_size}, got {self.grad_accum}")
        _validate_replay(self.replay)
        _validate_distill(self.distill)
        return self


#: List-valued fields whose items are dataclasses: (class name, field) -> item class.
#: A run config registers its tasks here (seekr_kernels.run.config).
_LIST_TYPES: dict = {}


RECIPES = ("package", "official")


#: What ``recipe: official`` sets (the published code, jinghan1he/SEEKR training/seekr.py
#: and scripts/exp_seq_seekr.sh, on 8 GPUs x 2 samples x 8 accumulation steps). Layer and
#: head budgets stay scaled to the model (24 of 32 layers and 128 of 1024 heads at 7B are
#: exactly the package's scaled defaults).
OFFICIAL = {
    "train": {"batch_size": 128, "grad_accum": 8, "lr": 1e-5, "weight_decay": 0.0, "betas": [0.9, 0.95],
              "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "pad_to_multiple_of": 8,
              "max_prompt_len": 1024, "max_answer_len": 512, "order": "fixed", "optimizer_scope": "run"},
    "replay": {"ratio": 0.01, "subset": "first", "in_accumulation": True, "order": "fixed",
               "outnumbered": "skip"},
    "distill": {"logits_weight": 0.5, "attn_weight": 1000.0, "query_budget": 0, "sensitivity_region": "full",
                "attn_log_eps": 1e-8, "forgettability_norm": "official", "sensitivity_padding": "official",
                "query_sampling": "official"},
}


def _merge_preset(data: dict, preset: dict) -> dict:
    """``data`` with the preset's keys filled in where ``data`` does not set them."""
    out = dict(data)
    for sec, vals in preset.items():
        cur = out.get(sec)
        if cur is None:
            out[sec] = dict(vals)
        elif isinstance(cur, dict):
            out[sec] = {**vals, **cur}
        # anything else is left for _build to report with its key
    return out


def _apply_preset_to_defaults(obj) -> None:
    """Official values on every preset field of ``obj`` still at its package default."""
    for sec, vals in OFFICIAL.items():
        sub = getattr(obj, sec, None)
        if sub is None:   # a RecipeConfig has no train section: its batch fields instead
            sub, names = obj, {"batch_size", "grad_accum", "pad_to_multiple_of"}
        else:
            names = set(vals)
        defaults = type(sub)()
        for k, v in vals.items():
            if k in names and hasattr(sub, k) and getattr(sub, k) == getattr(defaults, k):
                setattr(sub, k, list(v) if isinstance(v, list) else v)
    obj._preset_applied = True


def _err(key, msg):
    raise ConfigError(f"{key}: {msg}")


def _coerce(value, tp, key):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _err(key, f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            _err(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _err(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            _err(key, f"expected a number, got {value!r}")
        if isinstance(value, str):
            try:   # YAML reads "1e-5" (no dot) as a string
                value = float(value)
            except ValueError:
                _err(key, f"expected a number, got {value!r}")
        if not isinstance(value, (int, float)):
            _err(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):   # YAML's .nan / .inf: no key takes them
            _err(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _err(key, f"expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            _err(key, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            _err(key, f"expected a list, got {type(value).__name__}")
        return list(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            _err(key, f"unknown key (known: {', '.join(sorted(names))})")
        sub = _LIST_TYPES.get((cls.__name__, k))
        if sub is not None:
            if not isinstance(v, list):
                _err(key, f"expected a list, got {type(v).__name__}")
            items = []
            for i, item in enumerate(v):
                ik = f"{key}[{i}]"
                if isinstance(item, str):
                    item = {"path": item}
                if not isinstance(item, (dict, sub)):
                    _err(ik, f"expected a mapping, got {type(item).__name__}")
                items.append(item if isinstance(item, sub) else _build(sub, item, ik))
            kwargs[k] = items
        else:
            kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _choice(key, v, options):
    if v not in options:
        _err(key, f"must be one of {list(options)}, got {v!r}")


def _positive(key, v, allow_zero=False):
    if v is None:
        return
    if (v < 0) if allow_zero else (v <= 0):
        _err(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def _validate_replay(r, p="replay."):
    if not (math.isfinite(r.ratio) and r.ratio > 0):
        _err(p + "ratio", f"must be > 0 (a fraction < 1 or a count >= 1), got {r.ratio}")
    if r.ratio >= 1 and not float(r.ratio).is_integer():
        _err(p + "ratio", f"a count (>= 1) must be a whole number, got {r.ratio}")
    _positive(p + "cycle", r.cycle, allow_zero=True)
    _positive(p + "batch_size", r.batch_size)
    _choice(p + "subset", r.subset, ("random", "first"))
    _choice(p + "order", r.order, ("reshuffle", "fixed"))
    _choice(p + "outnumbered", r.outnumbered, ("every_step", "skip"))


def _validate_distill(d, p="distill."):
    if not 0 <= d.logits_weight <= 1:
        _err(p + "logits_weight", f"must lie in [0, 1], got {d.logits_weight}")
    _positive(p + "attn_weight", d.attn_weight, allow_zero=True)
    _positive(p + "layer_budget", d.layer_budget)
    _positive(p + "head_budget", d.head_budget)
    _positive(p + "query_budget", d.query_budget, allow_zero=True)
    _positive(p + "sensitivity_batch_size", d.sensitivity_batch_size)
    _validate_teacher_logits(d, p)
    _choice(p + "sensitivity_region", d.sensitivity_region, ("full", "causal"))
    _choice(p + "backend", d.backend, ("auto", "triton", "cpu", "cuda", "torch"))
    if not (math.isfinite(d.attn_log_eps) and 0 <= d.attn_log_eps < 1):
        _err(p + "attn_log_eps", f"must lie in [0, 1) (0 = exact log-softmax), got {d.attn_log_eps}")
    _choice(p + "forgettability_norm", d.forgettability_norm, ("sample", "official"))
    _choice(p + "sensitivity_padding", d.sensitivity_padding, ("real", "official"))
    _choice(p + "query_sampling", d.query_sampling, ("subset", "official"))


#: k of a topk / sampled logits teacher when ``distill.teacher_logits_k`` is not given:
#: the recommended k of benchmarks/results/README.md (1.7% KL error, gradient cosine 0.998).
DEFAULT_TEACHER_LOGITS_K = 256


def _validate_teacher_logits(d, p="distill."):
    """``teacher_logits``, ``teacher_logits_k``, the older ``teacher_logits_topk`` and
    ``fused_lm_head``; resolves the older spelling and the default k in place (so the
    resolved config validates again unchanged)."""
    _positive(p + "teacher_logits_topk", d.teacher_logits_topk, allow_zero=True)
    _choice(p + "teacher_logits", d.teacher_logits, ("dense", "topk", "sampled"))
    if d.teacher_logits_k is not None:
        _positive(p + "teacher_logits_k", d.teacher_logits_k)
    K = d.teacher_logits_topk
    if K:
        if d.teacher_logits == "sampled":
            _err(p + "teacher_logits", f"'sampled' contradicts {p}teacher_logits_topk={K} (the older spelling "
                                       f"of teacher_logits: topk); set {p}teacher_logits_k: {K} instead")
        if d.teacher_logits_k is not None and d.teacher_logits_k != K:
            _err(p + "teacher_logits_k", f"{d.teacher_logits_k} contradicts {p}teacher_logits_topk={K} (the older "
                                         f"spelling of teacher_logits: topk with k = {K}); set one of them")
        d.teacher_logits, d.teacher_logits_k = "topk", K
    if d.teacher_logits == "dense":
        if d.teacher_logits_k is not None:
            _err(p + "teacher_logits_k", f"applies to teacher_logits topk or sampled; teacher_logits is dense "
                                         f"(got k = {d.teacher_logits_k})")
    elif d.teacher_logits_k is None:
        d.teacher_logits_k = DEFAULT_TEACHER_LOGITS_K
    f = d.fused_lm_head
    if isinstance(f, str) and f.lower() in ("auto", "true", "false"):
        d.fused_lm_head = f.lower()
    elif isinstance(f, bool):
        d.fused_lm_head = "true" if f else "false"
    else:
        _err(p + "fused_lm_head", f"must be auto, true or false, got {f!r}")


def recipe_from_dict(data: Optional[dict] = None, validate: bool = True) -> RecipeConfig:
    """Build a :class:`RecipeConfig` from a plain dict (``replay``/``distill`` sections,
    ``method``, ``recipe``, ``seed``, ``batch_size``, ...); ``recipe: official`` fills in the
    published values under the keys given."""
    data = dict(data or {})
    if data.get("recipe", "package") == "official":
        data = _merge_preset(data, {k: v for k, v in OFFICIAL.items() if k != "train"})
        tr = OFFICIAL["train"]
        for k in ("batch_size", "grad_accum", "pad_to_multiple_of"):
            data.setdefault(k, tr[k])
    cfg = _build(RecipeConfig, data)
    cfg._preset_applied = data.get("recipe") == "official"
    return cfg.validate() if validate else cfg
