"""Evaluation through `model.generate`: greedy answers equal a plain argmax loop, no warnings,
seeded sampling with repeats, the metric protocol (prompt given to metrics that take it),
and two FSDP2 ranks giving the one-process result."""
import json
import logging
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import GenerationConfig

from seekr_kernels.run.config import ModelConfig
from seekr_kernels.run.data import CharTokenizer, Example, encode_example
from seekr_kernels.run.evaluate import GenerationOptions, evaluate_examples, get_metric
from seekr_kernels.run.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}
ALPHABET = "abcdefgh :"
TOK = CharTokenizer(ALPHABET)


def tiny_model(seed=0):
    # Large random weights: varied answers that end (eos) at different steps.
    model = build_model(ModelConfig(arch=ARCH), TOK, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def examples(n=7):
    # Prompts of different lengths (left padding inside a batch), answers of varied length.
    return [Example("ab cd efg"[: 2 + (3 * i) % 8] + ":", "hg"[: 1 + i % 2] * (1 + i % 3)) for i in range(n)]


@torch.no_grad()
def argmax_answer(model, ex, max_new):
    """The oracle: one unpadded sample, full forward per step, no KV cache."""
    ids = encode_example(ex, TOK, 32, 8).prompt_ids
    out = []
    for _ in range(max_new):
        t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if t == TOK.eos_token_id:
            break
        out.append(t)
    return TOK.decode(out)


def _record_transformers_warnings():
    records = []

    class H(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())

    if hasattr(logging.Logger, "warning_once") and hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()    # transformers says some things once per process
    h = H(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(h)
    return records, h


def test_greedy_matches_argmax_loop_without_warnings():
    model, exs = tiny_model(), examples()
    want = [argmax_answer(model, ex, 6) for ex in exs]
    assert len(set(want)) > 1                                # not a degenerate model
    records, h = _record_transformers_warnings()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")                   # FutureWarning, DeprecationWarning, ...
            r = evaluate_examples(model, TOK, exs, max_prompt_len=32, max_answer_len=8, max_new_tokens=6,
                                  batch_size=3, keep_predictions=len(exs))
            # A chat model's own generation defaults (sampling, max_length) change nothing
            # and say nothing: the evaluation's options are the only ones used.
            model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9,
                                                       max_length=4096, eos_token_id=TOK.eos_token_id)
            r2 = evaluate_examples(model, TOK, exs, max_prompt_len=32, max_answer_len=8, max_new_tokens=6,
                                   batch_size=3, keep_predictions=len(exs))
            s = evaluate_examples(model, TOK, exs, max_prompt_len=32, max_answer_len=8, max_new_tokens=6,
                                  generation=GenerationOptions(do_sample=True, temperature=0.7, num_repeats=2))
    finally:
        logging.getLogger("transformers").removeHandler(h)
    assert records == []
    assert [p["prediction"] for p in r["predictions"]] == want
    assert [p["prediction"] for p in r2["predictions"]] == want
    assert model.generation_config.temperature == 0.6        # restored after each call
    assert r["score"] == pytest.approx(sum(w == ex.answer for w, ex in zip(want, exs)) / len(exs))
    assert r["scores"] == [r["score"]] and len(s["scores"]) == 2 and model.training


def test_sampling_is_seeded_repeated_and_leaves_training_rng_alone():
    model, exs = tiny_model(1), examples(5)
    seen = []

    def record(prediction, reference):                       # a two-argument user metric
        seen.append(prediction)
        return float(len(prediction) % 2)

    def run(seed, repeats=2):
        seen.clear()
        r = evaluate_examples(model, TOK, exs, metric=record, max_prompt_len=32, max_answer_len=8,
                              generation=GenerationOptions(do_sample=True, temperature=3.0, num_repeats=repeats,
                                                           seed=seed))
        return r, list(seen)

    torch.manual_seed(123)
    (r1, p1), expected_next = run(7), None
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)                 # the RNG stream went on untouched
    r2, p2 = run(7)
    r3, p3 = run(8)
    assert p1 == p2 and r1 == r2                             # seeded
    assert p1 != p3                                          # another seed, other samples
    assert len(p1) == 2 * len(exs) and p1[0::2] != p1[1::2]  # two different answers per prompt
    per_repeat = [sum(len(p) % 2 for p in p1[r::2]) / len(exs) for r in (0, 1)]
    assert r1["scores"] == pytest.approx(per_repeat) and r1["score"] == pytest.approx(sum(per_repeat) / 2)
    with pytest.raises(ValueError, match="num_repeats"):
        GenerationOptions(num_repeats=2)
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions(do_sample=True, temperature=0.0)


