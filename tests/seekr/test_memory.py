"""Replay memory: seeded sampling, mixed-task batches == per-sample losses, save/load."""
import copy
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seekr_kernels as sk  # noqa: E402
from seekr_kernels.seekr.memory import ReplayMemory, ReplayMemoryError, ReplaySample, ReplayTask  # noqa: E402
from seekr_kernels.ops.teachers import TopK  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the plain-PyTorch backend.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


# ============================================================================ sampling

def test_sample_indices_reproducible_and_sized():
    a = ReplayMemory.sample_indices(1000, 0.01, seed=3)
    assert a == ReplayMemory.sample_indices(1000, 0.01, seed=3)
    assert a != ReplayMemory.sample_indices(1000, 0.01, seed=4)
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10 and 0 <= min(a) and max(a) < 1000
    assert len(ReplayMemory.sample_indices(1000, 0.0015, 0)) == 1        # int(1.5) -> 1
    assert len(ReplayMemory.sample_indices(50, 0.001, 0)) == 1           # at least one
    assert len(ReplayMemory.sample_indices(50, 7, 0)) == 7               # a count
    assert ReplayMemory.sample_indices(5, 9, 0) == [0, 1, 2, 3, 4]       # capped at n
    for bad in (0, -0.1, 2.5, float("nan"), True):
        with pytest.raises(ValueError, match="ratio"):
            ReplayMemory.sample_indices(10, bad, 0)
    with pytest.raises(ValueError, match="n"):
        ReplayMemory.sample_indices(0, 0.5, 0)


def test_choose_queries_reproducible():
    lens = [3, 40, 12, 12]
    a = ReplayMemory.choose_queries(lens, 10, seed=1)
    b = ReplayMemory.choose_queries(lens, 10, seed=1)
    assert a[0] is None                                   # shorter than the budget: all rows
    for x, y, n in zip(a[1:], b[1:], lens[1:]):
        assert torch.equal(x, y) and x.numel() == 10 and x.tolist() == sorted(set(x.tolist()))
        assert 0 <= int(x.min()) and int(x.max()) < n
    c = ReplayMemory.choose_queries(lens, 10, seed=2)
    assert any(not torch.equal(x, y) for x, y in zip(a[1:], c[1:]))
    assert ReplayMemory.choose_queries(lens, 0, 0) == [None] * 4
    with pytest.raises(ValueError, match="budget"):
        ReplayMemory.choose_queries(lens, -1, 0)
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        ReplayMemory.choose_queries([3, 0], 2, 0)


# ============================================================================ a memory built from a model

def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                                   max_position_embeddings=64)
    m = transformers.LlamaForCausalLM(cfg).float().eval()
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation("sdpa")
    else:
        m.config._attn_implementation = "sdpa"
    return m


def capture_sample(model, ids, n_answer, heads, queries, topk=None):
    """Teacher of one sample run alone (unpadded): logits predicting the answer, attention rows."""
    n = ids.numel()
    am = torch.zeros(n, dtype=torch.bool)
    am[n - n_answer:] = True
    x = ids[None]
    q = None if queries is None else queries[None]
    att = {}
    with torch.no_grad():
        if heads:
            with sk.capture_attention(model, heads, q, torch.ones(1, n, dtype=torch.long), backend="torch") as c:
                out = model(input_ids=x)
            att = {l: r[0] for l, r in c.rows.items()}
        else:
            out = model(input_ids=x)
    start = n - n_answer - 1
    lg = out.logits[0, start:n - 1]
    if topk:
        lg = TopK.from_dense(lg, topk, kind="logits")
    return ReplaySample(ids, am, queries, lg, start, att)


