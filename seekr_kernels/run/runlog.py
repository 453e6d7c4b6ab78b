"""Run logging: ``log.jsonl`` always, plus TensorBoard, Weights & Biases and MLflow.

``train.report_to`` picks the backends with Hugging Face's names and values: a name or a
list of ``tensorboard``, ``wandb``, ``mlflow``; ``none`` (the default, as in transformers
5) logs to ``log.jsonl`` only; ``all`` means every one of the three that is installed. A
backend whose package is missing is a :class:`~seekr_kernels.seekr.config.ConfigError`
naming ``train.report_to`` and the package, raised when the config is validated.

Every backend runs offline:

- ``tensorboard``: event files under ``<output_dir>/tensorboard``;
- ``wandb``: the usual environment (``WANDB_MODE=offline``, ``WANDB_PROJECT`` (default
  ``seekr``), ``WANDB_DIR`` (default ``<output_dir>``), ...); the run id is kept in
  ``<output_dir>/runlog.json`` so a resumed run continues the same W&B run;
- ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else a file store in
  ``<output_dir>/mlruns`` (``mlflow ui --backend-store-uri <output_dir>/mlruns``);
  experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``seekr``); the run id is kept in
  ``runlog.json`` as well.

Steps are the run's global optimiser step. After a resume from a checkpoint taken at step
``s`` the trainer calls :meth:`RunLogger.rewind`: ``log.jsonl`` loses every record after
``s``, TensorBoard purges them (``purge_step``), and W&B and MLflow, which cannot take a
step back, drop the re-logged steps up to the highest one they already hold (a resumed
run recomputes exactly those values). No step is ever recorded twice.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Optional, Sequence

#: report_to name -> (module that must be importable, pip package that provides it)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}

#: Record fields that are coordinates, not measurements (never sent as scalars).
_NOT_SCALARS = {"task", "epoch", "step", "global_step", "time", "completed"}

_STATE = "runlog.json"


def installed(backend: str) -> bool:
    """Whether ``backend``'s package can be imported here (without importing it)."""
    return importlib.util.find_spec(BACKENDS[backend][0]) is not None


def resolve_report_to(value, key: str = "train.report_to", check: bool = True) -> list:
    """``value`` (a name or a list of names) as the list of backends to use.

    ``none`` and ``jsonl`` add nothing (``log.jsonl`` is always written); ``all`` is every
    installed backend. With ``check`` a backend whose package is missing raises
    :class:`ConfigError` naming ``key`` and the package.
    """
    from ..seekr.config import ConfigError
    if value is None:
        value = []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{key}: expected a name or a list of names, got {value!r}")
    out = []
    for n in names:
        n = n.strip().lower()
        if n in ("none", "jsonl", ""):
            continue
        if n == "all":
            out += [b for b in BACKENDS if installed(b)]
            continue
        if n not in BACKENDS:
            raise ConfigError(f"{key}: unknown backend {n!r} (known: {', '.join(BACKENDS)}, none, all)")
        if check and not installed(n):
            raise ConfigError(f"{key}: {n} needs the '{BACKENDS[n][1]}' package, which is not installed "
                              f"(pip install {BACKENDS[n][1]}, or remove {n} from {key})")
        out.append(n)
    return list(dict.fromkeys(out))