def test_eval_config_generation_keys():
    from seekr_kernels.seekr.config import ConfigError
    from seekr_kernels.run.config import from_dict
    base = {"seed": 9, "tasks": [{"path": "x"}]}
    cfg = from_dict({**base, "eval": {"do_sample": True, "temperature": 0.1, "top_p": 0.9, "num_repeats": 2}})
    assert GenerationOptions.from_config(cfg.eval, cfg.seed) == \
        GenerationOptions(do_sample=True, temperature=0.1, top_p=0.9, num_repeats=2, seed=9)
    cfg = from_dict({**base, "eval": {"seed": 3}})
    assert GenerationOptions.from_config(cfg.eval, cfg.seed) == GenerationOptions(seed=3)
    for bad, msg in [({"num_repeats": 2}, "eval.num_repeats: repeats of greedy"),
                     ({"top_p": 1.5}, r"eval.top_p: must lie in \(0, 1\]"),
                     ({"temperature": 0}, "eval.temperature: must be > 0"),
                     ({"top_k": -1}, "eval.top_k: must be >= 0"),
                     ({"do_sample": "yes"}, "eval.do_sample: expected true or false")]:
        with pytest.raises(ConfigError, match=msg):
            from_dict({**base, "eval": bad})


def takes_prompt(prediction, reference, prompt=None):
    return float(prompt.startswith("ab"))


def takes_kwargs(prediction, reference, **kw):
    return float("prompt" in kw)


def two_args(prediction, reference):
    return 0.25


def test_metric_protocol():
    assert get_metric(takes_prompt)("x", "y", prompt="abc") == 1.0
    assert get_metric(takes_kwargs)("x", "y", prompt="abc") == 1.0
    assert get_metric(two_args)("x", "y", prompt="abc") == 0.25
    assert get_metric("test_evaluate:two_args")("x", "y", prompt="p") == 0.25
    assert get_metric("exact_match")(" a ", "a", prompt="p") == 1.0
    model, exs = tiny_model(), examples(4)
    r = evaluate_examples(model, TOK, exs, metric=takes_prompt, max_prompt_len=32, max_answer_len=4)
    assert r["score"] == pytest.approx(sum(ex.prompt.startswith("ab") for ex in exs) / len(exs))
    assert evaluate_examples(model, TOK, exs, metric=two_args, max_prompt_len=32, max_answer_len=4)["score"] == 0.25


WORKER = r"""
import json, os, sys, torch, torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import test_evaluate as T
from torch.distributed.fsdp import fully_shard
from seekr_kernels.run.evaluate import evaluate_examples
dist.init_process_group("gloo")
m = T.tiny_model()
for layer in m.model.layers:
    fully_shard(layer)
fully_shard(m)
r = evaluate_examples(m, T.TOK, T.examples(), max_prompt_len=32, max_answer_len=8, max_new_tokens=6,
                      batch_size=1, keep_predictions=10, sharded_model=True)
with open(sys.argv[2] + f".{dist.get_rank()}", "w") as f:
    json.dump(r, f)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def test_two_fsdp_ranks_match_one_process(tmp_path):
    # 7 examples over 2 ranks with batch size 1: rank 0 runs 3 prompts and a filler, rank 1
    # runs 4, answers end at different steps: generation must stay in lock-step.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, os.path.abspath(__file__),
                                       str(tmp_path / "r.json")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]   # a rank out of step deadlocks
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    got = [json.load(open(tmp_path / f"r.json.{k}")) for k in range(2)]
    one = evaluate_examples(tiny_model(), TOK, examples(), max_prompt_len=32, max_answer_len=8,
                            max_new_tokens=6, batch_size=1, keep_predictions=10)
    assert got[0]["score"] == got[1]["score"] == pytest.approx(one["score"])
    assert got[0]["loglik"] == pytest.approx(one["loglik"], abs=1e-5)
    both = [p["prediction"] for g in got for p in g["predictions"]]
    assert both == [p["prediction"] for p in one["predictions"]]
    assert len({len(x) for x in both}) > 1                   # answers did end at different steps


def test_cli_eval_uses_trace_metric_and_generation_options(tmp_path, capsys):
    from seekr_kernels.cli import main
    from seekr_kernels.run.data import write_records
    model_dir = str(tmp_path / "model")
    tiny_model().save_pretrained(model_dir)
    TOK.save(model_dir)
    exs = examples(4)
    for name in ("FOMC", "mine"):
        write_records(str(tmp_path / name / "train.json"), exs)
        write_records(str(tmp_path / name / "test.json"), exs)
    args = ["eval", "--model", model_dir, "--task", str(tmp_path / "FOMC"), "--task", str(tmp_path / "mine"),
            "--max-prompt-len", "32", "--max-answer-len", "4", "--out", str(tmp_path / "ev.json")]
    assert main(args) == 0
    res = json.load(open(tmp_path / "ev.json"))["tasks"]
    assert res["FOMC"]["metric"] == "trace:FOMC" and res["mine"]["metric"] == "exact_match"
    assert "trace:FOMC=" in capsys.readouterr().out
    assert main(args + ["--metric", "prefix", "--do-sample", "--num-repeats", "3", "--seed", "1"]) == 0
    res = json.load(open(tmp_path / "ev.json"))["tasks"]
    assert res["mine"]["metric"] == "prefix" and len(res["mine"]["scores"]) == 3
    assert main(args + ["--num-repeats", "2"]) == 2
    assert "--num-repeats: repeats of greedy decoding" in capsys.readouterr().err
    assert main(args + ["--metric", "trace:Nope"]) == 2
    assert "unknown TRACE task 'Nope'" in capsys.readouterr().err
