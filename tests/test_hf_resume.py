"""Resuming SEEKR inside the Hugging Face Trainer after a kill (seekr_kernels.hf), in one
process: a checkpoint is complete only once its manifest is written (a kill during a save
leaves one that is skipped, or refused naming the newest complete one), older checkpoints
are rotated out only after the new one is complete."""
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="seekr_kernels.hf needs transformers")

from seekr_kernels.hf import (SeekrCheckpointError, SeekrConfig, SeekrTrainer, last_checkpoint,  # noqa: E402
                              verify_checkpoint)
from seekr_kernels.seekr.recipe import SeekrRecipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(t, n=8):
    g = torch.Generator().manual_seed(t)
    out = []
    for _ in range(n):
        p = torch.randint(3, 40, (3,), generator=g).tolist()
        out.append({"prompt_ids": [1, t + 3] + p, "answer_ids": [(x * (t + 2)) % 37 + 3 for x in p[:2]] + [2]})
    return out


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=40,
                                        max_position_embeddings=32, pad_token_id=0))


def trainer(out, **kw):
    """8 rows, batch 4, 2 epochs: 4 steps per task (task b: 2 replay steps more), a
    checkpoint after every step."""
    a = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
             save_strategy="steps", save_steps=1, use_cpu=True, report_to=[], disable_tqdm=True, replay_ratio=4,
             replay_cycle=2, query_budget=3, layer_budget=2, head_budget=3, seekr_backend="torch",
             replay_pad_to_multiple_of=1, seed=1)
    a.update(kw)
    return SeekrTrainer(model=tiny_llama(), args=SeekrConfig(**a))


def same(x, y):
    for (n, a), (_, b) in zip(x.model.named_parameters(), y.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert torch.equal(x.recipe.importance, y.recipe.importance)
    assert x.recipe.heads.keys() == y.recipe.heads.keys()
    assert all(torch.equal(x.recipe.heads[k], y.recipe.heads[k]) for k in x.recipe.heads)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Task a, uninterrupted; its checkpoint folder is copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("full")
    tr = trainer(out)
    tr.train_task(rows(0), "a")
    return tr, out


def test_incomplete_checkpoints_are_skipped_or_refused(full, tmp_path):
    ref, src = full
    run = tmp_path / "run"
    shutil.copytree(src / "a", run / "a")
    d = run / "a"
    assert [os.path.basename(c) for c in sorted(d.glob("checkpoint-*"))] == [f"checkpoint-{i}" for i in range(1, 5)]
    for c in d.glob("checkpoint-*"):
        verify_checkpoint(str(c))
    # what kills at different moments of a save leave behind
    os.makedirs(d / "checkpoint-9")                                     # just created
    shutil.copytree(d / "checkpoint-4", d / "checkpoint-8")
    os.remove(d / "checkpoint-8" / "seekr_recipe" / "manifest.json")    # before the manifest
    shutil.copytree(d / "checkpoint-4", d / "checkpoint-7")
    shutil.rmtree(d / "checkpoint-7" / "seekr_recipe")                  # the Trainer's files only
    shutil.copytree(d / "checkpoint-4", d / "checkpoint-6")
    with open(d / "checkpoint-6" / "optimizer.pt", "r+b") as f:         # a truncated Trainer file
        f.truncate(100)
    shutil.copytree(d / "checkpoint-4", d / "checkpoint-5")
    with open(d / "checkpoint-5" / "seekr_recipe" / "tensors.safetensors", "r+b") as f:   # a damaged SEEKR file
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 1]))
    for n, msg in [(9, "manifest.json: missing"), (8, "manifest.json: missing"), (7, "manifest.json: missing"),
                   (6, "optimizer.pt: 100 bytes"), (5, "tensors.safetensors: checksum mismatch")]:
        with pytest.raises(SeekrCheckpointError, match=msg):
            verify_checkpoint(str(d / f"checkpoint-{n}"))
    assert last_checkpoint(str(d)) == str(d / "checkpoint-4")
    # an explicit incomplete checkpoint is refused, naming the newest complete one
    tr = trainer(run)
    with pytest.raises(SeekrCheckpointError, match="manifest.json: missing.*newest complete checkpoint there is "
                                                   ".*checkpoint-4"):
        tr.train_task(rows(0), "a", resume_from_checkpoint=str(d / "checkpoint-8"))
    # True: the newest complete one (the task's last step: end_task runs again)
    tr = trainer(run)
    tr.train_task(rows(0), "a", resume_from_checkpoint=True)
    assert tr.state.global_step == 4
    same(tr, ref)


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing catches it."""


def test_older_checkpoints_are_rotated_out_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    saves = []
    orig = SeekrRecipe.save

    def save(self, path, **kw):
        saves.append(path)
        if len(saves) == 3:                       # the Trainer's part of checkpoint-3 is written
            raise _Killed()
        return orig(self, path, **kw)
    monkeypatch.setattr(SeekrRecipe, "save", save)
    tr = trainer(tmp_path, save_total_limit=1)
    with pytest.raises(_Killed):
        tr.train_task(rows(0), "a")
    d = tmp_path / "a"
    assert (d / "checkpoint-3" / "trainer_state.json").is_file()
    assert last_checkpoint(str(d)) == str(d / "checkpoint-2")
