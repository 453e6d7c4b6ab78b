"""Quality of compact logits teachers on a real pretrained Llama (issue 20).

The teacher is SmolLM2-135M-Instruct (all 30 layers, fp32; ``python -m seekr_kernels.assets
smollm2``), its logits taken on 16 chat prompts (facts, instructions, arithmetic, code,
translation) at the positions of its own greedy answers (up to 32 tokens each: the tokens that
SEEKR's replay distils). The student is the same model after ``--drift-steps`` AdamW steps
(lr 1e-4, full fine-tuning) of language modelling on unrelated text, so the two disagree
as a teacher and a student do after a later task.

For each compact teacher the published logits term (cross-entropy of the student against
softmax(teacher), mean over the answer tokens; ``sk.logits_kl``) is compared with the same
term against the dense teacher, computed here in plain PyTorch:

* ``kl_rel_err``: |value - dense value| / dense KL, where dense KL = dense value - the
  teacher's entropy (the part of the term that depends on the student; the entropy only
  shifts both values, so dividing by the cross-entropy would hide errors);
* ``grad_cos`` / ``grad_rel_err``: cosine and relative L2 error of the gradient w.r.t. the
  student logits against the dense teacher's;
* ``kept_mass``: mean teacher probability mass on the k kept tokens (TopK);
* ``bytes_per_token``: storage per distilled token (``TopK.nbytes`` in memory).

Teachers: ``sk.TopK.from_dense(kind="logits")`` with each ``topk_mode`` (student_tail is
the package default) and ``sk.SampledTeacher.from_dense`` (priority sampling) over
``--draws`` seeds: per-draw rows, plus a ``sampled mean`` row (the mean of the draws'
errors, and the gradient cosine of the draws' mean gradient: unbiasedness).

Output: the table on stdout; ``real_topk_quality.csv`` only with ``--out DIR`` or
``--write`` (= ``--out benchmarks/results``, the committed numbers). ``--quick``: 4 prompts,
8 answer tokens, k in 32/256, 2 draws, 6 decoder layers — a seconds-long smoke run whose
numbers mean nothing. A full run takes about 2-4 minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import seekr_kernels as sk
from benchmarks import common

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain in two sentences why the sky is blue.",
    "What is 12 times 7?",
    "Write a Python function that returns the square of a number.",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for 'happy'.",
    "Who wrote Romeo and Juliet?",
    "List the days of the week.",
    "What is the boiling point of water in Celsius?",
    "Summarize the plot of Cinderella in one sentence.",
    "How many legs does a spider have?",
    "Write a haiku about autumn.",
    "What is the largest planet in our solar system?",
    "Convert 5 kilometers to meters.",
    "Suggest a name for a pet turtle.",
]
DRIFT_TEXT = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Les pommes de terre sont cuites dans l'eau salée pendant vingt minutes.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;",
    "The mitochondria is the powerhouse of the cell, producing ATP through respiration.",
]


def load(layers=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from seekr_kernels.assets import smollm2_path
    path = smollm2_path()
    logging.set_verbosity_error()
    kw = {"num_hidden_layers": layers} if layers else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(path)


def answers(model, tok, prompts, new_tokens):
    """Left-padded [prompt + greedy answer] ids, attention mask and labels (-100 off the answer)."""
    seqs = []
    for p in prompts:
        enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
        n = enc["input_ids"].shape[1]
        seqs.append((out[0, :n].tolist(), out[0, n:].tolist()))
    L = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
    am = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(seqs):
        s = torch.tensor(a + b)
        ids[i, L - len(s):] = s
        am[i, L - len(s):] = 1
        labels[i, L - len(b):] = torch.tensor(b)
    return ids, am, labels


def drift(model, tok, steps, lr=1e-4):
    student = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    enc = tok(DRIFT_TEXT, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for _ in range(steps):
        student(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return student.eval()


def logits_at(model, ids, am, labels):
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    # Logits that predict the answer tokens: position p predicts token p + 1.
    sel = labels[:, 1:] != -100
    return out[:, :-1][sel].float()                       # [N, V]


def dense_reference(s, t):
    """The published term against the dense teacher, plain PyTorch: value, KL, gradient."""
    s = s.detach().requires_grad_(True)
    p = torch.softmax(t.double(), -1)
    ce = -(p * torch.log_softmax(s.double(), -1)).sum(-1).mean()
    ce.backward()
    ent = -(p * torch.log_softmax(t.double(), -1)).sum(-1).mean()
    return ce.item(), (ce - ent).item(), s.grad.double()


def package_term(s, teacher, mode=None):
    s = s.detach().requires_grad_(True)
    labels = torch.zeros(s.shape[0], dtype=torch.long)
    v = sk.logits_kl(s[None], teacher, labels[None], topk_mode=mode)
    v.backward()
    return v.item(), s.grad.double()


def quality_rows(s, t, ks, draws, modes=("student_tail", "uniform", "kept", "renorm")):
    """Rows comparing each compact teacher of ``t`` with the dense one, student logits ``s``."""
    dense_val, dense_kl, dense_g = dense_reference(s, t)
    N = s.shape[0]
    probs = torch.softmax(t.double(), -1)

    def row(teacher, k, mode, seed, val, g, nbytes, kept=None):
        return {"teacher": teacher, "k": k, "mode": mode, "seed": seed, "value": val, "dense_value": dense_val,
                "dense_kl": dense_kl, "kl_rel_err": abs(val - dense_val) / dense_kl,
                "grad_cos": torch.nn.functional.cosine_similarity(g.flatten(), dense_g.flatten(), dim=0).item(),
                "grad_rel_err": ((g - dense_g).norm() / dense_g.norm()).item(),
                "kept_mass": kept, "bytes_per_token": nbytes / N}

    rows = []
    for k in ks:
        tk = sk.TopK.from_dense(t[None], k, kind="logits")
        kept = probs.topk(k, -1).values.sum(-1).mean().item()
        for mode in modes:
            val, g = package_term(s, tk, mode)
            rows.append(row("topk", k, mode, "", val, g, tk.nbytes, kept))
        errs, grads = [], []
        for seed in range(draws):
            st = sk.SampledTeacher.from_dense(t[None], k, seed=seed)
            val, g = package_term(s, st)
            rows.append(row("sampled", k, "priority", seed, val, g, st.nbytes))
            errs.append(rows[-1]["kl_rel_err"])
            grads.append(g)
        gm = torch.stack(grads).mean(0)
        mean = row("sampled mean", k, "priority", f"{draws} draws", sum(r["value"] for r in rows[-draws:]) / draws,
                   gm, st.nbytes)
        mean["kl_rel_err_mean_of_draws"] = sum(errs) / draws
        rows.append(mean)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--write", action="store_true",
                    help="write the committed results (benchmarks/results/real_topk_quality.csv); "
                         "the same as --out benchmarks/results")
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--draws", type=int, default=8, help="seeds of the sampled teacher per k")
    ap.add_argument("--drift-steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy answer tokens per prompt")
    args = ap.parse_args(argv)
    if args.write:
        if args.out and os.path.realpath(args.out) != os.path.realpath(common.RESULTS):
            ap.error("--write writes benchmarks/results; do not combine it with another --out")
        args.out = common.RESULTS
    out = common.out_dir(args) if args.out else None
    torch.manual_seed(0)
    prompts, new_tokens, ks, draws, layers = PROMPTS, args.new_tokens, args.ks, args.draws, None
    if args.quick:
        prompts, new_tokens, ks, draws, layers = PROMPTS[:4], 8, [32, 256], 2, 6
    t0 = time.time()
    model, tok = load(layers)
    ids, am, labels = answers(model, tok, prompts, new_tokens)
    student = drift(model, tok, args.drift_steps)
    t = logits_at(model, ids, am, labels)
    s = logits_at(student, ids, am, labels)
    rows = quality_rows(s, t, ks, draws)
    info = {"model": "SmolLM2-135M-Instruct" + (f" ({layers} layers)" if layers else ""), "tokens": t.shape[0],
            "drift_steps": args.drift_steps, "machine": common.machine()}
    for r in rows:
        r.update(info)
    dense_kl = rows[0]["dense_kl"]
    H = rows[0]["dense_value"] - dense_kl
    print(f"SmolLM2-135M-Instruct teacher, {t.shape[0]} answer tokens, teacher entropy {H:.3f} nats, "
          f"dense KL(teacher || student) {dense_kl:.4f} nats/token ({time.time() - t0:.0f} s)")
    print(f"{'teacher':<13} {'k':>5} {'mode':<13} {'kept mass':>9} {'KL rel. err':>11} {'grad cos':>9} "
          f"{'grad rel. err':>13} {'bytes/token':>11}")
    for r in rows:
        if r["teacher"] == "sampled":
            continue
        err = r.get("kl_rel_err_mean_of_draws", r["kl_rel_err"])
        kept = f"{r['kept_mass']:.4f}" if r["kept_mass"] is not None else ""
        print(f"{r['teacher']:<13} {r['k']:>5} {r['mode']:<13} {kept:>9} {err:>11.2%} {r['grad_cos']:>9.5f} "
              f"{r['grad_rel_err']:>13.4f} {r['bytes_per_token']:>11.0f}")
    dense_bytes = t.shape[-1] * 4
    best = [r for r in rows if r["teacher"] == "topk" and r["mode"] == "student_tail"]
    if best:
        r = best[-1]
        print(f"TopK k={r['k']} (student_tail) vs the dense teacher: storage "
              f"{common.ratio(r['bytes_per_token'], dense_bytes, 'size')}, KL error {r['kl_rel_err']:.2%}")
    if out:
        path = os.path.join(out, "real_topk_quality.csv")
        common.write_csv(path, rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
