"""The SEEKR recipe's configuration: :class:`RecipeConfig` and its ``replay`` / ``distill``
sections, the ``preset: official`` preset (:data:`OFFICIAL`), the table of older key
spellings (:data:`KEY_ALIASES`) and the key-checked builder every config of the package
goes through.

Every key is documented once, in its field's ``metadata["help"]``; the Hugging Face fields
(:class:`seekr_kernels.integrations.hf.SeekrArguments`) are generated from these fields,
help included. Every unknown key and every value of the wrong type or out of range is a
:class:`ConfigError` naming the key by its dotted path (``distill.head_budget``), as the
config spells it. A run of the package's own trainer extends this with model, train, eval
and log sections (:mod:`seekr_kernels.run.config`).

``preset: official`` (``recipe: official`` in configs written before the key was renamed)
switches every place where the package's definitions differ from the published code
(jinghan1he/SEEKR) to the published choice at once; see :data:`OFFICIAL` for the keys it
sets and README.md "Deviations from the published code" for what each changes. A key set
explicitly always wins over the preset.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


METHODS = ("sft", "replay", "replay+logits", "seekr")
#: ``distill.logits_positions``: the rows the logits term distils (README "Deviations").
LOGITS_POSITIONS = ("predict", "published")
PRESETS = ("package", "official")
RECIPES = PRESETS   # the name before the key was renamed (recipe -> preset)


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type or out of range (message names it)."""


class RunWarning(UserWarning):
    """A run that trains, but not quite as its config reads (message names the key). The
    command shows it on one line (``seekr: warning: ...``)."""


def _f(default=dataclasses.MISSING, help: str = "", **kw):
    """A config field with its help text (the one place a key is documented)."""
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ReplayConfig:
    """Replay memory and schedule (the ``replay`` section)."""
    ratio: float = _f(0.01, "Replay samples kept per task: < 1 a fraction of its training set, >= 1 a count.")
    cycle: int = _f(0, "A replay step before every N-th train step; 0: the published default, train batches "
                       "per epoch // replay batches (one pass over the memory per epoch). With a memory of a few "
                       "samples per task that is a handful of replay steps per task; 1 replays before every "
                       "train step (README, 'SEEKR on a real model': measured there, SEEKR with a 1% memory needs "
                       "it).")
    batch_size: Optional[int] = _f(None, "Samples per replay batch (global). Default: the global train batch "
                                         "(one micro-batch of it with replay.in_accumulation).")
    subset: str = _f("random", "Which samples of a task are kept: 'random' (a seeded random subset of at "
                               "least 1) or 'first' (the first int(N x ratio) samples, as published).")
    in_accumulation: bool = _f(False, "With gradient accumulation, a replay batch is one micro-batch inside the "
                                      "accumulation window of the next optimiser step (published: DeepSpeed "
                                      "counts it as a micro-step) instead of an optimiser step of its own; "
                                      "replay.batch_size is then the replay micro-batch.")
    order: str = _f("reshuffle", "'reshuffle' (each pass over the memory in a fresh order, continuing across "
                                 "epochs) or 'fixed' (one order per task, restarted at every epoch, as published).")
    outnumbered: str = _f("every_step", "When replay batches outnumber train batches (so the default cycle is "
                                        "0): 'every_step' (replay before every train step) or 'skip' (no replay "
                                        "in that task, as published).")


