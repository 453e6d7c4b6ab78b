"""SEEKR with TRL's SFTTrainer: three tiny tasks in sequence, OP/BWT at the end.

    python examples/trl_sft_seekr.py [--out DIR] [--epochs N] [--resume]

The same tiny tasks as hf_trainer_seekr.py, given to TRL as prompt/completion text:
``SeekrSFTTrainer`` tokenises each task with TRL (completion-only loss) and runs SEEKR
inside ``train()``; ``SeekrSFTConfig`` is TRL's ``SFTConfig`` with SEEKR's fields.
Runs on a CPU in about a minute.
"""
import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_tasks import exact_match, make_tasks, report, require_hf_extra, tiny_llama, train_tokenizer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="seekr-trl-example")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--resume", action="store_true",
                    help="continue a killed run in --out from its newest checkpoint (train_tasks(resume=True))")
    a = ap.parse_args(argv)
    require_hf_extra("examples/trl_sft_seekr.py")
    warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
    torch.set_num_threads(1)

    import datasets
    from datasets import Dataset
    datasets.disable_progress_bars()

    from transformers import set_seed

    from seekr_kernels.hf import SeekrSFTConfig, SeekrSFTTrainer

    # Seed first: the Trainer seeds the global RNG (args.seed) only when it is created, after
    # the model; a PEFT model (get_peft_model) draws its LoRA weights before that.
    set_seed(0)
    tasks = make_tasks()
    tok = train_tokenizer(tasks)
    model = tiny_llama(tok)
    args = SeekrSFTConfig(
        output_dir=a.out, per_device_train_batch_size=16, num_train_epochs=a.epochs, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=20, save_strategy="steps", save_steps=100,
        save_total_limit=1, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, bf16=False, max_length=32,
        seekr_method="seekr", replay_ratio=10, replay_batch_size=8, replay_cycle=2,
        layer_budget=2, head_budget=4, query_budget=4)
    # TRL's text data: the prompt starts with bos, the completion gets eos from TRL.
    data = {name: Dataset.from_list([{"prompt": tok.bos_token + p, "completion": c} for p, c in t["train"]])
            for name, t in tasks.items()}
    first = next(iter(data))
    trainer = SeekrSFTTrainer(model=model, args=args, processing_class=tok, train_dataset=data[first])
    res = trainer.train_tasks(data, score=lambda tr, name: exact_match(tr.model, tok, tasks[name]["test"]),
                              resume=a.resume)
    report(trainer, res)
    return res


if __name__ == "__main__":
    main()
