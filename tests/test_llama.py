"""Drop-in Llama patching: outputs, distillation, capture, observers, checkpointing, errors.

Tiny models built from configs (no downloads). The distillation loss is compared with the
published formula computed from the same weights run with eager attention and
``output_attentions=True``; captured rows with the eager attention probabilities.
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seekr_kernels as sk  # noqa: E402
from seekr_kernels import llama as skl  # noqa: E402
from seekr_kernels import reference  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2"]
# "auto" is the C++ backend when seekr_kernels._C is built, torch (with a warning) otherwise.
BACKENDS = ["torch", "auto"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def tiny_model(arch="llama", layers=3, seed=0, **extra):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=128)
    common.update(extra)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        raise AssertionError(arch)
    set_impl(model, "sdpa")
    return model.float().eval()


def set_impl(model, name):
    """model.set_attn_implementation where it exists (transformers >= 4.5x), else the config."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def batch(B=2, L=12, pad=(3, 0), seed=1):
    """Left-padded batch: sample b has pad[b] padding tokens at the start."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
    return ids, mask


def valid_keys(queries, mask, L):
    B = mask.shape[0]
    q = torch.arange(L).expand(B, L) if queries is None else queries
    j = torch.arange(L)
    return (j[None, None, None, :] <= q[:, None, :, None]) & mask.bool()[:, None, None, :]


def make_teacher(heads, queries, mask, L, seed=2):
    """Teacher rows with all their mass on the keys each row can see (as captured ones)."""
    g = torch.Generator().manual_seed(seed)
    B = mask.shape[0]
    Q = L if queries is None else queries.shape[1]
    out = {}
    for l, h in heads.items():
        S = h.shape[-1]
        z = torch.randn(B, S, Q, L, generator=g) * 2
        valid = valid_keys(queries, mask, L).expand(B, S, Q, L)
        out[l] = torch.softmax(z.masked_fill(~valid, -1e9), -1) * valid
    return out


def eager_twin(model):
    twin = copy.deepcopy(model)
    if skl.is_patched(twin):
        skl.unpatch_llama(twin)
    set_impl(twin, "eager")
    return twin


def published_loss(eager_model, ids, mask, heads, queries, teacher, **fw):
    out = eager_model(input_ids=ids, attention_mask=mask, output_attentions=True, **fw)
    per_layer = [reference.published_attention_kl(out.attentions[l], teacher[l], heads[l], queries, mask)
                 for l in sorted(heads)]
    return torch.stack(per_layer).mean(), out


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(g1, g2, rtol=1e-4, atol=1e-6):
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def enable_checkpointing(model, reentrant=False):
    kw = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


HEADS = {0: torch.tensor([1, 3]), 2: torch.tensor([[0, -1], [2, 1]])}
QUERIES = torch.tensor([[11, 3, 7, 5, 0], [2, 9, 4, 10, 6]])   # row 0 of sample 0 is padding


# ----------------------------------------------------------------------------- patching

@pytest.mark.parametrize("arch", ARCHS)
def test_patched_matches_sdpa(arch):
    ref = tiny_model(arch)
    model = copy.deepcopy(ref)
    ids, mask = batch()
    assert skl.patch_llama(model) is model
    assert skl.is_patched(model) and not skl.is_patched(ref)
    assert model.config._attn_implementation == skl.SDPA_NAME
    assert all(l.self_attn.config._attn_implementation == skl.SDPA_NAME for l in model.model.layers)
    for m in (ref, model):
        out = m(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        m._out = out.logits.detach()
    torch.testing.assert_close(model._out, ref._out, rtol=0, atol=0)
    assert_grads_close(grads(model), grads(ref), rtol=0, atol=0)
    skl.unpatch_llama(model)
    assert not skl.is_patched(model) and model.config._attn_implementation == "sdpa"


def test_patch_registers_mask_and_is_idempotent():
    model = tiny_model()
    skl.patch_llama(model)
    skl.patch_llama(model)
    masks = skl._mask_functions()
    if masks is not None:   # transformers >= 4.53 builds masks through this registry
        # Without the mask builder transformers would pass no mask: padding silently dropped.
        assert masks[skl.SDPA_NAME] is masks["sdpa"]
    ids, mask = batch()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        unpadded = model(input_ids=ids).logits
    assert not torch.allclose(padded[0, 5:], unpadded[0, 5:], atol=1e-4)
    skl.unpatch_llama(model)
    assert model.config._attn_implementation == "sdpa"


def test_patch_eager_model_restores_eager():
    model = tiny_model()
    set_impl(model, "eager")
    skl.patch_llama(model)
    assert model.config._attn_implementation == skl.SDPA_NAME
    skl.unpatch_llama(model)
    assert model.config._attn_implementation == "eager"


def test_patch_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        skl.patch_llama(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention"):
        skl.patch_llama(tiny_model(), attention="eager")
    if not skl._flash_attn_installed():
        with pytest.raises(ImportError, match="flash-attn"):
            skl.patch_llama(tiny_model(), attention="flash_attention_2")


# ----------------------------------------------------------------------------- distillation

# Every backend on llama; the other architectures differ only in the model wiring.
@pytest.mark.parametrize("arch,backend", [("llama", b) for b in BACKENDS] + [(a, "torch") for a in ARCHS[1:]])
def test_distill_matches_published(arch, backend):
    model = tiny_model(arch)
    eager = eager_twin(model)
    ids, mask = batch()
    L = ids.shape[1]
    teacher = make_teacher(HEADS, QUERIES, mask, L)

    pub, _ = published_loss(eager, ids, mask, HEADS, QUERIES, teacher)
    pub.backward()

    skl.patch_llama(model)
    with sk.distill_attention(model, HEADS, QUERIES, teacher, mask, backend=backend) as d:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(d.losses) == sorted(HEADS)
    loss = d.loss()
    loss.backward()
    torch.testing.assert_close(loss, pub, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), grads(eager))
    # Only the projections feeding q and k of distilled layers get a gradient.
    g = grads(model)
    assert any("layers.0.self_attn.q_proj" in n for n in g)
    assert all(g[n].abs().max() == 0 for n in g if "layers.2" in n and "v_proj" in n)


def test_distill_all_queries_with_ce_loss():
    model = tiny_model()
    eager = eager_twin(model)
    ids, mask = batch(pad=(0, 4))
    L = ids.shape[1]
    heads = {1: torch.tensor([2, 0, 3])}
    teacher = make_teacher(heads, None, mask, L)
    # Keep padded positions out of the CE (labels[t] is predicted at t-1): eager and SDPA
    # disagree on fully masked query rows.
    prev_pad = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1) == 0
    labels = ids.masked_fill((mask == 0) | prev_pad, -100)
    pub, out = published_loss(eager, ids, mask, heads, None, teacher, labels=labels)
    (out.loss + 10 * pub).backward()

    skl.patch_llama(model)
    with sk.distill_attention(model, heads, None, teacher, mask) as d:
        out2 = model(input_ids=ids, attention_mask=mask, labels=labels)
    (out2.loss + 10 * d.loss()).backward()
    torch.testing.assert_close(d.loss(), pub, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), grads(eager))


def test_capture_then_distill_gives_zero_loss():
    model = skl.patch_llama(tiny_model())
    ids, mask = batch()
    with torch.no_grad(), sk.capture_attention(model, HEADS, QUERIES, mask) as c:
        model(input_ids=ids, attention_mask=mask)
    with sk.distill_attention(model, HEADS, QUERIES, c.rows, mask) as d:
        model(input_ids=ids, attention_mask=mask)
    assert abs(d.loss().item()) < 1e-5


def test_triton_backend_matches_torch():
    pytest.importorskip("triton")
    try:
        from seekr_kernels.triton import attention_kl as _  # noqa: F401
    except Exception as e:  # pragma: no cover
        pytest.skip(f"triton attention_kl kernels not importable: {e}")
    from seekr_kernels._backend import available
    ok, why = available("triton", torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    model = skl.patch_llama(tiny_model(layers=2))
    ids, mask = batch(L=8)
    heads = {1: torch.tensor([1, -1, 3])}
    queries = torch.tensor([[7, 4], [2, 5]])
    teacher = make_teacher(heads, queries, mask, 8)
    res = {}
    for be in ("torch", "triton"):
        model.zero_grad()
        with sk.distill_attention(model, heads, queries, teacher, mask, backend=be) as d:
            model(input_ids=ids, attention_mask=mask)
        d.loss().backward()
        res[be] = (d.loss().detach(), grads(model))
    torch.testing.assert_close(res["triton"][0], res["torch"][0], rtol=1e-5, atol=1e-6)
    assert_grads_close(res["triton"][1], res["torch"][1])


# ----------------------------------------------------------------------------- capture

@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_eager(arch):
    model = tiny_model(arch)
    eager = eager_twin(model)
    skl.patch_llama(model)
    ids, mask = batch()
    with torch.no_grad():
        att = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with sk.capture_attention(model, HEADS, QUERIES, mask, backend="torch") as c:
            model(input_ids=ids, attention_mask=mask)
    L = ids.shape[1]
    for l, h in HEADS.items():
        rows = c.rows[l]
        hb = h.expand(2, -1) if h.dim() == 1 else h
        assert rows.shape == (2, hb.shape[1], QUERIES.shape[1], L) and rows.dtype == torch.float32
        for b in range(2):
            for s in range(hb.shape[1]):
                for qi, pos in enumerate(QUERIES[b].tolist()):
                    got = rows[b, s, qi]
                    if hb[b, s] < 0 or mask[b, pos] == 0:
                        assert got.abs().max() == 0
                    else:
                        torch.testing.assert_close(got, att[l][b, hb[b, s], pos], rtol=1e-5, atol=1e-6)


def test_capture_topk_dtype_device_all_queries():
    from seekr_kernels.ops.teachers import TopK
    model = skl.patch_llama(tiny_model())
    ids, mask = batch()
    heads = {1: torch.tensor([0, 2])}
    with torch.no_grad():
        with sk.capture_attention(model, heads, None, mask) as dense:
            model(input_ids=ids, attention_mask=mask)
        with sk.capture_attention(model, heads, None, mask, topk=4, dtype=torch.bfloat16,
                                  device="cpu") as c:
            model(input_ids=ids, attention_mask=mask)
    r = dense.rows[1]
    assert r.shape == (2, 2, 12, 12)
    torch.testing.assert_close(r.sum(-1)[0, :, 3:], torch.ones(2, 9))     # rows sum to 1 on tokens
    assert r[0, :, :3].abs().max() == 0                                    # padded queries
    t = c.rows[1]
    assert isinstance(t, TopK) and t.k == 4 and t.values.dtype == torch.bfloat16
    assert t.shape == r.shape
    torch.testing.assert_close(t.values.float(), torch.topk(r, 4, -1).values, rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------- training modes

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing_counts_once(backend):
    model = skl.patch_llama(tiny_model())
    ids, mask = batch()
    teacher = make_teacher(HEADS, QUERIES, mask, ids.shape[1])
    model.train()
    calls = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    results = []
    # Backward after the context, and inside it (the recomputation then sees the active
    # context and must still not count the layer again).
    for ckpt, inside in ((False, False), (True, False), (True, True)):
        if ckpt:
            enable_checkpointing(model)
        model.zero_grad()
        calls.clear()
        with sk.distill_attention(model, HEADS, QUERIES, teacher, mask, backend=backend) as d:
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            if inside:
                loss = out.loss + 100 * d.loss()
                loss.backward()
        if not inside:
            loss = out.loss + 100 * d.loss()
            loss.backward()
        results.append((loss.detach(), d.loss().detach(), grads(model), len(calls)))
    for r in results[2:]:
        assert r[3] == results[1][3]
        torch.testing.assert_close(r[0], results[1][0], rtol=0, atol=0)
        assert_grads_close(r[2], results[1][2], rtol=0, atol=0)
    (l0, a0, g0, n0), (l1, a1, g1, n1) = results[:2]
    assert n0 == 3 and n1 == 6          # checkpointing really recomputed every layer
    torch.testing.assert_close(a1, a0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    assert_grads_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_refused_for_distill_but_capture_works():
    model = skl.patch_llama(tiny_model())
    ids, mask = batch()
    teacher = make_teacher(HEADS, QUERIES, mask, ids.shape[1])
    model.train()
    enable_checkpointing(model, reentrant=True)
    warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
    with pytest.raises(ValueError, match="use_reentrant"):
        with sk.distill_attention(model, HEADS, QUERIES, teacher, mask):
            pass
    with sk.capture_attention(model, HEADS, QUERIES, mask) as c:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(c.rows) == [0, 2]
    # Under no_grad nothing needs a gradient: allowed.
    with torch.no_grad(), sk.distill_attention(model, HEADS, QUERIES, teacher, mask) as d:
        model(input_ids=ids, attention_mask=mask)
    assert torch.isfinite(d.loss())


def test_bf16_autocast():
    model = tiny_model()
    eager = eager_twin(model)
    skl.patch_llama(model)
    ids, mask = batch()
    teacher = make_teacher(HEADS, QUERIES, mask, ids.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pub, _ = published_loss(eager, ids, mask, HEADS, QUERIES, teacher)
        with sk.distill_attention(model, HEADS, QUERIES, teacher, mask) as d:
            model(input_ids=ids, attention_mask=mask)
        loss = d.loss()
    assert loss.dtype == torch.float32
    pub.backward()
    loss.backward()
    # bf16 q/k: agreement to bf16 precision only.
    torch.testing.assert_close(loss, pub.float(), rtol=3e-2, atol=3e-3)
    ge, gp = grads(eager), grads(model)
    for n in gp:
        rel = (gp[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-12)
        assert rel < 0.1, (n, rel)


def test_peft_lora():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                          init_lora_weights=False)
    base = tiny_model()
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    eager = copy.deepcopy(model)
    set_impl(eager.base_model.model, "eager")
    ids, mask = batch()
    teacher = make_teacher(HEADS, QUERIES, mask, ids.shape[1])

    pub, _ = published_loss(eager, ids, mask, HEADS, QUERIES, teacher)
    pub.backward()
    skl.patch_llama(model)
    assert skl.is_patched(model)
    with sk.distill_attention(model, HEADS, QUERIES, teacher, mask) as d:
        model(input_ids=ids, attention_mask=mask)
    d.loss().backward()
    torch.testing.assert_close(d.loss(), pub, rtol=1e-5, atol=1e-6)
    g, ge = grads(model), grads(eager)
    assert g and all("lora_" in n for n in g)      # base weights frozen by PEFT
    assert_grads_close(g, ge)
    skl.unpatch_llama(model)
    assert model.base_model.model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- observers

class _GradProbe(torch.autograd.Function):
    """Identity on the attention output that records its gradient."""

    @staticmethod
    def forward(ctx, o, sink):
        ctx.sink = sink
        return o.view_as(o)

    @staticmethod
    def backward(ctx, g):
        ctx.sink.append(g.detach().clone())
        return g, None


class Probe(skl.AttentionObserver):
    needs_grad = True

    def __init__(self, layers):
        super().__init__(layers)
        self.seen, self.grads = [], []

    def on_attention(self, layer_idx, module, query, key, value, attn_output, padding_mask):
        self.seen.append((layer_idx, tuple(query.shape), tuple(key.shape), tuple(value.shape),
                          tuple(attn_output.shape), padding_mask))
        return _GradProbe.apply(attn_output, self.grads)


@pytest.mark.parametrize("ckpt", [False, True])
def test_observer_sees_gqa_tensors_and_output_gradient(ckpt):
    model = skl.patch_llama(tiny_model())
    ids, mask = batch()
    model.train()
    if ckpt:
        enable_checkpointing(model)
    ref_grads = []
    # Reference: the gradient of layer 1's attention output from a plain forward hook on o_proj.
    def hook(mod, inp, out):
        if torch.is_grad_enabled():   # not in the recomputation inside backward
            inp[0].register_hook(lambda g: ref_grads.append(g.clone()))
    h = model.model.layers[1].self_attn.o_proj.register_forward_hook(hook)
    probe = Probe([1])
    with skl.observe_attention(model, probe, mask) as obs:
        assert obs is probe
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    h.remove()
    assert len(probe.seen) == 1                      # once, also under checkpointing
    l, qs, ks, vs, os_, pm = probe.seen[0]
    assert (l, qs, ks, vs, os_) == (1, (2, 4, 12, 16), (2, 2, 12, 16), (2, 2, 12, 16), (2, 12, 4, 16))
    assert torch.equal(pm, mask)
    assert len(probe.grads) == 1
    torch.testing.assert_close(probe.grads[0].reshape(2, 12, 64), ref_grads[-1])


def test_observer_must_return_tensor_of_same_shape():
    class Bad(skl.AttentionObserver):
        def on_attention(self, *a):
            return a[5][:, :1]
    model = skl.patch_llama(tiny_model())
    ids, _ = batch()
    with pytest.raises(TypeError, match="on_attention"):
        with skl.observe_attention(model, Bad()):
            model(input_ids=ids)


# ----------------------------------------------------------------------------- context rules

def test_restore_after_exception_and_nested_error():
    model = skl.patch_llama(tiny_model())
    ids, mask = batch()
    teacher = make_teacher(HEADS, QUERIES, mask, ids.shape[1])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(KeyError):
        with sk.distill_attention(model, HEADS, QUERIES, teacher, mask):
            model(input_ids=ids, attention_mask=mask)
            raise KeyError("boom")
    assert skl._state_of(model).observer is None
    with pytest.raises(RuntimeError, match="already active"):
        with sk.capture_attention(model, HEADS, QUERIES, mask):
            with sk.distill_attention(model, HEADS, QUERIES, teacher, mask):
                pass
    assert skl._state_of(model).observer is None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, rtol=0, atol=0)
    # Usable again, and the same context object can be re-entered for the next step.
    d = sk.distill_attention(model, HEADS, QUERIES, teacher, mask)
    for _ in range(2):
        with d:
            model(input_ids=ids, attention_mask=mask)
        assert sorted(d.losses) == [0, 2]


def test_context_misuse_errors():
    ids, mask = batch()
    teacher = make_teacher(HEADS, QUERIES, mask, ids.shape[1])
    plain = tiny_model()
    with pytest.raises(ValueError, match="patch_llama"):
        with sk.distill_attention(plain, HEADS, QUERIES, teacher, mask):
            pass
    model = skl.patch_llama(tiny_model())
    d = sk.distill_attention(model, HEADS, QUERIES, teacher, mask)
    with d:
        with pytest.raises(RuntimeError, match="active"):
            skl.unpatch_llama(model)
    with pytest.raises(RuntimeError, match="did not run"):
        d.loss()
    with pytest.raises(RuntimeError, match="twice"):
        with sk.distill_attention(model, HEADS, QUERIES, teacher, mask):
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)


def _distill_error(model, ids, mask, heads, queries, teacher, exc, match, run=False):
    with pytest.raises(exc, match=match):
        with sk.distill_attention(model, heads, queries, teacher, mask):
            if run:
                model(input_ids=ids, attention_mask=mask)


def test_validation_errors(monkeypatch):
    model = skl.patch_llama(tiny_model())
    ids, mask = batch()
    L = ids.shape[1]
    teacher = make_teacher(HEADS, QUERIES, mask, L)
    E = _distill_error
    E(model, ids, mask, {3: torch.tensor([0])}, QUERIES, {3: teacher[0][:, :1]}, ValueError, "layer 3 out of range")
    E(model, ids, mask, {-1: torch.tensor([0])}, QUERIES, {-1: teacher[0][:, :1]}, ValueError, "out of range")
    E(model, ids, mask, {"a": torch.tensor([0])}, QUERIES, teacher, TypeError, "heads: keys")
    E(model, ids, mask, {0: torch.tensor([0, 1, 2])}, QUERIES, {0: teacher[0]}, ValueError, r"heads\[0\]: 3 head slots")
    E(model, ids, mask, {0: torch.tensor([[0, 1]] * 3)}, QUERIES, {0: teacher[0]}, ValueError, r"heads\[0\].*batch size")
    E(model, ids, mask, {0: torch.tensor([0, 4])}, QUERIES, {0: teacher[0]}, ValueError, r"heads\[0\]: values")
    E(model, ids, mask, {0: torch.tensor([0.0, 1.0])}, QUERIES, {0: teacher[0]}, TypeError, r"heads\[0\]")
    E(model, ids, mask, HEADS, QUERIES, {0: teacher[0]}, ValueError, r"teacher: must have the same layers.*missing \[2\]")
    E(model, ids, mask, {}, QUERIES, {}, ValueError, "heads: no layer")
    E(model, ids, mask, HEADS, QUERIES, {0: teacher[0], 2: teacher[2][..., :-1]}, ValueError, r"teacher\[2\].*\[B, L\]")
    E(model, ids, mask, HEADS, QUERIES[:, :3], teacher, ValueError, r"teacher\[0\]: Q=5")
    E(model, ids, mask, HEADS, QUERIES + 1, teacher, ValueError, "queries: positions")
    E(model, ids, mask, HEADS, QUERIES.float(), teacher, TypeError, "queries")
    E(model, ids, mask.float(), HEADS, QUERIES, teacher, TypeError, "attention_mask")
    E(model, ids, mask * 2, HEADS, QUERIES, teacher, ValueError, "attention_mask: values")
    E(model, ids, mask, HEADS, QUERIES, {0: -teacher[0], 2: teacher[2]}, ValueError, "negative")

    # Shapes only known at run time: checked at the first layer, before any kernel runs.
    import seekr_kernels.ops.attention_kl as akl

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before validation")
    monkeypatch.setattr(akl, "attention_kl", no_kernel)
    E(model, ids[:, :8], None, HEADS, QUERIES % 8, teacher, ValueError,
      r"teacher: built for \[B, L\] = \[2, 12\] .* \[2, 8\]", run=True)
    with pytest.raises(ValueError, match=r"attention_mask: .*\[2, 12\].*\[2, 8\]"):
        with sk.capture_attention(model, HEADS, QUERIES % 8, mask):
            model(input_ids=ids[:, :8])
    with pytest.raises(ValueError, match="capture.*|heads: no layer"):
        sk.capture_attention(model, {}, None).__enter__()


def test_sliding_window_longer_than_sequence_is_refused():
    model = skl.patch_llama(tiny_model("mistral", sliding_window=4))
    ids, mask = batch(L=8)
    with pytest.raises(ValueError, match="sliding-window"):
        with sk.capture_attention(model, {0: torch.tensor([0])}, None, mask):
            model(input_ids=ids, attention_mask=mask)


def test_kv_cache_step_is_refused():
    model = skl.patch_llama(tiny_model())
    ids, _ = batch()
    with torch.no_grad():
        pkv = model(input_ids=ids[:, :6], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="KV cache"):
            with sk.capture_attention(model, {0: torch.tensor([0])}, None):
                model(input_ids=ids[:, 6:7], past_key_values=pkv, use_cache=True)
