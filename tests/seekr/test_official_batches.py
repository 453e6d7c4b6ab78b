"""``preset: official``, continued (issue 21 items 2, 3, 5): the published statistics passes'
values at left-padding rows, and the published per-device batching of the training loop.

The oracles re-write the published code (jinghan1he/SEEKR, ``training/seekr.py``,
``utils/llama_flash_att.py``) independently: transformers 4.31's eager attention mask
(``_make_causal_mask`` + ``_expand_mask``) on a plain eager Llama, and the published loop
(``DistributedSampler`` without ``set_epoch``, per-device ``DataLoader`` batches with a
partial last one, ``replay_cycle = len(train_loader) // len(replay_loader)``, DeepSpeed's
micro-step counting and 1 / accumulation loss scaling) as a list of micro-steps.
"""
import copy

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels.seekr.batching import Encoded, collate
from seekr_kernels.seekr.recipe import PendingSample


def tiny_llama(layers=3, kv_heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=40, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def samples_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, 40, (n - 3,), generator=g).tolist(),
             "answer_ids": torch.randint(3, 40, (3,), generator=g).tolist()} for n in lengths]


def padded(sample_list, T):
    """The published replay loader: the replay set left padded to one length T."""
    return collate([Encoded(s["prompt_ids"], s["answer_ids"]) for s in sample_list], 0, T)


# ============================================================================ item 2: padded rows

def mask_431(attention_mask, dtype=torch.float32):
    """transformers 4.31 ``LlamaModel._prepare_decoder_attention_mask``: ``_make_causal_mask``
    (finfo.min above the diagonal) plus ``_expand_mask`` (finfo.min at padded key columns),
    added: ``[B, 1, L, L]`` with 0, finfo.min and -inf (both)."""
    B, L = attention_mask.shape
    mn = torch.finfo(dtype).min
    causal = torch.full((L, L), mn)
    cond = torch.arange(L)
    causal.masked_fill_(cond < (cond + 1).view(L, 1), 0)
    expanded = attention_mask[:, None, None, :].expand(B, 1, L, L).to(dtype)
    inverted = 1.0 - expanded
    inverted = inverted.masked_fill(inverted.to(torch.bool), mn)
    return inverted + causal.to(dtype)[None, None]


def eager_431(model):
    """An unpatched eager copy of ``model``; run it with ``attention_mask=mask_431(...)`` (a
    4-D mask is used as given) and no position ids (4.31's default: arange)."""
    m = copy.deepcopy(model)
    if sk.llama.is_patched(m):
        sk.unpatch_llama(m)
    m.set_attn_implementation("eager")
    return m


def test_the_431_mask_makes_padding_rows_uniform_over_earlier_and_real_keys():
    """Checked numerically: a left-padding row i of the published eager attention attends
    uniformly to keys j <= i and to every real key; the other padded keys get 0."""
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1], [1] * 8])
    m4 = mask_431(mask)
    assert torch.isinf(m4).any() and (m4 == torch.finfo(torch.float32).min).any()
    model = eager_431(tiny_llama())
    ids = torch.randint(3, 40, mask.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        att = model(input_ids=ids, attention_mask=m4, output_attentions=True).attentions
    L = mask.shape[1]
    for a in att:
        for b in range(mask.shape[0]):
            p = int((mask[b] == 0).sum())
            for i in range(L):
                want = torch.zeros(L)
                if i < p:
                    keys = sorted(set(range(i + 1)) | set(range(p, L)))
                    want[keys] = 1.0 / len(keys)
                    torch.testing.assert_close(a[b, :, i], want.expand(a.shape[1], L), rtol=0, atol=1e-7)
                else:     # a real row: the masked softmax, nothing on padding or future keys
                    assert float(a[b, :, i, :p].abs().sum()) == 0.0
                    assert float(a[b, :, i, i + 1:].abs().sum()) == 0.0
                    torch.testing.assert_close(a[b, :, i].sum(-1), torch.ones(a.shape[1]))


def hidden_states(model, b, rows=None):
    with torch.no_grad(), sk.llama.padded_rows(model, b["attention_mask"], rows or "zero"):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                     output_hidden_states=True).hidden_states


