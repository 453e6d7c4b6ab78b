"""Leftovers, recovery, all-or-nothing saves, metadata integrity and file modes (issue 15).

The kill-during-save campaign (SIGKILL at random points) is in tests/fuzz/test_kill_saves.py;
these are the deterministic cases.
"""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels.seekr.memory import ReplayMemory, ReplayMemoryError, ReplaySample
from seekr_kernels.utils import store as io


def small_memory(n_tasks=3, seed=0, topk=False):
    g = torch.Generator().manual_seed(seed)
    mem = ReplayMemory()
    for t in range(n_tasks):
        samples = []
        for i in range(3):
            n = 5 + i
            ids = torch.randint(0, 50, (n,), generator=g)
            am = torch.arange(n) >= 2
            lg = torch.randn(n - 2, 50, generator=g)
            if topk:
                lg = sk.TopK.from_dense(lg, 4, kind="logits")
            att = {1: torch.softmax(torch.randn(2, n, n, generator=g), -1)}
            samples.append(ReplaySample(ids, am, None, lg, 2, att))
        mem.add_task(f"t{t}", samples, {1: torch.tensor([0, 3])}, {"seed": seed})
    return mem


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def same_memory(a, b):
    assert [t.name for t in a.tasks] == [t.name for t in b.tasks]
    for ta, tb in zip(a.tasks, b.tasks):
        for sa, sb in zip(ta.samples, tb.samples):
            assert torch.equal(sa.input_ids, sb.input_ids)
            assert torch.equal(sa.attention[1], sb.attention[1])


# ----------------------------------------------------------------------------- leftovers
def test_dead_writers_temporaries_are_removed_live_and_foreign_kept(tmp_path):
    target = tmp_path / "cache.safetensors"
    host = io._host_tag()
    dead = tmp_path / f".cache.safetensors.tmp-{host}.{dead_pid()}-abc123"
    live = tmp_path / f".cache.safetensors.tmp-{host}.{os.getppid()}-def456"
    other_host = tmp_path / f".cache.safetensors.tmp-0badc0de.{dead_pid()}-xyz"
    unrelated = tmp_path / f".other.bin.tmp-{host}.{dead_pid()}-q"
    for p in (dead, live, other_host, unrelated):
        p.write_bytes(b"x" * 100)
    sk.TeacherCache({0: torch.rand(1, 1, 2, 2)}).save(target)
    left = sorted(os.listdir(tmp_path))
    assert dead.name not in left
    assert {live.name, other_host.name, unrelated.name, "cache.safetensors"} <= set(left)
    # a load cleans too
    dead.write_bytes(b"x")
    sk.TeacherCache.load(target)
    assert not dead.exists()


def test_atomic_dir_recovers_the_old_copy_of_a_killed_swap(tmp_path):
    final = tmp_path / "task-000"
    with io.atomic_dir(final) as d:
        open(os.path.join(d, "a"), "w").write("committed")
    # a writer killed between its two renames: final moved aside, new copy not in place
    old = tmp_path / f".task-000.old-{io._host_tag()}.{dead_pid()}-k1"
    os.replace(final, old)
    tmp = tmp_path / f".task-000.tmp-{io._host_tag()}.{dead_pid()}-k2"
    tmp.mkdir()
    (tmp / "a").write_text("half")
    handled = io.clean_leftovers(final)
    assert sorted(os.path.basename(p) for p in handled) == sorted([old.name, tmp.name])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["task-000"]
    assert (final / "a").read_text() == "committed"


def test_atomic_dir_second_rename_failure_restores_the_old_copy(tmp_path, monkeypatch):
    final = tmp_path / "d"
    with io.atomic_dir(final) as d:
        open(os.path.join(d, "a"), "w").write("old")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        with io.atomic_dir(final) as d:
            open(os.path.join(d, "a"), "w").write("new")
    monkeypatch.undo()
    assert (final / "a").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"]


def test_replay_load_recovers_a_memory_swapped_out_by_a_killed_save(tmp_path):
    mem = small_memory()
    root = tmp_path / "memory"
    mem.save(str(root))
    os.replace(root, tmp_path / f".memory.old-{io._host_tag()}.{dead_pid()}-zz")
    same_memory(ReplayMemory.load(str(root)), mem)
    # the same for one task directory (the trainer's save_task)
    os.replace(root / "task-001", root / f".task-001.old-{io._host_tag()}.{dead_pid()}-yy")
    same_memory(ReplayMemory.load(str(root)), mem)
    assert sorted(os.listdir(root)) == ["memory.json", "task-000", "task-001", "task-002"]


