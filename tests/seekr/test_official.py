"""``recipe: official``: every place the package differs from the published code
(jinghan1he/SEEKR) is a config option, and each option computes what the published code
computes. The oracles below re-write the published formulas on eager attention (the
full [B, H, L, L] maps the published code materialises)."""
import copy
import math

import pytest
import torch

import seekr_kernels as sk
from seekr_kernels.seekr.config import OFFICIAL, ConfigError, recipe_from_dict
from seekr_kernels.run.config import RunConfig, from_dict
from seekr_kernels.run.data import EncodedDataset
from seekr_kernels.seekr.batching import collate
from seekr_kernels.seekr.memory import ReplayMemory

from tiny_runs import read_log, shift_weights, tiny_config, tiny_tasks  # noqa: E402


def tiny_llama(layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def samples_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, 40, (n - 3,), generator=g).tolist(),
             "answer_ids": torch.randint(3, 40, (3,), generator=g).tolist()} for n in lengths]


def eager_copy(model):
    m = copy.deepcopy(model)
    if sk.llama.is_patched(m):
        sk.unpatch_llama(m)
    m.set_attn_implementation("eager")
    return m


def padded(sample_list, T):
    """The published replay loader: the whole replay set left padded to one length T."""
    from seekr_kernels.seekr.batching import Encoded
    return collate([Encoded(s["prompt_ids"], s["answer_ids"]) for s in sample_list], 0, T)


# ============================================================================ config

def test_official_preset_sets_every_row_and_explicit_keys_win():
    base = {"tasks": [{"path": "x"}]}
    c = from_dict({**base, "recipe": "official"})
    for sec, vals in OFFICIAL.items():
        for k, v in vals.items():
            assert getattr(getattr(c, sec), k) == v, f"{sec}.{k}"
    c = from_dict({**base, "recipe": "official", "distill": {"attn_log_eps": 0}, "train": {"batch_size": 64}})
    assert c.distill.attn_log_eps == 0 and c.train.batch_size == 64
    assert c.distill.forgettability_norm == "official" and c.train.max_grad_norm == 1.0
    # the round trip a distributed launch makes keeps the user's choices
    c2 = from_dict(c.to_dict())
    assert c2.distill.attn_log_eps == 0 and c2.train.batch_size == 64 and c2.replay.subset == "first"
    # ... and so does the recipe built from the run (an explicit value equal to a default)
    c4 = from_dict({**base, "recipe": "official", "distill": {"attn_log_eps": 0}, "train": {"batch_size": 16}})
    rc = c4.recipe_config().validate()
    assert rc.distill.attn_log_eps == 0 and rc.batch_size == 16 and rc.grad_accum == 8
    # a config built in Python: fields left at the package default take the official value
    c3 = RunConfig(recipe="official", tasks=from_dict(base).tasks)
    c3.distill.query_budget = 7
    c3.validate()
    assert c3.distill.query_budget == 7 and c3.distill.attn_log_eps == 1e-8 and c3.replay.order == "fixed"
    package = from_dict(base)
    assert (package.distill.attn_log_eps, package.replay.subset, package.replay.in_accumulation) == (0.0, "random", False)
    r = recipe_from_dict({"recipe": "official", "distill": {"query_budget": 5}})
    assert r.distill.query_budget == 5 and r.grad_accum == 8 and r.replay.outnumbered == "skip"
    with pytest.raises(ConfigError, match="^recipe: must be one of"):
        from_dict({**base, "recipe": "paper"})
    with pytest.raises(ConfigError, match="distill.attn_log_eps"):
        from_dict({**base, "distill": {"attn_log_eps": -1}})
    with pytest.raises(ConfigError, match="replay.order"):
        from_dict({**base, "replay": {"order": "sorted"}})


# ============================================================================ attention log