def build_memory(model, topk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = [  # (name, heads, query budget, sample lengths)
        ("a", {0: torch.tensor([1, 3])}, 3, [12, 5, 9]),
        ("b", {0: torch.tensor([2]), 1: torch.tensor([0, 1, 3])}, 0, [8, 6]),
        ("c", {}, 0, [7]),                                 # replay+logits only: no heads
    ]
    mem = ReplayMemory()
    for ti, (name, heads, qb, lens) in enumerate(specs):
        qs = ReplayMemory.choose_queries(lens, qb, seed=ti)
        samples = [capture_sample(model, torch.randint(0, 48, (n,), generator=g), 3, heads, q, topk)
                   for n, q in zip(lens, qs)]
        mem.add_task(name, samples, heads, meta={"query_budget": qb})
    return mem


def per_sample_losses(student, s, heads):
    """Per-layer 'batchmean' attention KL and summed logits KL of one sample run alone."""
    x = s.input_ids[None]
    q = None if s.queries is None else s.queries[None]
    losses = {}
    if heads:
        teacher = {l: r[None] for l, r in s.attention.items()}
        with sk.distill_attention(student, {l: h for l, h in heads.items()}, q, teacher, backend="torch") as d:
            out = student(input_ids=x)
        losses = {l: v.detach() for l, v in d.losses.items()}
    else:
        out = student(input_ids=x)
    return losses, logits_kl_sum(out.logits[0, s.logits_start:s.logits_start + rows(s.logits)], s.logits)


def rows(lg):
    return lg.values.shape[0] if isinstance(lg, TopK) else lg.shape[0]


def logits_kl_sum(student_logits, teacher):
    t = teacher.to_dense() if isinstance(teacher, TopK) else teacher
    pt = torch.softmax(t.float(), -1)
    return (pt * (torch.log_softmax(t.float(), -1) - torch.log_softmax(student_logits.float(), -1))).sum()


@pytest.mark.parametrize("topk", [None, 5])
@pytest.mark.parametrize("multiple", [1, 8])
def test_mixed_task_batch_equals_per_sample(topk, multiple):
    teacher = sk.patch_llama(tiny(0))
    mem = build_memory(teacher, topk=topk)
    student = copy.deepcopy(tiny(0))
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    student = sk.patch_llama(student)

    keys = [(1, 0), (0, 0), (2, 0), (0, 1), (1, 1)]      # tasks mixed, (0, 0) is the longest (12)
    b = mem.batch(keys, pad_token_id=0, pad_to_multiple_of=multiple)
    B, L = b["input_ids"].shape
    # (0, 0) has 3 query rows < Q = 8 and is the longest: one extra padding column
    assert L == -(-13 // multiple) * multiple
    assert b["queries"].shape == (B, 8)
    assert sorted(b["heads"]) == [0, 1]
    assert b["heads"][0].tolist() == [[2, -1], [1, 3], [-1, -1], [1, 3], [2, -1]]
    assert b["heads"][1].tolist() == [[0, 1, 3], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [0, 1, 3]]
    assert b["task"].tolist() == [1, 0, 2, 0, 1]

    with sk.distill_attention(student, b["heads"], b["queries"], b["teacher_attention"], b["attention_mask"],
                              backend="torch") as d:
        out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      position_ids=b["position_ids"])
    batch_layers = {l: v.detach() for l, v in d.losses.items()}

    per_layer = {l: torch.zeros(()) for l in batch_layers}
    lkl = torch.zeros(())
    for k in keys:
        s = mem.sample(k)
        losses, lk = per_sample_losses(student, s, mem.tasks[k[0]].heads)
        for l, v in losses.items():
            per_layer[l] += v / B
        lkl += lk
    for l in batch_layers:
        torch.testing.assert_close(batch_layers[l], per_layer[l], rtol=1e-4, atol=1e-7)
    assert float(per_layer[0]) > 0 and float(per_layer[1]) > 0
    torch.testing.assert_close(d.loss().detach(), torch.stack([per_layer[0], per_layer[1]]).mean(),
                               rtol=1e-4, atol=1e-7)

    # teacher logits line up with the student's logits at logits_mask
    lm = b["logits_mask"]
    tl = b["teacher_logits"]
    assert isinstance(tl, TopK) == (topk is not None)
    dense = tl.to_dense() if topk else tl
    got = logits_kl_sum(out.logits[lm], dense[lm])
    torch.testing.assert_close(got.detach(), lkl.detach(), rtol=1e-4, atol=1e-6)
    # labels: the answer tokens, at the same absolute positions
    for i, k in enumerate(keys):
        s = mem.sample(k)
        p = L - s.n
        assert torch.equal(b["labels"][i, p:], s.labels) and (b["labels"][i, :p] == -100).all()
        assert b["attention_mask"][i].sum() == s.n and b["position_ids"][i, -1] == s.n - 1


def test_all_rows_batch_and_layer_filter():
    teacher = sk.patch_llama(tiny(1))
    mem = build_memory(teacher)
    b = mem.batch([(1, 0), (1, 1)], layers=[1])
    assert b["queries"] is None and sorted(b["teacher_attention"]) == [1]
    t = b["teacher_attention"][1]
    L = b["input_ids"].shape[1]
    assert t.shape == (2, 3, L, L)
    s = mem.sample((1, 1))
    p = L - s.n
    assert torch.equal(t[1, :, p:, p:], s.attention[1]) and float(t[1, :, :p].abs().sum()) == 0
    # a batch of a head-less task carries no attention keys
    b = mem.batch([(2, 0)])
    assert "heads" not in b and "teacher_logits" in b
    b = mem.batch([(0, 1)], attention=False, logits=False)
    assert set(b) == {"input_ids", "attention_mask", "position_ids", "labels", "task"}


@pytest.mark.parametrize("multiple", [1, 4, 8, 64])
def test_all_rows_batch_rounds_rows_with_columns(multiple):
    """Regression (issue 10): with no query subset in the batch the query axis must span the
    padded length too; it used to be taken before rounding and the copy failed."""
    teacher = sk.patch_llama(tiny(1))
    mem = build_memory(teacher)
    keys = [(1, 0), (1, 1)]
    b = mem.batch(keys, pad_token_id=0, pad_to_multiple_of=multiple)
    L = b["input_ids"].shape[1]
    assert L % multiple == 0 and b["queries"] is None
    for l, t in b["teacher_attention"].items():
        assert t.shape[2:] == (L, L)
        for i, k in enumerate(keys):
            s = mem.sample(k)
            p = L - s.n
            assert torch.equal(t[i, :s.attention[l].shape[0], p:, p:], s.attention[l])
            assert float(t[i, :, :p].abs().sum()) == 0 and float(t[i, :, :, :p].abs().sum()) == 0


def test_batches_cover_memory_reproducibly():
    mem = build_memory(sk.patch_llama(tiny(2)))
    a = mem.batches(4, seed=1, epoch=0)
    assert a == mem.batches(4, seed=1, epoch=0) and a != mem.batches(4, seed=1, epoch=1)
    assert sorted(k for bl in a for k in bl) == mem.keys() and len(mem) == 6


def test_sample_and_task_validation():
    ids = torch.arange(6)
    am = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.bool)
    with pytest.raises(ReplayMemoryError, match="queries"):
        ReplaySample(ids, am, queries=torch.tensor([6]))
    with pytest.raises(ReplayMemoryError, match="answer_mask"):
        ReplaySample(ids, am[:5])
    with pytest.raises(ReplayMemoryError, match="logits"):
        ReplaySample(ids, am, logits=torch.zeros(3, 10), logits_start=4)
    with pytest.raises(ReplayMemoryError, match=r"attention\[0\]"):
        ReplaySample(ids, am, queries=torch.tensor([1, 2]), attention={0: torch.zeros(2, 6, 6)})
    s = ReplaySample(ids, am, attention={0: torch.zeros(2, 6, 6)})
    with pytest.raises(ReplayMemoryError, match="heads"):
        ReplayTask("t", [s], {0: torch.tensor([3])})
    with pytest.raises(ReplayMemoryError, match="layers"):
        ReplayTask("t", [s], {1: torch.tensor([0, 3])})
    with pytest.raises(ReplayMemoryError, match="increasing"):
        ReplayTask("t", [s], {0: torch.tensor([3, 0])})
    mem = ReplayMemory()
    mem.add_task("t", [s], {0: torch.tensor([0, 3])})
    with pytest.raises(ValueError, match="keys"):
        mem.batch([(0, 1)])
    with pytest.raises(ValueError, match="keys"):
        mem.batch([])


