"""SIGKILL during saves: TeacherCache.save, ReplayMemory.save, Importance.save, atomic_dir.

A zygote process (saver.py) forks a child per trial that saves version A, then B, A, B,
... of an object; the test kills it at a random (seeded) moment and checks that what is
on disk loads as exactly A or exactly B, and that the leftovers of the killed write
(temporaries, a swapped-out old copy) are gone after the next load or save. SEEKR_FUZZ=long
runs more trials.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import fuzzlib
import saver
import seekr_kernels as sk
from seekr_kernels.seekr.memory import ReplayMemory
from seekr_kernels.utils.store import clean_leftovers

TARGETS = ("cache", "memory", "importance", "atomic_dir")
TRIALS = 15 if fuzzlib.long_mode() else 3


@pytest.fixture(scope="module")
def zygote():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, saver.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout.readline().strip() == "ready"
    yield p
    p.stdin.close()
    p.wait(timeout=30)


@pytest.fixture(scope="module")
def versions():
    return saver.versions()


def _same_tensor(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _check(target, d, versions):
    """Load what the killed child left; returns the version (0 or 1) it equals."""
    a, b = versions[target]
    if target == "cache":
        c = sk.TeacherCache.load(os.path.join(d, "cache.safetensors"))
        v = c.meta["version"]
        want = (a, b)[v]
        assert all(_same_tensor(c.attention[l], want.attention[l]) for l in want.attention)
        assert _same_tensor(c.logits, want.logits)
        return v
    if target == "memory":
        m = ReplayMemory.load(os.path.join(d, "memory"))
        v = m.tasks[0].meta["version"]
        want = (a, b)[v]
        assert [t.name for t in m.tasks] == [t.name for t in want.tasks]
        for ta, tb in zip(m.tasks, want.tasks):
            for x, y in zip(ta.samples, tb.samples):
                assert _same_tensor(x.input_ids, y.input_ids) and _same_tensor(x.logits, y.logits)
                assert _same_tensor(x.attention[1], y.attention[1])
        return v
    if target == "importance":
        imp = sk.Importance.load(os.path.join(d, "importance.safetensors"))
        v = [_same_tensor(imp.scores, x.scores) for x in (a, b)].index(True)
        assert len(imp.history) == len((a, b)[v].history)
        return v
    ck = os.path.join(d, "ckpt")
    clean_leftovers(ck)                     # what a loader of the directory runs first
    parts = sorted(os.listdir(ck))
    assert parts == [f"part-{i}.bin" for i in range(8)]
    contents = {open(os.path.join(ck, p), "rb").read() for p in parts}
    assert len(contents) == 1
    data = contents.pop()
    assert len(data) == 256 * 1024 and len(set(data)) == 1
    return data[0]


def _leftovers(d):
    out = []
    for root, dirs, files in os.walk(d):
        out += [os.path.join(root, n) for n in dirs + files if ".tmp-" in n or ".old-" in n]
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_kill_during_save(target, zygote, versions, tmp_path):
    rng = random.Random(f"kill-{target}")
    survived, mid_write = 0, 0
    for trial in range(TRIALS):
        d = tmp_path / f"trial-{trial}"
        d.mkdir()
        zygote.stdin.write(f"{target} {d}\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline().split()[1])
        t0 = time.monotonic()
        while not (d / "ready").exists():
            assert time.monotonic() - t0 < 120, "saver child never got ready"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):                # reaped by the zygote (SIGCHLD ignored)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        mid_write += bool(_leftovers(str(d)))
        _check(target, str(d), versions)
        if target == "importance":          # its loader does not clean: the next save does
            versions["importance"][0].save(str(d / "importance.safetensors"))
        assert _leftovers(str(d)) == [], f"trial {trial}: leftovers not cleaned"
        survived += 1
    print(f"kill-{target}: {survived}/{TRIALS} kills survived ({mid_write} landed mid-write)")
    path = os.environ.get("SEEKR_FUZZ_REPORT")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"campaign": f"kill-{target}", "kills": TRIALS, "survived": survived,
                                "mid_write": mid_write}) + "\n")
    assert survived == TRIALS
