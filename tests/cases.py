"""Shared inputs for the attention-op tests: random cases with a proper teacher, a
tolerance check, and the covering grid every backend is tested over."""
import itertools
import random

import torch

from seekr_kernels import reference
from seekr_kernels._checks import check_attention_args

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def make_case(B, H, Hkv, L, D, S, Q=None, pad="none", empty=True, dtype=torch.float32,
              teacher_dtype=torch.float32, seed=0, device="cpu", logit_scale=1.0, dup=False):
    """Random inputs and a teacher that is a proper distribution over each row's visible keys."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, L, D, generator=g) * logit_scale).to(device=device, dtype=dtype)
    k = (torch.randn(B, Hkv, L, D, generator=g) * logit_scale).to(device=device, dtype=dtype)
    S = min(S, H)
    heads = torch.stack([torch.randperm(H, generator=g)[:S] for _ in range(B)])
    if empty and S > 1:
        heads[0, -1] = -1
    queries = None if Q is None else torch.randint(0, L, (B, Q), generator=g)
    if dup and queries is not None and Q > 2:
        queries[:, 1] = queries[:, 0]
        queries[-1, -1] = queries[-1, 0]
    mask = torch.ones(B, L, dtype=torch.long)
    if pad == "left":
        mask[0, : L // 3] = 0
        if B > 1:
            mask[-1, : L // 2] = 0
    elif pad == "right":
        mask[-1, L - L // 3:] = 0
    heads, mask = heads.to(device), mask.to(device)
    queries = queries.to(device) if queries is not None else None
    tq = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(device)
    tk = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(device)
    ta = check_attention_args(tq, tk, heads, queries, mask)
    teacher = reference.attention_probs(ta, torch.float64).to(teacher_dtype)
    return q, k, teacher, heads, queries, mask


def assert_close(a, b, tol, what):
    a, b = a.double(), b.double()
    err = (a - b).norm().item()
    ref = b.norm().item()
    assert err <= tol * max(ref, 1.0) + tol, f"{what}: |diff|={err:.3g} |ref|={ref:.3g} tol={tol}"


# A covering grid: every value of every factor appears, in varied combinations.
B_ = [1, 3]
HK_ = [(4, 4), (8, 2)]
L_ = [1, 17, 64, 130]
D_ = [16, 64, 128]
Q_ = [None, 5]
PAD_ = ["none", "left", "right"]
DT_ = [torch.float32, torch.float16, torch.bfloat16]
_ALL = list(itertools.product(B_, HK_, L_, D_, Q_, PAD_, DT_))
GRID = random.Random(0).sample(_ALL, 30)
for _i, _vals in enumerate((B_, HK_, L_, D_, Q_, PAD_, DT_)):   # every value is covered
    assert {g[_i] for g in GRID} == set(_vals)
GRID_IDS = [f"B{b}-H{h[0]}/{h[1]}-L{l}-D{d}-Q{q}-{p}-{str(t)[6:]}" for b, h, l, d, q, p, t in GRID]
