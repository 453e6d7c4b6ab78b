"""A run's output directory: its layout, ``state.json`` (one reader), checkpoints (write,
verify, prune) and the resume decision with its config diff.

Layout (what :data:`RUN_ENTRIES` names)::

    state.json        the commit point: newest checkpoint, counters, rows, config; own checksum
    checkpoints/      step-NNNNNN (mid-task) and task-NNN (task end), see run.checkpoint
    memory/           the replay memory, one verified folder per task (seekr.memory)
    final/            the finished model; base/ the frozen base of a LoRA run on a built model
    log.jsonl, runlog.json, results.json, heatmap.png, tensorboard/, mlruns/, wandb/

A checkpoint is committed when ``state.json`` names it; a resumed run verifies the
checkpoint file by file, compares its config with the current one key by key
(:data:`RESUME_IGNORED` lists what may change) and checks the replay memory it was taken
with, before anything is loaded.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Optional, Sequence

from ..utils import store
from ..utils.store import atomic_save_json
from . import checkpoint
from .checkpoint import CheckpointError, ResumeError

STATE_VERSION = 2
STATE_KIND = "seekr-run"
TRAINER_KIND = "seekr-trainer-state"

#: What a run writes into its output directory: a folder holding any of these is a run
#: directory, and ``overwrite`` deletes these (nothing else).
RUN_ENTRIES = ("state.json", "results.json", "heatmap.png", "log.jsonl", "runlog.json", "checkpoints", "memory",
               "final", "base", "tensorboard", "mlruns", "wandb")

#: Config keys (and sections) a resumed run may change without being asked: they cannot
#: change a result (where files go, logging, progress, checkpoint cadence and shard size,
#: how many checkpoints are kept, how many predictions are logged, what the finished run
#: writes as its final model, max_steps, which stops a run without touching its
#: schedule, and the CPU thread count). Every other key, the number of processes, the device type and each task's
#: data are compared with the checkpoint's.
RESUME_IGNORED = ("output_dir", "log", "report_to", "train.report_to", "train.save_steps",
                  "train.save_total_limit", "train.max_steps", "train.max_shard_size", "keep_checkpoints",
                  "eval.keep_predictions", "model.lora.save", "train.num_threads")


class RunStateError(ValueError):
    """An output directory whose saved run state cannot be used (message names the file)."""


def read_run_state(out_dir: str, task_names: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The ``state.json`` of a run directory, checked; None when there is none.

    Raises :class:`RunStateError` naming the file when it is not a JSON object (a
    truncated write, an edit), when its checksum does not match, when ``completed`` is not
    a whole number in [0, number of tasks] or disagrees with the saved evaluation rows, or
    when the checkpoint it names is missing. ``task_names``: the config's tasks (bounds
    ``completed``). A resume reads it through :meth:`RunDirectory.read_state`, which adds
    the version checks."""
    p = os.path.join(out_dir, "state.json")
    if not os.path.exists(p):
        return None
    hint = "the run cannot resume from it: restore the file, or use another output_dir"
    try:
        with open(p, "rb") as f:
            st = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunStateError(f"{p}: damaged (truncated or not JSON: {e}); {hint}") from None
    except OSError as e:
        raise RunStateError(f"{p}: unreadable ({e.strerror})") from None
    if not isinstance(st, dict):
        raise RunStateError(f"{p}: damaged (expected a JSON object, got {type(st).__name__}); {hint}")
    if not store.is_sealed(st, optional=True):
        raise RunStateError(f"{p}: checksum mismatch (edited or damaged); {hint}")
    done = st.get("completed")
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise RunStateError(f"{p}: 'completed' must be a whole number >= 0, got {done!r}; {hint}")
    if task_names is not None and done > len(task_names):
        raise RunStateError(f"{p}: 'completed' is {done} but the config has {len(task_names)} task(s); {hint}")
    rows = st.get("rows")
    if rows is not None:
        if not isinstance(rows, list) or len(rows) != done:
            n = len(rows) if isinstance(rows, list) else rows
            raise RunStateError(f"{p}: 'completed' is {done} but {n} evaluation row(s) are saved (edited?); {hint}")
        for i, r in enumerate(rows):
            if not isinstance(r, list) or len(r) != i + 1:
                raise RunStateError(f"{p}: evaluation row {i} should hold {i + 1} score(s), got {r!r}; {hint}")
    ck = st.get("checkpoint")
    if done and ck is not None:
        if not isinstance(ck, str) or not os.path.isdir(os.path.join(out_dir, ck)):
            raise RunStateError(f"{p}: the checkpoint it names ({ck!r}) is missing from {out_dir}; {hint}")
    return st


