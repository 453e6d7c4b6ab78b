"""Continual learning of a real pretrained Llama: SmolLM2-135M-Instruct with LoRA on four
interfering natural-language tasks, six methods, TRACE's scores (issue 20).

Model: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads; ``python -m
seekr_kernels.assets smollm2``), fp32, LoRA r = 8 (alpha 16) on q_proj and v_proj of the
top 12 layers (18-29), through the package's own trainer (``python -m seekr_kernels train --config``, one
generated YAML per method and seed; the merged model is its ``final/``).

Tasks (TRACE's style, generated here from a fixed data seed, the same for every method and
run seed; fixed before any method ran and not tuned afterwards). Every task reads the same
kind of input — a customer message naming a person, a city, two ordered items with counts
and a problem — and asks something else of it, so learning one task pulls the model's
answers to the others' prompts (interference):

* ``route``: classify the message into a made-up team label (ZORP / BLICK / QUAN / MIVO, by
  the kind of problem); exact match. The base model cannot know the labels.
* ``count``: the arithmetic word problem "how many items in total" (a + b, 1..9 each);
  exact match of the number.
* ``rewrite``: a formal message rewritten as one plain sentence ("<name> from <city> says the
  order <problem>."); ROUGE-L (TRACE's MeetingBank metric).
* ``extract``: structured extraction ``name|city|first item``; exact match.

Prompts are the chat template's user turn (without the default system turn, to keep
sequences short: about 60 tokens with the answer). The harness first scores the base model
on every task (``seekr eval``): all four are low before training.

Methods: ``sft``, ``replay-1%``, ``replay-10%``, ``replay+logits-1%``, ``seekr-1%`` (package
recipe) and ``seekr-1%-official`` (``recipe: official``; the train section's batch, lr,
lengths and accumulation are set explicitly so that every method optimises the same way,
the preset sets the rest: fixed orders, one optimiser for the run, the first 1% as memory,
log(p + 1e-8), the published statistics, all query rows).

Scores per method and seed: the accuracy matrix (task j after training task i), OP and BWT
(TRACE's definitions, BWT over T - 1 tasks; fractions in the CSV, percent in the printed table), and TRACE's general-ability retention
on a fixed set of general prompts (capitals, opposites, everyday facts and one-digit
additions asked for a number only; 210 in all, ``general_prompts``): 32 of them (shuffled
with a fixed seed) are held out for the KL, the base model's greedy answers to the others
are scored for the key answer, the prompts it gets right are kept (about 110), and a
model's ``general`` score is the fraction of those it still answers with the key answer
(exact match of the key in the greedy answer); ``general_kl`` is the mean per-token
KL(base || model) on the base model's own greedy answers to the 32 held-out prompts. Wall
time, CPU time and peak resident memory (the training process's, ``wait4``) per method,
and where the wall time went (``time_split``: training steps, replay steps, end-of-task
passes, evaluation, checkpoints).

Output (``--out DIR``, default ./bench-out/; the committed numbers only with ``--out
benchmarks/results``): ``real_continual.csv`` (one row per method and seed, plus the base
model's row), ``real_continual.png`` and the run folders under ``DIR/real_continual_work``.

Optimisation, the same for every method: batch 4, AdamW lr 2e-3, 1 epoch (50 steps per
task), replay batches of 2. Chosen before any other method ran, from one sft seed at batch 8
and lr 1e-3 (25 steps per task), which left ``route`` at its majority label (0.37) and
``count`` at 0.17 after their own task: too little learnt for forgetting to mean much.

Time: a full seed is 6 methods x 4 tasks x 200 training samples (50 steps of 4 per task,
1 epoch; 200 train steps plus the replay steps), evaluation of 30 test samples per seen task
after each task (10 task evaluations) and the general set. A training step of 8 x ~64
tokens (LoRA on the top 12 layers) takes about 2 s on two idle cores and 4 s on one
(measured). Measured per run: 580-860 CPU-s with one thread (160-390 s of it evaluation),
so a seed of the six methods is about 70 CPU-minutes, plus about 5-7 for the base model's
pass; two harnesses with ``--threads 1`` finish a seed in about 40 minutes on two idle cores. The
recorded run used two harnesses at once with ``--threads 1`` on disjoint methods (what
``benchmarks/results/README.md`` gives) and ``--combine`` to join them. ``--quick``: the
first 4 decoder layers, 8 training and 2 test samples per task, 12 general prompts, the
methods given (default all), 1 or 4 replay samples: a smoke run whose numbers mean nothing
(about a minute per method on idle cores).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

METHODS = {
    "sft": {"method": "sft"},
    "replay-1%": {"method": "replay", "replay": {"ratio": 0.01}},
    "replay-10%": {"method": "replay", "replay": {"ratio": 0.1}},
    "replay+logits-1%": {"method": "replay+logits", "replay": {"ratio": 0.01}},
    "seekr-1%": {"method": "seekr", "replay": {"ratio": 0.01}},
    "seekr-1%-official": {"method": "seekr", "recipe": "official", "replay": {"ratio": 0.01}},
}
DATA_SEED = 1234          # the task set; fixed, whatever --seeds says

# LoRA on the top 12 of the 30 layers: the backward pass stops at layer 18, which halves a
# training step's cost (measured: 8.6-14 vs 25 CPU-s per step of 8 x 56 tokens on the shared
# machine); the lower layers' attention then never changes, so SEEKR's importance (x
# forgettability) selects heads in the adapted layers, where distillation can act.
TOP12 = r"model\.layers\.(1[8-9]|2[0-9])\.self_attn\.(q_proj|v_proj)"
FULL = {"layers": None, "train": 200, "test": 30, "batch": 4, "epochs": 1, "lr": 2e-3, "general": None,
        "max_new_tokens": 24, "kl_prompts": 32, "lora_targets": TOP12}
QUICK = {"layers": 4, "train": 8, "test": 2, "batch": 4, "epochs": 1, "lr": 1e-3, "general": 12,
         "max_new_tokens": 8, "kl_prompts": 4, "lora_targets": ["q_proj", "v_proj"]}

# ============================================================================ tasks

FIRST = ["Maria", "John", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Pavel", "Grace", "Tariq", "Elena", "Bruno",
         "Mei", "Diego", "Hana", "Ivan", "Chloe", "Samir", "Nora", "Felix"]
LAST = ["Lopez", "Smith", "Khan", "Sato", "Weber", "Haddad", "Rossi", "Novak", "Okafor", "Silva", "Berg", "Costa",
        "Chen", "Moreno", "Kim", "Petrov", "Dubois", "Aziz", "Larsen", "Meyer"]
CITIES = ["Porto", "Leeds", "Lyon", "Osaka", "Graz", "Tunis", "Turin", "Brno", "Lagos", "Recife", "Bergen", "Cork",
          "Busan", "Quito", "Malmo", "Tartu", "Nantes", "Fez", "Aarhus", "Basel"]
ITEMS = ["lamp", "mug", "chair", "kettle", "towel", "candle", "pillow", "basket", "mirror", "blanket", "vase",
         "clock", "plate", "notebook", "jacket", "scarf"]
PROBLEMS = {  # kind: (plain, formal, made-up team)
    "damaged": ("arrived damaged", "has reached me in a regrettably damaged condition", "ZORP"),
    "late": ("has not arrived yet", "has, to date, not been delivered to my address", "BLICK"),
    "wrong": ("contains the wrong items", "contains articles that differ from those I selected", "QUAN"),
    "charged": ("was charged twice", "appears to have been billed to my account on two occasions", "MIVO"),
}
TASKS = ("route", "count", "rewrite", "extract")
METRICS = {"route": "exact_match", "count": "exact_match", "rewrite": "rouge_l", "extract": "exact_match"}


def _record(rng):
    item1, item2 = rng.sample(ITEMS, 2)
    return {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "city": rng.choice(CITIES), "item1": item1,
            "item2": item2, "a": rng.randint(1, 9), "b": rng.randint(1, 9), "kind": rng.choice(sorted(PROBLEMS))}


def _plural(n, item):
    return f"{n} {item}" + ("" if n == 1 else "es" if item.endswith(("sh", "ch", "s", "x")) else "s")


def _message(r):
    return (f"Hi, I am {r['name']} from {r['city']}. I ordered {_plural(r['a'], r['item1'])} and "
            f"{_plural(r['b'], r['item2'])}, and the order {PROBLEMS[r['kind']][0]}.")


def _formal(r):
    return (f"Dear team, my name is {r['name']} and I reside in {r['city']}. I wish to inform you that my recent "
            f"purchase of {_plural(r['a'], r['item1'])} and {_plural(r['b'], r['item2'])} {PROBLEMS[r['kind']][1]}.")


def example(task, r):
    """(user message, answer) of one task for one generated record."""
    if task == "route":
        return (f"Route this customer message to a team: ZORP, BLICK, QUAN or MIVO. Answer with the team name only.\n"
                f"Message: {_message(r)}", PROBLEMS[r["kind"]][2])
    if task == "count":
        return (f"How many items did the customer order in total? Answer with a number only.\n"
                f"Message: {_message(r)}", str(r["a"] + r["b"]))
    if task == "rewrite":
        return (f"Rewrite this message as one short plain sentence.\nMessage: {_formal(r)}",
                f"{r['name']} from {r['city']} says the order {PROBLEMS[r['kind']][0]}.")
    if task == "extract":
        return (f"Extract the customer's name, city and first item as name|city|item.\nMessage: {_message(r)}",
                f"{r['name']}|{r['city']}|{r['item1']}")
    raise ValueError(task)


def prompt_text(tok, user):
    """The chat template's user turn (no system turn) ending in the assistant header, without
    its first token: the package's encoder prepends the tokenizer's bos, <|im_start|>."""
    text = f"{tok.bos_token}user\n{user}{tok.eos_token}\n{tok.bos_token}assistant\n"
    return text[len(tok.bos_token):]


def write_tasks(tok, folder, n_train, n_test):
    """One JSON-lines file per task (train and test splits), from the fixed data seed. Each
    task draws its own records (the same generator, so the same distribution)."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for t, task in enumerate(TASKS):
        rng = random.Random(DATA_SEED * 10 + t)
        path = os.path.join(folder, f"{task}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for split, n in (("train", n_train), ("test", n_test)):
                for _ in range(n):
                    user, answer = example(task, _record(rng))
                    f.write(json.dumps({"prompt": prompt_text(tok, user), "answer": answer, "split": split}) + "\n")
        paths[task] = path
    return paths


# ============================================================================ general ability

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Kenya", "Nairobi"),
            ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Belgium", "Brussels"),
            ("the Netherlands", "Amsterdam"), ("the United Kingdom", "London"), ("Mexico", "Mexico City"),
            ("Canada", "Ottawa"), ("Australia", "Canberra")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("happy", "sad"), ("fast", "slow"),
             ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("old", "new"),
             ("wet", "dry"), ("high", "low"), ("hard", "soft"), ("strong", "weak"), ("rich", "poor"),
             ("left", "right"), ("day", "night"), ("in", "out"), ("win", "lose"), ("push", "pull")]
