"""The ``seekr`` command: continual fine-tuning runs, evaluation and the built-in demo.

    seekr demo [--out DIR] [--quick] [--seeds N]   four methods on a built-in task stream, N seeds
    seekr train --config run.yaml [--set train.lr=1e-4 ...]
    seekr eval --model DIR --task PATH [--task PATH ...] [--split test] [--metric NAME]
    seekr eval --run OUTPUT_DIR               the last checkpoint of a run on its tasks
    seekr --version                           package, torch and which backends are built

Also runnable as ``python -m seekr_kernels``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parse_value(text: str):
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _overrides(pairs):
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise SystemExit(f"seekr: --set expects KEY=VALUE, got {p!r}")
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
    from .continual.demo import run_demo
    if args.seed_list is not None and len(set(args.seed_list)) != len(args.seed_list):
        print(f"seekr demo: error: --seed-list: a seed appears twice in {args.seed_list}", file=sys.stderr)
        return 2
    run_demo(out=args.out, quick=args.quick, methods=args.methods,
             seeds=args.seed_list if args.seed_list is not None else args.seeds, jobs=args.jobs,
             progress=not args.no_progress, threads=args.threads or None)
    return 0


def cmd_train(args) -> int:
    from .continual import metrics as M
    from .continual.config import load_config
    from .continual.trainer import ContinualTrainer
    ov = _overrides(args.set)
    if args.output_dir:
        ov["output_dir"] = args.output_dir
    if args.method:
        ov["method"] = args.method
    cfg = load_config(args.config, ov)
    trainer = ContinualTrainer(cfg)
    res = trainer.run()
    if trainer.dist.main:
        if res.get("complete"):
            print(M.format_table({cfg.method: res}))
        print(f"results: {os.path.join(cfg.output_dir, 'results.json')}")
    trainer.dist.close()
    return 0


def cmd_eval(args) -> int:
    import torch

    from .continual.config import ConfigError, ModelConfig
    from .continual.data import load_task, load_tokenizer
    from .continual.evaluate import GenerationOptions, evaluate_examples, get_metric, resolve_metric_name
    from .continual.metrics import write_json
    from .continual.trainer import build_model

    tasks_paths = list(args.task or [])
    metrics, names = {}, {}
    model_dir = args.model
    if args.run:
        with open(os.path.join(args.run, "state.json"), encoding="utf-8") as f:
            st = json.load(f)
        model_dir = model_dir or os.path.join(args.run, st["checkpoint"])
        if not tasks_paths:
            # The run's own task names and metrics (auto already resolved when it started).
            for ts in st["config"]["tasks"]:
                tasks_paths.append(ts["path"])
                names[ts["path"]] = ts.get("name")
                metrics[ts["path"]] = ts.get("metric", "exact_match")
    if not model_dir:
        raise SystemExit("seekr eval: give --model DIR or --run OUTPUT_DIR")
    if not tasks_paths:
        raise SystemExit("seekr eval: give at least one --task PATH (or --run OUTPUT_DIR)")
    try:
        gen = GenerationOptions(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, num_repeats=args.num_repeats, seed=args.seed)
    except ValueError as e:   # "top_p: must ..." -> "--top-p: must ..."
        key, _, msg = str(e).partition(":")
        raise ConfigError(f"--{key.replace('_', '-')}:{msg}") from None
    tasks = []
    for p in tasks_paths:
        task = load_task(p, name=names.get(p))
        task.metric = resolve_metric_name(args.metric or metrics.get(p, "auto"), task.name)
        try:
            get_metric(task.metric)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"{'--metric' if args.metric else task.name}: {e}") from None
        tasks.append(task)
    tok = load_tokenizer(args.tokenizer or model_dir)
    model = build_model(ModelConfig(path=model_dir), tok)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    out = {}
    for task in tasks:
        exs = task.split(args.split) or task.eval or task.test or task.train
        if args.max_samples:
            exs = exs[: args.max_samples]
        r = evaluate_examples(model, tok, exs, metric=task.metric, max_prompt_len=args.max_prompt_len,
                              max_answer_len=args.max_answer_len, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, device=device, keep_predictions=3,
                              generation=gen)
        out[task.name] = {"metric": task.metric, "score": r["score"], "scores": r["scores"],
                          "loglik": r["loglik"], "n": r["n"]}
        print(f"{task.name:<20} {task.metric}={r['score']:.4f}  loglik={r['loglik']:.4f}  (n={r['n']})")
    if args.out:
        write_json(args.out, {"model": model_dir, "split": args.split, "tasks": out})
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
                   help="torch CPU threads per process (default 1; 0 = torch's default)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a task stream from a YAML config (resumes an existing output_dir)",
                       description="Continual fine-tuning from a YAML config; see "
                                   "seekr_kernels/continual/config.py for every key. Under torchrun it "
                                   "trains with DDP (or FSDP2 with distributed.strategy: fsdp).")
    t.add_argument("--config", required=True, help="YAML config file")
    t.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. train.lr=1e-4")
    t.add_argument("--output-dir", help="override output_dir")
    t.add_argument("--method", choices=["sft", "replay", "replay+logits", "seekr"], help="override method")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model (local HF directory) on tasks",
                       description="Generation (greedy by default) scored by each task's metric, and "
                                   "the answer's mean log-likelihood.")
    e.add_argument("--model", help="local Hugging Face model directory (e.g. a run's checkpoint)")
    e.add_argument("--run", help="a `seekr train` output_dir: its last checkpoint and tasks")
    e.add_argument("--task", action="append", help="task directory (TRACE layout) or JSON-lines file; repeatable")
    e.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    e.add_argument("--split", default="test", choices=["train", "eval", "test"])
    e.add_argument("--metric", help="for every task: exact_match, contains, prefix, accuracy_extract, "
                   "accuracy_choice, rouge_l, edit_sim, sari, bleu1, bleu4, trace:TASK, auto or "
                   "module:function (default: the run's metric per task with --run, else auto: "
                   "TRACE's metric for a TRACE task name, exact_match otherwise)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-prompt-len", type=int, default=512)
    e.add_argument("--max-answer-len", type=int, default=512)
    e.add_argument("--max-new-tokens", type=int, help="generation length (default: --max-answer-len)")
    e.add_argument("--do-sample", action="store_true",
                   help="sample instead of greedy decoding (the published repeated inference: "
                        "--do-sample --temperature 0.1 --num-repeats 2)")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--top-k", type=int, default=50, help="0: off")
    e.add_argument("--num-repeats", type=int, default=1, help="sampled answers per prompt; the mean is reported")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--max-samples", type=int)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="write the scores as JSON here")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv=None) -> int:
    """Entry point of the ``seekr`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from .continual.config import ConfigError
    from .continual.data import DataError
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"seekr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