@pytest.mark.parametrize("kv_heads", [2, 4])          # GQA and MHA
def test_padded_rows_official_gives_every_layer_the_published_values(kv_heads):
    model = sk.patch_llama(tiny_llama(layers=4, kv_heads=kv_heads))
    ref = eager_431(model)
    b = padded(samples_of([5, 11, 8, 3]), 16)
    with torch.no_grad():
        want = ref(input_ids=b["input_ids"], attention_mask=mask_431(b["attention_mask"]),
                   output_hidden_states=True).hidden_states
    got = hidden_states(model, b, "official")
    zero = hidden_states(model, b)
    real = b["attention_mask"].bool()
    for l in range(len(want)):
        # every position, padding included, in every layer (RoPE offsets: rounding only)
        torch.testing.assert_close(got[l], want[l], rtol=1e-5, atol=1e-5)
        # real positions never depend on the padding rows
        torch.testing.assert_close(zero[l][real], got[l][real], rtol=1e-6, atol=1e-6)
    # SDPA's zero rows: the first layer's input is the embedding, the rest differ at padding
    pad = ~real
    assert torch.equal(zero[0][pad], got[0][pad])
    for l in range(2, len(want)):
        assert not torch.allclose(zero[l][pad], want[l][pad], atol=1e-3), l


def test_padded_rows_context_checks_its_arguments():
    model = sk.patch_llama(tiny_llama(layers=1))
    mask = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="mode: must be one of"):
        sk.llama.padded_rows(model, mask, "eager")
    with pytest.raises(TypeError, match="attention_mask: expected bool or integer"):
        sk.llama.padded_rows(model, mask.float()).__enter__()
    with sk.llama.padded_rows(model, mask):
        with pytest.raises(RuntimeError, match="already active"):
            sk.llama.padded_rows(model, mask).__enter__()
        with pytest.raises(ValueError, match=r"padded_rows got shape \[1, 4\]"):
            model(input_ids=torch.ones(1, 5, dtype=torch.long))
    with sk.llama.padded_rows(tiny_llama(layers=1), None, "zero"):      # a no-op: nothing checked
        pass