@dataclass
class DistillConfig:
    """SEEKR losses, budgets and statistics (the ``distill`` section). Replay batches train
    on ``(1 - a) CE + a logits-KL + b attention-KL``; the keys marked "published" are the
    switches ``preset: official`` sets; the logits teacher is README "Logits distillation
    without logits"."""
    logits_weight: float = _f(0.5, "a in (1 - a) CE + a logits-KL + b attention-KL, in [0, 1].")
    attn_weight: float = _f(1000.0, "b, the attention-KL weight.")
    layer_budget: Optional[int] = _f(None, "Layers whose heads may be distilled. Default: 3/4 of the model's "
                                           "layers (the published Llama-2-7B setting, scaled to the model); "
                                           "under preset official the published script's 24 for every model "
                                           "(all layers, with a warning, when it has fewer).")
    head_budget: Optional[int] = _f(None, "Heads distilled in total. Default: 1/8 of all heads (the published "
                                          "Llama-2-7B setting, scaled to the model); under preset official the "
                                          "published script's 128 for every model (at most layer_budget x heads, "
                                          "with a warning).")
    head_selection: str = _f("stable", "How heads of equal importance rank: 'stable' (the lower layer and head "
                                       "first) or 'published' (the published torch.topk calls: their order, "
                                       "which on ties is neither the lower index nor promised across torch "
                                       "versions).")
    query_budget: int = _f(100, "Query rows distilled per sample (0: all rows).")
    sensitivity_region: str = _f("full", "Region of the (dL/dA)^2 head sensitivity: 'full' or 'causal'.")
    sensitivity_batch_size: int = _f(1, "Samples per sensitivity pass.")
    teacher_logits: str = _f("dense", "What the replay memory keeps of the teacher's logits: 'dense' ([A, V] "
                                      "fp32 per sample, as published), 'topk' (the distill.teacher_logits_k "
                                      "largest logits and the row log-sum-exp) or 'sampled' (k positions drawn "
                                      "by priority sampling with importance weights, an unbiased teacher "
                                      "seeded by the run's seed, the task and the sample).")
    teacher_logits_k: Optional[int] = _f(None, "k of a 'topk' or 'sampled' teacher (default 256, the measured "
                                               "recommendation); not allowed with 'dense'. A k above the model's "
                                               "vocabulary is clamped to it, with a warning, when the task "
                                               "begins.")
    teacher_logits_topk: int = _f(0, "Older spelling of distill.teacher_logits 'topk' with distill.teacher_logits_k "
                                     "= this (0: dense); it may be combined only with 'topk' and the same k.")
    logits_positions: str = _f("predict", "Where the logits term distils the student against the teacher's logits: "
                                          "'predict' (the positions that predict the answer tokens, the rows "
                                          "of the replay CE) or 'published' (the answer tokens' own positions, the "
                                          "one after eos included: logits[labels != -100] as published; 'answer' "
                                          "is read as 'published'). The replay memory keeps the teacher at these "
                                          "positions; a memory of the other option is refused.")
    fused_lm_head: Any = _f("auto", "'auto', 'true' or 'false': the replay CE and logits term from the final "
                                    "hidden states and the lm_head weight without materialising [B, L, V] "
                                    "logits (method replay: the replay CE alone). 'auto': wherever that "
                                    "applies (an unsharded nn.Linear lm_head, not "
                                    "adapted by LoRA, no logits post-processing); 'true': refuse to run where it "
                                    "does not; 'false': always materialise the logits.")
    backend: str = _f("auto", "Kernel backend of the SEEKR ops: 'auto', 'triton', 'cpu', 'cuda' or 'torch'.")
    attn_log_eps: float = _f(0.0, "The attention KL with log(p + eps) for the student (published 1e-8; 0: the "
                                  "exact log-softmax). With eps > 0 the term runs on the plain-PyTorch backend "
                                  "(selected rows only).")
    forgettability_norm: str = _f("sample", "'sample' (per sample, mean over its Q = distill.query_budget query "
                                            "rows x n real keys) or 'official' (every sample padded to the replay "
                                            "set's length T: mean over Q x T; with query budget 0 the T rows "
                                            "include the padding rows; published).")
    sensitivity_padding: str = _f("real", "'real' (mean of (dL/dA)^2 over the sample's n x n map) or 'official' "
                                          "(over the T x T map of the sample padded to the replay set's length, "
                                          "padding keys included; published).")
    padded_rows: str = _f("zero", "What the attention of a left-padding query row (one that sees no real key) gives "
                                  "in the sensitivity and forgettability passes: 'zero' (transformers' SDPA and "
                                  "flash attention) or 'official' (transformers 4.31's eager mask, uniform over "
                                  "the keys up to it and the real keys; published). It sets the values at padding "
                                  "positions from the second layer on, which only distill.sensitivity_padding "
                                  "'official' reads.")
    query_sampling: str = _f("subset", "'subset' (a sample with n <= Q tokens distils all n rows) or 'official' "
                                       "(Q rows drawn with replacement, then sorted, when n < Q; published).")


#: Older spellings of config keys, for every config of the package (a run's YAML, a recipe
#: dict, the config saved in a run's state.json and checkpoints): older dotted key -> current
#: key. Each is a pure rename: the value is read as it is, under the current key. Both
#: spellings given: the current key at its default counts as unset (a dict written by
#: ``to_dict()`` carries every key), so the older spelling's value is read; two different
#: values otherwise are a :class:`ConfigError` naming both. Constructors
#: and attributes of the config classes take the older top-level spellings too
#: (``RunConfig(recipe="official").recipe``). Older spellings that change the value, not only
#: the key, stay keys of their own and are resolved where the key is checked:
#: ``distill.teacher_logits_topk`` (:func:`_validate_teacher_logits`) and ``log.tensorboard``
#: (:mod:`seekr_kernels.run.config`).
KEY_ALIASES = {
    "recipe": "preset",      # renamed so the key does not read as the SeekrRecipe class
}


