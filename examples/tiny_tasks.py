"""Three tiny interfering tasks, a tokenizer trained on them and a tiny Llama: what the
Hugging Face examples (``hf_trainer_seekr.py``, ``trl_sft_seekr.py``) learn in sequence.

Every task reads the same inputs (letter strings) and answers with a different
permutation of them, announced by a tag (``rev:cadb=`` -> ``bdac``); learning a new rule
overwrites the old ones unless something keeps them. Nothing is downloaded: the tokenizer
is trained here with ``tokenizers`` and the model is built from a ``LlamaConfig``.
"""
import importlib.util
import random

import torch

RULES = {
    "rev": lambda x: x[::-1],                 # reverse
    "rot": lambda x: x[2:] + x[:2],           # rotate left by two
    "ilv": lambda x: x[0::2] + x[1::2],       # even positions, then odd ones
}
LETTERS = "abcdefgh"


def require_hf_extra(example, modules=("datasets", "accelerate", "trl", "peft")):
    """Exit with the install line when the ``hf`` extra is missing (``scripts/setup.sh``
    installs only ``triton`` by default), rather than a traceback from an import."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"{example}: needs the hf extra (missing: {', '.join(missing)}): "
                         "pip install -e '.[hf]' or bash scripts/setup.sh triton,hf")


def make_tasks(n_train=160, n_test=24, length=3, seed=0):
    """{rule: {"train": [(prompt, answer)], "test": [(prompt, answer)]}} on shared inputs."""
    if n_train + n_test > len(LETTERS) ** length:
        raise ValueError(f"n_train + n_test: only {len(LETTERS) ** length} distinct inputs of length {length}")
    rng = random.Random(seed)
    inputs = []
    while len(inputs) < n_train + n_test:
        x = "".join(rng.choice(LETTERS) for _ in range(length))
        if x not in inputs:
            inputs.append(x)
    return {name: {split: [(f"{name}:{x}=", rule(x)) for x in xs]
                   for split, xs in (("train", inputs[:n_train]), ("test", inputs[n_train:]))}
            for name, rule in RULES.items()}


def train_tokenizer(tasks):
    """A character-level tokenizer trained on the task texts (``tokenizers``), wrapped for
    transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    texts = [p + a for t in tasks.values() for split in t.values() for p, a in split]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=48, special_tokens=["<pad>", "<s>", "</s>",
                                                                                      "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def tiny_llama(tokenizer, seed=0):
    """A 2-layer Llama sized for a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, vocab_size=len(tokenizer),
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def encode(tokenizer, pairs):
    """Rows ``{"prompt_ids", "answer_ids"}`` (bos + prompt, answer + eos)."""
    out = []
    for p, a in pairs:
        out.append({"prompt_ids": [tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False),
                    "answer_ids": tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id]})
    return out


@torch.no_grad()
def exact_match(model, tokenizer, pairs, bos=True, batch_size=32):
    """Share of prompts whose greedy answer is exactly right."""
    was = model.training
    model.eval()
    hits = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [(tokenizer.bos_token if bos else "") + p for p, _ in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for (_, a), ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            hits += tokenizer.decode(ids, skip_special_tokens=True).strip() == a
    model.train(was)
    return hits / max(1, len(pairs))


def report(trainer, res):
    """Print the last replay log of a SEEKR Trainer and ``train_tasks``' matrix, OP and BWT."""
    replay_logs = [h for h in trainer.state.log_history if "replay_ce" in h]
    if replay_logs:
        last = replay_logs[-1]
        print("last replay log: " + ", ".join(f"{k}={last[k]:.4f}" for k in
                                               ("replay_ce", "replay_logits_kl", "replay_attn_kl") if k in last))
    print("accuracy matrix (row: after task, column: task):")
    for name, row in zip(res["tasks"], res["matrix"]):
        print(f"  {name}: " + " ".join("  -  " if v is None else f"{v:.2f}" for v in row))
    print(f"OP={res['OP']:.3f} BWT={res['BWT']:.3f}")
