"""Head selection against the published rule (random scores, ties) and batch head layouts."""
import numpy as np
import pytest
import torch

from seekr_kernels.seekr.selection import batch_heads, select_heads


def published_select(attn_ipt, layer_budget, head_budget):
    """jinghan1he/SEEKR ``select_layer_head``, rewritten for the test (target_layers = all)."""
    select_layers = attn_ipt.sum(1).topk(layer_budget)[1].sort()[0]
    sub = attn_ipt[select_layers]
    pos = np.array(np.unravel_index(sub.flatten().topk(head_budget)[1].numpy(), sub.shape)).transpose()
    pos = sorted(pos, key=lambda x: (x[0], x[1]))
    out = {}
    for l, h in pos:
        out.setdefault(int(select_layers[l]), []).append(int(h))
    return {l: torch.tensor(h) for l, h in out.items()}


def as_lists(d):
    return {l: h.tolist() for l, h in d.items()}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape,lb,hb", [((4, 4), 3, 5), ((8, 6), 6, 12), ((32, 32), 24, 128), ((3, 2), 3, 6),
                                         ((5, 3), 1, 1)])
def test_matches_published_rule_on_random_scores(seed, shape, lb, hb):
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(shape, generator=g, dtype=torch.float64)   # continuous: no ties
    got = select_heads(imp, lb, hb)
    assert as_lists(got) == as_lists(published_select(imp, lb, hb))
    assert sum(h.numel() for h in got.values()) == hb
    assert list(got) == sorted(got)
    for h in got.values():
        assert h.dtype == torch.long and h.tolist() == sorted(h.tolist())


def test_float32_and_device_agnostic_input():
    imp = torch.rand(6, 4, generator=torch.Generator().manual_seed(3))
    assert as_lists(select_heads(imp, 4, 7)) == as_lists(select_heads(imp.double(), 4, 7))
    assert as_lists(select_heads(imp.half().float(), 2, 3)) == as_lists(select_heads(imp.half(), 2, 3))


def test_ties_lower_index_wins():
    # All equal: the first layers and, inside them, the first heads.
    imp = torch.ones(4, 3)
    assert as_lists(select_heads(imp, 2, 4)) == {0: [0, 1, 2], 1: [0]}
    # Layer sums tie between 1 and 3 (both 2.0): layer 1 wins the single remaining slot.
    imp = torch.tensor([[5.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    assert as_lists(select_heads(imp, 2, 2)) == {0: [0], 1: [0]}
    # Head ties across kept layers: lower (layer, head) first.
    imp = torch.tensor([[0.0, 1.0], [1.0, 0.0], [9.0, 9.0]])
    assert as_lists(select_heads(imp, 3, 3)) == {0: [1], 2: [0, 1]}


def test_ties_deterministic_and_order_independent_sums():
    # Same layer sums reached in a different summation order (fp32 could disagree).
    a = torch.tensor([0.1, 0.2, 0.3, 1e-8], dtype=torch.float32)
    imp = torch.stack([a, a.flip(0), a[[2, 0, 3, 1]]])
    r1 = select_heads(imp, 1, 2)
    for _ in range(3):
        assert as_lists(select_heads(imp, 1, 2)) == as_lists(r1)
    assert list(r1) == [0]


def test_layer_kept_without_heads_is_absent():
    # Layer 1 is kept (second largest sum) but its heads lose to layer 0's.
    imp = torch.tensor([[10.0, 9.0, 8.0], [3.0, 3.0, 3.0], [0.0, 0.0, 1.0]])
    assert as_lists(select_heads(imp, 2, 3)) == {0: [0, 1, 2]}


@pytest.mark.parametrize("lb,hb,name", [(0, 1, "layer_budget"), (5, 1, "layer_budget"), (-1, 1, "layer_budget"),
                                        (2, 0, "head_budget"), (2, 7, "head_budget")])
def test_budget_errors_name_the_argument(lb, hb, name):
    with pytest.raises(ValueError, match=name):
        select_heads(torch.rand(4, 3), lb, hb)


def test_input_errors():
    with pytest.raises(TypeError, match="layer_budget"):
        select_heads(torch.rand(4, 3), 2.0, 1)
    with pytest.raises(TypeError, match="head_budget"):
        select_heads(torch.rand(4, 3), 2, True)
    bad = torch.rand(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_heads(bad, 2, 2)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="importance"):
        select_heads(bad, 2, 2)
    with pytest.raises(ValueError, match="importance"):
        select_heads(torch.rand(12), 2, 2)
    with pytest.raises(TypeError, match="importance"):
        select_heads([[1.0, 2.0]], 1, 1)


def test_batch_heads_mixed_tasks():
    t0 = {0: torch.tensor([1, 3]), 2: torch.tensor([0])}
    t1 = {2: torch.tensor([2, 0, 1])}
    out = batch_heads([t0, t1, None, t0])
    assert sorted(out) == [0, 2]
    assert out[0].tolist() == [[1, 3], [-1, -1], [-1, -1], [1, 3]]
    assert out[2].tolist() == [[0, -1, -1], [2, 0, 1], [-1, -1, -1], [0, -1, -1]]
    assert batch_heads([t1], sort=True)[2].tolist() == [[0, 1, 2]]
    # explicit layers: an unnamed one is all empty
    out = batch_heads([t0, t1], layers=[1, 2])
    assert sorted(out) == [1, 2] and out[1].tolist() == [[-1], [-1]]


def test_batch_heads_errors():
    with pytest.raises(ValueError, match="empty batch"):
        batch_heads([])
    with pytest.raises(TypeError, match="selections"):
        batch_heads({0: torch.tensor([1])})
    with pytest.raises(ValueError, match=r"selections\[0\]\[0\]"):
        batch_heads([{0: torch.tensor([1, 1])}])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        batch_heads([{0: torch.tensor([4])}], n_heads=4)
    with pytest.raises(TypeError, match="integer"):
        batch_heads([{0: torch.tensor([1.0])}])