FACTS = [("How many days are there in a week?", "7"), ("How many legs does a spider have?", "8"),
         ("How many hours are in a day?", "24"), ("How many months are in a year?", "12"),
         ("What color is the sky on a clear day?", "blue"), ("What color is grass?", "green"),
         ("What is the largest planet in our solar system?", "Jupiter"), ("What is the chemical symbol for water?",
                                                                          "H2O"),
         ("What do bees make?", "honey"), ("Which animal is known as the king of the jungle?", "lion"),
         ("What is the freezing point of water in Celsius?", "0"), ("How many sides does a triangle have?", "3"),
         ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the opposite of north?", "south"),
         ("How many minutes are in an hour?", "60"), ("What planet do we live on?", "Earth"),
         ("What gas do plants absorb from the air?", "carbon dioxide"), ("How many continents are there?", "7"),
         ("What is the boiling point of water in Celsius?", "100"), ("How many sides does a square have?", "4")]

CAPITALS2 = [("Brazil", "Brasilia"), ("India", "New Delhi"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
             ("Iraq", "Baghdad"), ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
             ("Switzerland", "Bern"), ("the Czech Republic", "Prague"), ("Romania", "Bucharest"),
             ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"), ("Serbia", "Belgrade"), ("Ukraine", "Kyiv"),
             ("Vietnam", "Hanoi"), ("the Philippines", "Manila"), ("Indonesia", "Jakarta"), ("Malaysia", "Kuala Lumpur"),
             ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Afghanistan", "Kabul"),
             ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Lebanon", "Beirut"), ("Syria", "Damascus"),
             ("Jordan", "Amman"), ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Nigeria", "Abuja"),
             ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"), ("Iceland", "Reykjavik"), ("New Zealand", "Wellington"),
             ("the United States", "Washington"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Estonia", "Tallinn"),
             ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"),
             ("Uruguay", "Montevideo"), ("Bolivia", "La Paz"), ("Ecuador", "Quito"), ("Jamaica", "Kingston"),
             ("Qatar", "Doha"), ("Kuwait", "Kuwait City"), ("Singapore", "Singapore")]
OPPOSITES2 = [("good", "bad"), ("yes", "no"), ("black", "white"), ("love", "hate"), ("true", "false"),
        ("clean", "dirty"), ("thick", "thin"), ("long", "short"), ("young", "old"), ("first", "last"),
        ("buy", "sell"), ("give", "take"), ("laugh", "cry"), ("heavy", "light"), ("cheap", "expensive"),
        ("safe", "dangerous"), ("quiet", "loud"), ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"),
        ("start", "finish"), ("before", "after"), ("above", "below"), ("inside", "outside"), ("friend", "enemy"),
        ("war", "peace"), ("north", "south"), ("east", "west"), ("summer", "winter"), ("male", "female")]
FACTS2 = [("What color is a banana?", "yellow"), ("What color is snow?", "white"), ("What color is a ripe tomato?", "red"),
          ("What is the closest star to Earth?", "Sun"), ("What is the largest ocean on Earth?", "Pacific"),
          ("What is the tallest mountain in the world?", "Everest"), ("What is the longest river in Africa?", "Nile"),
          ("Which planet is known as the Red Planet?", "Mars"), ("What do cows drink?", "water"),
          ("What do caterpillars turn into?", "butterflies"), ("Who painted the Mona Lisa?", "Leonardo"),
          ("Who was the first president of the United States?", "Washington"),
          ("What is the largest mammal?", "whale"), ("What is the fastest land animal?", "cheetah"),
          ("Which gas do humans need to breathe?", "oxygen"), ("What is the hardest natural substance?", "diamond"),
          ("In which country are the pyramids of Giza?", "Egypt"), ("What language is spoken in Brazil?", "Portuguese"),
          ("What is the main language spoken in Mexico?", "Spanish"), ("Which organ pumps blood through the body?", "heart"),
          ("What is frozen water called?", "ice"), ("What is the currency of Japan?", "yen"),
          ("What instrument has 88 keys?", "piano"), ("Who developed the theory of relativity?", "Einstein"),
          ("What is the capital city of the state of California?", "Sacramento"),
          ("How many wheels does a bicycle have?", "2"), ("How many days are in a leap year?", "366"),
          ("What is the largest country by area?", "Russia"), ("Which continent is Kenya in?", "Africa"),
          ("What is the smallest prime number?", "2")]


def general_prompts():
    """(prompt, key answer) pairs: 80 capitals, 50 opposites, 50 facts and 30 one-digit
    additions (distinct) asked for a number only (210 in all). Fixed before the first full run from
    what the base model answers within max_new_tokens: bare "What is a + b?" prompts (an
    earlier draft) drew a worked explanation that never reached the sum in 24 tokens (1 of
    60 right), so the additions ask for the number only."""
    rng = random.Random(DATA_SEED + 2)
    out = [(f"What is the capital of {c}?", cap) for c, cap in CAPITALS + CAPITALS2]
    out += [(f"What is the opposite of '{w}'?", o) for w, o in OPPOSITES + OPPOSITES2]
    out += FACTS + FACTS2
    pairs = rng.sample([(a, b) for a in range(1, 10) for b in range(1, 10)], 30)
    out += [(f"What is {a} + {b}? Answer with a number only.", str(a + b)) for a, b in pairs]
    return out


def has_key(answer: str, key: str) -> bool:
    """The key answer appears in ``answer`` as a whole word (case-insensitive; numbers exact)."""
    return re.search(r"(?<![\w.])" + re.escape(key.lower()) + r"(?![\w])", answer.lower()) is not None


def _chat_ids(tok, user):
    return [tok.bos_token_id] + tok(prompt_text(tok, user), add_special_tokens=False)["input_ids"]


def _left_pad(seqs, pad):
    import torch
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        am[i, L - len(s):] = 1
    return ids, am


def greedy(model, tok, users, max_new_tokens, batch=16):
    """Greedy answers (token id lists, up to and including eos) to user messages."""
    import torch
    outs = []
    for i in range(0, len(users), batch):
        seqs = [_chat_ids(tok, u) for u in users[i:i + batch]]
        ids, am = _left_pad(seqs, tok.pad_token_id)
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)
        for row in g[:, ids.shape[1]:].tolist():
            outs.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return outs


def _answer_logprobs(model, tok, users, answers):
    """log softmax of the model at the positions predicting each answer token: [N, V]."""
    import torch
    rows = []
    for u, a in zip(users, answers):
        p = _chat_ids(tok, u)
        ids = torch.tensor([p + a])
        with torch.no_grad():
            lg = model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(a) - 1].float()
        rows.append(torch.log_softmax(lg, -1))
    return torch.cat(rows)