def data_digests(tasks) -> list:
    """SHA-256 of each task's records (all splits): a resumed run must see the same data."""
    out = []
    for task in tasks:
        # json.dumps' default spacing, not canonical JSON: earlier runs recorded these digests
        out.append(store.digest_bytes(*(json.dumps([[e.prompt, e.answer] for e in getattr(task, split)]).encode()
                                        for split in ("train", "eval", "test"))))
    return out


class RunDirectory:
    """``output_dir`` of one run, seen from one process (``main`` writes; every process
    reads). Paths, ``state.json``, the checkpoints in it and the resume decision."""

    def __init__(self, out: str, *, main: bool = True, say=print):
        self.out = out
        self.main = main
        self._say = say

    # ---------------------------------------------------------------- layout
    @property
    def state_path(self) -> str:
        return os.path.join(self.out, "state.json")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.out, "checkpoints")

    @property
    def memory(self) -> str:
        return os.path.join(self.out, "memory")

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    # ---------------------------------------------------------------- state.json
    def read_state_quiet(self) -> dict:
        """state.json as found, {} when missing or unreadable (for messages only)."""
        try:
            with open(self.state_path, encoding="utf-8") as f:
                st = json.load(f)
            return st if isinstance(st, dict) else {}
        except (OSError, ValueError):
            return {}

    def read_state(self) -> dict:
        """state.json for a resume: read and checked by :func:`read_run_state`, then of
        this package's run-state version."""
        p = self.state_path
        if not os.path.exists(p):
            raise ResumeError(f"{p}: missing, but {self.out} holds checkpoints; {self.hint()}")
        try:
            st = store.read_json(p, "run state", ResumeError)
        except ResumeError as e:
            raise ResumeError(f"{e}; {self.hint()}") from None
        if st.get("kind") != STATE_KIND or st.get("version") != STATE_VERSION:
            if "completed" in st and isinstance(st.get("version"), int) and st["version"] < STATE_VERSION:
                raise ResumeError(f"{p}: written by an older seekr-kernels (state version {st.get('version')}, "
                                  "checkpoints without manifests); finish it with that version, or start over "
                                  "with --overwrite")
            raise ResumeError(f"{p}: not a seekr run state (version {st.get('version')!r}); {self.hint()}")
        if not store.is_sealed(st):
            raise ResumeError(f"{p}: checksum mismatch (edited or damaged: e.g. its completed count); "
                              f"{self.hint()}")
        return st

    def write_state(self, fields: dict, checkpoint_rel: str, final: Optional[str] = None) -> None:
        """state.json: the run's commit point (``fields``: counters, rows, config, ...,
        plus the newest checkpoint), under its own checksum, written atomically."""
        st = {"version": STATE_VERSION, "kind": STATE_KIND, **fields, "checkpoint": checkpoint_rel}
        if final:
            st["final"] = final
        store.seal(st)
        atomic_save_json(self.state_path, st)

    # ---------------------------------------------------------------- what the folder holds
    def holds_run(self) -> bool:
        if os.path.isfile(self.out):
            raise ResumeError(f"output_dir: {self.out} is a file, not a directory")
        return any(os.path.exists(self.path(n)) for n in ("state.json", "checkpoints", "memory", "log.jsonl"))

    def is_seekr_run(self) -> bool:
        """Evidence that output_dir was written by a seekr run (before deleting anything)."""
        st = self.read_state_quiet()
        if st.get("kind") == STATE_KIND or ("completed" in st and "checkpoint" in st):
            return True
        for _, _, p in checkpoint.list_checkpoints(self.checkpoints):
            if any(os.path.exists(os.path.join(p, f)) for f in (checkpoint.MANIFEST, checkpoint.TRAINER_STATE,
                                                                "seekr_state.safetensors")):
                return True
        if os.path.exists(os.path.join(self.memory, "memory.json")):
            return True
        log = self.path("log.jsonl")
        if os.path.isfile(log) and not os.path.exists(self.state_path):
            with open(log, encoding="utf-8", errors="replace") as f:
                first = f.readline()
            with contextlib.suppress(ValueError):
                return isinstance(json.loads(first), dict) and "kind" in json.loads(first)
        return False

    def delete_run(self) -> None:
        """``overwrite``: delete what a run wrote (:data:`RUN_ENTRIES`), nothing else."""
        if not self.is_seekr_run():
            raise ResumeError(f"--overwrite: {self.out} does not look like a seekr run (no state.json, checkpoint "
                              "manifest or replay memory index); delete it yourself if it should go")
        for n in RUN_ENTRIES:
            checkpoint.discard(self.path(n))
        checkpoint.clean_run_leftovers(self.out)

    # ---------------------------------------------------------------- checkpoints
    def checkpoints_by_step(self, with_steps: bool = False) -> list:
        """Checkpoint directories, newest first (by the step their manifest names)."""
        out = []
        for kind, n, p in checkpoint.list_checkpoints(self.checkpoints):
            step = n if kind == "step" else -1
            with contextlib.suppress(Exception):
                with open(os.path.join(p, checkpoint.MANIFEST), encoding="utf-8") as f:
                    step = int(json.load(f).get("global_step", step))
            out.append((step, kind == "task", p))
        out.sort(reverse=True)
        return [(s, p) for s, _, p in out] if with_steps else [p for *_, p in out]

    def good_checkpoint(self, exclude=()) -> Optional[str]:
        """The newest checkpoint that verifies (None if none does)."""
        skip = {os.path.abspath(x) for x in exclude}
        for p in self.checkpoints_by_step():
            if os.path.abspath(p) in skip:
                continue
            try:
                checkpoint.verify(p)
                return p
            except CheckpointError:
                continue
        return None

    def hint(self, exclude=()) -> str:
        """What to do when the newest checkpoint cannot be used."""
        good = self.good_checkpoint(exclude)
        if good:
            return (f"the newest good checkpoint is {good}: continue from it with `seekr train --resume-from "
                    f"{good}` (python: run(resume={good!r})), or start over with --overwrite")
        return "no good checkpoint is left: start over with --overwrite"

    def write_checkpoint(self, name: str, meta: dict, *, model, recipe, trainer_state: dict, optimizer=None,
                         scaler=None) -> str:
        """Write ``checkpoints/<name>`` atomically, the manifest last (see
        :mod:`seekr_kernels.run.checkpoint` for the files): ``model(tmp_dir)`` saves the
        model and tokenizer, then the optimiser and LR-schedule states
        (``optimizer=(opt_sd, sched_sd)``), the gradient scaler's, the RNG states, the
        recipe's state without its memory, and ``trainer_state``. Returns its path."""
        rng = checkpoint.rng_state()

        def fill(tmp):
            model(tmp)
            if optimizer is not None:
                checkpoint.save_torch(os.path.join(tmp, checkpoint.OPTIMIZER), optimizer[0])
                checkpoint.save_torch(os.path.join(tmp, checkpoint.SCHEDULER), optimizer[1])
            if scaler is not None:
                checkpoint.save_torch(os.path.join(tmp, checkpoint.SCALER), scaler)
            with open(os.path.join(tmp, checkpoint.RNG), "w", encoding="utf-8") as f:
                json.dump(rng, f)
            recipe.save(os.path.join(tmp, checkpoint.SEEKR), memory=False)
            with open(os.path.join(tmp, checkpoint.TRAINER_STATE), "w", encoding="utf-8") as f:
                json.dump(trainer_state, f, indent=1)
        path = os.path.join(self.checkpoints, name)
        checkpoint.write(path, fill, meta=meta)
        return path

    def load_memory(self, digests: list, names: list, ck_path: str) -> list:
        """The replay memory's tasks 0..len(names)-1 from ``memory/``, each checked against
        the manifest digest the checkpoint ``ck_path`` recorded (``digests``)."""
        from ..seekr.memory import ReplayMemory
        have = self.memory_digests(len(names)) if len(digests) == len(names) else None
        tasks = []
        for i, name in enumerate(names):
            if have is None or have[i] != digests[i]:
                raise CheckpointError(f"{os.path.join(self.memory, f'task-{i:03d}')}: not the replay memory the "
                                      f"checkpoint {ck_path} was taken with")
            tasks.append(ReplayMemory.load_task(self.memory, i, name))
        return tasks

    def prune(self, newest: str, phase: str, keep_checkpoints: str, save_total_limit: Optional[int]) -> None:
        """Keep what the run needs: the newest ``save_total_limit`` mid-task checkpoints
        (none older than the newest task checkpoint), the task checkpoints per
        ``keep_checkpoints``, and never the one state.json names."""
        cks = checkpoint.list_checkpoints(self.checkpoints)
        steps = sorted((n, p) for k, n, p in cks if k == "step" and os.path.basename(p) != newest)
        tasks = sorted((n, p) for k, n, p in cks if k == "task" and os.path.basename(p) != newest)
        drop = []
        if phase == "task_end":
            drop += [p for _, p in steps]
            if keep_checkpoints == "last":
                drop += [p for _, p in tasks]
        elif save_total_limit is not None:
            drop += [p for _, p in steps[:max(0, len(steps) - (save_total_limit - 1))]]
        for p in drop:
            checkpoint.discard(p)

    def discard_after(self, step: int, keep: str) -> None:
        """Checkpoints after ``step`` belong to an abandoned continuation (or were never
        committed): the resumed run writes them again."""
        for s, p in self.checkpoints_by_step(with_steps=True):
            if s > step and os.path.abspath(p) != os.path.abspath(keep):
                checkpoint.discard(p)

    def memory_digests(self, k: int) -> list:
        """SHA-256 of the manifests of memory tasks 0..k-1 on disk (each manifest holds
        its data file's checksum): ties a checkpoint to the memory it was taken with."""
        return [store.digest_file(os.path.join(self.memory, f"task-{i:03d}", "manifest.json")) for i in range(k)]

    def write_final(self, global_step: int, write_merged=None) -> Optional[str]:
        """``final/``: the finished model as a loadable Hugging Face folder, from the
        checkpoint state.json names — its model and tokenizer files hard-linked (they are
        never modified in place), the trainer's and the recipe's files left out, and
        ``use_cache`` turned back on — or written by ``write_merged(tmp_dir)`` (a LoRA run
        saved merged). Returns that checkpoint's path, or None when ``final/`` already
        holds this step's model."""
        final = self.path("final")
        src = self.path(self.read_state_quiet().get("checkpoint", ""))
        with contextlib.suppress(CheckpointError):
            if checkpoint.verify(final).get("global_step") == global_step:
                return None
        trainer_only = (checkpoint.OPTIMIZER, checkpoint.SCHEDULER, checkpoint.SCALER, checkpoint.RNG,
                        checkpoint.TRAINER_STATE, checkpoint.MANIFEST)

        def links(tmp):
            for rel in store.list_files(src):
                if rel in trainer_only or rel.startswith(checkpoint.SEEKR + "/"):
                    continue
                dst = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    os.link(os.path.join(src, rel), dst)
                except OSError:
                    shutil.copy2(os.path.join(src, rel), dst)

        def fill(tmp):
            (write_merged or links)(tmp)
            cp = os.path.join(tmp, "config.json")
            if os.path.exists(cp):      # training turned the KV cache off; a finished model wants it
                with open(cp, encoding="utf-8") as f:
                    c = json.load(f)
                c["use_cache"] = True
                os.unlink(cp)           # maybe a hard link into the checkpoint: never write through it
                with open(cp, "w", encoding="utf-8") as f:
                    json.dump(c, f, indent=2, sort_keys=True)
        checkpoint.write(final, fill, meta={"what": "final model", "global_step": global_step})
        return src

    # ---------------------------------------------------------------- the resume decision
    def start(self, resume, overwrite: bool, barrier=lambda: None):
        """How the run starts: None (from the beginning; with ``overwrite`` the old run is
        deleted first, without resume a folder holding a run is refused), ``"restart"``
        (resume asked, but the run was killed before its first checkpoint), or
        ``(path, state)`` — the checkpoint to resume from (verified) and its
        ``trainer_state.json``."""
        if overwrite and resume:
            raise ValueError("resume and overwrite: choose one (continue the run, or start over)")
        holds = self.holds_run()
        if overwrite:
            if holds and self.main:
                self.delete_run()
            barrier()
            return None
        if not resume:
            if holds:
                st = self.read_state_quiet()
                what = (f"{st.get('completed')}/{len(st.get('tasks') or [])} tasks done, step "
                        f"{st.get('global_step')}" if st else "no checkpoint yet")
                raise ResumeError(f"output_dir: {self.out} holds a seekr run ({what}); continue it with --resume "
                                  "(python: run(resume=True)) or start over with --overwrite (run(overwrite=True))")
            return None
        if self.main:
            checkpoint.clean_run_leftovers(self.out)
        barrier()
        if isinstance(resume, (str, os.PathLike)):
            path = os.fspath(resume)
            if not os.path.isdir(path) and os.path.isdir(os.path.join(self.checkpoints, path)):
                path = os.path.join(self.checkpoints, path)
            st = None
        else:
            if not holds:
                self._say(f"resume: {self.out} holds no run yet; starting one")
                return None
            if not os.path.exists(self.state_path) and not self.checkpoints_by_step():
                return "restart"
            st = self.read_state()
            path = self.path(st["checkpoint"])
        try:
            checkpoint.verify(path)
        except CheckpointError as e:
            newest = "the newest checkpoint" if st is not None else "the checkpoint"
            raise CheckpointError(f"{newest} is damaged: {e}; {self.hint(exclude=[path])}") from None
        ts = store.read_json(os.path.join(path, checkpoint.TRAINER_STATE), "trainer state", CheckpointError)
        if ts.get("kind") != TRAINER_KIND:
            raise CheckpointError(f"{os.path.join(path, checkpoint.TRAINER_STATE)}: not a seekr trainer state")
        if st is not None:
            for k in ("completed", "global_step", "rows"):
                if st.get(k) != ts.get(k):
                    raise ResumeError(f"{self.state_path}: {k} = {st.get(k)!r} but its checkpoint {path} says "
                                      f"{ts.get(k)!r} (state.json edited or from another run); {self.hint()}")
        return path, ts


