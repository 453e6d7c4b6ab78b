"""The ``seekr`` command: continual fine-tuning runs, evaluation and the built-in demo.

    seekr demo [--out DIR] [--quick] [--seeds N]   four methods on a built-in task stream, N seeds
    seekr train --config run.yaml [--set train.lr=1e-4 ...] [--resume | --resume-from CKPT | --overwrite]
    seekr eval --model DIR --task PATH [--task PATH ...] [--split test] [--metric NAME]
    seekr eval --run OUTPUT_DIR [--matrix]    a run's last model on its tasks, with its settings
                                              (--matrix: the whole matrix from per-task checkpoints)
    seekr --version                           package, torch and which backends are built

Also runnable as ``python -m seekr_kernels``. An expected error (config, data, run state,
files, a missing package) prints one line naming the key, file or path and exits 2;
``seekr --debug ...`` shows the traceback too.
"""
from __future__ import annotations

import argparse
import os
import sys


def _parse_value(text: str):
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _overrides(pairs):
    from .seekr.config import ConfigError
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"--set: expected KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def cmd_demo(args) -> int:
    from .run.demo import run_demo
    if args.seed_list is not None and len(set(args.seed_list)) != len(args.seed_list):
        print(f"seekr demo: error: --seed-list: a seed appears twice in {args.seed_list}", file=sys.stderr)
        return 2
    run_demo(out=args.out, quick=args.quick, methods=args.methods,
             seeds=args.seed_list if args.seed_list is not None else args.seeds, jobs=args.jobs,
             progress=not args.no_progress, threads=args.threads or None)
    return 0


def cmd_train(args) -> int:
    from .run import metrics
    from .seekr.config import ConfigError
    from .run.config import load_config
    from .run.preflight import check_start
    from .run.trainer import ContinualTrainer
    if not os.path.isfile(args.config):
        raise ConfigError(f"--config: {args.config}: no such file")
    ov = _overrides(args.set)
    if args.output_dir:      # a command-line path: relative to the working directory
        ov["output_dir"] = os.path.abspath(args.output_dir)
    if args.method:
        ov["method"] = args.method
    if args.threads:
        ov["train.num_threads"] = args.threads
    cfg = load_config(args.config, ov)
    check_start(cfg.output_dir, args.resume_from or args.resume, args.overwrite)     # before the model is built
    trainer = ContinualTrainer(cfg)
    try:
        res = trainer.run(resume=args.resume_from or args.resume, overwrite=args.overwrite,
                          allow_config_change=args.allow_config_change)
        if trainer.dist.main:
            if res.get("complete"):
                print(metrics.format_table({cfg.method: res}))
            print(f"results: {os.path.join(cfg.output_dir, 'results.json')}")
    finally:
        trainer.dist.close()
    return 0


#: --flags -> EvalSettings fields, and GenerationOptions fields (flags left unset keep the
#: run's value, or the default).
_EVAL_FLAGS = ("split", "batch_size", "max_prompt_len", "max_answer_len", "max_new_tokens", "max_samples")
_GENERATION_FLAGS = ("do_sample", "temperature", "top_p", "top_k", "num_repeats", "seed")


def _eval_settings(args, cfg):
    import dataclasses

    from .seekr.config import ConfigError
    from .run.runeval import EvalSettings
    s = EvalSettings.from_run(cfg) if cfg is not None else EvalSettings()
    for f in _EVAL_FLAGS:
        v = getattr(args, f, None)
        if v is not None:
            if f != "split" and v < 1:
                raise ConfigError(f"--{f.replace('_', '-')}: must be > 0, got {v}")
            s = dataclasses.replace(s, **{f: v})
    gen = {f: getattr(args, f) for f in _GENERATION_FLAGS if getattr(args, f, None) is not None}
    try:
        return dataclasses.replace(s, generation=dataclasses.replace(s.generation, **gen))
    except ValueError as e:   # "top_p: must ..." -> "--top-p: must ..."
        key, _, msg = str(e).partition(":")
        raise ConfigError(f"--{key.replace('_', '-')}:{msg}") from None