def test_attention_kl_log_eps_is_the_published_formula():
    from seekr_kernels.reference import published_attention_kl
    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 10, 8
    q = (3 * torch.randn(B, H, L, D, dtype=torch.float64)).requires_grad_()    # sharp heads
    k = torch.randn(B, Hkv, L, D, dtype=torch.float64, requires_grad=True)
    heads = torch.tensor([[1, 3], [0, -1]])
    queries = torch.tensor([[2, 5, 5, 9], [4, 6, 8, 9]])
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0
    t = torch.softmax(3 * torch.randn(B, 2, 4, L, dtype=torch.float64), -1)
    # eager student maps, as the published code has them
    kk = k.repeat_interleave(H // Hkv, 1)
    z = q @ kk.transpose(-1, -2) / math.sqrt(D)
    allowed = torch.ones(L, L, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    p = torch.softmax(z.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    # the teacher puts no mass where the student cannot look (as a captured teacher)
    seen = allowed[:, 0].gather(1, queries[:, :, None].expand(-1, -1, L))        # [B, Q, L]
    tq = t * seen[:, None]
    tq = tq / tq.sum(-1, keepdim=True).clamp_min(1e-30)
    want = published_attention_kl(p, tq, heads, queries, mask)
    gq, gk = torch.autograd.grad(want, (q, k))
    got = sk.attention_kl(q, k, tq, heads, queries, mask, log_eps=1e-8)        # auto -> torch
    dq, dk = torch.autograd.grad(got, (q, k))
    # (the oracle computes in fp32, as the published code)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dq, gq, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(dk, gk, rtol=1e-4, atol=1e-7)
    exact = sk.attention_kl(q, k, tq, heads, queries, mask, backend="torch")
    assert float(got.detach()) < float(exact.detach())
    # gradients of the smoothed log in float64, on a small case (eps large enough to matter)
    qs, ks = q[:, :2, :6, :4].detach().clone().requires_grad_(), k[:, :1, :6, :4].detach().clone().requires_grad_()
    ts = torch.softmax(torch.randn(B, 2, 3, 6, dtype=torch.float64), -1)
    qq, mm = torch.tensor([[1, 4, 4], [3, 4, 5]]), mask[:, :6]
    assert torch.autograd.gradcheck(lambda a, b: sk.attention_kl(a, b, ts, torch.tensor([0, 1]), qq, mm, log_eps=1e-2),
                                    (qs, ks))
    with pytest.raises(ValueError, match="log_eps: .* torch backend only"):
        sk.attention_kl(q, k, tq, heads, queries, mask, log_eps=1e-8, backend="cpu")
    with pytest.raises(ValueError, match="log_eps: expected a number"):
        sk.attention_kl(q, k, tq, heads, queries, mask, log_eps=float("nan"))
    with pytest.raises(ValueError, match="TopK teacher"):
        sk.attention_kl(q, k, sk.TopK.from_dense(tq, 3, kind="probs"), heads, queries, mask, log_eps=1e-8)


# ============================================================================ sampling

def test_query_sampling_official_draws_with_replacement_then_sorts():
    lengths = [3, 5, 8, 12]
    sub = ReplayMemory.choose_queries(lengths, 5, 7)
    off = ReplayMemory.choose_queries(lengths, 5, 7, mode="official")
    assert sub[0] is None and sub[1] is None and sub[2].numel() == 5
    for n, q in zip(lengths, off):
        assert q.numel() == 5 and bool((q[1:] >= q[:-1]).all()) and 0 <= int(q.min()) and int(q.max()) < n
    assert off[0].unique().numel() < 5                    # 5 rows of a 3-token sample repeat
    assert off[1].tolist() == [0, 1, 2, 3, 4]             # n == Q: every row once
    for q in off[2:]:
        assert q.unique().numel() == 5                    # n > Q: without replacement
    assert ReplayMemory.choose_queries(lengths, 0, 7, mode="official") == [None] * 4


def test_replay_subset_first_takes_the_first_samples():
    assert ReplayMemory.sample_indices(250, 0.01, 3, mode="first") == [0, 1]
    assert ReplayMemory.sample_indices(50, 0.01, 3, mode="first") == [0]        # at least 1
    assert ReplayMemory.sample_indices(50, 4, 3, mode="first") == [0, 1, 2, 3]
    rnd = ReplayMemory.sample_indices(250, 0.04, 3)
    assert len(rnd) == 10 and rnd != list(range(10))
    rc = sk.SeekrRecipe({"method": "replay", "replay": {"ratio": 0.5, "subset": "first"}}, num_layers=2, num_heads=4)
    assert rc.begin_task(None, samples_of([6, 7, 8, 9, 10, 11])) == [0, 1, 2]


# ============================================================================ statistics

def published_forgettability(before, after, sample_list, queries, T):
    """get_replay_attns + get_replay_attn_diff: eager maps of every head of the replay set
    padded to T; rows at the query positions (all T with budget 0); squared difference
    averaged over samples x rows x T keys."""
    b = padded(sample_list, T)
    diffs = []
    with torch.no_grad():
        for i in range(len(sample_list)):
            inp = {k: b[k][i:i + 1] for k in ("input_ids", "attention_mask", "position_ids")}
            n = int(b["attention_mask"][i].sum())
            sel = torch.arange(T) if queries[i] is None else queries[i] + (T - n)
            ab = [a[0][:, sel] for a in before(**inp, output_attentions=True).attentions]
            aa = [a[0][:, sel] for a in after(**inp, output_attentions=True).attentions]
            diffs.append(torch.stack([(x.double() - y.double()) ** 2 for x, y in zip(ab, aa)]))   # [nl, H, Q, T]
    return torch.stack(diffs).transpose(0, 1).transpose(1, 2).mean((2, 3, 4)).float()


@pytest.mark.parametrize("budget", [0, 5])
def test_forgettability_official_normalisation(budget):
    model = tiny_llama()
    lengths = [6, 9, 4, 13, 7]
    sl = samples_of(lengths)
    rc = sk.SeekrRecipe({"method": "seekr", "recipe": "official", "replay": {"ratio": 5},
                         "distill": {"query_budget": budget, "backend": "torch"}}, model=model)
    rc.begin_task(model, sl)
    before = eager_copy(model)
    shift_weights(model)
    st = rc.current
    got = rc.forgettability(model, st.samples, st.before)
    T = 16                                                  # 13 tokens padded to a multiple of 8
    want = published_forgettability(before, eager_copy(model), sl, [s.queries for s in st.samples], T)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-9)
    if budget:
        assert st.samples[2].queries.numel() == 5           # 4 tokens, 5 rows drawn with replacement
    rc.cfg.distill.forgettability_norm = "sample"
    per_sample = rc.forgettability(model, st.samples, st.before)
    assert not torch.allclose(per_sample, got, rtol=0.05)    # the two normalisations differ


def published_sensitivity(model, sample_list, T):
    """attn_grad_hook: per sample (padded to T with the rest of the replay set) the mean of
    (dL/dA)^2 over the whole T x T map of each head, dL/dA from the sample's own mean CE;
    averaged over samples, normalised per layer."""
    b = padded(sample_list, T)
    acc = 0
    for i in range(len(sample_list)):
        out = model(**{k: b[k][i:i + 1] for k in b}, output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        out.loss.backward()
        acc = acc + torch.stack([a.grad[0].double() ** 2 for a in out.attentions]).mean((2, 3))
        model.zero_grad(set_to_none=True)
    s = acc / len(sample_list)
    return (s / s.sum(1, keepdim=True)).float()


def test_sensitivity_official_padding():
    # One layer: the values at padding positions are then the embeddings' (deeper layers
    # carry the attention implementation's own output at fully masked padding rows).
    model = tiny_llama(layers=1)
    sl = samples_of([6, 9, 4, 11, 7])
    rc = sk.SeekrRecipe({"method": "seekr", "distill": {"sensitivity_padding": "official", "backend": "torch"},
                         "pad_to_multiple_of": 8}, model=model)
    sk.patch_llama(model)
    pend = [sk.seekr.recipe.PendingSample(s["prompt_ids"], s["answer_ids"], 0) for s in sl]
    got = rc.sensitivity(model, pend)
    want = published_sensitivity(eager_copy(model), sl, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    rc.cfg.distill.sensitivity_padding = "real"
    assert not torch.allclose(rc.sensitivity(model, pend), got, rtol=1e-3)


# ============================================================================ replay schedule

def test_replay_in_accumulation_window(tmp_path, monkeypatch):
    """With grad_accum 2 a replay batch is one micro-step of the window; every 2 micro-steps
    (train or replay) one optimiser step, each micro-step's mean loss / 2 — what DeepSpeed
    does with the published loop."""
    from seekr_kernels.run.steps import TrainSteps
    from seekr_kernels.run.trainer import ContinualTrainer
    paths = tiny_tasks(tmp_path / "data")[:2]
    cfg = tiny_config(tmp_path / "run", paths, "replay+logits", **{
        "train.grad_accum": 2, "replay.in_accumulation": True, "replay.order": "fixed", "replay.batch_size": 6,
        "train.schedule": "constant", "train.warmup_steps": 0})
    events, checked = [], {}
    orig_t, orig_r = TrainSteps.train_micro, TrainSteps.replay_micro
    orig_step = TrainSteps.optimizer_step

    def train_micro(self, items, boundary, scale):
        events.append(("t", boundary, scale, items))
        return orig_t(self, items, boundary, scale)

    def replay_micro(self, keys, boundary, scale):
        events.append(("r", boundary, scale, keys))
        return orig_r(self, keys, boundary, scale)

    def step(self, opt, sched):
        window = []
        for e in reversed(events[:-1] if events and events[-1] == "step" else events):
            if e == "step":
                break
            window.insert(0, e)
        if not checked and any(e[0] == "r" for e in window):
            # The same window by the published rule: sum of each micro-step's mean loss / 2.
            grads = {n: p.grad.clone() for n, p in self.base.named_parameters()}
            self.base.zero_grad(set_to_none=True)
            for kind, _, _, x in window:
                if kind == "r":
                    loss, _ = self.recipe.replay_loss(self.base, self.recipe.batch(x))
                else:
                    b = collate(x, self.pad_token_id, 1)
                    loss = self.base(**b, use_cache=False).loss
                (loss / 2).backward()
            for n, p in self.base.named_parameters():
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
            checked["window"] = [e[0] for e in window]
        events.append("step")
        return orig_step(self, opt, sched)

    monkeypatch.setattr(TrainSteps, "train_micro", train_micro)
    monkeypatch.setattr(TrainSteps, "replay_micro", replay_micro)
    monkeypatch.setattr(TrainSteps, "optimizer_step", step)
    ContinualTrainer(cfg, quiet=True).run()
    micro = [e for e in events if e != "step"]
    assert all(e[2] == 0.5 for e in micro)
    # task 1: 3 batches of 8 -> 6 micro-steps of 4, no memory; task 2: a memory of 6 in
    # replay micro-batches of 6 -> 1 replay batch, cycle 6 // 1 = 6: one replay, 7 micro-steps
    kinds = "".join(e[0] for e in micro)
    assert kinds == "tttttt" + "tttttrt"
    assert events.count("step") == 3 + 4                     # the last, half-full window is stepped
    assert checked["window"] in (["r", "t"], ["t", "r"])
    # the boundary flag marks the second micro-step of each window (DDP syncs there)
    assert [e[1] for e in micro[6:]] == [False, True, False, True, False, True, False]
    replay = [r for r in read_log(tmp_path / "run") if r["kind"] == "replay"]
    assert len(replay) == 1 and "logits_kl" in replay[0]


def test_official_recipe_end_to_end(tmp_path):
    """``recipe: official`` on tiny data runs to the end: first-sample subsets, fixed
    order, no replay when the memory's batches outnumber the train batches."""
    from seekr_kernels.run.trainer import ContinualTrainer
    paths = tiny_tasks(tmp_path / "data")
    d = tiny_config(tmp_path / "run", paths, "seekr").to_dict()
    d["recipe"] = "official"
    for sec, keys in OFFICIAL.items():           # only what the tiny config needs stays explicit
        for k in keys:
            if k not in ("batch_size", "lr", "max_prompt_len", "max_answer_len", "backend", "layer_budget",
                         "head_budget"):
                d[sec].pop(k, None)
    d["train"].update(batch_size=8, grad_accum=2)
    d["replay"] = {"ratio": 0.25}
    cfg = from_dict(d)
    assert cfg.distill.attn_log_eps == 1e-8 and cfg.replay.subset == "first" and cfg.distill.query_budget == 0
    tr = ContinualTrainer(cfg, quiet=True)
    res = tr.run()
    assert res["complete"]
    assert tr._global_batches(24, 0, 1, 8) == tr._global_batches(24, 3, 1, 8)    # train.order: fixed
    first = EncodedDataset(tr.tasks[0].train, tr.tokenizer, 12, 6).items[:6]          # replay.subset: first
    assert [s.input_ids.tolist() for s in tr.memory.tasks[0].samples] == [x.prompt_ids + x.answer_ids for x in first]
    replay = [r for r in read_log(tmp_path / "run") if r["kind"] == "replay"]
    # task 2: 6 micro-steps, memory 6 -> 2 replay micro-batches of 4 (the trailing one of
    # 2 is kept: 2 >= world size) -> cycle 3: 2 replays; task 3: 12 -> 3 batches, cycle 2: 3
    assert len(replay) == 2 + 3 and all("attn_kl" in r for r in replay)
    # outnumbered: a memory of more replay batches than train micro-steps -> no replay
    rc = sk.SeekrRecipe({"recipe": "official", "replay": {"batch_size": 1}, "batch_size": 8, "grad_accum": 2},
                        num_layers=2, num_heads=4)
    rc.memory = tr.memory
    assert rc.replay_schedule(6).cycle == 0
    rc.cfg.replay.outnumbered = "every_step"
    assert rc.replay_schedule(6).cycle == 1
    # a replay batch must give every process and micro-step a sample
    rc = sk.SeekrRecipe({"batch_size": 8, "grad_accum": 4, "replay": {"batch_size": 2}}, num_layers=2, num_heads=4)
    with pytest.raises(ConfigError, match="replay.batch_size: 2 is smaller than the 4 samples"):
        rc.replay_schedule(3)