# ============================================================================ persistence

def assert_same(m1, m2):
    assert len(m1.tasks) == len(m2.tasks)
    for t1, t2 in zip(m1.tasks, m2.tasks):
        assert t1.name == t2.name and t1.meta == t2.meta
        assert {l: h.tolist() for l, h in t1.heads.items()} == {l: h.tolist() for l, h in t2.heads.items()}
        for s1, s2 in zip(t1.samples, t2.samples):
            assert torch.equal(s1.input_ids, s2.input_ids) and torch.equal(s1.answer_mask, s2.answer_mask)
            assert (s1.queries is None) == (s2.queries is None)
            if s1.queries is not None:
                assert torch.equal(s1.queries, s2.queries)
            assert s1.logits_start == s2.logits_start
            if isinstance(s1.logits, TopK):
                for a in ("values", "indices", "lse"):
                    assert torch.equal(getattr(s1.logits, a), getattr(s2.logits, a))
            else:
                assert torch.equal(s1.logits, s2.logits)
            assert s1.attention.keys() == s2.attention.keys()
            for l in s1.attention:
                assert torch.equal(s1.attention[l], s2.attention[l])


@pytest.mark.parametrize("topk", [None, 4])
def test_save_load_round_trip(tmp_path, topk):
    mem = build_memory(sk.patch_llama(tiny(3)), topk=topk)
    root = str(tmp_path / "memory")
    sizes = mem.save(root)
    assert sorted(os.listdir(root)) == ["memory.json", "task-000", "task-001", "task-002"]  # no temp leftovers
    assert ReplayMemory.disk_sizes(root) == dict(enumerate(sizes)) and all(s > 0 for s in sizes)
    back = ReplayMemory.load(root, names=["a", "b", "c"])
    assert_same(mem, back)
    keys = [(0, 2), (1, 1), (2, 0)]
    b1, b2 = mem.batch(keys), back.batch(keys)
    for l in b1["teacher_attention"]:
        assert torch.equal(b1["teacher_attention"][l], b2["teacher_attention"][l])
    # saving again over the existing directories works and gives the same bytes
    assert mem.save(root) == sizes
    assert sorted(os.listdir(root)) == ["memory.json", "task-000", "task-001", "task-002"]
    assert sorted(os.listdir(tmp_path)) == ["memory"]             # no swapped-out copy left