def check_resume_config(ts: dict, config: dict, defaults: dict, tasks, world: int, device_type: str, path: str,
                        allow: tuple) -> list:
    """Compare a checkpoint's trainer state ``ts`` with the resuming run: its config
    (``config``, the defaults flattened in ``defaults``), every task's data, the number of
    processes and the device type. Refuses what changed and may not (see
    :func:`config_diff`); returns the allowed changes. Configs saved before a key existed
    are read as the code that wrote them ran."""
    from ..seekr.config import canonical_keys
    saved, now = flatten(canonical_keys(ts.get("config") or {})), flatten(config)
    K = saved.get("distill.teacher_logits_topk")
    if K and "distill.teacher_logits" not in saved:
        # Saved before distill.teacher_logits existed: its older spelling, resolved as now.
        saved.update({"distill.teacher_logits": "topk", "distill.teacher_logits_k": K})
    if "distill.fused_lm_head" not in saved and ts.get("config"):
        # Saved before the fused replay step existed: it trained on materialised logits,
        # and the default (auto) would now fuse, which is not bit-identical. Refused as a
        # change unless the run says fused_lm_head: false (or allows the change).
        saved["distill.fused_lm_head"] = "false"
    saved.update({"world_size": ts.get("world_size"), "device_type": ts.get("device_type")})
    now.update({"world_size": world, "device_type": device_type})
    data = ts.get("data") or []
    for i, d in enumerate(data_digests(tasks)):
        now[f"tasks[{i}].data"] = d
        if i < len(data):
            saved[f"tasks[{i}].data"] = data[i]
    diff = config_diff(saved, now, defaults, path, allow)
    done = int(ts["completed"])
    learned = [t["name"] if isinstance(t, dict) and t.get("name") else None
               for t in (ts.get("config") or {}).get("tasks", [])][:done]
    names = [t.name for t in tasks][:done]
    if done > len(tasks) or (all(learned) and learned != names):
        raise ResumeError(f"{path}: learned tasks {learned}, this config's stream starts with {names}; a resumed "
                          "run can only add tasks after the learned ones")
    return diff


