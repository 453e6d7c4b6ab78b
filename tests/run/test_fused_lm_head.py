"""The replay loss with the lm_head fused into its CE and logits terms
(``distill.fused_lm_head``): equal to the materialised path in loss, logged parts and every
parameter gradient for dense, TopK and sampled teachers, tied and untied (with a bias)
heads, through PEFT; never builds [B, L, V] logits; refused where it cannot apply; the
``distill.teacher_logits`` keys and their older spelling."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import seekr_kernels as sk
from seekr_kernels.seekr.config import ConfigError, recipe_from_dict
from seekr_kernels.seekr.recipe import sample_seed
from seekr_kernels.run.trainer import ContinualTrainer

from tiny_runs import read_log, tiny_config, tiny_tasks  # noqa: E402

V = 50


def tiny_model(tied=True, bias=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    m = LlamaForCausalLM(cfg).float()
    if bias:
        m.lm_head = torch.nn.Linear(16, V, bias=True)
        torch.nn.init.normal_(m.lm_head.bias, std=0.5)
    return m


def samples(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)

    def ids():
        return torch.randint(1, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
    return [{"prompt_ids": ids(), "answer_ids": ids()} for _ in range(n)]


def recipe_for(model, method="replay+logits", kind="dense", fused="auto", **distill):
    d = {"fused_lm_head": fused, "layer_budget": 2, "head_budget": 3, "query_budget": 3, **distill}
    if kind != "dense":
        d.update(teacher_logits=kind, teacher_logits_k=8)
    return sk.SeekrRecipe({"method": method, "replay": {"ratio": 8}, "batch_size": 4, "distill": d},
                          model=model, pad_token_id=0)


def replay_grads(model, method, kind, fused, **distill):
    """Loss, parts and gradients of one replay batch of a memory captured from ``model``,
    on a copy of it that has drifted from its teacher."""
    m = copy.deepcopy(model)
    rc = recipe_for(m, method, kind, fused, **distill)
    rc.begin_task(m, samples())
    rc.end_task(m)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    loss, parts = rc.replay_loss(m, rc.batch(rc.memory.keys()[:6]))
    loss.backward()
    return loss.detach(), parts, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}


def assert_same(a, b):
    (la, pa, ga), (lb, pb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-6, atol=1e-6, msg=k)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert ga[n] is not None and gb[n] is not None, n
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("method,kind,tied,bias", [
    ("replay+logits", "dense", True, False),
    ("replay+logits", "topk", True, False),
    ("replay+logits", "sampled", True, False),
    ("replay+logits", "dense", False, True),
    ("replay+logits", "topk", False, True),
    ("replay+logits", "sampled", False, False),
    ("seekr", "sampled", True, False),
    ("replay", "dense", False, True),
])
def test_fused_replay_loss_and_gradients_equal_the_materialised_path(method, kind, tied, bias):
    model = tiny_model(tied, bias)
    want = replay_grads(model, method, kind, "false")
    got = replay_grads(model, method, kind, "true")
    assert_same(got, want)
    if method == "seekr":
        assert set(got[1]) == {"ce", "logits_kl", "attn_kl"}


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_a_term_of_weight_zero_is_still_logged(a):
    model = tiny_model()
    assert_same(replay_grads(model, "replay+logits", "topk", "true", logits_weight=a),
                replay_grads(model, "replay+logits", "topk", "false", logits_weight=a))


def test_fused_path_builds_no_vocabulary_sized_logits(monkeypatch):
    widths = []
    orig = torch.nn.Linear.forward

    def spy(self, x):
        out = orig(self, x)
        widths.append(out.shape[-1])
        return out
    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    model = tiny_model(tied=False)
    replay_grads(model, "replay+logits", "dense", "false")
    assert V in widths                     # the materialised path (and teacher capture) run the head
    m = copy.deepcopy(model)
    rc = recipe_for(m, fused="true")
    rc.begin_task(m, samples())
    rc.end_task(m)
    widths.clear()
    loss, _ = rc.replay_loss(m, rc.batch(rc.memory.keys()[:6]))
    loss.backward()
    assert widths and V not in widths      # every other Linear ran; the lm_head did not
    assert "forward" not in vars(m.lm_head)    # the stand-in is gone after the step


def test_peft_lora_fuses_unless_the_lm_head_is_adapted():
    peft = pytest.importorskip("peft", reason="peft is a test dependency (the lora extra)")
    base = tiny_model(tied=False)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj",
                                                                                                      "v_proj"]))
    assert recipe_for(lora).fused_lm_head(lora) is lora.get_output_embeddings()
    assert_same(replay_grads(lora, "replay+logits", "sampled", "true"),
                replay_grads(lora, "replay+logits", "sampled", "false"))
    head = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4,
                                                                    target_modules=["q_proj", "lm_head"]))
    assert recipe_for(head).fused_lm_head(head) is None                 # auto: materialised logits
    with pytest.raises(ConfigError, match=r"distill.fused_lm_head: true, but the lm_head is a .*LoRA"):
        recipe_for(head, fused="true").begin_task(head, samples())
    assert recipe_for(base, fused="false").fused_lm_head(base) is None


def test_where_fusion_does_not_apply(monkeypatch):
    model = tiny_model()
    rc = recipe_for(model)
    assert rc.fused_lm_head(model) is model.lm_head
    rc.dist = sk.DistributedHooks(sharded=True)           # FSDP: stays materialised
    assert rc.fused_lm_head(model) is None
    rc_true = recipe_for(model, fused="true")
    rc_true.dist = sk.DistributedHooks(sharded=True)
    with pytest.raises(ConfigError, match="distill.fused_lm_head: true, but the model is sharded"):
        rc_true.fused_lm_head(model)
    assert recipe_for(model, backend="torch").fused_lm_head(model) is None

    class Mine(sk.SeekrRecipe):
        def logits_loss(self, outputs, batch, n):
            return super().logits_loss(outputs, batch, n)
    assert Mine(rc.cfg, model=model).fused_lm_head(model) is None    # the override is honoured
    soft = tiny_model()
    soft.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="rescales its logits"):
        recipe_for(soft, fused="true").fused_lm_head(soft)


def test_sampled_teacher_is_seeded_by_run_task_and_sample():
    model = tiny_model()
    a, b = recipe_for(model, kind="sampled"), recipe_for(model, kind="sampled")
    for rc in (a, b):
        rc.begin_task(model, samples())
        rc.end_task(model)
    ta, tb = a.memory.tasks[0].samples, b.memory.tasks[0].samples
    assert all(isinstance(x.logits, sk.SampledTeacher) and x.logits.k == 8 for x in ta)
    for x, y in zip(ta, tb):
        assert torch.equal(x.logits.values, y.logits.values) and torch.equal(x.logits.indices, y.logits.indices)
    # sample j of task t drew with sample_seed(seed, t, j): redraw sample 2 from its dense logits
    s = ta[2]
    lg = model(input_ids=s.input_ids[None], use_cache=False).logits[0].detach()
    a0 = s.logits_start
    want = sk.SampledTeacher.from_dense(lg[a0:a0 + s.logits.values.shape[0]], 8, seed=sample_seed(42, 0, 2))
    torch.testing.assert_close(s.logits.values, want.values, rtol=1e-5, atol=1e-7)
    assert len({sample_seed(42, t, j) for t in range(3) for j in range(100)}) == 300


def test_teacher_logits_keys_and_their_older_spelling():
    d = recipe_from_dict({"distill": {"teacher_logits_topk": 16}}).distill
    assert (d.teacher_logits, d.teacher_logits_k) == ("topk", 16)
    assert recipe_from_dict({"distill": {"teacher_logits_topk": 16, "teacher_logits": "topk",
                                         "teacher_logits_k": 16}}).distill.teacher_logits_k == 16
    d = recipe_from_dict({"distill": {"teacher_logits": "sampled"}}).distill
    assert d.teacher_logits_k == 256 and d.fused_lm_head == "auto"
    assert recipe_from_dict({"distill": {"teacher_logits_topk": 0}}).distill.teacher_logits == "dense"
    assert recipe_from_dict({"distill": {"fused_lm_head": False}}).distill.fused_lm_head == "false"
    bad = [({"teacher_logits": "sampled", "teacher_logits_topk": 8},
            r"distill.teacher_logits: 'sampled' contradicts distill.teacher_logits_topk=8"),
           ({"teacher_logits": "topk", "teacher_logits_k": 4, "teacher_logits_topk": 8},
            r"distill.teacher_logits_k: 4 contradicts distill.teacher_logits_topk=8"),
           ({"teacher_logits_k": 8}, r"distill.teacher_logits_k: applies to teacher_logits topk or sampled"),
           ({"teacher_logits": "top-k"}, r"distill.teacher_logits: must be one of"),
           ({"teacher_logits": "topk", "teacher_logits_k": 0}, r"distill.teacher_logits_k"),
           ({"teacher_logits_topk": -1}, r"distill.teacher_logits_topk"),
           ({"fused_lm_head": "yes"}, r"distill.fused_lm_head: must be auto, true or false")]
    for distill, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            recipe_from_dict({"distill": distill})


def test_hf_arguments_take_the_flat_names():
    from seekr_kernels.hf import SeekrArguments
    a = SeekrArguments(teacher_logits="sampled", teacher_logits_k=32, fused_lm_head="false")
    d = a.seekr_recipe_config(batch_size=1, grad_accum=1).distill
    assert (d.teacher_logits, d.teacher_logits_k, d.fused_lm_head) == ("sampled", 32, "false")
    with pytest.raises(ConfigError, match=r"^teacher_logits: 'sampled' contradicts teacher_logits_topk=8"):
        SeekrArguments(teacher_logits="sampled", teacher_logits_topk=8)


def test_trainer_run_with_fused_head_on_and_off(tmp_path):
    data = tiny_tasks(tmp_path / "data")[:2]
    runs = {}
    for fused in ("true", "false"):
        cfg = tiny_config(tmp_path / fused, data, "seekr", **{"distill.fused_lm_head": fused,
                                                              "distill.backend": "auto",
                                                              "distill.teacher_logits": "topk",
                                                              "distill.teacher_logits_k": 8})
        tr = ContinualTrainer(cfg, quiet=True)
        runs[fused] = (tr, tr.run(), [r for r in read_log(tmp_path / fused) if r["kind"] == "replay"])
    (a, ra, la), (b, rb, lb) = runs["true"], runs["false"]
    assert la and len(la) == len(lb)
    for x, y in zip(la, lb):
        for k in ("ce", "logits_kl", "attn_kl", "loss"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    for (n, p), (_, q) in zip(a.base.named_parameters(), b.base.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert ra["matrix"] == rb["matrix"]


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_op_parts_are_the_separate_terms(backend):
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(2, 7, 8, generator=g), torch.randn(V, 8, generator=g)
    t = sk.TopK.from_dense(torch.randn(2, 7, V, generator=g), 5, kind="logits")
    lab = torch.randint(0, V, (2, 7), generator=g)
    lab[:, :2] = -100
    parts = {}
    loss = sk.linear_logits_kl(h, W, t, lab, hard_weight=0.3, soft_weight=0.7, backend=backend, _parts=parts)
    ce = sk.linear_logits_kl(h, W, None, lab, hard_weight=1.0, soft_weight=0.0, backend="torch")
    kd = sk.linear_logits_kl(h, W, t, lab, backend="torch")
    torch.testing.assert_close(parts["hard"], ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts["soft"], kd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * kd, rtol=1e-6, atol=1e-6)
