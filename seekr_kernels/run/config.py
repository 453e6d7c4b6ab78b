"""Run configuration: nested dataclasses loaded from YAML (or a dict), validated by key.

Every unknown key and every value of the wrong type or out of range is a
:class:`ConfigError` naming the key by its dotted path (``train.lr``, ``tasks[2].path``).

Example ``run.yaml``::

    method: seekr                 # sft | replay | replay+logits | seekr
    output_dir: runs/trace
    seed: 42
    model:
      path: /models/llama-2-7b    # local Hugging Face directory; omit for a tiny Llama
    tasks:
      - {name: C-STANCE, path: data/TRACE/C-STANCE, epochs: 5}
      - {name: FOMC, path: data/TRACE/FOMC, epochs: 3}   # metric: auto -> trace:FOMC
    train: {batch_size: 16, lr: 1.0e-5, precision: auto}
    replay: {ratio: 0.01}
    distill: {logits_weight: 0.5, attn_weight: 1000, head_budget: 128, query_budget: 100}

Paths (``output_dir``, ``model.path``, ``model.tokenizer``, ``tasks[i].path``) are relative
to the config file's folder (:func:`load_config`; the working directory for
:func:`from_dict`) and kept absolute. ``train.report_to`` picks the logging backends
(:mod:`seekr_kernels.run.runlog`). Checks that need the machine or the files
(devices, kernels, folders, data, a saved run) run before training
(:mod:`seekr_kernels.run.preflight`).

The ``method``, ``preset`` and ``seed`` keys, the ``replay`` and ``distill`` sections, the
``preset: official`` preset, the older key spellings (:data:`~seekr_kernels.seekr.config.KEY_ALIASES`:
``recipe:`` is read as ``preset:``) and the key checks are the recipe's
(:mod:`seekr_kernels.seekr.config`, where each of those keys is documented). A key the
config sets explicitly always wins over the preset (``preset: official`` + ``distill:
{attn_log_eps: 0}`` = published recipe with the exact attention log). A
:class:`RunConfig` built in Python with ``preset="official"`` gets the preset on every
field still at its package default when validated.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..seekr.config import (_LIST_TYPES, METHODS, OFFICIAL, PRESETS, ConfigError, DistillConfig, RecipeConfig,
                            ReplayConfig, _apply_preset_to_defaults, _build, _choice, _err, _merge_preset,
                            _positive, _validate_distill, _validate_replay, _written, accepts_older_keys,
                            key_spellings, recipe_field, resolve_aliases)


# ---------------------------------------------------------------- LoRA and checkpoint keys
# (model.lora; train.save_steps, save_total_limit, max_steps, max_shard_size,
# optimizer_scope, precision fp16: see _validate_checkpointing)

@dataclass
class LoRAConfig:
    """``model.lora``: train LoRA adapters (PEFT) instead of the full model.

    ``r``, ``alpha`` (``lora_alpha``), ``dropout`` (``lora_dropout``) and
    ``target_modules`` (module names, or ``"all-linear"``) are PEFT's ``LoraConfig``
    fields. Checkpoints hold the adapters only; ``save`` says what the finished run
    writes to ``output_dir/final``: ``merged`` (default: a plain Hugging Face model with
    the adapters merged into the weights, loadable by any tool without PEFT) or
    ``adapter`` (the adapters alone, ``adapter_config.json`` naming the base model:
    ``model.path``, or ``output_dir/base`` for a model built from ``model.arch``).
    Needs the ``peft`` package (``pip install 'seekr-kernels[lora]'``).
    """
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = field(default_factory=lambda: ["q_proj", "v_proj"])
    save: str = "merged"                # merged | adapter


@dataclass
class ModelConfig:
    """Where the model comes from.

    ``path``: a local Hugging Face model directory (``from_pretrained``, no downloads).
    Without it a small Llama is built from ``arch`` (LlamaConfig fields) with the built-in
    character tokenizer over ``alphabet``.
    """
    path: Optional[str] = None
    tokenizer: Optional[str] = None
    arch: dict = field(default_factory=dict)
    alphabet: Optional[str] = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    lora: Optional[LoRAConfig] = None   # null: full fine-tuning


@dataclass
class TaskSpec:
    """One task of the stream. ``metric`` scores its generated answers (names in
    :mod:`seekr_kernels.run.evaluate`): ``auto`` (default) is TRACE's metric for a task
    named like a TRACE task (``trace:<task>``) and ``exact_match`` otherwise; validation
    replaces ``auto`` by the metric it stands for and checks that the metric can be loaded."""
    name: Optional[str] = None
    path: Optional[str] = None
    epochs: Optional[int] = None
    metric: str = "auto"


@dataclass
class TrainConfig:
    """Optimisation. ``batch_size`` is the global batch of one optimiser step (all ranks and
    accumulation micro-steps together); each micro-step on each rank sees
    ``batch_size / (world_size * grad_accum)`` samples. ``max_grad_norm`` clips the global
    gradient norm before every optimiser step, at 1.0 by default as in the published code and
    the Hugging Face Trainer (0: no clipping; the default was 0 before)."""
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    schedule: str = "constant"          # constant | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: float = 1.0          # 0: no clipping
    max_prompt_len: int = 512
    max_answer_len: int = 512
    pad_to_multiple_of: int = 8
    precision: str = "auto"             # auto (bf16 autocast on CUDA) | fp32 | bf16 | fp16 (autocast + GradScaler)
    gradient_checkpointing: bool = False
    shuffle: bool = True
    order: str = "reshuffle"            # reshuffle: a new order every epoch | fixed: epoch 0's order every epoch
    batching: str = "global"            # global: batches of batch_size, a short last one trained | per_device: published
    # --- checkpoints (README "Checkpoints and resume")
    save_steps: int = 0                 # a mid-task checkpoint every N optimiser steps; 0: task ends only
    save_total_limit: Optional[int] = 2  # mid-task checkpoints kept (newest); null: all
    max_steps: int = 0                  # stop after N optimiser steps in all (a smoke run); 0: no limit
    max_shard_size: str = "5GB"         # save_pretrained's shard size of checkpoint weights
    optimizer_scope: str = "task"       # task: a fresh AdamW + schedule per task | run: one for the run (published)
    num_threads: Optional[int] = None   # torch CPU threads per process; null: preflight.num_threads decides
    # --- logging (Hugging Face's key and values; log.jsonl is always written)
    report_to: Any = "none"             # tensorboard | wandb | mlflow | none | all, or a list of them


@dataclass
class EvalConfig:
    """Evaluation after each task: generated answers scored by each task's metric.

    Generation is greedy unless ``do_sample``; the published repeated inference is
    ``do_sample: true, temperature: 0.1, num_repeats: 2`` (with Llama-2-chat, also
    ``top_p: 0.9``, its own default); ``seed`` null means the run's seed."""
    split: str = "test"
    batch_size: int = 32
    max_new_tokens: Optional[int] = None   # default: train.max_answer_len
    max_samples: Optional[int] = None
    keep_predictions: int = 5
    # --- generation options (sampling = the published repeated inference)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50                     # 0: off
    num_repeats: int = 1                # answers per prompt, each scored; the mean is reported
    seed: Optional[int] = None          # default: the run's seed