def published_sensitivity_431(model, sample_list, T):
    """``get_replay_logits_and_attns`` with ``attn_grad_hook``: every sample alone, padded to
    T with the replay set, eager attention under the 4.31 mask, its own mean CE; per head
    the mean of (dL/dA)^2 over the T x T map; mean over samples, normalised per layer."""
    ref = eager_431(model)
    b = padded(sample_list, T)
    acc = 0
    for i in range(len(sample_list)):
        out = ref(input_ids=b["input_ids"][i:i + 1], attention_mask=mask_431(b["attention_mask"][i:i + 1]),
                  labels=b["labels"][i:i + 1], output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        out.loss.backward()
        acc = acc + torch.stack([a.grad[0].double() ** 2 for a in out.attentions]).mean((2, 3))
        ref.zero_grad(set_to_none=True)
    s = acc / len(sample_list)
    return (s / s.sum(1, keepdim=True)).float()


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_official_padded_sensitivity_equals_the_published_in_every_layer(kv_heads):
    model = sk.patch_llama(tiny_llama(layers=3, kv_heads=kv_heads))
    sl = samples_of([6, 9, 4, 11, 7])
    rc = sk.SeekrRecipe({"method": "seekr", "preset": "official", "distill": {"backend": "torch"}}, model=model)
    assert rc.cfg.distill.padded_rows == "official" and rc.cfg.distill.sensitivity_padding == "official"
    pend = [PendingSample(s["prompt_ids"], s["answer_ids"], 0) for s in sl]
    want = published_sensitivity_431(model, sl, 16)
    got = rc.sensitivity(model, pend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # several samples per pass: the same
    rc.cfg.distill.sensitivity_batch_size = 3
    torch.testing.assert_close(rc.sensitivity(model, pend), want, rtol=1e-4, atol=1e-7)
    # SDPA's zero rows: the first layer agrees (its values at padding are the embeddings'),
    # the others do not
    rc.cfg.distill.padded_rows = "zero"
    zero = rc.sensitivity(model, pend)
    torch.testing.assert_close(zero[0], want[0], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(zero[1:], want[1:], rtol=1e-3)
    # without padding (8 tokens, a multiple of 8) every layer agrees whatever the rows
    s8 = samples_of([8], seed=4)
    one = [PendingSample(s8[0]["prompt_ids"], s8[0]["answer_ids"], 0)]
    rc.cfg.distill.padded_rows = "official"
    a = rc.sensitivity(model, one)
    rc.cfg.distill.padded_rows = "zero"
    torch.testing.assert_close(rc.sensitivity(model, one), a, rtol=0, atol=0)
    torch.testing.assert_close(a, published_sensitivity_431(model, s8, 8), rtol=1e-4, atol=1e-7)


def published_forgettability_431(before, after, sample_list, T):
    """``get_replay_attns`` / ``get_replay_attn_diff`` with query budget 0: every row of
    the replay set padded to T, eager attention under the 4.31 mask (padding rows
    included: uniform in both models), mean over samples x T rows x T keys."""
    b = padded(sample_list, T)
    diffs = []
    with torch.no_grad():
        for i in range(len(sample_list)):
            inp = {"input_ids": b["input_ids"][i:i + 1], "attention_mask": mask_431(b["attention_mask"][i:i + 1]),
                   "output_attentions": True}
            ab, aa = before(**inp).attentions, after(**inp).attentions
            diffs.append(torch.stack([(x[0].double() - y[0].double()) ** 2 for x, y in zip(ab, aa)]))
    return torch.stack(diffs).transpose(0, 1).transpose(1, 2).mean((2, 3, 4)).float()


def test_official_forgettability_with_padded_rows_is_the_published():
    model = sk.patch_llama(tiny_llama(layers=3))
    sl = samples_of([6, 9, 4, 13, 7])
    rc = sk.SeekrRecipe({"method": "seekr", "preset": "official", "replay": {"ratio": 5},
                         "distill": {"backend": "torch"}}, model=model)
    rc.begin_task(model, sl)
    before = eager_431(model)
    shift_weights(model)
    st = rc.current
    got = rc.forgettability(model, st.samples, st.before)
    torch.testing.assert_close(got, published_forgettability_431(before, eager_431(model), sl, 16),
                               rtol=2e-5, atol=1e-9)
    rc.cfg.distill.padded_rows = "zero"          # padding rows are uniform in both maps: no effect
    torch.testing.assert_close(rc.forgettability(model, st.samples, st.before), got, rtol=1e-6, atol=0)


# ============================================================================ item 3: batching

import os   # noqa: E402
import sys  # noqa: E402

from seekr_kernels.run.data import EncodedDataset, epoch_batches  # noqa: E402
from seekr_kernels.run.steps import TrainSteps  # noqa: E402
from seekr_kernels.run.trainer import ContinualTrainer  # noqa: E402
from seekr_kernels.seekr.recipe import task_seed  # noqa: E402
from seekr_kernels.seekr.stream import per_device_batches  # noqa: E402

from tiny_runs import shift_weights, tiny_config, tiny_tasks  # noqa: E402


def published_rank_batches(order, world, per_device):
    """torch's own ``DistributedSampler`` (no shuffle here: ``order`` is the epoch's order;
    ``drop_last=False``) and a ``DataLoader`` of ``per_device`` per process: ``[rank][k]``."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    out = []
    for r in range(world):
        sampler = DistributedSampler(order, num_replicas=world, rank=r, shuffle=False)
        out.append([list(b) for b in DataLoader(order, batch_size=per_device, sampler=sampler,
                                                collate_fn=lambda x: x)])
    return out


@pytest.mark.parametrize("n,world,b", [(20, 1, 2), (44, 1, 2), (21, 2, 2), (7, 4, 3), (3, 4, 1), (16, 8, 2)])
def test_per_device_batches_are_the_distributed_sampler_and_loader(n, world, b):
    order = [100 + (7 * i) % n for i in range(n)]
    want = published_rank_batches(order, world, b)
    got = per_device_batches(order, world, b)
    assert len(got) == len(want[0]) == -(-(-(-n // world)) // b)
    for k, unit in enumerate(got):
        for r in range(world):     # a contiguous shard of the unit is rank r's own batch
            assert sk.seekr.batching.shard(unit, r, world) == want[r][k]


def published_loop(train_order, mem_order, world, per_device, epochs):
    """``train_one_task``'s micro-steps: ``[(kind, [rank batches])]``. ``replay_cycle =
    len(train_loader) // len(replay_loader)`` (0: no replay), a replay before step s when
    ``(s + 1) % cycle == 0``; the replay iterator starts over every epoch and when it is
    exhausted (the samplers never get ``set_epoch``: the same order each time)."""
    train = published_rank_batches(train_order, world, per_device)
    replay = published_rank_batches(mem_order, world, per_device) if mem_order else None
    cycle = len(train[0]) // len(replay[0]) if replay else 0
    events = []
    for _ in range(epochs):
        it = 0
        for step in range(len(train[0])):
            if cycle > 0 and (step + 1) % cycle == 0:
                events.append(("r", [replay[r][it % len(replay[0])] for r in range(world)]))
                it += 1
            events.append(("t", [train[r][step] for r in range(world)]))
    return events, cycle


class Recorder:
    """The trainer's micro-steps and optimiser steps, task by task."""

    def __init__(self, mp):
        self.tasks = []
        orig_t, orig_r, orig_s = TrainSteps.train_micro, TrainSteps.replay_micro, TrainSteps.optimizer_step
        orig_step = TrainSteps.train_step
        rec = self

        def train_micro(self, items, boundary, scale):
            rec.tasks[-1].append(("t", [tuple(e.prompt_ids + e.answer_ids) for e in items], boundary, scale))
            return orig_t(self, items, boundary, scale)

        def replay_micro(self, keys, boundary, scale):
            rec.tasks[-1].append(("r", [tuple(k) for k in keys], boundary, scale))
            return orig_r(self, keys, boundary, scale)

        def train_step(self, items, opt, sched):
            rec.tasks[-1].append(("T", [tuple(e.prompt_ids + e.answer_ids) for e in items], None, None))
            return orig_step(self, items, opt, sched)

        def optimizer_step(self, opt, sched):
            rec.tasks[-1].append("step")
            return orig_s(self, opt, sched)

        orig_fit = ContinualTrainer._fit

        def fit(self, t, ds, epochs):
            rec.tasks.append([])
            rec.ds = ds
            return orig_fit(self, t, ds, epochs)

        mp.setattr(TrainSteps, "train_micro", train_micro)
        mp.setattr(TrainSteps, "replay_micro", replay_micro)
        mp.setattr(TrainSteps, "train_step", train_step)
        mp.setattr(TrainSteps, "optimizer_step", optimizer_step)
        mp.setattr(ContinualTrainer, "_fit", fit)


OFFICIAL_LOOP = {"train.batching": "per_device", "train.order": "fixed", "replay.in_accumulation": True,
                 "replay.order": "fixed", "replay.outnumbered": "skip", "train.schedule": "constant",
                 "train.warmup_steps": 0}


@pytest.mark.parametrize("n,mem,replays_before", [
    (20, 20, list(range(10))),          # 10 micro-batches of 2, 10 replay batches: cycle 1
    (44, 8, [4, 9, 14, 19]),            # 22 micro-batches, 4 replay batches: cycle 5
])
def test_per_device_batching_is_the_published_loop(tmp_path, monkeypatch, n, mem, replays_before):
    """Per-device batch 2, accumulation 8 (batch 16), one process, two epochs: the micro-steps,
    their replay batches, the 1/8 loss scale and the optimiser-step boundaries of the
    published loop (windows counted from the task's start; the last one stepped)."""
    paths = tiny_tasks(tmp_path / "data", n_train=n)[:2]
    cfg = tiny_config(tmp_path / "run", paths, "replay", **OFFICIAL_LOOP, **{
        "train.batch_size": 16, "train.grad_accum": 8, "train.epochs": 2, "replay.ratio": mem})
    rec = Recorder(monkeypatch)
    tr = ContinualTrainer(cfg, quiet=True)
    tr.run()
    for t, events in enumerate(rec.tasks):
        micro = [e for e in events if e != "step"]
        ds = EncodedDataset(tr.tasks[t].train, tr.tokenizer, 12, 6)
        content = [tuple(e.prompt_ids + e.answer_ids) for e in ds.items]
        order = epoch_batches(n, n, task_seed(cfg.seed, t), 0)[0]           # the package's seeded order
        first = [e for e in micro if e[0] == "r"]
        mem_order = [k for k in first[0][1]] + [k for e in first[1:] for k in e[1]] if first else []
        mem_order = list(dict.fromkeys(mem_order))                         # the replay pass's order
        want, cycle = published_loop(order, mem_order if t else [], 1, 2, 2)
        assert len(micro) == len(want), (t, len(micro), len(want))
        for got, (kind, batches) in zip(micro, want):
            assert got[0] == kind and got[3] == 1 / 8
            if kind == "t":
                assert got[1] == [content[i] for i in batches[0]]
            else:
                assert got[1] == batches[0]
        # DeepSpeed's boundaries: every 8th micro-step, then the task's last window
        assert [e[2] for e in micro] == [(i + 1) % 8 == 0 for i in range(len(micro))]
        assert events.count("step") == -(-len(micro) // 8) and events[-1] == "step"
        assert sum(len(e[1]) for e in micro if e[0] == "t") == 2 * n            # no sample dropped
        if t:
            steps = [i for i, e in enumerate([e for e in micro[:len(micro) // 2]]) if e[0] == "t"]
            pos = [sum(1 for e in micro[:i] if e[0] == "t") for i, e in enumerate(micro[:len(micro) // 2])
                   if e[0] == "r"]
            assert pos == replays_before and len(steps) == n // 2


def test_global_batching_trains_a_short_last_batch(tmp_path, monkeypatch):
    """The package default: 18 samples in batches of 8 with accumulation 4 -> steps of 8, 8 and
    2 (two micro-steps of 1; the empty ones skipped); the short step's gradient is that of
    its mean CE over its own tokens. The same with replay inside the window: units of 2, 2,
    2, 2 | 2, 2, 2, 2 | 1, 1."""
    paths = tiny_tasks(tmp_path / "data", n_train=18)[:2]
    cfg = tiny_config(tmp_path / "a", paths, "replay", **{
        "train.batch_size": 8, "train.grad_accum": 4, "train.schedule": "constant", "train.warmup_steps": 0,
        "train.max_grad_norm": 0.0, "replay.ratio": 4})
    checked = []
    orig = TrainSteps.optimizer_step
    last = {}
    orig_step = TrainSteps.train_step

    def train_step(self, items, opt, sched):
        last["items"] = items
        return orig_step(self, items, opt, sched)

    def step(self, opt, sched):
        items = last.pop("items", None)
        if items is not None and len(items) == 2:
            grads = {k: p.grad.clone() for k, p in self.base.named_parameters()}
            self.base.zero_grad(set_to_none=True)
            b = collate(items, self.pad_token_id, 1)
            self.base(**b, use_cache=False).loss.backward()        # HF: mean over the batch's targets
            for k, p in self.base.named_parameters():
                torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-7)
            checked.append(len(items))
        return orig(self, opt, sched)

    monkeypatch.setattr(TrainSteps, "train_step", train_step)
    monkeypatch.setattr(TrainSteps, "optimizer_step", step)
    rec = Recorder(monkeypatch)        # (wraps the two above)
    ContinualTrainer(cfg, quiet=True).run()
    assert checked == [2, 2]
    for events in rec.tasks:
        train = [e for e in events if e != "step" and e[0] == "T"]
        assert [len(e[1]) for e in train] == [8, 8, 2]
        assert sum(len(e[1]) for e in train) == 18
    # replay inside the accumulation window: a short batch makes fewer micro-steps
    monkeypatch.undo()
    rec = Recorder(monkeypatch)
    cfg = tiny_config(tmp_path / "b", paths, "replay", **{
        "train.batch_size": 8, "train.grad_accum": 4, "replay.in_accumulation": True, "replay.ratio": 4})
    ContinualTrainer(cfg, quiet=True).run()
    sizes = [len(e[1]) for e in rec.tasks[0] if e != "step"]
    assert sizes == [2] * 8 + [1, 1]
    assert rec.tasks[0].count("step") == 3
    assert sum(len(e[1]) for e in rec.tasks[1] if e != "step" and e[0] == "t") == 18


class FakeDist:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def all_reduce(self, t):
        return t


def test_per_rank_loss_is_the_process_own_mean():
    """``train.batching: per_device``: a micro-step's loss on a process is its own mean CE
    (HF's ``outputs.loss`` of its batch) / grad_accum, not its share of the global sum."""
    from types import SimpleNamespace

    from seekr_kernels.seekr.batching import Encoded as E
    model = tiny_llama(layers=1).train()
    g = torch.Generator().manual_seed(2)
    items = [E(torch.randint(3, 40, (p,), generator=g).tolist(), torch.randint(3, 40, (a,), generator=g).tolist())
             for p, a in [(3, 2), (4, 5), (2, 1), (5, 3), (3, 4)]]
    for batching, rank in [("per_device", 0), ("per_device", 1), ("global", 1)]:
        tr = SimpleNamespace(batching=batching, pad_to_multiple_of=1, grad_accum=4)
        steps = TrainSteps(model, None, tr, FakeDist(rank, 2), torch.device("cpu"), 0)
        model.zero_grad(set_to_none=True)
        steps.train_micro(items, True, 0.25)
        got = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        mine = items[:2] if rank == 0 else items[2:]
        loss = model(**collate(mine, 0, 1), use_cache=False).loss * 0.25
        if batching == "global":       # the share of the global micro-batch's sum, x world
            n_mine = sum(len(e.answer_ids) for e in mine)
            loss = loss * n_mine / sum(len(e.answer_ids) for e in items) * 2
        loss.backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-8)


def test_a_process_without_a_sample_runs_a_weight_zero_one():
    """Global batching, 3 samples on 2 processes x 2 micro-steps: process 0 has nothing in
    the first micro-step and runs one sample with weight 0 (matched collectives)."""
    from types import SimpleNamespace

    from seekr_kernels.seekr.batching import Encoded as E
    model = tiny_llama(layers=1).train()
    items = [E([1, 5, 6], [7, 8]), E([1, 9], [10, 11, 12]), E([1, 4, 4, 4], [13])]
    tr = SimpleNamespace(batching="global", pad_to_multiple_of=1, grad_accum=2)
    steps = TrainSteps(model, None, tr, FakeDist(0, 2), torch.device("cpu"), 0)
    assert steps.micro_plan(3) == [[], [0]]
    assert TrainSteps(model, None, tr, FakeDist(1, 2), torch.device("cpu"), 0).micro_plan(3) == [[1], [2]]
    # one sample: micro-step 0 is empty everywhere (skipped), process 0 fills micro-step 1
    assert steps.micro_plan(1) == [[]]
    assert TrainSteps(model, None, tr, FakeDist(1, 2), torch.device("cpu"), 0).micro_plan(1) == [[0]]
    calls = []
    orig = steps.forward
    steps.forward = lambda b: calls.append(b["input_ids"].shape[0]) or orig(b)
    steps.optimizer_step = lambda opt, sched: None
    steps.train_step(items, None, None)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert calls == [1, 1]
    model.zero_grad(set_to_none=True)
    # process 0's share: items[0] of a global batch of 2 + 3 + 1 = 6 targets (its first
    # token has a prompt before it), x 2 processes
    from seekr_kernels.seekr.losses import ce_sum
    b = collate([items[0]], 0, 1)
    (ce_sum(model(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits,
            b["labels"]) * (2 / 6)).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-8)


def test_two_processes_with_short_batches_match_one(tmp_path):
    """19 samples in global batches of 8 on 2 processes x accumulation 2: the last batch of
    3 leaves process 0 one micro-step without a sample; the run matches one process."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run"))
    from test_distributed import _compare, _launch
    paths = tiny_tasks(tmp_path / "data", n_train=19)[:2]
    over = {"train.grad_accum": 2}
    ContinualTrainer(tiny_config(tmp_path / "one", paths, "replay+logits", **over), quiet=True).run()
    _launch(tiny_config(tmp_path / "two", paths, "replay+logits", **over).to_dict())
    _compare(str(tmp_path / "one"), str(tmp_path / "two"))


@pytest.mark.parametrize("method,over,crash", [
    # global batches of 8, 8, 3 (the 3 spread over 2 micro-steps)
    ("replay+logits", {"train.grad_accum": 2}, 6),
    # the published per-device batching: micro-batches of 4, 4, 4, 4, 3 per epoch, replay inside the window
    ("seekr", {**OFFICIAL_LOOP, "train.grad_accum": 2, "train.epochs": 2}, 9),
])
def test_killed_mid_task_with_short_batches_resumes_bit_identical(tmp_path, monkeypatch, method, over, crash):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run"))
    from test_checkpoint import kill_and_resume, records, tree_bytes
    data = tiny_tasks(tmp_path / "data", n_train=19)
    kill_and_resume(tmp_path, data, monkeypatch, method, over, crash)
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert tree_bytes(tmp_path / "a" / "final") == tree_bytes(tmp_path / "b" / "final")
    assert records(tmp_path / "b") == records(tmp_path / "a")


def test_per_rank_replay_loss_is_the_process_own_mean(tmp_path):
    """``train.batching: per_device``: a replay micro-step's loss on a process is its own
    batch's mean (HF's ``outputs.loss`` for method replay) / grad_accum, not its share of
    the global replay batch."""
    paths = tiny_tasks(tmp_path / "data")[:2]
    cfg = tiny_config(tmp_path / "run", paths, "replay", **OFFICIAL_LOOP, **{"train.grad_accum": 2,
                                                                             "replay.ratio": 6})
    tr = ContinualTrainer(cfg, quiet=True)
    tr.run()
    keys = tr.recipe.memory.keys()[:5]
    model = tr.base
    for rank, mine in [(0, keys[:2]), (1, keys[2:])]:
        tr.steps.dist = FakeDist(rank, 2)
        assert tr.steps.per_rank
        model.zero_grad(set_to_none=True)
        rec = tr.steps.replay_micro(keys, False, 0.5)
        got = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        b = tr.recipe.batch(mine)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False)
        (out.loss * 0.5).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-8)
        assert rec["ce"] == pytest.approx(float(out.loss.detach()) / 2, rel=1e-5)     # (FakeDist sums one rank) / 2