def cmd_eval(args) -> int:
    from .run import metrics
    from .seekr.config import ConfigError
    from .run.config import ModelConfig
    from .run.data import load_task, load_tokenizer
    from .run.runeval import (checked_metric, evaluate_tasks, final_checkpoint, load_checkpoint_model,
                              load_run, rebuild_matrix, resolve_device, run_tasks, _has_tokenizer)

    if args.matrix and not args.run:
        raise ConfigError("--matrix: needs --run OUTPUT_DIR (it evaluates the run's per-task checkpoints)")
    if args.matrix and (args.model or args.task):
        raise ConfigError("--matrix: evaluates the run's checkpoints on the run's tasks; drop --model and --task")
    st = cfg = None
    if args.run:
        st, cfg = load_run(args.run)
    settings = _eval_settings(args, cfg)
    device = resolve_device(args.device)

    if args.matrix:
        def row(t, tasks, scores):
            print(f"after {tasks[t].name:<20} " + "  ".join(f"{tk.name}={v:.4f}" for tk, v in zip(tasks, scores)),
                  flush=True)
        res = rebuild_matrix(args.run, settings, device, progress=row)
        out = args.out or os.path.join(args.run, "eval-matrix.json")
        import dataclasses
        metrics.write_json(out, {**res, "run": os.path.abspath(args.run), "settings": dataclasses.asdict(settings)})
        png = os.path.splitext(out)[0] + ".png"
        metrics.plot_heatmap(res["matrix"], png, res["tasks"], title=f"{res['method']} (rebuilt from checkpoints)")
        if res["complete"]:
            print(metrics.format_table({res["method"]: res}))
        else:
            print(f"partial run: {sum(r[0] is not None for r in res['matrix'])} of {len(res['tasks'])} tasks "
                  "(no OP/BWT)")
        print(f"results: {out}\nheatmap: {png}")
        return 0

    model_dir = args.model or (final_checkpoint(args.run, st) if args.run else None)
    if not model_dir:
        raise ConfigError("--model: give --model DIR or --run OUTPUT_DIR")
    if args.task:
        tasks = []
        for p in args.task:
            task = load_task(p)
            task.metric = checked_metric(args.metric or "auto", task.name, "--metric" if args.metric else task.name)
            tasks.append(task)
    elif cfg is not None:
        tasks = run_tasks(cfg)
        if args.metric:
            for t in tasks:
                t.metric = checked_metric(args.metric, t.name, "--metric")
    else:
        raise ConfigError("--task: give at least one --task PATH (or --run OUTPUT_DIR)")
    tok = None
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    elif cfg is None and not _has_tokenizer(model_dir):
        raise ConfigError(f"--tokenizer: {model_dir} holds no tokenizer; give --tokenizer DIR")
    model, tok = load_checkpoint_model(model_dir, cfg.model if cfg is not None else ModelConfig(), tokenizer=tok,
                                       seed=cfg.seed if cfg is not None else 0, device=device)
    out = {}
    for task, r in zip(tasks, evaluate_tasks(model, tok, tasks, settings, device, keep_predictions=3)):
        out[task.name] = {"metric": task.metric, "score": r["score"], "scores": r["scores"],
                          "loglik": r["loglik"], "n": r["n"]}
        print(f"{task.name:<20} {task.metric}={r['score']:.4f}  loglik={r['loglik']:.4f}  (n={r['n']})")
    if args.out:
        metrics.write_json(args.out, {"model": os.path.abspath(model_dir), "split": settings.split, "tasks": out})
    return 0