@dataclass
class LogConfig:
    """Progress bars and the logging interval (``every`` optimiser steps). Where the logs
    go is ``train.report_to``; ``tensorboard: true`` is a deprecated alias of
    ``train.report_to: [tensorboard]`` (a warning, then added to it)."""
    progress: bool = True
    tensorboard: bool = False
    every: int = 1


@dataclass
class DistributedConfig:
    strategy: str = "ddp"               # ddp | fsdp (used when launched by torchrun)
    backend: str = "auto"               # auto: nccl on CUDA, gloo on CPU


@accepts_older_keys
@dataclass
class RunConfig:
    """A run of the package's trainer (``seekr train``). ``method``, ``preset``, ``seed``,
    ``replay`` and ``distill`` are the recipe's keys (:class:`RecipeConfig`)."""
    method: str = recipe_field("method")
    preset: str = recipe_field("preset")
    output_dir: str = "seekr-run"
    seed: int = recipe_field("seed")
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    keep_checkpoints: str = "last"      # last | all
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list = field(default_factory=list)   # list[TaskSpec]
    train: TrainConfig = field(default_factory=TrainConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Check values (ranges, choices); raise :class:`ConfigError` naming the key.
        Relative paths left (a config built in Python) become absolute against the
        working directory."""
        _choice(_written(self, "preset"), self.preset, PRESETS)
        if self.preset == "official" and not self._preset_applied:
            _apply_preset_to_defaults(self)
        _validate(self)
        resolve_paths(self)
        return self

    # Not a field: set once the official preset is merged (from_dict merges it under the
    # user's keys; validate() fills default-valued fields of a config built in Python).
    _preset_applied = False

    def recipe_config(self) -> "RecipeConfig":
        """The parts of this run the SEEKR recipe needs (see :class:`RecipeConfig`)."""
        t = self.train
        rc = RecipeConfig(method=self.method, preset=self.preset, seed=self.seed,
                          replay=dataclasses.replace(self.replay),
                          distill=dataclasses.replace(self.distill),
                          batch_size=t.batch_size, grad_accum=t.grad_accum,
                          pad_to_multiple_of=t.pad_to_multiple_of,
                          capture_batch_size=self.eval.batch_size)
        # The run's values are final (preset and explicit keys resolved): a value the user
        # set equal to a package default must not be taken for an unset one.
        rc._preset_applied = True
        return rc


_LIST_TYPES[("RunConfig", "tasks")] = TaskSpec


def _validate(c: RunConfig):
    _choice("method", c.method, METHODS)
    _choice("keep_checkpoints", c.keep_checkpoints, ("last", "all"))
    if not (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:")):
        _err("device", f"must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    _choice("model.dtype", c.model.dtype, ("float32", "bfloat16", "float16"))
    t = c.train
    for k in ("batch_size", "grad_accum", "epochs", "max_prompt_len", "max_answer_len", "pad_to_multiple_of"):
        _positive(f"train.{k}", getattr(t, k))
    _positive("train.lr", t.lr)
    for k in ("weight_decay", "warmup_steps", "max_grad_norm"):
        _positive(f"train.{k}", getattr(t, k), allow_zero=True)
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
        _err("train.betas", f"expected two numbers in [0, 1), got {t.betas!r}")
    _choice("train.schedule", t.schedule, ("constant", "linear", "cosine"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))
    if t.batch_size % t.grad_accum:
        _err("train.grad_accum", f"must divide train.batch_size={t.batch_size}, got {t.grad_accum}")
    _choice("train.order", t.order, ("reshuffle", "fixed"))
    _positive("train.num_threads", t.num_threads)
    _choice("train.batching", t.batching, ("global", "per_device"))
    if t.batching == "per_device" and t.grad_accum > 1 and c.method != "sft" and not c.replay.in_accumulation:
        _err("train.batching", "per_device (the published DeepSpeed loop) replays inside the accumulation window: "
                               "it needs replay.in_accumulation: true with train.grad_accum > 1")
    _validate_checkpointing(c)
    _validate_replay(c.replay, "replay.")
    _validate_distill(c.distill, "distill.")
    e = c.eval
    _choice("eval.split", e.split, ("train", "eval", "test"))
    _positive("eval.batch_size", e.batch_size)
    _positive("eval.max_new_tokens", e.max_new_tokens)
    _positive("eval.max_samples", e.max_samples)
    _positive("eval.keep_predictions", e.keep_predictions, allow_zero=True)
    _validate_generation(e)
    _positive("log.every", c.log.every)
    _choice("distributed.strategy", c.distributed.strategy, ("ddp", "fsdp"))
    _choice("distributed.backend", c.distributed.backend, ("auto", "gloo", "nccl"))
    if not c.tasks:
        _err("tasks", "at least one task is needed")
    for i, ts in enumerate(c.tasks):
        if not ts.path:
            _err(f"tasks[{i}].path", "is required")
        _positive(f"tasks[{i}].epochs", ts.epochs)
    names = [ts.name or _default_name(ts.path) for ts in c.tasks]
    if len(set(names)) != len(names):
        _err("tasks", f"task names must be unique, got {names}")
    _validate_metrics(c.tasks, names)
    _validate_arch(c.model)
    _validate_report_to(c)


def _validate_report_to(c: RunConfig):
    import warnings

    from .runlog import resolve_report_to
    c.train.report_to = resolve_report_to(c.train.report_to, "train.report_to")
    if c.log.tensorboard:
        warnings.warn("log.tensorboard is deprecated: use train.report_to: [tensorboard]", FutureWarning,
                      stacklevel=3)
        c.train.report_to = resolve_report_to(c.train.report_to + ["tensorboard"], "log.tensorboard")
        c.log.tensorboard = False


#: LlamaConfig fields that are sizes (positive integers when given).
_ARCH_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "head_dim")


def _validate_arch(m: ModelConfig):
    """``model.arch``: known LlamaConfig fields, positive sizes, heads that divide the
    hidden size and key/value heads that divide the heads (of the model it builds: the
    package's tiny defaults under the given fields)."""
    if not m.arch:
        return
    from transformers import LlamaConfig
    known = set(LlamaConfig().to_dict()) | {"head_dim"}
    for k, v in m.arch.items():
        key = f"model.arch.{k}"
        if k not in known:
            _err(key, "unknown LlamaConfig field")
        if k in _ARCH_SIZES and v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            _err(key, f"must be a positive integer, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            _err(key, f"expected a finite number, got {v!r}")
    if m.path:
        return      # a model directory brings its own architecture
    from .models import TINY_ARCH
    a = {**TINY_ARCH, **m.arch}
    H, KV = a["num_attention_heads"], a.get("num_key_value_heads") or a["num_attention_heads"]
    if "head_dim" not in m.arch and a["hidden_size"] % H:
        _err("model.arch.num_attention_heads", f"{H} heads do not divide hidden_size={a['hidden_size']}")
    if H % KV:
        _err("model.arch.num_key_value_heads", f"{KV} key/value heads do not divide num_attention_heads={H}")
    eps = a.get("rms_norm_eps")
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        _err("model.arch.rms_norm_eps", f"must be a finite number > 0, got {eps!r}")


def _validate_checkpointing(c: RunConfig):
    """The LoRA, checkpoint, max_steps and fp16 keys."""
    t = c.train
    _positive("train.save_steps", t.save_steps, allow_zero=True)
    _positive("train.save_total_limit", t.save_total_limit)
    _positive("train.max_steps", t.max_steps, allow_zero=True)
    _choice("train.optimizer_scope", t.optimizer_scope, ("task", "run"))
    if t.optimizer_scope == "run" and t.schedule != "constant":
        _err("train.optimizer_scope", f"'run' needs train.schedule: constant (a {t.schedule} decay would need "
                                      f"the whole run's step count in advance), got {t.schedule!r}")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*", str(t.max_shard_size), re.IGNORECASE):
        _err("train.max_shard_size", f"expected a size such as '5GB' or '200MB', got {t.max_shard_size!r}")
    if t.precision == "fp16" and c.model.dtype != "float32" and c.model.lora is None:
        _err("train.precision", f"fp16 (autocast + gradient scaler) needs float32 trainable weights; "
                                f"model.dtype is {c.model.dtype} (use model.dtype: float32, or model.lora)")
    lo = c.model.lora
    if lo is None:
        return
    _positive("model.lora.r", lo.r)
    _positive("model.lora.alpha", lo.alpha)
    if not (math.isfinite(lo.dropout) and 0 <= lo.dropout < 1):
        _err("model.lora.dropout", f"must lie in [0, 1), got {lo.dropout}")
    tm = lo.target_modules
    if not ((isinstance(tm, str) and tm) or (isinstance(tm, list) and tm and all(isinstance(x, str) and x
                                                                                for x in tm))):
        _err("model.lora.target_modules", f"expected a non-empty list of module names or 'all-linear', got {tm!r}")
    _choice("model.lora.save", lo.save, ("merged", "adapter"))
    import importlib.util
    if importlib.util.find_spec("peft") is None:
        _err("model.lora", "needs the peft package: pip install peft (or 'seekr-kernels[lora]')")


def _validate_generation(e: EvalConfig):
    _positive("eval.temperature", e.temperature)
    if not 0 < e.top_p <= 1:
        _err("eval.top_p", f"must lie in (0, 1], got {e.top_p}")
    _positive("eval.top_k", e.top_k, allow_zero=True)
    _positive("eval.num_repeats", e.num_repeats)
    if e.num_repeats > 1 and not e.do_sample:
        _err("eval.num_repeats", "repeats of greedy decoding are identical; set eval.do_sample: true")


def _validate_metrics(tasks, names):
    # Resolve `auto` here, so the saved config (state.json) names the metric the run used,
    # and load each metric now: a missing package fails before training, not after a task.
    from .evaluate import get_metric, resolve_metric_name
    for i, (ts, name) in enumerate(zip(tasks, names)):
        if not isinstance(ts.metric, str):
            _err(f"tasks[{i}].metric", f"expected a string, got {ts.metric!r}")
        ts.metric = resolve_metric_name(ts.metric, name)
        try:
            get_metric(ts.metric)
        except (ValueError, ImportError) as e:
            _err(f"tasks[{i}].metric", str(e).removeprefix("metric: "))


def _default_name(path):
    import os
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def from_dict(data: dict, validate: bool = True, base_dir: Optional[str] = None) -> RunConfig:
    """Build a :class:`RunConfig` from a plain dict (e.g. parsed YAML; older key spellings
    through :data:`~seekr_kernels.seekr.config.KEY_ALIASES`).

    Relative paths (``output_dir``, ``model.path``, ``model.tokenizer``, ``tasks[i].path``)
    are made absolute against ``base_dir`` (default: the working directory), see
    :func:`resolve_paths`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    data, spelled = resolve_aliases(data, RunConfig)
    official = data.get("preset") == "official"
    cfg = _build(RunConfig, _merge_preset(data, OFFICIAL) if official else data, spelled=spelled)
    if spelled:
        cfg._spelled = spelled
    cfg._preset_applied = official
    resolve_paths(cfg, base_dir)
    return cfg.validate() if validate else cfg


def load_config(path: str, overrides: dict | None = None) -> RunConfig:
    """Read a YAML (or JSON) config file; ``overrides`` (dotted keys, see
    :func:`set_dotted`) are applied on top, as if written in the file (an override
    replaces the file's key under its other spelling too: ``preset=package`` over a file's
    ``recipe: official``).

    Every relative path in it (``output_dir``, ``model.path``, ``model.tokenizer``,
    ``tasks[i].path``, overrides included) is resolved against the config file's folder
    and kept absolute, so the saved config (``state.json``) works from any directory.
    """
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        for k, v in (overrides or {}).items():
            for other in key_spellings(k):      # the override wins over the file's other spelling
                if other != k:
                    _drop_dotted(data, other)
            set_dotted(data, k, v)
        cfg = from_dict(data, validate=False, base_dir=os.path.dirname(os.path.abspath(path)))
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def resolve_paths(cfg: RunConfig, base_dir: Optional[str] = None) -> RunConfig:
    """Make ``cfg``'s relative paths absolute against ``base_dir`` (default: the working
    directory): ``output_dir``, ``model.path``, ``model.tokenizer``, ``tasks[i].path``
    (``~`` expanded). Task placeholders like ``<name>`` (tasks given as objects) stay."""
    base = os.path.abspath(base_dir or os.getcwd())

    def rel(p):
        if not isinstance(p, str) or not p or (p.startswith("<") and p.endswith(">")):
            return p
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    cfg.output_dir = rel(cfg.output_dir)
    cfg.model.path = rel(cfg.model.path)
    cfg.model.tokenizer = rel(cfg.model.tokenizer)
    for ts in cfg.tasks:
        if isinstance(ts, TaskSpec):
            ts.path = rel(ts.path)
    return cfg


def _drop_dotted(data: dict, key: str) -> None:
    """Remove the dotted mapping key ``key`` from ``data`` where it is set."""
    *path, last = key.split(".")
    for p in path:
        data = data.get(p) if isinstance(data, dict) else None
    if isinstance(data, dict):
        data.pop(last, None)


_SEGMENT = re.compile(r"([^\[\]]*)((?:\[-?\d+\])*)")


def _key_parts(key: str) -> list:
    """``"tasks[0].epochs"`` / ``"tasks.0.epochs"`` -> ``["tasks", 0, "epochs"]``."""
    parts = []
    for seg in key.split("."):
        m = _SEGMENT.fullmatch(seg)
        if m is None or not seg:
            raise ConfigError(f"{key}: malformed key (expected names and indices: tasks.0.epochs "
                              "or tasks[0].epochs)")
        head = m.group(1)
        if head:
            parts.append(int(head) if re.fullmatch(r"-?\d+", head) else head)
        parts += [int(x) for x in re.findall(r"-?\d+", m.group(2))]
    return parts


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set one key of a config dict: ``set_dotted(d, "train.lr", 1e-4)`` sets
    ``d["train"]["lr"]`` (missing mappings are created); list items by index,
    ``tasks.0.epochs`` or ``tasks[0].epochs`` (a task given as a path string becomes
    ``{path: ...}``). A bad index or a key under a value that is not a mapping is a
    :class:`ConfigError` naming it; unknown names are reported by validation."""
    parts = _key_parts(key)
    cur = data
    where = ""
    for n, p in enumerate(parts):
        last = n == len(parts) - 1
        here = f"{where}[{p}]" if isinstance(p, int) else (f"{where}.{p}" if where else p)
        if isinstance(p, int):
            if not isinstance(cur, list):
                raise ConfigError(f"{key}: {where or 'the config'} is not a list (no index {p})")
            if not -len(cur) <= p < len(cur):
                raise ConfigError(f"{key}: index {p} out of range ({where} has {len(cur)} item(s))")
            if last:
                cur[p] = value
                return
            if where == "tasks" and isinstance(cur[p], str):
                cur[p] = {"path": cur[p]}
            nxt = cur[p]
        else:
            if not isinstance(cur, dict):
                raise ConfigError(f"{key}: {where} is not a mapping (no key {p!r})")
            if last:
                cur[p] = value
                return
            nxt = cur.get(p)
            if nxt is None:
                if isinstance(parts[n + 1], int):
                    raise ConfigError(f"{key}: {here} is not set, so it has no index {parts[n + 1]}")
                nxt = cur[p] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"{key}: {here} is {type(nxt).__name__} {nxt!r}, not a mapping or list")
        cur = nxt
        where = here


def task_name(spec: TaskSpec) -> str:
    return spec.name or _default_name(spec.path)
