"""SEEKR training on the real (layer-subset) model: the Hugging Face ``SeekrTrainer`` with PEFT
LoRA and checkpointing, and the ``seekr train`` command on a folder saved from it.

Two tiny tasks of chat-template prompts (4 samples each, two optimiser steps per task): the
second task replays the first one's memory (2 samples) before each of its steps, with all
three SEEKR terms. What must hold: every loss is finite, the attention term is 0 at the
first replay (the student is still the model the teacher rows were captured on) and
positive at the second (a task-2 step changed it), the LoRA weights moved and the base
weights did not, and the checkpoints hold the recipe state.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from real_helpers import chat_ids

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASKS = {
    "capitals": [("What is the capital of Italy?", "Rome"), ("What is the capital of Japan?", "Tokyo"),
                 ("What is the capital of Kenya?", "Nairobi"), ("What is the capital of Peru?", "Lima")],
    "opposites": [("Give the opposite of 'hot'.", "cold"), ("Give the opposite of 'up'.", "down"),
                  ("Give the opposite of 'early'.", "late"), ("Give the opposite of 'full'.", "empty")],
}


def _rows(tok, pairs):
    return [{"prompt_ids": chat_ids(tok, q), "answer_ids": tok(a, add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id]} for q, a in pairs]


def test_hf_seekr_trainer_with_lora_and_checkpoints(model, tokenizer, tmp_path):
    peft = pytest.importorskip("peft", reason="the LoRA path needs peft (the test extra)")
    from seekr_kernels.hf import SeekrConfig, SeekrTrainer
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    args = SeekrConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                       learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=1, use_cpu=True,
                       report_to=[], disable_tqdm=True, seekr_method="seekr", replay_ratio=2, replay_batch_size=2,
                       replay_cycle=1, layer_budget=2, head_budget=4, query_budget=8)
    trainer = SeekrTrainer(model=lora, args=args)
    logs = []

    class Record(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            records.append({**(logs or {}), "step": state.global_step})
    records = logs
    trainer.add_callback(Record())
    trainer.train_tasks([(name, _rows(tokenizer, pairs)) for name, pairs in TASKS.items()])

    losses = [h["loss"] for h in logs if "loss" in h]
    replay = [h for h in logs if "replay_attn_kl" in h]
    assert losses and all(math.isfinite(x) for x in losses), logs
    assert len(replay) == 2, logs                            # before each step of task 2
    assert all(math.isfinite(h["replay_loss"]) for h in replay), logs
    assert abs(replay[0]["replay_attn_kl"]) < 1e-6 < replay[1]["replay_attn_kl"], replay
    changed = [n for n, p in lora.named_parameters() if "lora_" in n and not torch.equal(p, before[n])]
    assert len(changed) == len([n for n in before if "lora_B" in n]) * 2   # every lora_A and lora_B moved
    for n, p in lora.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), f"base weight {n} changed"
    heads = trainer.seekr_history[0]["heads"]
    assert sum(len(h) for h in heads.values()) == 4 and len(heads) <= 2
    ck = sorted(os.listdir(tmp_path / "opposites"))
    assert ck and all((tmp_path / "opposites" / c / "seekr_recipe").is_dir() for c in ck)
    assert (tmp_path / "opposites" / ck[-1] / "adapter_model.safetensors").is_file()


def _chat_prompt_text(tok, question):
    """The chat-template text of one user turn without its first token: the package's
    encoder prepends the tokenizer's bos (<|im_start|>), which is that token."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.startswith(tok.bos_token)
    return text[len(tok.bos_token):]


def test_seekr_train_command_on_a_saved_layer_subset(_base_model, tokenizer, tmp_path):
    model_dir = tmp_path / "smollm2-6l"
    _base_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    q = "What is the capital of Italy?"
    enc = [tokenizer.bos_token_id] + tokenizer(_chat_prompt_text(tokenizer, q), add_special_tokens=False)["input_ids"]
    assert enc == chat_ids(tokenizer, q)                 # the prompt text encodes as the chat template does
    for name, pairs in TASKS.items():
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for split in ("train", "test"):
                for question, answer in pairs:
                    f.write(json.dumps({"prompt": _chat_prompt_text(tokenizer, question), "answer": answer,
                                        "split": split}) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
method: seekr
output_dir: run
seed: 0
model:
  path: {model_dir}
  lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj], save: adapter}}
tasks:
  - {{name: capitals, path: capitals.jsonl}}
  - {{name: opposites, path: opposites.jsonl}}
train: {{batch_size: 2, lr: 1.0e-3, max_prompt_len: 64, max_answer_len: 8, max_steps: 5}}
replay: {{ratio: 2, batch_size: 2, cycle: 1}}
distill: {{layer_budget: 2, head_budget: 4, query_budget: 8}}
eval: {{batch_size: 4, max_samples: 2, max_new_tokens: 4}}
log: {{progress: false}}
""")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "seekr_kernels", "train", "--config", str(cfg)], capture_output=True,
                       text=True, env=env, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    replay = [r for r in records if "attn_kl" in r]
    assert len(replay) == 2 and all(math.isfinite(r[k]) for r in replay for k in ("ce", "logits_kl", "attn_kl")), kinds
    assert abs(replay[0]["attn_kl"]) < 1e-6 < replay[1]["attn_kl"], replay
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 5 and res["matrix"][0][0] is not None, res
    assert not res["complete"]
