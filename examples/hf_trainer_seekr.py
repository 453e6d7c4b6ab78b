"""SEEKR with the Hugging Face Trainer: three tiny tasks in sequence, OP/BWT at the end.

    python examples/hf_trainer_seekr.py [--out DIR] [--epochs N] [--resume]

A tiny Llama (built from a LlamaConfig) and a tokenizer trained here learn three tasks
that overwrite each other (see tiny_tasks.py). ``SeekrTrainer.train_tasks`` runs each
task as one ``trainer.train()``: replay batches from the memory of earlier tasks every
``replay_cycle`` steps with SEEKR's loss, the recipe's end_task between tasks. The loss
parts (replay_ce, replay_logits_kl, replay_attn_kl) go through the Trainer's log, so
``report_to="tensorboard"`` (or wandb, mlflow) records them. Runs on a CPU in about a
minute.
"""
import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_tasks import encode, exact_match, make_tasks, report, require_hf_extra, tiny_llama, train_tokenizer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="seekr-hf-example")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--resume", action="store_true",
                    help="continue a killed run in --out from its newest checkpoint (train_tasks(resume=True))")
    ap.add_argument("--method", default="seekr", choices=["sft", "replay", "replay+logits", "seekr"])
    a = ap.parse_args(argv)
    require_hf_extra("examples/hf_trainer_seekr.py")
    warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
    torch.set_num_threads(1)          # a tiny model: one thread is the fastest

    from datasets import Dataset

    from transformers import set_seed

    from seekr_kernels.hf import SeekrConfig, SeekrTrainer

    # Seed first: the Trainer seeds the global RNG (args.seed) only when it is created, after
    # the model; a PEFT model (get_peft_model) draws its LoRA weights before that.
    set_seed(0)
    tasks = make_tasks()
    tok = train_tokenizer(tasks)
    model = tiny_llama(tok)
    args = SeekrConfig(
        output_dir=a.out, per_device_train_batch_size=16, num_train_epochs=a.epochs, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=20, save_strategy="steps", save_steps=100,
        save_total_limit=1, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
        # SEEKR: keep 10 samples per task; distil 4 of the 8 heads on 4 query rows per sample
        seekr_method=a.method, replay_ratio=10, replay_batch_size=8, replay_cycle=2,
        layer_budget=2, head_budget=4, query_budget=4)
    trainer = SeekrTrainer(model=model, args=args, processing_class=tok)
    data = {name: Dataset.from_list(encode(tok, t["train"])) for name, t in tasks.items()}
    res = trainer.train_tasks(data, score=lambda tr, name: exact_match(tr.model, tok, tasks[name]["test"]),
                              resume=a.resume)
    trainer.recipe.save(os.path.join(a.out, "seekr"))
    report(trainer, res)
    return res


if __name__ == "__main__":
    main()
