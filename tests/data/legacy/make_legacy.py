# Kept for the record: run at commit 61b56de from the repository root to recreate the *_v1 files,
# and at 3575421 with 61b56de -> 3575421 and v1 -> v2 in the names for the *_v2 files (the
# header-checksummed cache and the indexed replay memory, still int32 indices).
# Writes teacher caches and a replay memory with the format of commit 61b56de (before compact indices).
import torch, json
import seekr_kernels as sk
from seekr_kernels.ops.teachers import TopK
from seekr_kernels.seekr.memory import ReplayMemory, ReplaySample
out = "tests/data/legacy"
g = torch.Generator().manual_seed(0)
B, S, Q, L, V = 2, 2, 3, 5, 40
att = torch.softmax(torch.randn(B, S, Q, L, generator=g), -1)
lg = (torch.randn(B, L, V, generator=g) * 3).to(torch.bfloat16)
heads = {1: torch.tensor([0, 3])}
q = torch.tensor([[0, 2, 4], [1, 3, 4]])
sk.TeacherCache({1: TopK.from_dense(att, 3)}, lg, heads, q, {"ids": torch.arange(B * L).reshape(B, L)},
                meta={"written_by": "61b56de"}).save(f"{out}/cache_v1_dense.safetensors")
sk.TeacherCache({1: att.to(torch.bfloat16)}, TopK.from_dense(lg, 6, kind="logits"), heads, q,
                meta={"written_by": "61b56de"}).save(f"{out}/cache_v1_topk.safetensors")
mem = ReplayMemory()
for name, kind in (("dense", 0), ("topk", 1)):
    samples = []
    for i in range(2):
        n = 6 + i
        ids = torch.randint(0, V, (n,), generator=g)
        am = torch.zeros(n, dtype=torch.bool); am[n // 2:] = True
        t = (torch.randn(n - 1, V, generator=g) * 2).to(torch.bfloat16)
        logits = TopK.from_dense(t, 5, kind="logits") if kind else t
        samples.append(ReplaySample(ids, am, None, logits, 1))
    mem.add_task(name, samples, {}, {"written_by": "61b56de"})
mem.save(f"{out}/replay_v1")