def _contradiction(old, a, new, b):
    _err(old, f"{a!r} contradicts {new}: {b!r} ({old} is the older spelling of {new}); set one of them")


def _section(d: dict, path, create: bool):
    """The mapping at ``path`` inside ``d``, copied into ``d`` (so the caller's dicts stay as
    they are); None where there is none (created empty with ``create``) or it is no mapping."""
    for k in path:
        v = d.get(k)
        if v is None and create:
            v = {}
        if not isinstance(v, dict):
            return None
        d[k] = d = dict(v)
    return d


def _field_default(cls, path):
    """The default of the key ``path`` of the config dataclass ``cls`` (MISSING if none)."""
    for i, name in enumerate(path):
        f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        if f is None:
            return dataclasses.MISSING
        if i == len(path) - 1:
            return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        cls = typing.get_type_hints(cls)[name]
        if not dataclasses.is_dataclass(cls):
            return dataclasses.MISSING
    return dataclasses.MISSING


def resolve_aliases(data: dict, cls=None) -> tuple:
    """``(data, spelled)``: a copy of the config dict ``data`` (of the config dataclass
    ``cls``, default :class:`RecipeConfig`) with every older key of :data:`KEY_ALIASES` under
    its current name, and ``{current key: older key}`` of those renamed (so errors can name
    the key as written). Both spellings given: see :data:`KEY_ALIASES`."""
    cls = cls or RecipeConfig
    if not isinstance(data, dict):
        return data, {}
    out, spelled = dict(data), {}
    for old, new in KEY_ALIASES.items():
        *osec, okey = old.split(".")
        src = _section(out, osec, create=False)
        if src is None or okey not in src:
            continue
        *nsec, nkey = new.split(".")
        dst = _section(out, nsec, create=True)
        if dst is None:
            continue      # the section is no mapping: _build reports it
        value = src.pop(okey)
        if nkey in dst and dst[nkey] != value and dst[nkey] != _field_default(cls, new.split(".")):
            _contradiction(old, value, new, dst[nkey])
        dst[nkey] = value
        spelled[new] = old
    return out, spelled


def canonical_keys(data: dict, cls=None) -> dict:
    """A config dict (one saved by an older version included) under the current keys."""
    return resolve_aliases(data, cls)[0]


def key_spellings(key: str) -> tuple:
    """Every spelling of the dotted config ``key``: itself, its current name and its older ones."""
    new = KEY_ALIASES.get(key, key)
    return (new,) + tuple(old for old, n in KEY_ALIASES.items() if n == new)


def _written(cfg, key: str) -> str:
    """``key`` as the config ``cfg`` was given it (its older spelling where that was used)."""
    return (getattr(cfg, "_spelled", None) or {}).get(key, key)


