"""The SEEKR recipe object on its own: driven by a hand-written loop it reproduces the
package's trainer bit for bit; its replay loss is the published formula; its state saves,
loads and verifies; its memory is a Dataset; patched models copy and pickle."""
import copy
import json
import os
import pickle

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels.run.data import EncodedDataset, epoch_batches, load_task
from seekr_kernels.seekr.batching import collate
from seekr_kernels.seekr.losses import ce_sum
from seekr_kernels.seekr.stream import ReplaySchedule
from seekr_kernels.seekr.recipe import task_seed
from seekr_kernels.run.models import build_model, build_tokenizer
from seekr_kernels.run.trainer import ContinualTrainer

from tiny_runs import TASKS, tiny_config, tiny_tasks  # noqa: E402

# Constant learning rate and no clipping: the hand-written loop (README's own loop) needs no
# scheduler and does not clip (the trainer clips at 1.0 by default).
CONST = {"train.schedule": "constant", "train.warmup_steps": 0, "train.max_grad_norm": 0.0}


def hand_loop(cfg, model, tok, tasks):
    """The whole SEEKR run with the recipe and a few lines of plain PyTorch."""
    recipe = sk.SeekrRecipe(cfg, model=model, pad_token_id=tok.pad_token_id)
    tr = cfg.train
    for t, task in enumerate(tasks):
        ds = EncodedDataset(task.train, tok, tr.max_prompt_len, tr.max_answer_len)
        recipe.begin_task(model, ds.items, name=task.name)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=tuple(tr.betas), weight_decay=0.0)
        batches = epoch_batches(len(ds), tr.batch_size, task_seed(cfg.seed, t), 0)
        sched = recipe.replay_schedule(len(batches))
        sched.start_epoch(0)
        for step, gb in enumerate(batches):
            if sched.is_replay_step(step):
                loss, _ = recipe.replay_loss(model, recipe.batch(sched.next_batch()))
                loss.backward()
                opt.step()
                opt.zero_grad()
            b = collate([ds[i] for i in gb], tok.pad_token_id, tr.pad_to_multiple_of)
            n = int((b["labels"][:, 1:] != -100).sum())
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=b["position_ids"], use_cache=False)
            (ce_sum(out.logits, b["labels"]) * (1 / n)).backward()
            opt.step()
            opt.zero_grad()
        recipe.end_task(model)
    return recipe


@pytest.mark.parametrize("method", ["seekr", "replay+logits"])
def test_hand_written_loop_reproduces_the_trainer(tmp_path, method):
    paths = tiny_tasks(tmp_path / "data")[:2]
    cfg = tiny_config(tmp_path / "run", paths, method, **CONST)
    trainer = ContinualTrainer(cfg, quiet=True)
    trainer.run()
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, cfg.seed)
    recipe = hand_loop(cfg, model, tok, trainer.tasks)
    sa, sb = trainer.base.state_dict(), model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(recipe.importance, trainer.importance)
    assert {l: h.tolist() for l, h in recipe.heads.items()} == {l: h.tolist() for l, h in trainer.heads.items()}
    assert recipe.task_names == list(TASKS[:2]) and recipe.num_tasks == 2
    for ta, tb in zip(trainer.memory.tasks, recipe.memory.tasks):
        for x, y in zip(ta.samples, tb.samples):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.logits, y.logits)
            assert x.attention.keys() == y.attention.keys()
            assert all(torch.equal(x.attention[l], y.attention[l]) for l in x.attention)
    if method == "seekr":
        assert recipe.heads and recipe.memory.tasks[1].has_attention


@pytest.fixture(scope="module")
def seekr_run(tmp_path_factory):
    """A seekr trainer after one task (its memory holds teachers with attention rows)."""
    root = tmp_path_factory.mktemp("seekr1")
    paths = tiny_tasks(root / "data")[:1]
    tr = ContinualTrainer(tiny_config(root / "run", paths, "seekr"), quiet=True)
    tr.run()
    return tr


