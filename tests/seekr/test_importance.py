"""Task sensitivity, forgettability and the importance accumulator vs eager attention.

Tiny Llama models built from configs (no downloads). Sensitivity is compared with the
gradient of ``output_attentions`` of an eager twin (retain_grad, mean of squares over each
sample's real [n, n] map or its causal part); forgettability with the eager attention
probabilities of two models.
"""
import copy
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seekr_kernels as sk  # noqa: E402
from seekr_kernels import llama as skl  # noqa: E402
from seekr_kernels.seekr.importance import (Importance, ForgettabilityMeter, attention_grad_sq_sums,  # noqa: E402
                                            measure_forgettability, measure_sensitivity, sensitivity_loss)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def set_impl(model, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def tiny(seed=0, layers=2, heads=4, kv=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=64,
                                   max_position_embeddings=64)
    m = transformers.LlamaForCausalLM(cfg).float().eval()
    set_impl(m, "sdpa")
    return m


def eager_twin(model):
    twin = copy.deepcopy(model)
    if skl.is_patched(twin):
        skl.unpatch_llama(twin)
    set_impl(twin, "eager")
    return twin


def make_batch(pads, L, seed=1, answer=4):
    g = torch.Generator().manual_seed(seed)
    B = len(pads)
    ids = torch.randint(0, 64, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    labels = ids.clone()
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        labels[b, :L - answer] = -100
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}


def fw(b):
    return {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}


# ============================================================================ sensitivity

@pytest.mark.parametrize("region", ["full", "causal"])
@pytest.mark.parametrize("mask_kind", ["none", "left"])
def test_grad_sq_sums_vs_brute_force(region, mask_kind):
    g = torch.Generator().manual_seed(0)
    B, L, H, Hkv, D = 2, 13, 4, 2, 5
    dO = torch.randn(B, L, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    mask = None if mask_kind == "none" else torch.tensor([[0] * 4 + [1] * 9, [1] * 13])
    sums, entries = attention_grad_sq_sums(dO, v, mask, region, block=4)     # L % block != 0
    for b in range(B):
        real = torch.arange(L) if mask is None else mask[b].nonzero().flatten()
        n = real.numel()
        for h in range(H):
            A = dO[b, real, h] @ v[b, h // 2, real].T                          # dL/dA on real tokens
            if region == "causal":
                A = A.tril()
            torch.testing.assert_close(sums[b, h], (A ** 2).sum())
        assert float(entries[b]) == (n * n if region == "full" else n * (n + 1) / 2)


def eager_sensitivity(model, batch, region):
    """Mean over samples of mean (dL/dA)^2 over each sample's real [n, n] map (or causal part)."""
    twin = eager_twin(model)
    out = twin(**fw(batch), output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    sensitivity_loss(out.logits, batch["labels"]).backward()
    n_layers, H = len(out.attentions), out.attentions[0].shape[1]
    acc = torch.zeros(n_layers, H, dtype=torch.float64)
    B = batch["input_ids"].shape[0]
    for l, a in enumerate(out.attentions):
        for b in range(B):
            real = batch["attention_mask"][b].nonzero().flatten()
            gm = a.grad[b][:, real][:, :, real].double()                         # [H, n, n]
            if region == "causal":
                n = real.numel()
                gm = gm * torch.ones(n, n, dtype=torch.bool).tril()
                acc[l] += (gm ** 2).sum((1, 2)) / (n * (n + 1) / 2)
            else:
                acc[l] += (gm ** 2).mean((1, 2))
    return (acc / B).float()


@pytest.mark.parametrize("region", ["full", "causal"])
def test_sensitivity_vs_eager_with_padding(region):
    model = tiny()
    batch = make_batch([3, 0, 5], L=11)
    want = eager_sensitivity(model, batch, region)
    pm = sk.patch_llama(copy.deepcopy(model))
    with measure_sensitivity(pm, region=region) as m:
        out = pm(**fw(batch))
        sensitivity_loss(out.logits, batch["labels"]).backward()
    got = m.scores
    assert got.dtype == torch.float32 and got.shape == (2, 4)
    assert float(want.min()) > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
    assert m.counts.tolist() == [3.0, 3.0]


def test_sensitivity_matches_published_formula_one_sample():
    """Published: (grad_output[0] ** 2).mean over [L, L], one unpadded sample at a time."""
    model = tiny(seed=3, kv=4)
    batches = [make_batch([0], L=9, seed=s) for s in (5, 6)]
    twin = eager_twin(model)
    pub = torch.zeros(2, 4, dtype=torch.float64)
    for b in batches:
        out = twin(**fw(b), labels=b["labels"], output_attentions=True)
        for a in out.attentions:
            a.retain_grad()
        out.loss.backward()                          # transformers' mean CE of the one sample
        pub += torch.stack([(a.grad[0].double() ** 2).mean((1, 2)) for a in out.attentions])
    pub = (pub / len(batches)).float()
    pm = sk.patch_llama(copy.deepcopy(model))
    with measure_sensitivity(pm) as m:
        for b in batches:
            pm(**fw(b), labels=b["labels"]).loss.backward()
    torch.testing.assert_close(m.scores, pub, rtol=1e-4, atol=1e-10)


def test_batch_equals_samples_one_at_a_time_and_backward_after_exit():
    model = sk.patch_llama(tiny(seed=4))
    pads = [2, 0, 4]
    L = 10
    full = make_batch(pads, L)
    with measure_sensitivity(model, region="causal") as m_batch:
        out = model(**fw(full))
    sensitivity_loss(out.logits, full["labels"]).backward()      # after leaving the context
    model.zero_grad()
    with measure_sensitivity(model, region="causal") as m_one:
        for b, p in enumerate(pads):
            one = {k: v[b:b + 1, p:] for k, v in full.items()}
            one["position_ids"] = torch.arange(L - p)[None]
            o = model(**fw(one))
            sensitivity_loss(o.logits, one["labels"]).backward()
    torch.testing.assert_close(m_batch.scores, m_one.scores, rtol=1e-4, atol=1e-10)


def test_frozen_model_and_layers_subset_and_no_grad():
    model = sk.patch_llama(tiny(seed=5))
    batch = make_batch([1, 0], L=8)
    with measure_sensitivity(model) as ref:
        sensitivity_loss(model(**fw(batch)).logits, batch["labels"]).backward()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    with measure_sensitivity(model, layers=[1]) as m:
        sensitivity_loss(model(**fw(batch)).logits, batch["labels"]).backward()
        with torch.no_grad():
            model(**fw(batch))                     # no graph: nothing measured, no error
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(m.scores[1], ref.scores[1])
    assert float(m.scores[0].abs().sum()) == 0 and m.counts.tolist() == [0.0, 2.0]


def test_gradient_checkpointing_counts_once():
    base = tiny(seed=6)
    model = sk.patch_llama(copy.deepcopy(base))
    batch = make_batch([2, 0], L=9)
    with measure_sensitivity(model) as ref:
        sensitivity_loss(model(**fw(batch)).logits, batch["labels"]).backward()
    ck = sk.patch_llama(copy.deepcopy(base))
    kw = {"use_reentrant": False}
    if hasattr(ck, "activation_checkpointing_enable"):
        ck.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    ck.train()                                     # checkpointing is active in training mode only
    with measure_sensitivity(ck) as m:
        sensitivity_loss(ck(**fw(batch)).logits, batch["labels"]).backward()
    torch.testing.assert_close(m.scores, ref.scores, rtol=1e-4, atol=1e-10)
    assert m.counts.tolist() == [2.0, 2.0]


def test_sensitivity_errors():
    model = tiny()
    with pytest.raises(ValueError, match="not patched"):
        with measure_sensitivity(model):
            pass
    pm = sk.patch_llama(model)
    with pytest.raises(ValueError, match="region"):
        measure_sensitivity(pm, region="upper")
    batch = make_batch([0], L=6)
    with pytest.raises(ValueError, match="attention_mask"):
        with measure_sensitivity(pm):
            pm(input_ids=batch["input_ids"], attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
    # the context was left cleanly: a new one can be entered
    with measure_sensitivity(pm) as m:
        sensitivity_loss(pm(**fw(batch)).logits, batch["labels"]).backward()
    assert float(m.scores.sum()) > 0


# ============================================================================ forgettability

def perturbed(model, seed=9, eps=0.05):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(eps * torch.randn(p.shape, generator=g))
    return other


def eager_probs(model, batch):
    with torch.no_grad():
        return [a.double() for a in eager_twin(model)(**fw(batch), output_attentions=True).attentions]


def eager_forgettability(before, after, batches, normalize="sample"):
    acc, n = None, 0
    for batch in batches:
        pa, pb = eager_probs(before, batch), eager_probs(after, batch)
        if acc is None:
            acc = torch.zeros(len(pa), pa[0].shape[1], dtype=torch.float64)
        mask = batch["attention_mask"]
        B, L = mask.shape
        for b in range(B):
            real = mask[b].nonzero().flatten()
            q = batch["queries"][b] if "queries" in batch else real
            q = q[mask[b, q] == 1]
            if "query_mask" in batch:
                q = batch["queries"][b][batch["query_mask"][b]]
            K = real.numel() if normalize == "sample" else L
            for l in range(len(pa)):
                d = (pa[l][b][:, q][:, :, real] - pb[l][b][:, q][:, :, real]) ** 2    # [H, Q, n]
                acc[l] += d.sum((1, 2)) / (q.numel() * K)
            n += 1
    return (acc / n).float()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forgettability_vs_eager_two_models(backend):
    before = tiny(seed=7)
    after = perturbed(before)
    batches = [make_batch([3, 0], L=10, seed=11), make_batch([0, 6, 1], L=12, seed=12)]
    batches[0]["queries"] = torch.tensor([[3, 5, 9], [0, 4, 8]])
    want = eager_forgettability(before, after, batches)
    got = measure_forgettability(sk.patch_llama(copy.deepcopy(before)), sk.patch_llama(copy.deepcopy(after)),
                                 batches, backend=backend)
    assert got.shape == (2, 4) and float(want.min()) > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)


def test_forgettability_published_formula_and_padded_normalisation():
    before = tiny(seed=8, kv=4)
    after = perturbed(before, seed=3)
    pb, pa = sk.patch_llama(copy.deepcopy(before)), sk.patch_llama(copy.deepcopy(after))
    # published: ((before - after) ** 2).mean over [Q, L] per head, one unpadded sample at a time
    samples = [make_batch([0], L=9, seed=s) for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    for s in samples:
        s["queries"] = torch.sort(torch.randperm(9, generator=g)[:4]).values[None]
    pub = torch.zeros(2, 4, dtype=torch.float64)
    for s in samples:
        A, B_ = eager_probs(before, s), eager_probs(after, s)
        pub += torch.stack([((A[l][0][:, s["queries"][0]] - B_[l][0][:, s["queries"][0]]) ** 2).mean((1, 2))
                            for l in range(2)])
    got = measure_forgettability(pb, pa, samples)
    torch.testing.assert_close(got, (pub / 3).float(), rtol=1e-4, atol=1e-10)
    # 'padded' divides by the batch length instead of each sample's real length
    batch = make_batch([4, 0], L=10, seed=5)
    want = eager_forgettability(before, after, [batch], normalize="padded")
    torch.testing.assert_close(measure_forgettability(pb, pa, [batch], normalize="padded"), want,
                               rtol=1e-4, atol=1e-10)


def test_forgettability_store_cpu_query_mask_and_identity():
    before = tiny(seed=10)
    after = perturbed(before, seed=4)
    pb = sk.patch_llama(copy.deepcopy(before))
    pa = sk.patch_llama(copy.deepcopy(after))
    batch = make_batch([2, 0], L=8, seed=7)
    batch["queries"] = torch.tensor([[2, 5, 7], [1, 3, 3]])
    batch["query_mask"] = torch.tensor([[True, True, True], [True, True, False]])
    meter = ForgettabilityMeter(store="cpu")
    meter.update(pb, pa, batch)
    want = eager_forgettability(before, after, [batch])
    torch.testing.assert_close(meter.scores, want, rtol=1e-4, atol=1e-10)
    # k of 2 layers x [2, 2, 8, 8] + q rows 2 x [2, 4, 3, 8], fp32
    assert meter.peak_stored_bytes == 2 * (2 * 2 * 8 * 8 + 2 * 4 * 3 * 8) * 4
    same = measure_forgettability(pb, sk.patch_llama(copy.deepcopy(before)), [batch])
    assert float(same.abs().max()) == 0.0


def test_forgettability_errors():
    a, b = sk.patch_llama(tiny()), sk.patch_llama(tiny(seed=1))
    batch = make_batch([0], L=6)
    with pytest.raises(ValueError, match="normalize"):
        ForgettabilityMeter(normalize="keys")
    with pytest.raises(ValueError, match="queries"):
        measure_forgettability(a, b, [{**batch, "queries": torch.tensor([[6]])}])
    with pytest.raises(ValueError, match="query_mask"):
        measure_forgettability(a, b, [{**batch, "query_mask": torch.ones(1, 2, dtype=torch.bool)}])
    with pytest.raises(ValueError, match="not patched"):
        measure_forgettability(a, tiny(), [batch])


# ============================================================================ importance

def test_importance_published_update_and_selection():
    g = torch.Generator().manual_seed(0)
    imp = Importance(4, 3)
    want = torch.zeros(4, 3, dtype=torch.float64)
    for _ in range(3):
        s, f = torch.rand(4, 3, generator=g), torch.rand(4, 3, generator=g)
        imp.update(s, f)
        want += (s.double() / s.double().sum(1, keepdim=True)) * f.double()
    torch.testing.assert_close(imp.scores, want.float())
    assert imp.num_tasks == 3
    assert {l: h.tolist() for l, h in imp.select(2, 3).items()} == \
        {l: h.tolist() for l, h in sk.select_heads(want, 2, 3).items()}
    # a layer with zero sensitivity contributes 0 rather than NaN
    s = torch.rand(4, 3, generator=g)
    s[2] = 0
    c = imp.update(s, torch.ones(4, 3))
    assert float(c[2].abs().sum()) == 0 and torch.isfinite(imp.scores).all()
    with pytest.raises(ValueError, match="sensitivity"):
        imp.update(torch.rand(3, 3), torch.rand(4, 3))
    with pytest.raises(ValueError, match="forgettability"):
        imp.update(torch.rand(4, 3), torch.full((4, 3), float("nan")))


def test_importance_save_load_round_trip_and_corruption(tmp_path):
    g = torch.Generator().manual_seed(1)
    imp = Importance(3, 2)
    for _ in range(2):
        imp.update(torch.rand(3, 2, generator=g), torch.rand(3, 2, generator=g))
    p = str(tmp_path / "importance.safetensors")
    size = imp.save(p)
    assert size == os.path.getsize(p) and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    back = Importance.load(p)
    torch.testing.assert_close(back.scores, imp.scores, rtol=0, atol=0)
    assert back.num_tasks == 2
    for (s0, f0), (s1, f1) in zip(imp.history, back.history):
        assert torch.equal(s0, s1) and torch.equal(f0, f1)
    # state_dict round trip (inside a larger checkpoint)
    again = Importance(3, 2).load_state_dict(imp.state_dict())
    assert torch.equal(again.scores, imp.scores)
    with pytest.raises(ValueError, match="scores"):
        Importance(4, 2).load_state_dict(imp.state_dict())
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: len(raw) // 2])                        # truncated
    with pytest.raises(ValueError, match="importance"):
        Importance.load(p)
    bad = bytearray(raw)
    bad[-3] ^= 0xFF                                                   # flipped bit in the data
    open(p, "wb").write(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        Importance.load(p)