def accepts_older_keys(cls):
    """Class decorator for a config dataclass: its constructor takes the older top-level
    spellings of :data:`KEY_ALIASES` as keywords, and each is an attribute reading and
    writing the current field (``RunConfig(recipe="official").recipe == "official"``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    olds = {old: new for old, new in KEY_ALIASES.items() if "." not in old and new in names}
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kw):
        spelled = {}
        for old, new in olds.items():
            if old in kw:
                value = kw.pop(old)
                if new in kw and kw[new] != value and kw[new] != _field_default(cls, (new,)):
                    _contradiction(old, value, new, kw[new])
                kw[new], spelled[new] = value, old
        init(self, *args, **kw)
        if spelled:
            self._spelled = spelled

    cls.__init__ = __init__
    for old, new in olds.items():
        setattr(cls, old, property(lambda self, n=new: getattr(self, n),
                                   lambda self, v, n=new: setattr(self, n, v),
                                   doc=f"The older spelling of :attr:`{new}`."))
    return cls


def recipe_field(name: str):
    """A field of another config dataclass that is the recipe's top-level key ``name``
    (same default and help), so the run config does not document it a second time."""
    f = next(f for f in dataclasses.fields(RecipeConfig) if f.name == name)
    return field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


@accepts_older_keys
@dataclass
class RecipeConfig:
    """What :class:`seekr_kernels.SeekrRecipe` needs, without the rest of a run. Built from a
    run with :meth:`RunConfig.recipe_config`, from a dict with :func:`recipe_from_dict`
    (``preset: official`` applies as in a run config)."""
    method: str = _f("seekr", "Continual-learning method: 'sft' (no replay), 'replay' (CE on replay batches), "
                              "'replay+logits' (+ logits distillation) or 'seekr' (+ attention distillation of "
                              "the selected heads).")
    preset: str = _f("package", "'package' or 'official': every key left unset takes the published SEEKR "
                                "code's value (a key set explicitly wins).")
    seed: int = _f(42, "Seed of the recipe's draws (replay subsets, replay order, query rows, sampled teachers).")
    replay: ReplayConfig = _f(help="Replay memory and schedule.", default_factory=ReplayConfig)
    distill: DistillConfig = _f(help="SEEKR losses, budgets and statistics.", default_factory=DistillConfig)
    batch_size: int = _f(16, "The global train batch of one optimiser step (the default replay batch).")
    grad_accum: int = _f(1, "Accumulation micro-steps per optimiser step.")
    pad_to_multiple_of: int = _f(8, "Padding multiple of replay batches (and of the replay set under the "
                                    "official statistics).")
    capture_batch_size: int = _f(32, "Samples per forward pass of teacher capture and forgettability.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    _preset_applied = False

    def validate(self) -> "RecipeConfig":
        """Check values; raise :class:`ConfigError` naming the key."""
        _choice(_written(self, "preset"), self.preset, PRESETS)
        if self.preset == "official" and not self._preset_applied:
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


#: What ``preset: official`` sets (the published code, jinghan1he/SEEKR training/seekr.py
#: and scripts/exp_seq_seekr.sh, on 8 GPUs x 2 samples x 8 accumulation steps). The layer
#: and head budgets, left unset, take the published script's numbers for every model
#: (:data:`OFFICIAL_BUDGETS`) instead of the package's scaled defaults; the recipe resolves
#: them against the model's shape (``SeekrRecipe._set_shape``, clamped with a warning).
OFFICIAL = {
    "train": {"batch_size": 128, "grad_accum": 8, "lr": 1e-5, "weight_decay": 0.0, "betas": [0.9, 0.95],
              "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "pad_to_multiple_of": 8,
              "max_prompt_len": 1024, "max_answer_len": 512, "order": "fixed", "batching": "per_device",
              "optimizer_scope": "run"},
    "replay": {"ratio": 0.01, "subset": "first", "in_accumulation": True, "order": "fixed",
               "outnumbered": "skip"},
    "distill": {"logits_weight": 0.5, "attn_weight": 1000.0, "query_budget": 0, "sensitivity_region": "full",
                "attn_log_eps": 1e-8, "forgettability_norm": "official", "sensitivity_padding": "official",
                "padded_rows": "official", "query_sampling": "official", "logits_positions": "published",
                "head_selection": "published"},
}
#: ``distill.layer_budget`` / ``head_budget`` under ``preset: official`` when unset: the
#: published script's values (scripts/exp_seq_seekr.sh), whatever the model's shape (the
#: package scales its defaults: 30 / 200 at 40 layers x 40 heads).
OFFICIAL_BUDGETS = {"layer_budget": 24, "head_budget": 128}
#: The train keys of :data:`OFFICIAL` that are top-level keys of a :class:`RecipeConfig`.
_RECIPE_TRAIN_KEYS = ("batch_size", "grad_accum", "pad_to_multiple_of")


def official_value(path: tuple):
    """What ``preset: official`` sets the recipe key ``path`` (``("replay", "subset")``,
    ``("batch_size",)``) to; :data:`dataclasses.MISSING` where the preset leaves it."""
    if len(path) == 1:
        return OFFICIAL["train"][path[0]] if path[0] in _RECIPE_TRAIN_KEYS else dataclasses.MISSING
    return OFFICIAL.get(path[0], {}).get(path[1], dataclasses.MISSING)


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
            sub, names = obj, set(_RECIPE_TRAIN_KEYS)
        else:
            names = set(vals)
        defaults = type(sub)()
        for k, v in vals.items():
            if k in names and hasattr(sub, k) and getattr(sub, k) == getattr(defaults, k):
                setattr(sub, k, list(v) if isinstance(v, list) else v)
    obj._preset_applied = True


def _err(key, msg):
    raise ConfigError(f"{key}: {msg}")


def _coerce(value, tp, key, spelled=None):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, spelled)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _err(key, f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key, spelled)
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


def _build(cls, data: dict, prefix: str = "", spelled: Optional[dict] = None):
    """``cls`` from the dict ``data`` (current keys: :func:`resolve_aliases`); errors name a
    key as ``spelled`` says it was written."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    spelled = spelled or {}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        key = spelled.get(key, key)
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
                items.append(item if isinstance(item, sub) else _build(sub, item, ik, spelled))
            kwargs[k] = items
        else:
            kwargs[k] = _coerce(v, hints[k], key, spelled)
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
    _choice(p + "padded_rows", d.padded_rows, ("zero", "official"))
    _choice(p + "query_sampling", d.query_sampling, ("subset", "official"))
    _choice(p + "head_selection", d.head_selection, ("stable", "published"))