def version_info() -> str:
    """What `seekr --version` prints: this package, torch, and which kernel backends exist here."""
    import torch

    from . import _backend
    from ._version import __version__

    def found(mod, err):
        return "built" if mod is not None else f"not built ({type(err).__name__}: {err})"

    cuda = torch.version.cuda or "none"
    dev = f", {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else ", no device"
    triton = _backend._import("triton")[0]
    lines = [
        f"seekr-kernels {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"torch {torch.__version__} (CUDA {cuda}{dev})",
        "backends:",
        f"  cpu     C++ extension seekr_kernels._C: {found(*_backend._import('seekr_kernels._C'))}",
        f"  cuda    CUDA extension seekr_kernels._C_cuda: {found(*_backend._import('seekr_kernels._C_cuda'))}",
        f"  triton  {'triton ' + triton.__version__ if triton is not None else 'triton not installed'}",
        "  torch   plain PyTorch: always",
    ]
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    # argparse's own "version" action formats its text when the parser is built; this one
    # imports torch only when --version is given.
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_info())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seekr", description="SEEKR continual fine-tuning of Llama-family models with fused kernels.",
        epilog="Start with `seekr demo`: a small Llama learns four made-up tasks one after another "
               "with four methods (sft, replay 1%, replay 10%, SEEKR 1%).")
    p.add_argument("--version", action=_VersionAction,
                   help="print the package and torch versions and which backends are built, then exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its line")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="run the built-in demo (four methods, three seeds; about 5 minutes on 2 idle "
                                    "CPU cores)",
                       description="Sequential fine-tuning, replay 1%, replay 10% and SEEKR 1% on a "
                                   "built-in stream of tasks that interfere, over several seeds; prints "
                                   "OP/BWT per seed and their mean [min, max], and writes results.json and "
                                   "heatmaps (per seed and of the mean).")
    d.add_argument("--out", default="seekr-demo", help="output folder (default: ./seekr-demo)")
    d.add_argument("--quick", action="store_true", help="a shortened run (seconds; for tests and smoke checks)")
    d.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="subset of: sft replay-1%% replay-10%% seekr-1%%")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--seeds", type=_positive_int, default=3, metavar="N", help="run seeds 0 .. N-1 (default 3)")
    g.add_argument("--seed-list", type=int, nargs="+", default=None, metavar="S", help="run these seeds")
    d.add_argument("--jobs", type=_positive_int, default=2,
                   help="runs (one seed, one method) at once, each in its own process (default 2; 1 = all "
                        "in this process)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (default 1; 0 = the automatic choice of "
                        "train.num_threads: null, torch's default or 1 on a busy machine)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a task stream from a YAML config (--resume continues a run)",
                       description="Continual fine-tuning from a YAML config; see "
                                   "seekr_kernels/seekr/config.py and seekr_kernels/run/config.py for every key. Under torchrun it "
                                   "trains with DDP (or FSDP2 with distributed.strategy: fsdp).")
    t.add_argument("--config", required=True, help="YAML config file")
    t.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="override config keys as if written in the file, e.g. train.lr=1e-4, "
                   "tasks.0.epochs=2 or tasks[0].epochs=2 (a key replaces the file's older spelling of it: "
                   "preset=package over recipe: official)")
    t.add_argument("--output-dir", help="override output_dir (relative to the working directory)")
    t.add_argument("--method", choices=["sft", "replay", "replay+logits", "seekr"], help="override method")
    t.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads per process (sets train.num_threads; default: the config's, where "
                        "null takes this process's share of the cores, or 1 on a busy machine)")
    r = t.add_mutually_exclusive_group()
    r.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its newest checkpoint (also mid-task; starts a "
                        "run if there is none yet). Without --resume or --overwrite an output_dir that holds "
                        "a run is refused")
    r.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue from this checkpoint directory (e.g. an older one when the newest is damaged)")
    r.add_argument("--overwrite", action="store_true",
                   help="delete the run in output_dir (only what a seekr run writes) and start over")
    t.add_argument("--allow-config-change", nargs="+", default=(), metavar="KEY",
                   help="with --resume: config keys or sections (train.lr, tasks, ...) that may differ from "
                        "the run's; any other change is refused")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model or a run (its last model, or its whole accuracy matrix)",
                       description="Generation (greedy by default) scored by each task's metric, and the "
                                   "answer's mean log-likelihood. With --run every setting (lengths, eval "
                                   "section, generation options, metrics, tokenizer) is the run's; a flag "
                                   "given here overrides it.")
    e.add_argument("--model", help="local Hugging Face model directory (e.g. a run's checkpoint)")
    e.add_argument("--run", help="a `seekr train` output_dir: its last checkpoint, tasks and settings")
    e.add_argument("--matrix", action="store_true",
                   help="with --run: rebuild the accuracy matrix from the per-task checkpoints (the model after "
                        "task i on tasks 0..i; needs keep_checkpoints: all), print OP/BWT, write the results "
                        "JSON (--out, default RUN/eval-matrix.json) and a heatmap PNG beside it")
    e.add_argument("--task", action="append", help="task directory (TRACE layout) or JSON-lines file; repeatable")
    e.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's, else the run's)")
    e.add_argument("--split", choices=["train", "eval", "test"], help="default: the run's eval.split, else test")
    e.add_argument("--metric", help="for every task: exact_match, contains, prefix, accuracy_extract, "
                   "accuracy_choice, rouge_l, edit_sim, sari, bleu1, bleu4, trace:TASK, auto or "
                   "module:function (default: the run's metric per task with --run, else auto: "
                   "TRACE's metric for a TRACE task name, exact_match otherwise)")
    e.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size, else 32")
    e.add_argument("--max-prompt-len", type=int, help="default: the run's train.max_prompt_len, else 512")
    e.add_argument("--max-answer-len", type=int, help="default: the run's train.max_answer_len, else 512")
    e.add_argument("--max-new-tokens", type=int, help="generation length (default: the run's, else --max-answer-len)")
    e.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (the published repeated inference: "
                        "--do-sample --temperature 0.1 --num-repeats 2); default: the run's")
    e.add_argument("--temperature", type=float)
    e.add_argument("--top-p", type=float)
    e.add_argument("--top-k", type=int, help="0: off")
    e.add_argument("--num-repeats", type=int, help="sampled answers per prompt; the mean is reported")
    e.add_argument("--seed", type=int, help="sampling seed (default: the run's eval seed, else 0)")
    e.add_argument("--max-samples", type=int)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="write the scores as JSON here")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_eval)
    return p