class General:
    """TRACE-style general-ability retention, scored against the base model."""

    def __init__(self, base, tok, n_prompts, max_new_tokens, kl_prompts):
        gp = general_prompts()
        random.Random(DATA_SEED + 1).shuffle(gp)
        gp = gp[:n_prompts] if n_prompts else gp
        self.kl_users = [u for u, _ in gp[:kl_prompts]]
        self.eval = gp[kl_prompts:] if len(gp) > kl_prompts else gp
        self.tok, self.max_new = tok, max_new_tokens
        base_ans = greedy(base, tok, [u for u, _ in self.eval], max_new_tokens)
        texts = [tok.decode(a, skip_special_tokens=True) for a in base_ans]
        self.kept = [(u, k) for (u, k), t in zip(self.eval, texts) if has_key(t, k)]
        self.base_correct = len(self.kept) / len(self.eval)
        self.kl_answers = greedy(base, tok, self.kl_users, max_new_tokens)
        self.base_logp = _answer_logprobs(base, tok, self.kl_users, self.kl_answers)

    def score(self, model):
        """(retention: fraction of the kept prompts still answered with the key, or None if
        the base got none right; mean per-token KL(base || model) on base generations)."""
        ret = None
        if self.kept:
            ans = greedy(model, self.tok, [u for u, _ in self.kept], self.max_new)
            ok = [has_key(self.tok.decode(a, skip_special_tokens=True), k) for a, (_, k) in zip(ans, self.kept)]
            ret = sum(ok) / len(ok)
        lp = _answer_logprobs(model, self.tok, self.kl_users, self.kl_answers)
        kl = (self.base_logp.exp() * (self.base_logp - lp)).sum(-1).mean().item()
        return ret, kl


