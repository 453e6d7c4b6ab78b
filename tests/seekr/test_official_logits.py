"""``preset: official``, issue 21 items 1 and 4: the logits term at the published
positions (``distill.logits_positions``), the published head selection on ties
(``distill.head_selection``) and the published budgets. Each is checked against a
re-implementation of the published code (jinghan1he/SEEKR ``training/seekr.py``,
``data/data_collator.py``) written here."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import seekr_kernels as sk
from seekr_kernels.seekr.config import OFFICIAL, ConfigError, recipe_from_dict
from seekr_kernels.seekr.memory import ReplayMemory, ReplayMemoryError

BOS, EOS, PAD, V = 1, 2, 0, 40


def tiny_llama(layers=2, heads=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def make_samples(spec, seed=0):
    """(prompt tokens with bos, answer tokens with eos) per sample; a prompt length of 0 is
    a sample without prompt, an answer length of 2 a one-token answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, a in spec:
        prompt = ([BOS] + torch.randint(3, V, (p - 1,), generator=g).tolist()) if p else []
        out.append({"prompt_ids": prompt, "answer_ids": torch.randint(3, V, (a - 1,), generator=g).tolist() + [EOS]})
    return out


#: left padding (lengths 4..9, padded to a multiple of 8), one-token answers (answer
#: length 2: the token and eos), a one-token answer in the longest sample
SPEC = [(5, 2), (3, 4), (7, 2), (2, 2), (4, 3), (6, 3)]


# ============================================================================ the published term

def published_batch(samples, T):
    """The published DataCollator (left padding to T, labels = the last label_len tokens,
    label_len = the answer's tokens with eos)."""
    ids, mask, labels = [], [], []
    for s in samples:
        seq = s["prompt_ids"] + s["answer_ids"]
        pad = T - len(seq)
        ids.append([PAD] * pad + seq)
        mask.append([0] * pad + [1] * len(seq))
        labels.append([-100] * (T - len(s["answer_ids"])) + s["answer_ids"])
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def published_teacher(teacher_logits, samples, T):
    """DistillAttnDataCollator: each sample's teacher logits (captured on the sample)
    right-aligned to the batch length T, zeros on the left, -100 off the label tokens."""
    out = []
    for lg, s in zip(teacher_logits, samples):
        lg = torch.cat([torch.zeros(T - lg.shape[0], lg.shape[1]), lg]) if lg.shape[0] < T else lg[-T:]
        lg = lg.clone()
        lg[:T - len(s["answer_ids"])] = -100.0
        out.append(lg)
    return torch.stack(out)


def published_logits_term(logits, labels, teacher_logits):
    """cal_replay_logits_distill_loss: CrossEntropyLoss(logits[labels != -100],
    softmax(teacher_logits[labels != -100]))."""
    idx = torch.nonzero(labels != -100, as_tuple=True)
    return torch.nn.CrossEntropyLoss()(logits[idx].float(), F.softmax(teacher_logits[idx].float(), dim=-1))


def own_logits(model, samples):
    """Each sample's logits alone, unpadded ([n, V] fp32)."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s["prompt_ids"] + s["answer_ids"]])).logits[0].float()
                for s in samples]


def recipe_after_task(samples, positions, fused="false", method="replay+logits", seed=0, **distill):
    """A recipe that has learned one task of ``samples`` (all kept, in order) with
    ``model`` as the teacher; the model then drifts (a student that moved away)."""
    model = tiny_llama(seed=seed)
    cfg = {"method": method, "replay": {"ratio": len(samples), "subset": "first"},
           "distill": {"logits_positions": positions, "fused_lm_head": fused, **distill}}
    rc = sk.SeekrRecipe(cfg, model=model, pad_token_id=PAD)
    rc.begin_task(model, samples)
    rc.end_task(model)
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return rc, model, teacher


def reference(model, teacher, samples, b, a):
    """(total, logits term, CE) of the published replay loss (logits_weight a, no
    attention term) on the recipe's batch ``b``, with its gradients in ``model``."""
    T = b["input_ids"].shape[1]
    ids, mask, labels = published_batch(samples, T)
    assert torch.equal(ids, b["input_ids"]) and torch.equal(mask, b["attention_mask"])
    tl = published_teacher(own_logits(teacher, samples), samples, T)
    # position ids over real tokens, as the package (README: the published arange is not reproduced)
    out = model(input_ids=ids, attention_mask=mask, position_ids=b["position_ids"], use_cache=False)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))  # HF's shifted CE
    lkl = published_logits_term(out.logits, labels, tl)
    total = (1 - a) * ce + a * lkl
    total.backward()
    return total.detach(), lkl.detach(), ce.detach()


