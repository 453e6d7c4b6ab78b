"""Evaluate a run from its output directory (``seekr eval --run DIR [--matrix]``) with the
run's own settings: prompt/answer lengths, ``eval`` section (split, batch size, generation
options, seed), each task's metric and the run's tokenizer.

Checkpoint layout this module reads (:func:`task_checkpoint`, :func:`load_checkpoint_model`):
``<run>/checkpoints/task-NNN/`` (NNN: 0-based task index, 3 digits) is the model after
task NNN, either a Hugging Face folder (``save_pretrained``, sharded or not) or a PEFT
adapter folder (``adapter_config.json``) on the run's base model; the tokenizer is saved
in it too (else the run's ``model.tokenizer`` / ``model.path`` / built-in tokenizer). The
matrix needs every task's folder (``keep_checkpoints: all``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import torch

from ..seekr.config import ConfigError
from .config import ModelConfig, RunConfig, from_dict, task_name
from .evaluate import GenerationOptions
from .preflight import eval_split
from .rundir import RunStateError, read_run_state


@dataclasses.dataclass
class EvalSettings:
    """How a model is evaluated (from a run's config, overridable per field); ``generation``
    holds the decoding options (greedy by default)."""
    split: str = "test"
    batch_size: int = 32
    max_prompt_len: int = 512
    max_answer_len: int = 512
    max_new_tokens: Optional[int] = None
    max_samples: Optional[int] = None
    generation: GenerationOptions = dataclasses.field(default_factory=GenerationOptions)
    precision: str = "fp32"

    @classmethod
    def from_run(cls, cfg: RunConfig) -> "EvalSettings":
        e, t = cfg.eval, cfg.train
        return cls(split=e.split, batch_size=e.batch_size, max_prompt_len=t.max_prompt_len,
                   max_answer_len=t.max_answer_len, max_new_tokens=e.max_new_tokens, max_samples=e.max_samples,
                   generation=GenerationOptions.from_config(e, cfg.seed), precision=t.precision)

    def autocast(self, device: torch.device):
        """The autocast dtype training used on this device type (None on CPU unless bf16)."""
        if self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda"):
            return torch.bfloat16
        if self.precision == "fp16" and device.type == "cuda":
            return torch.float16
        return None


def load_run(run_dir: str):
    """``(state, config)`` of a run directory: its checked ``state.json`` and the saved
    config as a :class:`RunConfig` (not re-validated: another machine may lack what the
    training machine had)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run: {run_dir} is not a directory")
    st = read_run_state(run_dir)
    if st is None:
        raise RunStateError(f"{os.path.join(run_dir, 'state.json')}: missing (not a seekr run directory, or no "
                            "task has finished yet)")
    if not isinstance(st.get("config"), dict):
        raise RunStateError(f"{os.path.join(run_dir, 'state.json')}: holds no 'config'")
    try:
        cfg = from_dict(st["config"], validate=False)
    except ConfigError as e:
        raise RunStateError(f"{os.path.join(run_dir, 'state.json')}: saved config: {e}") from None
    return st, cfg


def task_checkpoint(run_dir: str, t: int) -> str:
    """The folder of the model after task ``t`` (0-based)."""
    return os.path.join(run_dir, "checkpoints", f"task-{t:03d}")


def final_checkpoint(run_dir: str, st: dict) -> str:
    """The model after the run's last completed task (else the checkpoint state.json names)."""
    done = int(st.get("completed", 0))
    if done:
        p = task_checkpoint(run_dir, done - 1)
        if os.path.isdir(p):
            return p
    ck = st.get("checkpoint")
    if not ck:
        raise RunStateError(f"{os.path.join(run_dir, 'state.json')}: names no checkpoint")
    return os.path.join(run_dir, ck)


def _has_tokenizer(path: str) -> bool:
    from .preflight import _TOKENIZER_FILES
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def load_checkpoint_model(path: str, model_cfg: Optional[ModelConfig] = None, *, tokenizer=None,
                          seed: int = 0, device=None):
    """``(model, tokenizer)`` from a checkpoint folder of a run.

    ``path``: a Hugging Face model folder (``save_pretrained``: config.json and weights,
    sharded or not), or a PEFT adapter folder (``adapter_config.json``), which is applied
    to the run's base model (``model_cfg.path``, or the tiny Llama built from
    ``model_cfg.arch`` with ``seed``) and merged. The tokenizer comes from ``path`` when
    saved there, else from ``model_cfg`` (``tokenizer``, ``path``, built-in), unless given.
    """
    from .models import build_model, build_tokenizer
    from .data import load_tokenizer
    mcfg = model_cfg or ModelConfig()
    if "lora" in {f.name for f in dataclasses.fields(mcfg)}:
        mcfg = dataclasses.replace(mcfg, lora=None)   # the checkpoint brings its own adapters
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint folder is missing")
    if tokenizer is None:
        tokenizer = load_tokenizer(path) if _has_tokenizer(path) else build_tokenizer(mcfg)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        try:
            from peft import PeftModel
        except ImportError:
            raise ImportError(f"{path}: a LoRA adapter checkpoint needs the 'peft' package (pip install peft)") \
                from None
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            named = json.load(f).get("base_model_name_or_path")
        if named and os.path.isdir(named):     # the base the adapter names (a run saves it)
            model = build_model(dataclasses.replace(mcfg, path=path, tokenizer=None, arch={}), tokenizer, seed)
            model = model.merge_and_unload()
        else:                                  # else the run's own base model
            base = build_model(dataclasses.replace(mcfg, tokenizer=None), tokenizer, seed)
            model = PeftModel.from_pretrained(base, path, is_trainable=False).merge_and_unload()
    elif os.path.isfile(os.path.join(path, "config.json")):
        model = build_model(dataclasses.replace(mcfg, path=path, tokenizer=None, arch={}), tokenizer, seed)
    else:
        raise FileNotFoundError(f"{path}: neither a model (config.json) nor a LoRA adapter "
                                "(adapter_config.json) folder")
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} but no CUDA device is available here")
    return dev


