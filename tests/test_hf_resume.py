"""Resuming SEEKR inside the Hugging Face Trainer after a kill (seekr_kernels.hf), in one
process: a checkpoint is complete only once its manifest is written (a kill during a save
leaves one that is skipped, or refused naming the newest complete one), older checkpoints
are rotated out only after the new one is complete, and ``train_tasks(resume=True)`` run
again after a kill at any point of a sequence ends where the uninterrupted run ends."""
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
                                        max_position_embeddings=32, pad_token_id=0, attention_dropout=0.1))


def trainer(out, **kw):
    """8 rows, batch 4, 2 epochs: 4 steps per task (task b: 2 replay steps more), a
    checkpoint after every step. Attention dropout: the global RNG must be carried across
    the task boundaries."""
    a = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
             save_strategy="steps", save_steps=1, use_cpu=True, report_to=[], disable_tqdm=True, replay_ratio=4,
             replay_cycle=2, query_budget=3, layer_budget=2, head_budget=3, seekr_backend="torch",
             replay_pad_to_multiple_of=1, seed=1)
    a.update(kw)
    return SeekrTrainer(model=tiny_llama(), args=SeekrConfig(**a))


def same(x, y):
    for (n, a), (_, b) in zip(x.model.named_parameters(), y.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    rx, ry = x.recipe, y.recipe
    assert rx.task_names == ry.task_names and torch.equal(rx.importance, ry.importance)
    assert rx.heads.keys() == ry.heads.keys() and all(torch.equal(rx.heads[k], ry.heads[k]) for k in rx.heads)
    for tx, ty in zip(rx.memory.tasks, ry.memory.tasks):
        for sx, sy in zip(tx.samples, ty.samples):
            assert torch.equal(sx.input_ids, sy.input_ids) and torch.equal(sx.logits, sy.logits)
    assert x.seekr_history == y.seekr_history


def same_as_final(tr, d):
    """The trainer holds the model and recipe state of the task end saved in ``d``."""
    from safetensors.torch import load_file
    verify_checkpoint(str(d))
    saved = load_file(str(d / "model.safetensors"))
    for n, p in tr.model.state_dict().items():
        if n in saved:
            torch.testing.assert_close(p, saved[n], rtol=0, atol=0, msg=n)
    rc = SeekrRecipe(tr.recipe.cfg, model=tr.model).load(str(d / "seekr_recipe"))
    assert rc.task_names == tr.recipe.task_names and torch.equal(rc.importance, tr.recipe.importance)


def score(tr, name):
    """A deterministic score: minus the loss on the task's first rows."""
    from seekr_kernels.hf import SeekrDataCollator
    batch = SeekrDataCollator(0, 1)(rows(TASKS.index(name))[:4])
    tr.model.eval()
    with torch.no_grad():
        loss = tr.model(**batch).loss
    tr.model.train()
    torch.rand(3)           # a score that draws random numbers must not change the next task
    return -float(loss)


TASKS = ["a", "b"]


def tasks():
    return [(n, rows(i)) for i, n in enumerate(TASKS)]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The sequence, uninterrupted; tests copy its folder and damage the copy."""
    out = tmp_path_factory.mktemp("full")
    tr = trainer(out)
    res = tr.train_tasks(tasks(), score=score)
    return tr, out, res


def test_incomplete_checkpoints_are_skipped_or_refused(full, tmp_path):
    _, src, _ = full
    run = tmp_path / "run"
    shutil.copytree(src / "a", run / "a")
    d = run / "a"
    shutil.rmtree(d / "final")
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
    same_as_final(tr, src / "a" / "final")


def test_resume_true_before_the_first_checkpoint_starts_the_task(full, tmp_path):
    """A job killed before the task's first save, requeued: the same call starts the task."""
    _, src, _ = full
    tr = trainer(tmp_path)
    tr.train_task(rows(0), "a", resume_from_checkpoint=True)
    same_as_final(tr, src / "a" / "final")


def _killed_before_b_saved(d):
    shutil.rmtree(d / "b")


def _killed_ending_a(d):
    """During a's end_task or final save: a resumes at its last checkpoint, b starts."""
    shutil.rmtree(d / "b")
    os.remove(d / "a" / "final" / "seekr_recipe" / "manifest.json")


def _killed_mid_b(d):
    for c in (d / "b").glob("checkpoint-*"):
        if int(c.name.split("-")[1]) > 2:
            shutil.rmtree(c)
    shutil.rmtree(d / "b" / "final")
    os.makedirs(d / "b" / "checkpoint-3")                     # a save the kill interrupted


def _killed_saving_b_final(d):
    os.remove(d / "b" / "final" / "seekr_recipe" / "manifest.json")


def _killed_scoring_b(d):
    from seekr_kernels.utils import store
    p = d / "seekr_scores.json"
    saved = store.read_json(p, "scores")
    store.write_json(p, store.seal({k: v for k, v in saved.items() if k != "sha256"} | {
        "tasks": saved["tasks"][:1], "rows": saved["rows"][:1]}))


def _finished(d):
    pass


@pytest.mark.parametrize("kill", [_killed_ending_a, _killed_before_b_saved, _killed_mid_b, _killed_saving_b_final, _killed_scoring_b,
                                  _finished], ids=lambda f: f.__name__.strip("_"))
def test_train_tasks_resume_continues_the_sequence(full, tmp_path, kill):
    """``train_tasks(tasks, resume=True)`` run again after a kill ends where the
    uninterrupted sequence ends: weights, recipe state, history, score rows."""
    ref, src, want = full
    d = tmp_path / "run"
    shutil.copytree(src, d)
    kill(d)
    tr = trainer(d)
    got = tr.train_tasks(tasks(), score=score, resume=True)
    assert got == want
    same(tr, ref)
    if tr.state.log_history:          # the logs continue at the sequence's step
        assert tr.state.log_history[-1]["step"] == ref.state.log_history[-1]["step"]


def test_one_log_folder_and_one_step_across_tasks(tmp_path):
    """TensorBoard: one run folder under output_dir for the sequence, train/loss at one
    increasing step (the Trainer's global_step restarts in every task)."""
    pytest.importorskip("tensorboard", reason="tensorboard is needed for report_to='tensorboard'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tr = trainer(tmp_path, report_to="tensorboard", logging_steps=1, save_strategy="no")
    tr.train_tasks(tasks())
    runs = sorted({os.path.dirname(p) for p in tmp_path.rglob("events.out.tfevents.*")})
    assert len(runs) == 1 and os.path.dirname(runs[0]) == str(tmp_path / "runs"), runs
    ev = EventAccumulator(runs[0])
    ev.Reload()
    steps = [e.step for e in ev.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == tr._seekr_step_offset
    assert [e.step for e in ev.Scalars("train/replay_loss")]          # task b's replay steps
    assert [h["step"] for h in tr.state.log_history if "loss" in h] == steps[4:]      # task b's own state


def test_train_tasks_resume_refuses_another_task_list(full, tmp_path):
    _, src, _ = full
    shutil.copytree(src, tmp_path / "run")
    with pytest.raises(ValueError, match=r"tasks: .*final ends the sequence \['a', 'b'\], tasks starts with "
                                         r"\['b'\]"):
        trainer(tmp_path / "run").train_tasks(tasks()[::-1], resume=True)
    with pytest.raises(ValueError, match="resume: save_strategy='no'"):
        trainer(tmp_path / "run", save_strategy="no").train_tasks(tasks(), resume=True)


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
