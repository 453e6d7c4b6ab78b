"""Zygote for the kill-during-save tests: ``python saver.py``.

Imports torch and seekr_kernels once, builds two versions (A, B) of every saved object,
prints ``ready``, then for each stdin line ``TARGET DIR`` forks a child that saves A once,
creates ``DIR/ready``, and then saves B, A, B, ... into DIR until it is SIGKILLed by the
test; the child's pid is printed as ``pid N``. SIGCHLD is ignored so killed children are
reaped at once (a zombie would still look alive to the leftover cleanup).
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def versions():
    """{target: (A, B)}: objects that differ in every tensor and in their metadata."""
    import torch
    import seekr_kernels as sk
    from seekr_kernels.seekr.memory import ReplayMemory, ReplaySample

    def cache(v):
        g = torch.Generator().manual_seed(v)
        att = torch.softmax(torch.randn(4, 4, 64, 256, generator=g), -1)       # 1 MiB per layer
        return sk.TeacherCache({0: att, 3: att.flip(-1)}, torch.randn(4, 256, 512, generator=g),
                               {0: torch.tensor([0, 1, 2, 3]), 3: torch.tensor([3, 2, 1, 0])},
                               meta={"version": v})

    def memory(v):
        g = torch.Generator().manual_seed(100 + v)
        mem = ReplayMemory()
        for t in range(3 + v):                     # A: 3 tasks, B: 4 tasks
            smp = [ReplaySample(torch.randint(0, 100, (60,), generator=g), torch.arange(60) > 10, None,
                                torch.randn(49, 300, generator=g), 11,
                                {1: torch.softmax(torch.randn(2, 60, 60, generator=g), -1)}) for _ in range(6)]
            mem.add_task(f"v{v}-t{t}", smp, {1: torch.tensor([0, 5])}, {"version": v})
        return mem

    def importance(v):
        imp = sk.Importance(32, 64)
        g = torch.Generator().manual_seed(200 + v)
        for _ in range(40):
            imp.update(torch.rand(32, 64, generator=g), torch.rand(32, 64, generator=g))
        return imp

    return {"cache": (cache(0), cache(1)), "memory": (memory(0), memory(1)),
            "importance": (importance(0), importance(1)), "atomic_dir": (0, 1)}


def save(target, obj, d):
    if target == "cache":
        obj.save(os.path.join(d, "cache.safetensors"))
    elif target == "memory":
        obj.save(os.path.join(d, "memory"))
    elif target == "importance":
        obj.save(os.path.join(d, "importance.safetensors"))
    else:
        from seekr_kernels.utils.store import atomic_dir
        with atomic_dir(os.path.join(d, "ckpt")) as tmp:
            for i in range(8):
                with open(os.path.join(tmp, f"part-{i}.bin"), "wb") as f:
                    f.write(bytes([obj]) * (256 * 1024))


def main():
    import torch
    torch.set_num_threads(1)
    vs = versions()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    for line in sys.stdin:
        target, d = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                a, b = vs[target]
                save(target, a, d)
                open(os.path.join(d, "ready"), "w").close()
                while True:
                    save(target, b, d)
                    save(target, a, d)
            finally:
                os._exit(1)
        print(f"pid {pid}", flush=True)


if __name__ == "__main__":
    main()