def test_corrupt_truncated_and_mismatched(tmp_path):
    mem = build_memory(sk.patch_llama(tiny(4)))
    root = str(tmp_path / "m")
    mem.save(root)
    data = os.path.join(root, "task-001", "data.safetensors")
    raw = open(data, "rb").read()

    open(data, "wb").write(raw[:-100])
    with pytest.raises(ReplayMemoryError, match="truncated"):
        ReplayMemory.load(root)
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0x55
    open(data, "wb").write(bytes(bad))
    with pytest.raises(ReplayMemoryError, match="checksum"):
        ReplayMemory.load(root)
    open(data, "wb").write(raw)
    assert len(ReplayMemory.load(root).tasks) == 3

    with pytest.raises(ReplayMemoryError, match="expected 'x'"):
        ReplayMemory.load(root, names=["a", "x", "c"])
    with pytest.raises(ReplayMemoryError, match="expected 2"):
        ReplayMemory.load(root, names=["a", "b"])

    man_p = os.path.join(root, "task-002", "manifest.json")
    man = json.load(open(man_p))
    json.dump({**man, "format": 99}, open(man_p, "w"))
    with pytest.raises(ReplayMemoryError, match="differs from the manifest the index memory.json lists"):
        ReplayMemory.load(root)                  # the index covers every manifest
    with pytest.raises(ReplayMemoryError, match="format 99"):
        ReplayMemory.load_task(root, 2)
    json.dump({**man, "index": 0}, open(man_p, "w"))
    with pytest.raises(ReplayMemoryError, match="task #0"):
        ReplayMemory.load_task(root, 2)
    json.dump({**man, "meta": {"edited": 1}}, open(man_p, "w"))
    with pytest.raises(ReplayMemoryError, match="manifest checksum mismatch"):
        ReplayMemory.load_task(root, 2)
    open(man_p, "w").write("{not json")
    with pytest.raises(ReplayMemoryError, match="manifest"):
        ReplayMemory.load_task(root, 2)
    os.remove(man_p)
    with pytest.raises(ReplayMemoryError, match="missing manifest"):
        ReplayMemory.load(root)

    os.rename(os.path.join(root, "task-002"), os.path.join(root, "task-005"))
    with pytest.raises(ReplayMemoryError, match="task-002: missing; the index memory.json lists 3 tasks"):
        ReplayMemory.load(root)
    os.remove(os.path.join(root, "memory.json"))
    with pytest.raises(ReplayMemoryError, match="no memory.json index"):
        ReplayMemory.load(root)
    with pytest.raises(ReplayMemoryError, match="not task-000"):
        ReplayMemory.load(root, names=["a", "b", "c"])
    with pytest.raises(ReplayMemoryError, match="no such"):
        ReplayMemory.load(str(tmp_path / "nothing"))


def _reseal(man):
    """A manifest edited with a recomputed checksum, as a buggy writer would produce."""
    from seekr_kernels.utils import store
    return store.seal(man, "manifest_sha256")


def test_consistent_checksum_over_inconsistent_content(tmp_path):
    """A manifest that describes other data (with matching checksums) is refused too."""
    mem = build_memory(sk.patch_llama(tiny(5)))
    root = str(tmp_path / "m")
    mem.save(root)
    man_p = os.path.join(root, "task-000", "manifest.json")
    man = json.load(open(man_p))
    man["num_samples"] = 2
    json.dump(_reseal(man), open(man_p, "w"))
    with pytest.raises(ReplayMemoryError, match="samples"):
        ReplayMemory.load_task(root, 0)
    man["num_samples"] = 3
    man["heads"] = {"0": [1, 2]}
    json.dump(_reseal(man), open(man_p, "w"))
    with pytest.raises(ReplayMemoryError, match="heads"):
        ReplayMemory.load_task(root, 0)


