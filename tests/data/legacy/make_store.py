# Kept for the record: run at commit 4e026d2 (before issue 19 moved every digest, manifest and
# checksummed-JSON helper into seekr_kernels/utils/store.py) from the repository root, with
# PYTHONPATH=. , to recreate tests/data/legacy/store_4e026d2/. tests/utils/test_store.py loads
# each file with the current code and checks that writing the loaded object again gives the
# same bytes (file formats unchanged by the move).
import json
import os
import shutil

import torch

import seekr_kernels as sk
from seekr_kernels.ops.teachers import TopK
from seekr_kernels.run import checkpoint as ck
from seekr_kernels.seekr.importance import Importance
from seekr_kernels.seekr.memory import ReplayMemory, ReplaySample
from seekr_kernels.utils.store import atomic_save_json

out = "tests/data/legacy/store_4e026d2"
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
g = torch.Generator().manual_seed(19)

# teacher cache, version 3: TopK attention rows, a sampled teacher over a vocabulary > 65536
B, S, Q, L, V = 2, 2, 3, 5, 70000
att = torch.softmax(torch.randn(B, S, Q, L, generator=g), -1)
lg = torch.randn(B, L, V, generator=g)
lg[..., -4:] += 6
sk.TeacherCache({1: TopK.from_dense(att, 3)}, sk.SampledTeacher.from_dense(lg, 4, seed=1).to(dtype=torch.bfloat16),
                {1: torch.tensor([0, 3])}, torch.tensor([[0, 2, 4], [1, 3, 4]]),
                {"ids": torch.arange(B * L).reshape(B, L)}, meta={"written_by": "4e026d2", "x": [1, "é"]}
                ).save(f"{out}/cache_v3.safetensors")

# replay memory: a dense task with attention rows and queries, a TopK task with packed indices
mem = ReplayMemory()
for name, kind in (("dense", 0), ("topk", 1)):
    samples = []
    for i in range(3):
        n = 6 + i
        ids = torch.randint(0, 300, (n,), generator=g)
        am = torch.zeros(n, dtype=torch.bool)
        am[n // 2:] = True
        t = torch.randn(n - 1, 70000 if kind else 50, generator=g) * 2
        logits = TopK.from_dense(t, 5, kind="logits").to(dtype=torch.bfloat16) if kind else t.to(torch.bfloat16)
        q = torch.tensor([0, 2, n - 1])
        samples.append(ReplaySample(ids, am, q, logits, 1, {0: torch.softmax(torch.randn(2, 3, n, generator=g), -1)}))
    mem.add_task(name, samples, {0: torch.tensor([1, 2])}, {"written_by": "4e026d2", "nan": float("nan")})
mem.save(f"{out}/memory")

# importance scores
imp = Importance(3, 2)
for _ in range(2):
    imp.update(torch.rand(3, 2, generator=g), torch.rand(3, 2, generator=g))
imp.save(f"{out}/importance.safetensors")

# a checkpoint directory (nested files, manifest meta) and a run state sealed like the trainer's
def fill(tmp):
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "ü": 1}, f)
    os.makedirs(os.path.join(tmp, "seekr", "memory"))
    with open(os.path.join(tmp, "seekr", "recipe.json"), "wb") as f:
        f.write(b'{"kind": "x"}')
    with open(os.path.join(tmp, "seekr", "memory", "empty.bin"), "wb"):
        pass
    torch.save({"w": torch.arange(4)}, os.path.join(tmp, "optimizer.pt"))
ck.write(f"{out}/checkpoint", fill, meta={"phase": "task", "task": 1, "global_step": 7, "what": "ünï"})
st = {"version": 2, "kind": "seekr-run-state", "completed": 1, "rows": [[0.5, 1.0]], "checkpoint": "checkpoints/task-001",
      "heads": {"0": [1, 2]}, "config": {"b": 1, "a": [1.5, None, True, "ß"]}}
st["sha256"] = ck.json_digest(st)
atomic_save_json(f"{out}/state.json", st)

# a SEEKR recipe state mid-task (importance, heads, memory with attention, pre-task snapshot)
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
cfg = {"method": "seekr", "seed": 3, "replay": {"ratio": 0.5},
       "distill": {"query_budget": 2, "layer_budget": 1, "head_budget": 2}}
rc = sk.SeekrRecipe(cfg, model=model, pad_token_id=0)
items = [{"prompt_ids": [1 + i, 2, 3], "answer_ids": [4 + i, 5]} for i in range(4)]
rc.begin_task(model, items, name="first")
rc.end_task(model)
rc.begin_task(model, items[::-1], name="second")
rc.save(f"{out}/recipe")
print(sorted(os.listdir(out)))