def grads(model):
    gs = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gs


@pytest.mark.parametrize("fused", ["false", "true"])
def test_published_positions_reproduce_the_published_term(fused):
    """Materialised and fused lm_head: logits term, total loss and gradients of
    ``logits_positions: published`` are the published ones on a left-padded batch with
    one-token answers; ``predict`` is not (the check can fail)."""
    samples = make_samples(SPEC)
    got = {}
    for pos in ("published", "predict"):
        rc, model, teacher = recipe_after_task(samples, pos, fused)
        assert (rc.fused_lm_head(model) is not None) == (fused == "true")
        b = rc.batch(rc.memory.keys())
        assert b["logits_positions"] == pos
        loss, parts = rc.replay_loss(model, b)
        loss.backward()
        got[pos] = (loss.detach(), parts, grads(model))
    total, lkl, ce = reference(model, teacher, samples, b, rc.cfg.distill.logits_weight)
    want = grads(model)
    loss, parts, g = got["published"]
    torch.testing.assert_close(parts["logits_kl"], lkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-6)
    for n in want:
        torch.testing.assert_close(g[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # the package's default distils other rows: the same check fails for it
    loss_p, parts_p, g_p = got["predict"]
    torch.testing.assert_close(parts_p["ce"], ce, rtol=1e-5, atol=1e-6)
    assert abs(float(parts_p["logits_kl"]) - float(lkl)) > 1e-3 * float(lkl)
    assert max(float((g_p[n] - want[n]).abs().max()) for n in want) > 1e-4 * max(
        float(want[n].abs().max()) for n in want)


def test_published_positions_fused_triton_kernels():
    """The fused lm_head's two calls on the Triton kernels (the interpreter on CPU)."""
    from seekr_kernels._backend import available
    if not available("triton", torch.device("cpu"))[0] and not torch.cuda.is_available():
        pytest.skip("no Triton here")
    samples = make_samples(SPEC[:3])
    rc, model, teacher = recipe_after_task(samples, "published", "true", backend="triton")
    b = rc.batch(rc.memory.keys())
    loss, parts = rc.replay_loss(model, b)
    loss.backward()
    g = grads(model)
    total, lkl, ce = reference(model, teacher, samples, b, 0.5)
    want = grads(model)
    torch.testing.assert_close(parts["logits_kl"], lkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), total, rtol=1e-5, atol=1e-6)
    for n in want:
        torch.testing.assert_close(g[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_published_positions_without_prompt():
    """A sample without prompt (the published collator never builds one: it prepends
    bos): the published formula's rows are all its positions, one more than its
    next-token targets, and the term is their mean. (Logits term only: the replay CE of
    a left-padded sample without prompt has a target predicted from a padding position,
    in the published code and here alike.)"""
    samples = make_samples([(0, 3), (4, 2), (3, 3)], seed=3)
    for fused in ("false", "true"):
        rc, model, teacher = recipe_after_task(samples, "published", fused, seed=3, logits_weight=1.0)
        b = rc.batch(rc.memory.keys())
        assert b["num_logits_in_batch"] == 8 and b["num_items_in_batch"] == 7
        loss, parts = rc.replay_loss(model, b)
        loss.backward()
        g = grads(model)
        total, lkl, ce = reference(model, teacher, samples, b, 1.0)
        want = grads(model)
        torch.testing.assert_close(parts["logits_kl"], lkl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.detach(), total, rtol=1e-5, atol=1e-6)
        for n in want:
            torch.testing.assert_close(g[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("logits_weight", [0.0, 1.0])
def test_published_positions_weight_zero_terms_are_logged(logits_weight):
    samples = make_samples(SPEC[:3], seed=4)
    for fused in ("false", "true"):
        rc, model, teacher = recipe_after_task(samples, "published", fused, seed=4, logits_weight=logits_weight)
        b = rc.batch(rc.memory.keys())
        loss, parts = rc.replay_loss(model, b)
        loss.backward()
        g = grads(model)
        total, lkl, ce = reference(model, teacher, samples, b, logits_weight)
        want = grads(model)
        torch.testing.assert_close(parts["logits_kl"], lkl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(parts["ce"], ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.detach(), total, rtol=1e-5, atol=1e-6)
        for n in want:
            torch.testing.assert_close(g[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_published_positions_with_compact_teachers(kind):
    """A TopK / sampled teacher keeping every entry (k = V) is the dense teacher, at the
    published positions too (both paths)."""
    samples = make_samples(SPEC[:4], seed=8)
    for fused in ("false", "true"):
        rc, model, teacher = recipe_after_task(samples, "published", fused, seed=8, teacher_logits=kind,
                                               teacher_logits_k=V)
        b = rc.batch(rc.memory.keys())
        loss, parts = rc.replay_loss(model, b)
        total, lkl, ce = reference(model, teacher, samples, b, 0.5)
        model.zero_grad(set_to_none=True)
        tol = dict(rtol=1e-5, atol=1e-6) if kind == "topk" else dict(rtol=2e-3, atol=1e-4)  # sampled: reweighted
        torch.testing.assert_close(parts["logits_kl"], lkl, **tol)


def test_published_positions_local_batches_add_up_to_the_global_batch():
    """Per-process batches (collate_fn, local counts) all-reduced: the published rows'
    count (here one more than the targets, a sample has no prompt) is reduced too."""
    samples = make_samples([(0, 3), (4, 2), (3, 3), (5, 2)], seed=5)
    rc, model, _ = recipe_after_task(samples, "published", "false", seed=5)
    keys = rc.memory.keys()
    with torch.no_grad():
        whole, _ = rc.replay_loss(model, rc.batch(keys))
        locs = [rc.collate_fn(keys[:2]), rc.collate_fn(keys[2:])]
        vecs = [torch.tensor([b["num_items_in_batch"], b["num_samples_in_batch"], 0, 0, b["num_logits_in_batch"]],
                             dtype=torch.float64) for b in locs]
        total = vecs[0] + vecs[1]
        parts = []
        for r, b in enumerate(locs):
            rc.dist = sk.DistributedHooks(r, 2, all_reduce=lambda v: total.clone())
            parts.append(rc.replay_loss(model, b)[0])
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-7)


def test_capture_stores_the_teacher_at_the_chosen_positions():
    samples = make_samples(SPEC + [(0, 3)], seed=6)
    for pos in ("predict", "published"):
        rc, _, teacher = recipe_after_task(samples, pos, seed=6)
        task = rc.memory.tasks[0]
        assert task.logits_positions == pos
        for s, rs, lg in zip(samples, task.samples, own_logits(teacher, samples)):
            P, A = len(s["prompt_ids"]), len(s["answer_ids"])
            start, rows = (P, A) if pos == "published" else (max(0, P - 1), A - (0 if P else 1))
            assert rs.logits_start == start and rs.logits.shape[0] == rows
            torch.testing.assert_close(rs.logits, lg[start:start + rows], rtol=1e-5, atol=1e-5)


# ============================================================================ memory and config

def test_memory_records_its_positions_and_refuses_the_other(tmp_path):
    samples = make_samples(SPEC[:3], seed=7)
    rc, model, _ = recipe_after_task(samples, "published", seed=7)
    root = str(tmp_path / "m")
    rc.memory.save(root)
    man_p = os.path.join(root, "task-000", "manifest.json")
    man = json.load(open(man_p))
    assert man["layout"]["logits_positions"] == "published"
    back = ReplayMemory.load(root)
    assert back.tasks[0].logits_positions == "published"
    # a recipe of the other option refuses the memory (on load) and its batches
    other = sk.SeekrRecipe({"method": "replay+logits", "distill": {"logits_positions": "predict"}},
                           num_layers=2, num_heads=4)
    rc.save(str(tmp_path / "state"))
    with pytest.raises(ValueError, match="distill.logits_positions: 'predict'.*'published' positions"):
        other.load(str(tmp_path / "state"))
    other.memory = back
    with pytest.raises(ConfigError, match="distill.logits_positions"):
        other.replay_loss(model, other.batch(back.keys()))
    # a batch never mixes the two
    rp, _, _ = recipe_after_task(samples, "predict", seed=7)
    mixed = ReplayMemory(back.tasks + [copy.copy(rp.memory.tasks[0])])
    mixed.tasks[1].name = "other"
    with pytest.raises(ValueError, match="different positions"):
        mixed.batch([(0, 0), (1, 0)])
    # a reader that ignores the layout key (older versions) refuses the data: the starts
    # are stored under another name
    from seekr_kernels.utils import store
    del man["layout"]["logits_positions"]
    json.dump(store.seal({k: v for k, v in man.items() if k != "manifest_sha256"}, "manifest_sha256"),
              open(man_p, "w"))
    with pytest.raises(ReplayMemoryError, match="inconsistent replay memory content.*logits_start"):
        ReplayMemory.load_task(root, 0)


def test_memories_without_positions_read_as_predict(tmp_path):
    legacy = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "legacy", "replay_v2")
    mem = ReplayMemory.load(legacy)
    assert [t.logits_positions for t in mem.tasks] == ["predict", "predict"]
    assert mem.batch([(0, 0), (0, 1)])["logits_positions"] == "predict"
    # written again, a predict memory keeps the tensor names every version reads
    mem.save(str(tmp_path / "m"))
    man = json.load(open(tmp_path / "m" / "task-000" / "manifest.json"))
    assert man["layout"]["logits_positions"] == "predict"
    from safetensors.torch import load_file
    assert "logits_start" in load_file(str(tmp_path / "m" / "task-000" / "data.safetensors"))


def test_logits_positions_config():
    assert OFFICIAL["distill"]["logits_positions"] == "published"
    assert recipe_from_dict({}).distill.logits_positions == "predict"
    assert recipe_from_dict({"preset": "official"}).distill.logits_positions == "published"
    assert recipe_from_dict({"preset": "official", "distill": {"logits_positions": "predict"}}
                            ).distill.logits_positions == "predict"
    assert recipe_from_dict({"distill": {"logits_positions": "answer"}}).distill.logits_positions == "published"
    with pytest.raises(ConfigError, match="distill.logits_positions: must be one of"):
        recipe_from_dict({"distill": {"logits_positions": "shifted"}})


# ============================================================================ item 4: ties and budgets

def published_select_layer_head(attn_ipt, layer_budget, head_budget):
    """jinghan1he/SEEKR ``select_layer_head`` (target_layers = every layer), rewritten:
    topk of the layer sums (fp32, as its attn_ipt), sorted; topk over the kept layers'
    heads flattened; unravelled and sorted by (layer, head)."""
    import numpy as np
    select_layers = attn_ipt.sum(1).topk(layer_budget)[1].sort()[0]
    sub = attn_ipt[select_layers]
    pos = np.array(np.unravel_index(sub.flatten().topk(head_budget)[1].numpy(), sub.shape)).transpose()
    out = {}
    for l, h in sorted(pos, key=lambda x: (x[0], x[1])):
        out.setdefault(int(select_layers[l]), []).append(int(h))
    return out


def as_lists(d):
    return {int(l): torch.as_tensor(h).tolist() for l, h in d.items()}


def tie_cases():
    g = torch.Generator().manual_seed(0)
    rounded = torch.zeros(8, 4)                          # layer sums equal in fp32 (1 + 3e-8 -> 1), not in fp64
    rounded[:, 0], rounded[::2, 1:] = 1.0, 1e-8
    zero_below = torch.rand(32, 32, generator=g)
    zero_below[:12] = 0                                   # layers whose maps did not move
    few = torch.zeros(32, 32)
    few[20:, :5] = torch.rand(12, 5, generator=g)        # fewer non-zero heads than the budget
    return [(torch.zeros(40, 40), 24, 128), (torch.ones(4, 4), 2, 3),
            (torch.randint(0, 3, (8, 6), generator=g).float(), 5, 9),
            (torch.randint(0, 2, (32, 32), generator=g).float() * 0.5, 24, 128),
            (rounded, 3, 5), (rounded, 1, 2),
            (zero_below, 24, 128), (few, 24, 128)]


def test_published_head_selection_is_the_published_code_on_ties():
    differ = 0
    for imp, lb, hb in tie_cases():
        got = as_lists(sk.select_heads(imp, lb, hb, ties="published"))
        assert got == published_select_layer_head(imp, lb, hb), (list(imp.shape), lb, hb)
        assert sum(len(h) for h in got.values()) == hb
        differ += got != as_lists(sk.select_heads(imp, lb, hb))
    assert differ >= 3        # the stable rule gives other heads on these ties (the check can fail)
    with pytest.raises(ValueError, match="ties"):
        sk.select_heads(torch.ones(2, 2), 1, 1, ties="topk")


def fixed_importance(rc, imp):
    """The recipe's statistics replaced: sensitivity x forgettability = ``imp``."""
    rc.sensitivity = lambda model, samples: imp.clone()
    rc.forgettability = lambda model, samples, before: torch.ones_like(imp)


def test_recipe_under_official_selects_heads_as_published():
    """End of a task under ``preset: official`` (explicit budgets): equal importances
    select the published heads; the package's default selects others."""
    samples = make_samples(SPEC[:2], seed=9)
    got = {}
    for preset in ("official", "package"):
        model = tiny_llama(layers=4)
        rc = sk.SeekrRecipe({"preset": preset, "replay": {"ratio": 2, "subset": "first"},
                             "distill": {"layer_budget": 2, "head_budget": 3, "backend": "torch"}},
                            model=model, pad_token_id=PAD)
        assert rc.cfg.distill.head_selection == ("published" if preset == "official" else "stable")
        fixed_importance(rc, torch.ones(4, 4))
        rc.begin_task(model, samples)
        got[preset] = as_lists(rc.end_task(model)["heads"])
    assert got["official"] == published_select_layer_head(torch.ones(4, 4), 2, 3)
    assert got["package"] == {0: [0, 1, 2]} != got["official"]


def test_official_budgets_are_the_published_numbers_on_any_shape():
    """A fake 40 x 40 model: 24 / 128 under official (no warning), 30 / 200 scaled by
    the package; the end of a task selects 24 layers' worth of 128 heads as published."""
    import warnings
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=80, intermediate_size=16, num_hidden_layers=40,
                                         num_attention_heads=40, num_key_value_heads=40, vocab_size=V,
                                         max_position_embeddings=32)).eval()
    assert sk.SeekrRecipe({}, model=model).budgets == (30, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = sk.SeekrRecipe({"preset": "official", "replay": {"ratio": 1, "subset": "first"},
                             "distill": {"backend": "torch"}}, model=model, pad_token_id=PAD)
    assert rc.budgets == (24, 128)
    imp = torch.rand(40, 40, generator=torch.Generator().manual_seed(1))
    imp[torch.rand(40, 40, generator=torch.Generator().manual_seed(2)) < 0.5] = 0.0       # ties at 0
    fixed_importance(rc, imp)
    rc.begin_task(model, make_samples([(3, 2)], seed=10))
    heads = as_lists(rc.end_task(model)["heads"])
    assert heads == published_select_layer_head(imp, 24, 128)
    assert sum(len(h) for h in heads.values()) == 128


def test_official_budgets_clamped_with_one_warning_line():
    from seekr_kernels.seekr.config import RunWarning
    from seekr_kernels.run.preflight import RunWarning as PreflightWarning
    assert RunWarning is PreflightWarning          # the command shows it on one line
    model = tiny_llama(layers=2)
    with pytest.warns(RunWarning) as rec:
        rc = sk.SeekrRecipe({"preset": "official"}, model=model)
    assert rc.budgets == (2, 8)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RunWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert msgs[0].startswith("distill.layer_budget: 24 -> 2; distill.head_budget: 128 -> 8 (preset official")
    # only the head budget: 32 layers of 2 heads keep 24 layers, 48 heads
    with pytest.warns(RunWarning, match=r"^distill.head_budget: 128 -> 48 \(preset official"):
        assert sk.SeekrRecipe({"preset": "official"}, num_layers=32, num_heads=2).budgets == (24, 48)
    # budgets set explicitly are used as given: no clamp, no warning; too large is an error
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sk.SeekrRecipe({"preset": "official", "distill": {"layer_budget": 1, "head_budget": 3}},
                              model=model).budgets == (1, 3)
        assert sk.SeekrRecipe({"preset": "official"}, num_layers=32, num_heads=32).budgets == (24, 128)
    with pytest.raises(ConfigError, match="distill.layer_budget: 3 is more than the model's 2 layers"):
        sk.SeekrRecipe({"preset": "official", "distill": {"layer_budget": 3}}, model=model)


def test_head_selection_config():
    assert OFFICIAL["distill"]["head_selection"] == "published"
    assert recipe_from_dict({}).distill.head_selection == "stable"
    assert recipe_from_dict({"preset": "official", "distill": {"head_selection": "stable"}}
                            ).distill.head_selection == "stable"
    with pytest.raises(ConfigError, match="distill.head_selection: must be one of"):
        recipe_from_dict({"distill": {"head_selection": "topk"}})