def expected_errors() -> tuple:
    """Exceptions the command reports as one line (exit 2) instead of a traceback: bad
    config, data, run state or files, and a missing optional package."""
    from .cache import TeacherCacheError
    from .run.checkpoint import CheckpointError, ResumeError
    from .seekr.config import ConfigError
    from .run.data import DataError
    from .run.rundir import RunStateError
    from .seekr.memory import ReplayMemoryError
    return (ConfigError, DataError, RunStateError, ReplayMemoryError, TeacherCacheError, CheckpointError,
            ResumeError, OSError, ImportError)


def one_line(e: BaseException) -> str:
    """An error message on one line: the first line, the first detail after it, and how
    many more there are (DataError lists every bad record)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    msg = lines[0]
    if len(lines) > 1:
        msg = f"{msg.rstrip(':')}: {lines[1]}"
        if len(lines) > 2:
            msg += f" (and {len(lines) - 2} more; --debug shows all)"
    return msg


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # Run warnings name their key: print them as the command's own lines, not as source locations.
    text = str(message)
    text = text[len("seekr_kernels: "):] if text.startswith("seekr_kernels: ") else text
    print(f"seekr: warning: {text}", file=file or sys.stderr)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _ours(category, filename) -> bool:
    """A warning of this package (a RunWarning, or one raised from its code: a deprecated
    key's FutureWarning, a clamped setting), not a library's (PEFT, transformers...),
    which prints as Python prints it."""
    from .run.preflight import RunWarning
    if issubclass(category, RunWarning):
        return True
    return os.path.abspath(str(filename)).startswith(_PACKAGE)


def main(argv=None) -> int:
    """Entry point of the ``seekr`` console script: exit 0, or 2 with one line naming the
    key, file or path for every expected error (``--debug``: the traceback too)."""
    import warnings
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False)
    expected = expected_errors()
    shown = warnings.showwarning
    with warnings.catch_warnings():
        def show(message, category, filename, lineno, *a, **k):
            if _ours(category, filename):
                return _show_warning(message, category, filename, lineno, *a, **k)
            return shown(message, category, filename, lineno, *a, **k)
        warnings.showwarning = show
        try:
            return args.func(args)
        except expected as e:
            if debug:
                import traceback
                traceback.print_exc()
            print(f"seekr {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"seekr {args.command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