def read_jsonl(path: str) -> list:
    """The records of a ``log.jsonl``; a line cut short by a kill is skipped."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


def matrix_markdown(names: Sequence[str], matrix) -> str:
    """The accuracy matrix (rows: after task i; columns: task j) as a Markdown table."""
    head = "| after \\ task | " + " | ".join(names) + " |"
    sep = "|" + " --- |" * (len(names) + 1)
    rows = []
    for i, r in enumerate(matrix):
        if all(v is None for v in r):
            continue
        cells = ["" if v is None else f"{v:.4f}" for v in r]
        rows.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep] + rows)


class RunLogger:
    """One run's logs: ``log.jsonl`` plus the ``report_to`` backends, on the main rank only.

    Args:
        out_dir: the run's output directory (``log.jsonl``, ``runlog.json``, ``tensorboard/``,
            ``mlruns/`` and the offline ``wandb/`` folder go there).
        report_to: names as in ``train.report_to`` (see :func:`resolve_report_to`).
        run_name: the run's name in W&B and MLflow.
        config: the run's config (W&B config, MLflow params, TensorBoard text).
        main: False on the other ranks of a distributed run: every call is a no-op.

    Backends start at the first record, so a run that fails its checks opens none.
    """

    def __init__(self, out_dir: str, report_to, *, run_name: str, config: Optional[dict] = None,
                 main: bool = True):
        self.out_dir = out_dir
        self.backends = resolve_report_to(report_to) if main else []
        self.run_name = run_name
        self.config = config or {}
        self.main = main
        #: the highest step logged so far (records without a step of their own get it)
        self.step = 0
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._mlflow = None            # (client, run_id)
        self._purge_step = None        # TensorBoard: discard earlier events from this step on
        self._floor = None             # W&B / MLflow: drop steps <= this (they hold them already)

    # ------------------------------------------------------------------ records
    def log(self, kind: str, step: int, /, **fields) -> None:
        """One record at global step ``step``: every field to ``log.jsonl`` (with ``kind``,
        ``global_step`` and ``time``); numeric fields to the backends as ``<kind>/<field>``.

        ``kind`` and ``step`` are positional, so a field may itself be called ``step``
        (the trainer's batch index inside an epoch)."""
        if not self.main:
            return
        step = int(step)
        self.step = max(self.step, step)
        self._write({"kind": kind, "global_step": step, **fields})
        scalars = {f"{kind}/{k}": float(v) for k, v in fields.items()
                   if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self._scalars(step, scalars)

    def log_eval(self, task: int, step: int, *, names: Sequence[str], row: Sequence[float], matrix,
                 op: Optional[float] = None, bwt: Optional[float] = None, heatmap: Optional[str] = None,
                 **fields) -> None:
        """The evaluation after task ``task``: its row of scores (``eval/<task name>``), the
        accuracy matrix so far (``log.jsonl``, a Markdown table and a W&B table / MLflow
        artifact), OP and BWT once the stream is complete, and the heatmap PNG as an image.
        Extra ``fields`` (e.g. log-likelihoods) go to ``log.jsonl``."""
        if not self.main:
            return
        step = int(step)
        self.step = max(self.step, step)
        names = list(names)
        rec = {"kind": "eval", "global_step": step, "task": task, "name": names[task], "scores": list(row),
               "matrix": matrix, **fields}
        if op is not None:
            rec["OP"], rec["BWT"] = op, bwt
        self._write(rec)
        scalars = {f"eval/{names[j]}": float(v) for j, v in enumerate(row) if v is not None}
        if row:
            scalars["eval/average_seen"] = float(sum(row) / len(row))
        if op is not None:
            scalars["eval/OP"] = float(op)
            if bwt is not None:
                scalars["eval/BWT"] = float(bwt)
        self._scalars(step, scalars)
        if self.backends and self._accepts(step):
            self._eval_media(task, step, names, matrix, heatmap)

    def rewind(self, step: int) -> None:
        """Forget everything logged after global step ``step`` (a resume from a checkpoint
        taken there): ``log.jsonl`` is rewritten without those records (atomically),
        TensorBoard purges them, W&B and MLflow drop the steps up to the highest they hold."""
        if not self.main:
            return
        step = int(step)
        self._close_jsonl()
        path = self.jsonl_path
        recs = read_jsonl(path)
        high = max([int(r.get("global_step", 0)) for r in recs] + [step])
        keep = [r for r in recs if int(r.get("global_step", 0)) <= step]
        if os.path.exists(path):
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        st = self._state()
        high = max(high, int(st.get("backend_step", 0)))
        self._save_state({**st, "backend_step": high})
        self.step = step
        self._floor = high if high > step else None
        self._purge_step = step + 1
        if self._tb is not None:       # reopen with the purge marker
            self._tb.close()
            self._tb = None

    def close(self) -> None:
        """Flush and close every backend (W&B ``finish``, MLflow run marked finished)."""
        self._close_jsonl()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id)
            self._mlflow = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ jsonl
    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.out_dir, "log.jsonl")

    def _write(self, rec):
        rec.setdefault("time", round(time.time(), 3))
        if self._jsonl is None:
            os.makedirs(self.out_dir, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()

    def _close_jsonl(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    # ------------------------------------------------------------------ state (run ids)
    def _state(self) -> dict:
        p = os.path.join(self.out_dir, _STATE)
        if not os.path.isfile(p):
            return {}
        try:
            with open(p, encoding="utf-8") as f:
                st = json.load(f)
            return st if isinstance(st, dict) else {}
        except (OSError, json.JSONDecodeError):
            # Only run ids live there: a damaged file starts new W&B / MLflow runs.
            return {}

    def _save_state(self, st: dict):
        from .metrics import write_json
        write_json(os.path.join(self.out_dir, _STATE), st)

    # ------------------------------------------------------------------ backends
    def _accepts(self, step) -> bool:
        return self._floor is None or step > self._floor

    def _scalars(self, step: int, scalars: dict):
        if not self.backends:
            return
        if "tensorboard" in self.backends:
            tb = self._tensorboard()
            for k, v in scalars.items():
                tb.add_scalar(k, v, step)
        if not self._accepts(step):
            return
        if "wandb" in self.backends:
            self._wandb_run().log(scalars, step=step)
        if "mlflow" in self.backends:
            from mlflow.entities import Metric
            client, run_id = self._mlflow_run()
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in scalars.items()])

    def _eval_media(self, task, step, names, matrix, heatmap):
        md = matrix_markdown(names, matrix)
        have_png = bool(heatmap) and os.path.isfile(heatmap)
        if "tensorboard" in self.backends:
            tb = self._tensorboard()
            tb.add_text("eval/matrix", md, step)
            if have_png:
                import matplotlib.image as mpimg
                img = mpimg.imread(heatmap)[..., :3]
                tb.add_image("eval/heatmap", img, step, dataformats="HWC")
        if "wandb" in self.backends:
            import wandb
            shown = [r for r in matrix if any(v is not None for v in r)]
            data = [[names[i]] + [None if v is None else float(v) for v in r] for i, r in enumerate(shown)]
            rec = {"eval/matrix": wandb.Table(columns=["after"] + names, data=data)}
            if have_png:
                rec["eval/heatmap"] = wandb.Image(heatmap)
            self._wandb_run().log(rec, step=step)
        if "mlflow" in self.backends:
            client, run_id = self._mlflow_run()
            tag = f"after-task-{task:03d}"
            client.log_text(run_id, md, f"eval/matrix-{tag}.md")
            client.log_dict(run_id, {"tasks": names, "matrix": matrix}, f"eval/matrix-{tag}.json")
            if have_png:
                with tempfile.TemporaryDirectory() as d:
                    p = os.path.join(d, f"heatmap-{tag}.png")
                    shutil.copyfile(heatmap, p)
                    client.log_artifact(run_id, p, "eval")

    def _tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.out_dir, "tensorboard"), purge_step=self._purge_step)
            if self._purge_step is None and self.config:
                self._tb.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```", 0)
        return self._tb

    def _wandb_run(self):
        if self._wandb is None:
            import wandb
            st = self._state()
            run_id = st.get("wandb_id")
            if not run_id:
                run_id = uuid.uuid4().hex[:12]
                self._save_state({**st, "wandb_id": run_id})
            wdir = os.environ.get("WANDB_DIR") or self.out_dir
            os.makedirs(wdir, exist_ok=True)
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "seekr"), name=self.run_name,
                                     id=run_id, resume="allow", dir=wdir, config=self.config,
                                     settings=wandb.Settings(console="off", silent=True))
        return self._wandb

    def _mlflow_run(self):
        if self._mlflow is None:
            from mlflow.tracking import MlflowClient
            uri = os.environ.get("MLFLOW_TRACKING_URI") or _file_uri(os.path.join(self.out_dir, "mlruns"))
            # MLflow 3 keeps its file store in maintenance mode behind an opt-in; ours is a
            # local offline store, so opt in for this client only (the store is built here).
            with _env_default("MLFLOW_ALLOW_FILE_STORE", "true"):
                client = MlflowClient(tracking_uri=uri)
            st = self._state()
            run_id = st.get("mlflow_run_id") if st.get("mlflow_tracking_uri") == uri else None
            if run_id is not None:
                try:
                    client.update_run(run_id, status="RUNNING")
                except Exception:    # deleted from the store: start a new run
                    run_id = None
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "seekr")
                exp = client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
                run_id = client.create_run(exp_id, run_name=self.run_name).info.run_id
                self._save_state({**st, "mlflow_run_id": run_id, "mlflow_tracking_uri": uri})
                self._mlflow = (client, run_id)
                self._mlflow_params()
            self._mlflow = (client, run_id)
        return self._mlflow

    def _mlflow_params(self):
        from mlflow.entities import Param
        client, run_id = self._mlflow
        flat = _flatten(self.config)
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flat.items()]
        params = [Param(p.key, p.value[:500]) for p in params]
        for i in range(0, len(params), 100):           # MLflow takes 100 params per batch
            client.log_batch(run_id, params=params[i:i + 100])


def _file_uri(path: str) -> str:
    from pathlib import Path
    return Path(os.path.abspath(path)).as_uri()


@contextlib.contextmanager
def _env_default(name: str, value: str):
    """``os.environ[name] = value`` inside the block unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