def evaluate_tasks(model, tokenizer, tasks: Sequence, settings: EvalSettings, device,
                   keep_predictions: int = 0) -> list:
    """Evaluate ``model`` on each task (its ``metric``); one result dict per task."""
    from .evaluate import evaluate_examples
    out = []
    for i, task in enumerate(tasks):
        exs = eval_split(task, settings.split, warn=True, where=f"task {task.name}")
        if settings.max_samples:
            exs = exs[: settings.max_samples]
        r = evaluate_examples(model, tokenizer, exs, metric=task.metric, max_prompt_len=settings.max_prompt_len,
                              max_answer_len=settings.max_answer_len, batch_size=settings.batch_size,
                              max_new_tokens=settings.max_new_tokens, device=device,
                              autocast_dtype=settings.autocast(device), keep_predictions=keep_predictions,
                              generation=settings.generation)
        out.append(r)
    return out


def run_tasks(cfg: RunConfig) -> list:
    """The run's tasks, loaded from their (absolute) paths with the run's names and metrics."""
    from .data import load_task
    tasks = []
    for i, ts in enumerate(cfg.tasks):
        if not os.path.exists(ts.path):
            raise FileNotFoundError(f"tasks[{i}].path: {ts.path} does not exist (moved since the run?)")
        tasks.append(load_task(ts.path, task_name(ts), checked_metric(ts.metric, task_name(ts), f"tasks[{i}].metric")))
    return tasks


def checked_metric(metric: str, name: str, key: str) -> str:
    """``metric`` with ``auto`` resolved for task ``name``, loadable here (else a
    :class:`ConfigError` naming ``key``)."""
    from .evaluate import get_metric, resolve_metric_name
    metric = resolve_metric_name(metric, name)
    try:
        get_metric(metric)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"{key}: {str(e).removeprefix('metric: ')}") from None
    return metric


def rebuild_matrix(run_dir: str, settings: EvalSettings, device, *, progress=None) -> dict:
    """The accuracy matrix of a run from its per-task checkpoints: the model after task i
    on tasks 0..i (a partial run gives the rows of its completed tasks).

    Returns ``{"tasks", "matrix", "loglik", "complete", "OP", "BWT"}`` (OP/BWT when every
    task is complete), the layout of the run's ``results.json``."""
    from . import metrics
    st, cfg = load_run(run_dir)
    done = int(st["completed"])
    missing = [t for t in range(done) if not os.path.isdir(task_checkpoint(run_dir, t))]
    if missing:
        raise FileNotFoundError(f"--matrix: {task_checkpoint(run_dir, missing[0])} is missing ({len(missing)} of "
                                f"{done} task checkpoints); the matrix needs every task's checkpoint: train with "
                                "keep_checkpoints: all")
    tasks = run_tasks(cfg)
    rows, ll_rows = [], []
    tok = None
    for t in range(done):
        model, tok = load_checkpoint_model(task_checkpoint(run_dir, t), cfg.model, tokenizer=tok, seed=cfg.seed,
                                           device=device)
        res = evaluate_tasks(model, tok, tasks[: t + 1], settings, device)
        rows.append([r["score"] for r in res])
        ll_rows.append([r["loglik"] for r in res])
        if progress:
            progress(t, tasks, rows[-1])
        del model
    T = len(tasks)
    out = {"method": cfg.method, "tasks": [t.name for t in tasks], "complete": done == T,
           "matrix": metrics.partial_matrix(rows, T), "loglik": metrics.partial_matrix(ll_rows, T)}
    if done == T:
        out["OP"] = metrics.overall_performance(out["matrix"])
        out["BWT"] = metrics.backward_transfer(out["matrix"])
    return out