def _published_replay_loss(model, b, a, beta):
    """The published replay loss (jinghan1he/SEEKR training/seekr.py) on eager attention:
    (1 - a) HF mean CE + a CE(student, softmax(teacher)) over label tokens + beta * mean over
    distilled layers of per-sample KLDivLoss('batchmean') of log(p + 1e-8) / B, with p the
    full [B, H, L, L] attention (its 1e-8 is far below these soft heads' probabilities)."""
    from seekr_kernels.reference import published_attention_kl
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                labels=b["labels"], use_cache=False, output_attentions=True)
    sel = torch.zeros_like(b["labels"], dtype=torch.bool)
    sel[:, :-1] = b["labels"][:, 1:] != -100
    lkl = -(torch.softmax(b["teacher_logits"][sel], -1) * torch.log_softmax(out.logits[sel], -1)).sum(-1).mean()
    layers = sorted(b["heads"])
    attn = sum(published_attention_kl(out.attentions[l], b["teacher_attention"][l], b["heads"][l], b["queries"],
                                      b["attention_mask"]) for l in layers) / len(layers)
    return (1 - a) * out.loss + a * lkl + beta * attn


def test_replay_loss_is_the_trainer_step_and_the_published_formula(seekr_run, own_replay_grads):
    tr = seekr_run
    rc = tr.recipe
    keys = tr.memory.keys()[:5]
    model = tr.base
    model.train()
    d = rc.cfg.distill
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                  # a student that has drifted from its teacher
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    # 1. the trainer's replay step: its gradients just before the optimiser step
    grads, rec = own_replay_grads(tr, keys)
    # 2. the recipe on the same batch and weights
    loss, parts = rc.replay_loss(model, rc.batch(keys))
    loss.backward()
    assert set(parts) == {"ce", "logits_kl", "attn_kl"}
    for k in parts:
        assert float(parts[k]) == pytest.approx(rec[k], rel=1e-6, abs=1e-9)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, msg=n)
    # 3. the published formula with eager attention on a copy of the same weights; with
    # its log(p + 1e-8) (distill.attn_log_eps) the recipe gives it exactly
    ref = copy.deepcopy(model)
    sk.unpatch_llama(ref)
    ref.set_attn_implementation("eager")
    b = rc.batch(keys)
    want = _published_replay_loss(ref, b, d.logits_weight, d.attn_weight)
    want.backward()
    model.zero_grad(set_to_none=True)
    d.attn_log_eps = 1e-8
    try:
        got, parts = rc.replay_loss(model, b)
        got.backward()
    finally:
        d.attn_log_eps = 0.0
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    assert float(got.detach()) < float(loss.detach())     # log(p + eps) > log p: a smaller KL
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=n)
    model.zero_grad(set_to_none=True)


def test_local_batches_with_all_reduce_hook_add_up_to_the_global_batch(seekr_run):
    """DistributedSampler-style batches (local keys, local counts) normalised through the
    injected all-reduce give the global batch's loss."""
    tr = seekr_run
    keys = tr.memory.keys()[:5]
    model = tr.base.eval()
    rc = sk.SeekrRecipe(tr.cfg, model=model, pad_token_id=tr.tokenizer.pad_token_id)
    rc.load_state_dict(tr.recipe.state_dict())
    with torch.no_grad():
        whole, _ = rc.replay_loss(model, rc.batch(keys))
        locs = [rc.collate_fn(keys[:2]), rc.collate_fn(keys[2:])]
        counts = [torch.tensor([b["num_items_in_batch"], b["num_samples_in_batch"]]
                               + [float(l in b["distill_layers"]) for l in range(rc.num_layers)],
                               dtype=torch.float64) for b in locs]
        total = counts[0] + counts[1]
        parts = []
        for r, b in enumerate(locs):
            rc.dist = sk.DistributedHooks(r, 2, all_reduce=lambda v: total.clone())
            parts.append(rc.replay_loss(model, b)[0])
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-7)