def config_diff(saved: dict, now: dict, defaults: dict, path: str, allow: tuple) -> list:
    """Keys (dotted) whose value differs between the checkpoint's flattened config
    ``saved`` and the current ``now`` (a key missing on one side counts as its default),
    ignoring :data:`RESUME_IGNORED`. Differences not under ``allow`` are refused with a
    :class:`ResumeError` naming them and what to do; the allowed ones are returned as
    ``(key, saved, now)``."""
    missing = object()
    diff = []
    for k in sorted(set(saved) | set(now)):
        if _under(k, RESUME_IGNORED):
            continue
        a = saved.get(k, defaults.get(k, missing))
        b = now.get(k, defaults.get(k, missing))
        if a != b and not (a is missing and k.endswith(".data")):
            diff.append((k, a, b))
    refused = [d for d in diff if not _under(d[0], allow)]
    if refused:
        shown = "; ".join(f"{k}: {'(none)' if a is missing else repr(a)} -> "
                          f"{'(none)' if b is missing else repr(b)}" for k, a, b in refused[:8])
        raise ResumeError(f"{path}: the config differs from the run's in {', '.join(k for k, *_ in refused)} "
                          f"({shown}); resume with the run's config, allow the change with "
                          f"--allow-config-change {' '.join(k for k, *_ in refused)}, or start over with "
                          "--overwrite")
    return diff


def flatten(d, prefix: str = "") -> dict:
    """Dotted keys of a nested config dict (list items that are mappings as ``key[i]``)."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and any(isinstance(x, dict) for x in d):
        out[f"{prefix}.len"] = len(d)
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "[") for p in prefixes)