# ----------------------------------------------------------------------------- all-or-nothing
def test_replay_save_is_all_or_nothing(tmp_path, monkeypatch):
    root = str(tmp_path / "memory")
    old = small_memory(3, seed=0)
    old.save(root)
    new = small_memory(4, seed=1)
    real = ReplayMemory._write_task

    def fail_on_third(self, d, i):
        if i == 2:
            raise OSError("killed")
        return real(self, d, i)

    monkeypatch.setattr(ReplayMemory, "_write_task", fail_on_third)
    with pytest.raises(OSError, match="killed"):
        new.save(root)
    monkeypatch.undo()
    same_memory(ReplayMemory.load(root), old)       # no mix of old and new tasks
    assert sorted(os.listdir(tmp_path)) == ["memory"]
    new.save(root)
    same_memory(ReplayMemory.load(root), new)


def test_replay_save_refuses_to_replace_foreign_content(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(ReplayMemoryError, match="not a replay memory; refusing"):
        small_memory(1).save(str(root))
    assert (root / "thesis.tex").read_text() == "precious"


def test_save_task_commits_through_the_index(tmp_path):
    root = str(tmp_path / "memory")
    mem = small_memory(3)
    for i in range(3):
        mem.save_task(root, i)
    same_memory(ReplayMemory.load(root), mem)
    idx_p = os.path.join(root, "memory.json")
    committed = open(idx_p, "rb").read()
    # killed after the task directory, before the index: the old index still rules
    mem.tasks[2].name = "renamed"
    mem.save_task(root, 2)
    open(idx_p, "wb").write(committed)
    with pytest.raises(ReplayMemoryError, match="task-002/manifest.json: differs from the manifest the index"):
        ReplayMemory.load(root)
    # an index listing fewer tasks: the directory beyond it is not part of the memory
    mem2 = small_memory(2)
    mem2.save_task(root, 0)
    mem2.save_task(root, 1)
    assert len(ReplayMemory.load(root).tasks) == 2
    # a memory whose last task is missing is refused (it was accepted before the index)
    mem.save(root)
    import shutil
    shutil.rmtree(os.path.join(root, "task-002"))
    with pytest.raises(ReplayMemoryError, match="task-002: missing"):
        ReplayMemory.load(root)


# ----------------------------------------------------------------------------- metadata integrity
@pytest.mark.parametrize("edit,msg", [
    (lambda m: m["layout"].update(logits=None), "not what the manifest's layout describes"),
    (lambda m: m["layout"].update(attention_layers=[]), "not what the manifest's layout describes"),
    (lambda m: m.update(heads={"1": [0, 2]}), "heads of layer 1 differ"),
])
def test_replay_manifest_edits_are_refused(tmp_path, edit, msg):
    root = str(tmp_path / "memory")
    small_memory(2).save(root)
    man_p = os.path.join(root, "task-001", "manifest.json")
    man = json.load(open(man_p))
    edit(man)
    json.dump(man, open(man_p, "w"))
    with pytest.raises(ReplayMemoryError, match="manifest checksum mismatch"):
        ReplayMemory.load_task(root, 1)
    io.seal(man, "manifest_sha256")                                        # consistent digest
    json.dump(man, open(man_p, "w"))
    with pytest.raises(ReplayMemoryError, match=msg):
        ReplayMemory.load_task(root, 1)


def test_replay_index_edits_are_refused(tmp_path):
    root = str(tmp_path / "memory")
    small_memory(2).save(root)
    p = os.path.join(root, "memory.json")
    idx = json.load(open(p))
    idx["tasks"] = idx["tasks"][:1]
    json.dump(idx, open(p, "w"))
    with pytest.raises(ReplayMemoryError, match="index checksum mismatch"):
        ReplayMemory.load(root)


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_keep_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        sk.TeacherCache({0: torch.rand(1, 1, 2, 2)}).save(tmp_path / "c.safetensors")
        sk.Importance(2, 2).save(str(tmp_path / "imp.safetensors"))
        small_memory(1).save(str(tmp_path / "memory"))
    finally:
        os.umask(old)
    files = [tmp_path / "c.safetensors", tmp_path / "imp.safetensors",
             tmp_path / "memory" / "memory.json", tmp_path / "memory" / "task-000" / "data.safetensors"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    for d in (tmp_path / "memory", tmp_path / "memory" / "task-000"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d