#: k of a topk / sampled logits teacher when ``distill.teacher_logits_k`` is not given:
#: the recommended k of benchmarks/results/README.md (1.7% KL error, gradient cosine 0.998).
DEFAULT_TEACHER_LOGITS_K = 256


def _validate_teacher_logits(d, p="distill."):
    """``teacher_logits``, ``teacher_logits_k``, the older ``teacher_logits_topk``,
    ``logits_positions`` and ``fused_lm_head``; resolves the older spelling, the default k
    and ``logits_positions: answer`` in place (so the resolved config validates again
    unchanged)."""
    _positive(p + "teacher_logits_topk", d.teacher_logits_topk, allow_zero=True)
    _choice(p + "teacher_logits", d.teacher_logits, ("dense", "topk", "sampled"))
    if d.logits_positions == "answer":      # the positions' other name: stored as 'published'
        d.logits_positions = "published"
    _choice(p + "logits_positions", d.logits_positions, LOGITS_POSITIONS)
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


def vocabulary_size(model) -> Optional[int]:
    """The output vocabulary of an (unwrapped) causal LM: its output embeddings' rows, else
    ``config.vocab_size``; None when neither is known."""
    get = getattr(model, "get_output_embeddings", None)
    shape = getattr(getattr(get() if callable(get) else None, "weight", None), "shape", None)
    if shape is not None and len(shape) == 2 and shape[0] > 0:
        return int(shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if isinstance(v, int) else None


def check_vocabulary(cfg: "RecipeConfig", model, p: str = "distill.") -> Optional[str]:
    """Where the recipe meets the model (the vocabulary is known only then): a
    ``teacher_logits_k`` above the vocabulary (:func:`vocabulary_size`; ``model`` may be
    the size itself) is clamped to it, with a warning naming the key, and the message is
    returned (None when nothing is clamped). A top-k teacher with k >= V keeps every logit
    (the dense teacher's values, stored sparse); a sampled one draws V tokens per
    position. Not refused: the default k (256) exceeds the vocabulary of small test
    models, where the clamped teacher is what was asked for."""
    d = cfg.distill
    vocab_size = model if isinstance(model, int) else vocabulary_size(model)
    if (cfg.method not in ("replay+logits", "seekr") or d.teacher_logits == "dense" or not vocab_size
            or d.teacher_logits_k is None or d.teacher_logits_k <= vocab_size):
        return None
    what = ("keeps all of them (the dense teacher's values)" if d.teacher_logits == "topk"
            else f"draws {vocab_size} tokens per position")
    msg = (f"{p}teacher_logits_k: {d.teacher_logits_k} is more than the model's vocabulary ({vocab_size} tokens); "
           f"clamped to {vocab_size}: the {d.teacher_logits} teacher {what}")
    import warnings
    warnings.warn(msg, UserWarning, stacklevel=3)
    return msg


def recipe_from_dict(data: Optional[dict] = None, validate: bool = True) -> RecipeConfig:
    """Build a :class:`RecipeConfig` from a plain dict (``replay``/``distill`` sections,
    ``method``, ``preset``, ``seed``, ``batch_size``, ...; older key spellings through
    :data:`KEY_ALIASES`); ``preset: official`` fills in the published values under the keys
    given."""
    data, spelled = resolve_aliases(dict(data or {}))
    official = data.get("preset", "package") == "official"
    if official:
        data = _merge_preset(data, {k: v for k, v in OFFICIAL.items() if k != "train"})
        for k in _RECIPE_TRAIN_KEYS:
            data.setdefault(k, OFFICIAL["train"][k])
    cfg = _build(RecipeConfig, data, spelled=spelled)
    if spelled:
        cfg._spelled = spelled
    cfg._preset_applied = official
    return cfg.validate() if validate else cfg