# ============================================================================ runs

def _python_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    return env


def run_timed(cmd, log_path, cwd=None):
    """Run ``cmd`` with its output in ``log_path``: (exit code, wall seconds, peak RSS MiB of
    the child, its CPU seconds (user + system), from wait4)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_python_env(), cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.time() - t0, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def base_scores(model_dir, paths, cfg, work):
    """The base model's score per task through ``seekr eval`` (one call per metric)."""
    scores = {}
    for metric in sorted(set(METRICS.values())):
        tasks = [t for t in TASKS if METRICS[t] == metric]
        out = os.path.join(work, f"base-{metric}.json")
        cmd = [sys.executable, "-m", "seekr_kernels", "eval", "--model", model_dir, "--metric", metric,
               "--max-prompt-len", "128", "--max-answer-len", "32", "--max-new-tokens", str(cfg["max_new_tokens"]),
               "--batch-size", "16", "--out", out] + [a for t in tasks for a in ("--task", paths[t])]
        rc = run_timed(cmd, out + ".log")[0]
        if rc:
            raise RuntimeError(f"seekr eval of the base model failed; see {out}.log")
        with open(out) as f:
            res = json.load(f)["tasks"]
        scores.update({t: res[t]["score"] for t in tasks})
    return scores


def run_config(name, seed, model_dir, paths, cfg, out_dir, threads=0):
    spec = METHODS[name]
    c = {"method": spec["method"], "output_dir": out_dir, "seed": seed, "device": "cpu",
         "model": {"path": model_dir, "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                               "target_modules": cfg["lora_targets"], "save": "merged"}},
         "tasks": [{"name": t, "path": paths[t], "metric": METRICS[t]} for t in TASKS],
         "train": {"batch_size": cfg["batch"], "grad_accum": 1, "epochs": cfg["epochs"], "lr": cfg["lr"],
                   "max_prompt_len": 128, "max_answer_len": 32, "pad_to_multiple_of": 8, "precision": "fp32",
                   **({"num_threads": threads} if threads else {})},
         "replay": {"batch_size": max(1, cfg["batch"] // 2), **spec.get("replay", {})},
         "eval": {"batch_size": 16, "max_new_tokens": cfg["max_new_tokens"]},
         "log": {"progress": False}}
    if "recipe" in spec:
        c["recipe"] = spec["recipe"]
    if cfg is QUICK and "ratio" in c["replay"]:
        # 1% of 8 samples is none under the published "first" subset: counts instead.
        c["replay"]["ratio"] = 1 if c["replay"]["ratio"] <= 0.01 else 4
    return c


def time_split(log_path):
    """Where a run's wall time went, from its log.jsonl: each event's time since the one
    before it is charged to the event's kind -- ``train`` and ``replay`` steps, ``passes``
    (the end-of-task passes: memory, importance/sensitivity, forgettability, teacher
    capture and head selection, which end in the ``heads`` event), ``eval`` (generation and
    scoring, ``samples`` and ``eval``) and ``save`` (checkpoints). What precedes the first
    step (start-up, model load) and follows the last event (final save) is the rest of the
    wall time. Methods without head selection have no ``heads`` event: their end-of-task
    work (memory, teacher capture) is charged to ``eval``."""
    kinds = {"train": "train", "replay": "replay", "heads": "passes", "samples": "eval", "eval": "eval",
             "saved": "save"}
    out = {k: 0.0 for k in ("train", "replay", "passes", "eval", "save")}
    prev = None
    with open(log_path) as f:
        for line in f:
            ev = json.loads(line)
            t = ev.get("time")
            if t is None:
                continue
            if prev is not None and ev.get("kind") in kinds:
                out[kinds[ev["kind"]]] += t - prev
            prev = t
    return {f"time_{k}_s": round(v, 1) for k, v in out.items()}


def parse_variant(text):
    """``LABEL:KEY=VALUE[,KEY=VALUE...]`` -> (label, {dotted key: YAML value}): a factor-study
    variant, e.g. ``attn100:distill.attn_weight=100``."""
    import yaml
    label, sep, body = text.partition(":")
    if not sep or not label or not body:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE...]")
    sets = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        sets[key.strip()] = yaml.safe_load(value)
    return label, sets


def apply_sets(config, sets):
    """Set dotted keys (``distill.attn_weight``) in a run config, making sections as needed."""
    for key, value in sets.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config


def run_method(name, seed, model_dir, paths, cfg, work, general, max_steps=0, threads=0, variant=None):
    import torch
    import yaml
    from transformers import AutoModelForCausalLM
    label, sets = variant or (None, {})
    run_dir = os.path.join(work, f"{name}-seed{seed}" + (f"-{label}" if label else ""))
    cfg_path = run_dir + ".yaml"
    with open(cfg_path, "w") as f:
        c = apply_sets(run_config(name, seed, model_dir, paths, cfg, run_dir, threads), sets)
        if max_steps:
            c["train"]["max_steps"] = max_steps
        yaml.safe_dump(c, f, sort_keys=False)
    cmd = [sys.executable, "-m", "seekr_kernels", "train", "--config", cfg_path, "--overwrite"]
    rc, wall, peak, cpu = run_timed(cmd, run_dir + ".log")
    row = {"method": name + (f" [{label}]" if label else ""), "seed": seed,
           "variant": json.dumps(sets, sort_keys=True) if sets else "", "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": round(peak)}
    if rc:
        row["error"] = f"seekr train exited {rc}; see {run_dir}.log"
        return row
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    row.update(time_split(os.path.join(run_dir, "log.jsonl")))
    row.update({"OP": res["OP"], "BWT": res["BWT"], "steps": res["global_step"],
                "matrix": json.dumps([[None if v is None else round(v, 4) for v in r] for r in res["matrix"]])})
    row.update({f"final_{t}": res["matrix"][-1][j] for j, t in enumerate(TASKS)})
    model = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final"), dtype=torch.float32).eval()
    row["general"], row["general_kl"] = general.score(model)
    return row


# ============================================================================ output

def _values(rows, method, key):
    """The recorded values of ``key`` over the rows (seeds) of ``method``."""
    return [float(r[key]) for r in rows if r["method"] == method and r.get(key) not in (None, "")]


def plot(path, rows):
    plt = common.pyplot()
    if plt is None:
        return
    rows = [r for r in rows if r["method"] != "base" and r.get("OP") not in (None, "")]
    methods = list(dict.fromkeys(r["method"] for r in rows))

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    # OP and BWT are fractions in the CSV; the axes give percent, as the tables do.
    for a, (k, title, scale) in zip(ax, (("OP", "OP (%)", 100), ("BWT", "BWT (%)", 100),
                                         ("general", "general retention", 1))):
        v = [[scale * x for x in _values(rows, m, k)] for m in methods]
        means = [sum(x) / len(x) if x else float("nan") for x in v]
        err = [[mu - min(x) if x else 0 for mu, x in zip(means, v)],
               [max(x) - mu if x else 0 for mu, x in zip(means, v)]]
        a.bar(range(len(methods)), means, yerr=err, capsize=3)
        a.set_xticks(range(len(methods)))
        a.set_xticklabels(methods, rotation=30, ha="right")
        a.set_title(title)
        a.axhline(0, color="k", lw=0.5)
    fig.suptitle("SmolLM2-135M-Instruct + LoRA, 4 tasks (mean over seeds, bars: min to max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.1f}" if pct else f"{v:.3f}"


def summary(rows):
    """Markdown table over seeds: per method the mean [min, max] of OP, BWT, general
    retention and KL, mean wall and CPU seconds with the ratio to sft's (same seeds), and
    where the wall time went (means)."""
    runs = [r for r in rows if r["method"] != "base" and r.get("OP") not in (None, "")]
    methods = list(dict.fromkeys(r["method"] for r in runs))

    def vals(m, k):
        return _values(runs, m, k)

    def mmm(v, pct):
        if not v:
            return "-"
        # OP and BWT are fractions in results.json and the CSV; the table gives percent.
        f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
        return f"{f(sum(v) / len(v))} [{f(min(v))}, {f(max(v))}]"
    mean = (lambda v: sum(v) / len(v) if v else float("nan"))
    sft_cpu, sft_wall = mean(vals("sft", "cpu_s")), mean(vals("sft", "wall_s"))
    lines = ["| method | seeds | OP % | BWT % | general retention | general KL | wall s (x sft) | CPU s (x sft) "
             "| train / replay / passes / eval / save s |",
             "| --- | ---: | --- | --- | --- | --- | ---: | ---: | --- |"]
    for m in methods:
        w, c = mean(vals(m, "wall_s")), mean(vals(m, "cpu_s"))
        split = " / ".join(f"{mean(vals(m, f'time_{k}_s')):.0f}" for k in ("train", "replay", "passes", "eval", "save"))
        lines.append(f"| {m} | {len(vals(m, 'OP'))} | {mmm(vals(m, 'OP'), True)} | {mmm(vals(m, 'BWT'), True)} | "
                     f"{mmm(vals(m, 'general'), False)} | {mmm(vals(m, 'general_kl'), False)} | "
                     f"{w:.0f} ({w / sft_wall:.2f}) | {c:.0f} ({c / sft_cpu:.2f}) | {split} |")
    return "\n".join(lines)


def combine(folders, out):
    """One CSV, plot and summary from the real_continual.csv of several harness runs
    (e.g. two with --threads 1 on disjoint methods): the base row once, every run row."""
    rows, base = [], None
    for d in folders:
        for r in common.read_csv(os.path.join(d, "real_continual.csv")):
            if r["method"] == "base":
                base = base or r
            else:
                rows.append(r)
    rows = [base] + rows if base else rows
    common.write_csv(os.path.join(out, "real_continual.csv"), rows)
    plot(os.path.join(out, "real_continual.png"), rows)
    print(summary(rows))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (LoRA init, data order)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads of each training run (train.num_threads; 0: the package's choice). "
                         "Two harnesses with --threads 1 each, on disjoint --methods, use two cores better "
                         "than one with 2")
    ap.add_argument("--variant", type=parse_variant, action="append", default=None, metavar="LABEL:KEY=VALUE,...",
                    help="a factor-study variant: run every method with these config keys set (repeatable; "
                         "e.g. attn100:distill.attn_weight=100); rows are labelled 'method [LABEL]'")
    ap.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                    help="no runs: combine the real_continual.csv of these output folders into --out")
    ap.add_argument("--base-only", action="store_true",
                    help="score the base model only (tasks and general prompts), no training")
    args = ap.parse_args(argv)
    if args.base_only:
        args.methods = []
    out = common.out_dir(args)
    if args.combine:
        return combine(args.combine, out)
    cfg = QUICK if args.quick else FULL
    work = os.path.join(out, "real_continual_work")
    os.makedirs(work, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from seekr_kernels.assets import smollm2_path
    logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    src = smollm2_path()
    tok = AutoTokenizer.from_pretrained(src)
    model_dir = src
    if cfg["layers"]:       # --quick: a layer-subset copy, saved as a plain folder
        model_dir = os.path.join(work, f"smollm2-{cfg['layers']}l")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            m = AutoModelForCausalLM.from_pretrained(src, num_hidden_layers=cfg["layers"])
            m.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
    t0 = time.time()
    paths = write_tasks(tok, os.path.join(work, "tasks"), cfg["train"], cfg["test"])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    general = General(base, tok, cfg["general"], cfg["max_new_tokens"], cfg["kl_prompts"])
    del base
    bs = base_scores(model_dir, paths, cfg, work)
    print(f"base model ({os.path.basename(model_dir)}): " + ", ".join(f"{t}={bs[t]:.3f}" for t in TASKS)
          + f"; general prompts answered right: {len(general.kept)}/{len(general.eval)} ({time.time() - t0:.0f} s)",
          flush=True)
    rows = [{"method": "base", "seed": "", **{f"final_{t}": bs[t] for t in TASKS},
             "general": 1.0 if general.kept else None, "general_kl": 0.0,
             "general_base_correct": general.base_correct, "general_kept": len(general.kept),
             "general_prompts": len(general.eval)}]
    meta = {"model": os.path.basename(model_dir), "quick": args.quick, "machine": common.machine(),
            "threads": args.threads, **{
        f"cfg_{k}": v for k, v in cfg.items()}}
    rows[0].update(meta)
    for seed in args.seeds:
        for name, variant in [(m, v) for m in args.methods for v in (args.variant or [None])]:
            row = run_method(name, seed, model_dir, paths, cfg, work, general, threads=args.threads,
                             variant=variant)
            row.update(meta)
            rows.append(row)
            # After every run, so that a killed or crashed harness keeps what it measured.
            common.write_csv(os.path.join(out, "real_continual.csv"), rows, say=False)
            name = row["method"]
            if "error" in row:
                print(f"[{name} seed {seed}] ERROR {row['error']}", flush=True)
                continue
            print(f"[{name} seed {seed}] OP {100 * row['OP']:.1f}%  BWT {100 * row['BWT']:.1f}%  "
                  + "  ".join(f"{t}={row['final_' + t]:.3f}" for t in TASKS)
                  + f"  general {_fmt(row['general'])}  KL {row['general_kl']:.4f}  {row['wall_s']:.0f} s  "
                  f"(CPU {row['cpu_s']:.0f} s)  {row['peak_rss_mib']} MiB peak", flush=True)
    common.write_csv(os.path.join(out, "real_continual.csv"), rows)
    plot(os.path.join(out, "real_continual.png"), rows)
    done = [r for r in rows if "OP" in r]
    sft = [r for r in done if r["method"] == "sft"]
    for r in done:
        if r["method"] != "sft" and sft:
            print(f"{r['method']} (seed {r['seed']}) vs sft: wall time {common.ratio(r['wall_s'], sft[0]['wall_s'])}, "
                  f"peak memory {common.ratio(r['peak_rss_mib'], sft[0]['peak_rss_mib'], 'memory')}")
    print(summary(rows))
    print(f"wrote {os.path.join(out, 'real_continual.csv')} and real_continual.png ({time.time() - t0:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