def test_replay_dataset_with_distributed_sampler(seekr_run):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    mem = seekr_run.memory
    ds = seekr_run.recipe.dataset()
    assert len(ds) == len(mem) == 6 and ds[0] == (0, 0) and ds[-1] == (0, 5)
    assert ds.sample(3) is mem.sample((0, 3))
    with pytest.raises(IndexError):
        ds[6]
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        dl = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=ds.collate_fn(0, 8))
        for b, idx in zip(dl, [list(sampler)[i:i + 2] for i in range(0, 3, 2)]):
            keys = [ds[i] for i in idx]
            want = mem.batch(keys, 0, 8)
            assert b.keys() == want.keys() and torch.equal(b["input_ids"], want["input_ids"])
            for l in want["teacher_attention"]:
                assert torch.equal(b["teacher_attention"][l], want["teacher_attention"][l])
            seen += keys
    assert sorted(seen) == mem.keys()      # the two replicas cover the memory exactly


def test_state_dict_save_load_round_trip_mid_task(tmp_path):
    """Saved in the middle of a task (pre-task snapshot included), loaded into a fresh
    recipe: ending the task there gives what the original gives."""
    paths = tiny_tasks(tmp_path / "data")[:2]
    cfg = tiny_config(tmp_path / "run", paths, "seekr", **CONST)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, cfg.seed)
    tasks = [load_task(p, os.path.basename(p)) for p in paths]
    rc = hand_loop(cfg, model, tok, tasks[:1])
    ds = EncodedDataset(tasks[1].train, tok, 12, 6)
    rc.begin_task(model, ds.items, name=tasks[1].name)
    with torch.no_grad():                        # "training": perturb the weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rc.save(str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path / "ck")) == ["memory", "recipe.json", "tensors.safetensors"]
    rc2 = sk.SeekrRecipe(cfg, model=model, pad_token_id=tok.pad_token_id).load(str(tmp_path / "ck"))
    assert rc2.current.name == tasks[1].name and rc2.num_tasks == 1
    snap_a, snap_b = rc.current.before.tensors, rc2.current.before.tensors
    assert snap_a.keys() == snap_b.keys() and all(torch.equal(snap_a[k], snap_b[k]) for k in snap_a)
    ia, ib = rc.end_task(model), rc2.end_task(model)
    assert torch.equal(ia["forgettability"], ib["forgettability"]) and torch.equal(rc.importance, rc2.importance)
    assert {l: h.tolist() for l, h in rc.heads.items()} == {l: h.tolist() for l, h in rc2.heads.items()}
    assert len(rc2.memory.tasks) == 2
    for x, y in zip(rc.memory.tasks[1].samples, rc2.memory.tasks[1].samples):
        assert torch.equal(x.logits, y.logits) and all(torch.equal(x.attention[l], y.attention[l])
                                                       for l in x.attention)
    # a state in memory round-trips too, and the on-disk copy is verified on load
    rc3 = sk.SeekrRecipe(cfg, model=model, pad_token_id=tok.pad_token_id).load_state_dict(rc2.state_dict())
    assert torch.equal(rc3.importance, rc2.importance) and len(rc3.memory) == len(rc2.memory)
    rc2.save(str(tmp_path / "ck"))
    p = tmp_path / "ck" / "tensors.safetensors"
    data = bytearray(p.read_bytes())
    data[-2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        sk.SeekrRecipe(cfg, model=model).load(str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="holds a 'seekr' recipe"):
        meta = json.loads((tmp_path / "ck" / "recipe.json").read_text())
        sk.SeekrRecipe({"method": "replay"}, model=model).load_state_dict({**meta, "kind": "seekr-recipe"})


def test_deepcopy_and_pickle_of_a_patched_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
    model = sk.patch_llama(LlamaForCausalLM(cfg).eval())
    ids = torch.randint(0, 40, (2, 9))
    am = torch.ones(2, 9, dtype=torch.long)
    am[0, :3] = 0
    heads = {1: torch.tensor([0, 3])}
    with torch.no_grad(), sk.capture_attention(model, heads, None, am, backend="torch") as c:
        want = model(input_ids=ids, attention_mask=am).logits
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert sk.llama.is_patched(twin)
        st = sk.llama._state_of(twin)
        assert st is not sk.llama._state_of(model) and st.observer is None
        assert all(m is not model.model.layers[l].self_attn for l, m in st.layers.items())
        with sk.distill_attention(twin, heads, None, c.rows, am, backend="torch") as d:
            got = twin(input_ids=ids, attention_mask=am).logits
            # the original is free while its twin runs a context
            with torch.no_grad(), sk.capture_attention(model, heads, None, am, backend="torch"):
                model(input_ids=ids, attention_mask=am)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert float(d.loss()) < 1e-6
        d.loss().backward()


def test_peft_lora_model_keeps_only_adapters():
    """begin/end task on a PEFT LoRA model: no model copy is built; the snapshot holds the
    adapters only, and forgettability sees exactly what the adapters changed."""
    peft = pytest.importorskip("peft", reason="peft is needed for the LoRA path")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
    base = LlamaForCausalLM(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    g = torch.Generator().manual_seed(1)
    samples = [{"input_ids": torch.randint(3, 40, (n,), generator=g).tolist()} for n in (7, 9, 6, 8)]
    for s in samples:
        s["labels"] = [-100] * 3 + s["input_ids"][3:]
    rc = sk.SeekrRecipe({"method": "seekr", "replay": {"ratio": 4}, "distill": {"query_budget": 4},
                         "pad_to_multiple_of": 1}, model=model)
    rc.begin_task(model, samples, name="a")
    snap = rc.current.before
    assert snap.tensors and all("lora_" in n for n in snap.tensors)
    assert snap.nbytes == sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
    info = rc.end_task(model)
    assert float(info["forgettability"].sum()) > 0 and rc.heads
    assert rc.memory.tasks[0].samples[0].answer_mask.tolist() == [False] * 3 + [True] * 4
    rc.begin_task(model, samples, name="b")                     # no change -> forgettability 0
    assert float(rc.end_task(model)["forgettability"].sum()) == 0


def test_replay_schedule_orders_and_outnumbered():
    keys = [(0, i) for i in range(6)]
    s = ReplaySchedule(keys, 2, 7, seed=1)
    assert (s.cycle, s.per_epoch) == (2, 3)
    first = [s.next_batch() for _ in range(3)]
    assert sorted(k for b in first for k in b) == keys
    assert [s.next_batch() for _ in range(3)] != first          # a new pass, reshuffled
    f = ReplaySchedule(keys, 2, 7, seed=1, order="fixed")
    f.start_epoch(0)
    e0 = [f.next_batch() for _ in range(2)]
    f.start_epoch(1)                                            # restarts at the first batch
    assert [f.next_batch() for _ in range(2)] == e0
    many = [(0, i) for i in range(20)]
    assert ReplaySchedule(many, 2, 7, seed=0).cycle == 1        # replay every step
    skip = ReplaySchedule(many, 2, 7, seed=0, outnumbered="skip")
    assert skip.cycle == 0 and skip.per_epoch == 0 and not skip.is_replay_step(0)
    assert ReplaySchedule(keys, 4, 7, min_batch=4).cycle == 7   # trailing batch of 2 < 4 dropped


def test_recipe_errors_name_the_problem(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=20))
    with pytest.raises(sk.seekr.config.ConfigError, match="distill.layer_budget"):
        sk.SeekrRecipe({"distill": {"layer_budget": 3}}, model=model)
    with pytest.raises(sk.seekr.config.ConfigError, match="replay.subset"):
        sk.SeekrRecipe({"replay": {"subset": "last"}}, model=model)
    rc = sk.SeekrRecipe({"method": "replay"}, model=model)
    with pytest.raises(ValueError, match=r"task_samples\[0\]: the supervised tokens"):
        rc.begin_task(model, [{"input_ids": [1, 2, 3], "labels": [1, -100, 3]}])
    rc.begin_task(model, [{"prompt_ids": [1], "answer_ids": [2, 3]}], name="x")
    with pytest.raises(RuntimeError, match="in progress"):
        rc.begin_task(model, [{"prompt_ids": [1], "answer_ids": [2]}])
    rc.end_task(model)
    with pytest.raises(RuntimeError, match="no task in progress"):
        rc.end_task(model)
    with pytest.raises(ValueError, match="recipe.json: missing"):
        rc.load(str(tmp_path))