# ============================================================================ compact teachers (issue 13)

LEGACY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "legacy")


def _sparse_equal(a, b):
    assert type(a) is type(b) and a.kind == b.kind and a.full_size == b.full_size
    assert a.indices.dtype == b.indices.dtype == torch.int32
    for f in ("values", "indices", "lse"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f


def _sparse_memory(kind, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in (9, 5, 7):
        ids = torch.randint(0, min(V, 1000), (n,), generator=g)
        am = torch.zeros(n, dtype=torch.bool)
        am[n - 3:] = True
        t = torch.randn(3, V, generator=g) * 3
        t[:, V - 5:] += 8                    # mass near the top of the vocabulary: high index bits
        lg = (sk.SampledTeacher.from_dense(t, 6, seed=seed) if kind == "sampled"
              else TopK.from_dense(t, 6, kind="logits"))
        samples.append(ReplaySample(ids, am, None, lg.to(dtype=torch.bfloat16), n - 4))
    mem = ReplayMemory()
    mem.add_task("t", samples)
    return mem


@pytest.mark.parametrize("kind, V", [("sampled", 300), ("topk", 70000), ("sampled", 128256)])
def test_compact_teachers_round_trip_and_batch(tmp_path, kind, V):
    from safetensors.torch import load_file
    mem = _sparse_memory(kind, V)
    root = str(tmp_path / "m")
    mem.save(root)
    data = load_file(os.path.join(root, "task-000", "data.safetensors"))
    assert "logits.indices" not in data and data["logits.indices16"].dtype == torch.int16
    assert ("logits.indices_hi" in data) == (V > 65536) and ("logits.lse" in data) == (kind == "topk")
    back = ReplayMemory.load(root)
    for s1, s2 in zip(mem.tasks[0].samples, back.tasks[0].samples):
        _sparse_equal(s1.logits, s2.logits)
    b = back.batch([(0, 0), (0, 1)])
    tl = b["teacher_logits"]
    assert tl.kind == ("sampled" if kind == "sampled" else "logits") and tuple(tl.shape[:2]) == (2, 9)
    # rows outside the stored range: zero weights (sampled), uniform filler (TopK)
    if kind == "sampled":
        assert isinstance(tl, sk.SampledTeacher) and float(tl.values[~b["logits_mask"]].abs().sum()) == 0
    s = mem.tasks[0].samples[1]
    p = 9 - s.n
    rng = slice(p + s.logits_start, p + s.logits_start + 3)
    assert torch.equal(tl.values[1, rng], s.logits.values) and torch.equal(tl.indices[1, rng], s.logits.indices)


def test_sampled_batch_feeds_logits_kl():
    mem = _sparse_memory("sampled", 300)
    b = mem.batch([(0, 0), (0, 2)])
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, b["input_ids"].shape[1], 300, generator=g, requires_grad=True)
    labels = torch.where(b["logits_mask"], 0, -100)
    loss = sk.logits_kl(student, b["teacher_logits"], labels, reduction="sum")
    ref = torch.zeros(())
    for i, k in enumerate([(0, 0), (0, 2)]):
        s = mem.sample(k)
        p = b["input_ids"].shape[1] - s.n + s.logits_start
        w = s.logits.to_dense().float()
        ref = ref - (w * torch.log_softmax(student[i, p:p + 3].detach(), -1)).sum()
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_memory_written_before_packed_indices_loads(version):
    """tests/data/legacy/replay_v1 was written at 61b56de (int32 TopK indices, no index, no
    manifest checksum), replay_v2 at 3575421 (memory.json index, checksummed manifests)."""
    root = os.path.join(LEGACY, f"replay_v{version}")
    mem = ReplayMemory.load(root, names=["dense", "topk"])
    if version == 2:
        assert [t.name for t in ReplayMemory.load(root).tasks] == ["dense", "topk"]
    dense, topk = mem.tasks
    assert all(isinstance(s.logits, torch.Tensor) for s in dense.samples)
    for s in topk.samples:
        assert isinstance(s.logits, TopK) and s.logits.indices.dtype == torch.int32 and s.logits.k == 5
        s.logits.check()
        assert torch.equal(s.logits.values.float(), s.logits.values.float().sort(-1, descending=True).values)
    # re-saved, it is written packed and reads back the same
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        mem.save(d)
        back = ReplayMemory.load(d)
        for s1, s2 in zip(topk.samples, back.tasks[1].samples):
            _sparse_equal(s1.logits, s2.logits)
