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
import math

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
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    st = rc.current
    got = rc.forgettability(model, st.samples, st.before)
    torch.testing.assert_close(got, published_forgettability_431(before, eager_431(model), sl, 16),
                               rtol=2e-5, atol=1e-9)
    rc.cfg.distill.padded_rows = "zero"          # padding rows are uniform in both maps: no effect
    torch.testing.assert_close(rc.forgettability(model, st.samples, st.before), got, rtol=1e-6, atol=0)
