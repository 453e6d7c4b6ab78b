"""The fuzz campaign: case specs (hypothesis), their execution, and subprocess workers.

A *spec* is a JSON-able dict describing one call: the op, backend, shapes, dtype, seed of
the tensor values and at most one *fault* (an invalid input). :func:`run_case` builds the
tensors from it, calls the op and classifies the result:

* ``ok``            valid input, result (and gradients) match the fp64 torch oracle;
* ``clear_error``   invalid input, refused with the expected exception naming the argument;
* ``silent_wrong``  invalid input accepted, or valid input giving a wrong/non-finite result;
* ``wrong_error``   an exception of the wrong type, not naming the argument, or refusing
                    valid input;
* ``crash``         the worker process died (a native crash) or hung: counted by the
                    parent (:func:`run_campaign`), which restarts a worker after the case.

Specs run in subprocess workers (``worker.py``), so a segfault in native code is a
counted result, not a dead test session. Everything is seeded: the same spec list gives
the same tensors and outcomes.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))

OUTCOMES = ("ok", "clear_error", "silent_wrong", "wrong_error", "crash")


def long_mode() -> bool:
    """SEEKR_FUZZ=long runs the long campaign (thousands of cases, more kill trials)."""
    return os.environ.get("SEEKR_FUZZ", "") == "long"


def n_cases(ci: int, long: int) -> int:
    if os.environ.get("SEEKR_FUZZ_CASES"):
        return int(os.environ["SEEKR_FUZZ_CASES"])
    return long if long_mode() else ci


# ============================================================================ specs (hypothesis)

# Faults of the attention ops: name -> (argument the error must name, exception types,
# whether it is caught with check_values=False too). "backend" faults are derived.
ATT_FAULTS = {
    "nan_q": ("q", "V", False), "inf_k": ("k", "V", False), "overflow": ("q", "V", False),
    "nan_teacher": ("teacher", "V", False), "neg_teacher": ("teacher", "V", False),
    "dup_head": ("heads", "V", False),
    "head_eq_H": ("heads", "V", True), "head_huge": ("heads", "V", True),
    "head_2p32": ("heads", "V", True), "head_lt_m1": ("heads", "V", True),
    "query_eq_L": ("queries", "V", True), "query_neg": ("queries", "V", True),
    "mask_value": ("attention_mask", "V", True),
    "heads_float": ("heads", "T", True), "queries_shape": ("queries", "V", True),
    "mask_shape": ("attention_mask", "V", True), "mask_float": ("attention_mask", "T", True),
    "k_shape": ("k", "V", True), "k_dtype": ("k", "T", True), "hkv_divides": ("k", "V", True),
    "q_3d": ("q", "V", True), "teacher_shape": ("teacher", "V", True),
    "scale_zero": ("scale", "V", True), "scale_nan": ("scale", "V", True),
    "scale_str": ("scale", "T", True), "reduction": ("reduction", "V", True),
    "topk_index": ("teacher", "V", True), "topk_kind": ("teacher", "V", True),
    "qb_shape": ("q_b", "V", True), "nan_kb": ("k_b", "V", False),
    "q_int": ("q", "T", True), "out_dtype": ("out_dtype", "T", True),
}
# Which faults apply to which op.
_ATT_COMMON = ["nan_q", "inf_k", "overflow", "dup_head", "head_eq_H", "head_huge", "head_2p32",
               "head_lt_m1", "query_eq_L", "query_neg", "mask_value", "heads_float",
               "queries_shape", "mask_shape", "mask_float", "k_shape", "k_dtype", "hkv_divides",
               "q_3d", "scale_zero", "scale_nan", "scale_str", "q_int"]
ATT_OP_FAULTS = {
    "kl": _ATT_COMMON + ["nan_teacher", "neg_teacher", "teacher_shape", "reduction"],
    "kl_topk": _ATT_COMMON + ["topk_index", "topk_kind", "reduction"],
    "probs": _ATT_COMMON + ["out_dtype"],
    "sqdiff": _ATT_COMMON + ["qb_shape", "nan_kb"],
}
ATT_BACKENDS = {"kl": ("cpu", "torch", "triton"), "kl_topk": ("cpu", "torch", "triton"),
                "probs": ("cpu", "torch", "triton"), "sqdiff": ("cpu", "torch", "triton")}
DTYPES = ("float32", "float32", "bfloat16", "float16", "float64")

LOGIT_FAULTS = {
    "nan_student": ("student_logits", "V", False), "inf_teacher": ("teacher", "V", False),
    "all_neginf_student": ("student_logits", "V", False),
    "labels_shape": ("labels", "V", True), "labels_float": ("labels", "T", True),
    "teacher_shape": ("teacher", "V", True), "reduction": ("reduction", "V", True),
    "topk_nan_values": ("teacher", "V", False), "topk_index": ("teacher", "V", True),
    "topk_kind": ("teacher", "V", True), "student_int": ("student_logits", "T", True),
    "fd_negative": ("x", "V", True), "fd_nan": ("x", "V", True), "fd_k": ("k", "V", True),
    "fd_all_neginf": ("x", "V", True),
}
LOGIT_OP_FAULTS = {
    "lkl": ["nan_student", "inf_teacher", "all_neginf_student", "labels_shape", "labels_float",
            "teacher_shape", "reduction", "student_int"],
    "lkl_topk": ["nan_student", "all_neginf_student", "labels_shape", "reduction", "topk_nan_values",
                 "topk_index", "topk_kind"],
    "from_dense": ["fd_negative", "fd_nan", "fd_k", "fd_all_neginf"],
}
# Faults that may sit on an ignored row (label -100): then the input is valid.
IGNORABLE = {"nan_student", "inf_teacher", "all_neginf_student", "topk_nan_values"}


# linear_logits_kl (lm_head fused with the logits term): value faults land on a labelled
# row (refused, naming the argument) or, for the ones in LINEAR_IGNORABLE, on an ignored
# (-100) row, where the input is valid and must not change anything.
LINEAR_FAULTS = {
    "nan_hidden": ("hidden", "V", False), "inf_hidden": ("hidden", "V", False),
    "inf_weight": ("weight", "V", False), "nan_weight": ("weight", "V", False),
    "neginf_weight_masked": ("weight", "V", False), "inf_bias": ("bias", "V", False),
    "nan_teacher": ("teacher", "V", False), "topk_nan_values": ("teacher", "V", False),
    "label_range": ("labels", "V", False), "labels_shape": ("labels", "V", True),
    "weight_shape": ("weight", "V", True), "weight_dtype": ("weight", "T", True),
}
LINEAR_IGNORABLE = {"nan_hidden", "inf_hidden", "nan_teacher", "topk_nan_values"}
LINEAR_BACKENDS = ("chunked", "torch", "triton")


def attention_specs(st, backends=None):
    """Hypothesis strategy of attention-op specs."""
    @st.composite
    def spec(draw):
        op = draw(st.sampled_from(sorted(ATT_OP_FAULTS)))
        bks = [b for b in ATT_BACKENDS[op] if backends is None or b in backends] or list(ATT_BACKENDS[op])
        hkv = draw(st.integers(1, 3))
        H = hkv * draw(st.integers(1, 3))
        L = draw(st.integers(1, 24))
        d = dict(family="attention", op=op, backend=draw(st.sampled_from(bks)),
                 B=draw(st.integers(1, 3)), H=H, Hkv=hkv, L=L,
                 D=draw(st.one_of(st.integers(1, 20), st.sampled_from([32, 40, 64]))),
                 S=draw(st.integers(0, min(H, 3))),
                 Q=draw(st.one_of(st.none(), st.integers(0, 7))),
                 dtype=draw(st.sampled_from(DTYPES)),
                 pad=draw(st.sampled_from(["none", "left", "right", "random"])),
                 empty_slot=draw(st.booleans()), check_values=draw(st.booleans()),
                 reduction=draw(st.sampled_from(["none", "sum", "mean", "batchmean"])),
                 scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
                 noncontig=draw(st.booleans()),
                 magnitude=draw(st.sampled_from([0.1, 1.0, 1.0, 4.0, 30.0])),
                 topk=draw(st.integers(1, L)), seed=draw(st.integers(0, 2 ** 31 - 1)))
        faults = ATT_OP_FAULTS[op]
        fault = draw(st.one_of(st.none(), st.sampled_from(faults)))
        if fault is not None and not ATT_FAULTS[fault][2]:
            d["check_values"] = True              # value faults are only caught when checked
        d["fault"] = fault
        return d
    return spec()


def logits_specs(st, backends=None):
    @st.composite
    def spec(draw):
        op = draw(st.sampled_from(sorted(LOGIT_OP_FAULTS)))
        bks = [b for b in ("torch", "triton") if backends is None or b in backends] or ["torch"]
        V = draw(st.integers(1, 70))
        d = dict(family="logits", op=op, backend=draw(st.sampled_from(bks)),
                 N=draw(st.integers(1, 3)), L=draw(st.integers(1, 8)), V=V,
                 dtype=draw(st.sampled_from(DTYPES)), check_values=draw(st.booleans()),
                 reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                 ignore_frac=draw(st.sampled_from([0.0, 0.3, 0.8, 1.0])),
                 magnitude=draw(st.sampled_from([0.1, 1.0, 5.0, 40.0])),
                 mode=draw(st.sampled_from([None, "student_tail", "uniform", "kept", "renorm"])),
                 topk=draw(st.integers(1, V)), on_ignored=draw(st.booleans()),
                 seed=draw(st.integers(0, 2 ** 31 - 1)))
        fault = draw(st.one_of(st.none(), st.sampled_from(LOGIT_OP_FAULTS[op])))
        if fault is not None and not LOGIT_FAULTS[fault][2] and not (d["on_ignored"] and fault in IGNORABLE):
            d["check_values"] = True
        d["fault"] = fault
        return d
    return spec()


def linear_specs(st, backends=None):
    @st.composite
    def spec(draw):
        bks = [b for b in LINEAR_BACKENDS if backends is None or b in backends] or list(LINEAR_BACKENDS)
        teacher = draw(st.sampled_from(["dense", "topk", "sampled", "none"]))
        V = draw(st.integers(2, 50))
        d = dict(family="linear", op="linear", backend=draw(st.sampled_from(bks)),
                 N=draw(st.integers(1, 3)), L=draw(st.integers(1, 7)), Hd=draw(st.integers(1, 24)), V=V,
                 dtype=draw(st.sampled_from(DTYPES)), check_values=draw(st.booleans()),
                 reduction=draw(st.sampled_from(["mean", "sum"])),
                 ignore_frac=draw(st.sampled_from([0.0, 0.3, 0.8, 1.0])),
                 magnitude=draw(st.sampled_from([0.1, 1.0, 4.0])), bias=draw(st.booleans()),
                 teacher=teacher, hard_weight=draw(st.sampled_from([0.0, 0.5, 1.0])) if teacher != "none" else 1.0,
                 topk=draw(st.integers(1, V)), chunk=draw(st.one_of(st.none(), st.integers(1, 9))),
                 on_ignored=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))
        faults = [f for f in LINEAR_FAULTS if not (f == "nan_teacher" and teacher != "dense")
                  and not (f == "topk_nan_values" and teacher not in ("topk", "sampled"))
                  and not (f == "inf_bias" and not d["bias"])]
        fault = draw(st.one_of(st.none(), st.sampled_from(faults)))
        if fault is not None and not LINEAR_FAULTS[fault][2] and not (d["on_ignored"] and fault in LINEAR_IGNORABLE):
            d["check_values"] = True
        d["fault"] = fault
        return d
    return spec()


def file_specs(st):
    @st.composite
    def spec(draw):
        return dict(family="files", op=draw(st.sampled_from(["cache", "memory"])),
                    damage=draw(st.sampled_from(["flip", "flip", "truncate", "header", "delete", "swap"])),
                    topk=draw(st.booleans()), where=draw(st.floats(0.0, 1.0)),
                    bits=draw(st.integers(1, 255)), seed=draw(st.integers(0, 2 ** 31 - 1)))
    return spec()


def draw_specs(strategy, n: int, seed: int) -> list:
    """n specs from a hypothesis strategy, deterministically (fixed seed, no database)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    out = []

    @hseed(seed)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(spec):
        out.append(spec)

    collect()
    return out


# ============================================================================ running one case

def _dt(name):
    import torch
    return getattr(torch, name)


def _classify_error(e, fault_arg, fault_kind, *alternatives):
    """clear_error if ``e`` is the expected exception naming ``fault_arg`` (or one of the
    ``alternatives``, (arg, kind) pairs: when an input has two faults either may be named)."""
    msg = str(e)
    for arg, kind in ((fault_arg, fault_kind),) + alternatives:
        if isinstance(e, {"V": ValueError, "T": TypeError}[kind]) and msg.startswith(f"{arg}:"):
            return "clear_error", ""
    return "wrong_error", f"{type(e).__name__}: {msg[:300]}"


def _attempt(call, expected, fault):
    """Run ``call()``; returns (outcome, why, result): an exception is classified against
    ``expected`` (None: the input was valid), and a returned result with a fault pending
    is a silently accepted fault. outcome None means: valid, compare the result."""
    try:
        result = call()
    except Exception as e:   # noqa: BLE001 -- classified
        if expected is None:
            return "wrong_error", f"valid input refused: {type(e).__name__}: {str(e)[:300]}", None
        return (*_classify_error(e, *expected), None)
    if expected is not None:
        return "silent_wrong", f"fault {fault} accepted", result
    return None, "", result


def _with_fp64_refusal(expected, sp, arg):
    """Triton refuses fp64 input (TypeError naming ``arg``): alone, or besides a fault."""
    if sp["backend"] != "triton" or sp["dtype"] != "float64":
        return expected
    if expected is None:
        return (arg, "T")
    return tuple(expected) + ((arg, "T"),)


def _close(got, want, tol, what):
    """'' if |got - want| <= tol * (1 + |want|) (norms, fp64), else a description."""
    import torch
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    if not bool(torch.isfinite(got).all()):
        return f"{what}: non-finite values"
    err = (got - want).norm().item()
    ref = want.norm().item()
    if not err <= tol * (1.0 + ref):
        return f"{what}: |diff|={err:.3g} |ref|={ref:.3g} tol={tol:.2g}"
    return ""


# Tolerances against the fp64 oracle on the same (rounded) inputs: the fused kernels
# accumulate in fp32; results and gradients are returned in the input dtype.
TOL = {"float64": 1e-9, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def _att_inputs(sp):
    import torch
    g = torch.Generator().manual_seed(sp["seed"])
    B, H, Hkv, L, D = sp["B"], sp["H"], sp["Hkv"], sp["L"], sp["D"]
    dt = _dt(sp["dtype"])
    m = sp["magnitude"]
    if sp["noncontig"]:
        q = (torch.randn(B, L, H, D, generator=g) * m).to(dt).transpose(1, 2)
        k = (torch.randn(B, L, Hkv, D, generator=g) * m).to(dt).transpose(1, 2)
    else:
        q = (torch.randn(B, H, L, D, generator=g) * m).to(dt)
        k = (torch.randn(B, Hkv, L, D, generator=g) * m).to(dt)
    S = sp["S"]
    heads = torch.stack([torch.randperm(H, generator=g)[:S] for _ in range(B)]) if S else \
        torch.zeros(B, 0, dtype=torch.long)
    if sp["empty_slot"] and S:
        heads[0, -1] = -1
    queries = None if sp["Q"] is None else torch.randint(0, L, (B, sp["Q"]), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if sp["pad"] == "left":
        mask[0, : L // 3] = 0
    elif sp["pad"] == "right":
        mask[-1, L - L // 3:] = 0
    elif sp["pad"] == "random":
        mask = (torch.rand(B, L, generator=g) > 0.3).long()
    Q = L if queries is None else queries.shape[1]
    logits_t = torch.randn(B, S, Q, L, generator=g) * 2
    # a proper teacher: a distribution over each row's visible keys (others 0)
    pos = (torch.arange(L)[None, :].expand(B, L) if queries is None else queries)[:, None, :, None]
    vis = (torch.arange(L) <= pos) & mask.bool()[:, None, None, :]
    teacher = torch.softmax(logits_t.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0).to(dt)
    qb = (q.float() + 0.3 * torch.randn(q.shape, generator=g) * m).to(dt)
    kb = (k.float() + 0.3 * torch.randn(k.shape, generator=g) * m).to(dt)
    return q, k, heads, queries, mask, teacher, qb, kb


def _apply_att_fault(sp, t):
    """Apply sp['fault'] to the input dict t (in place); returns (arg, kind) expected."""
    import torch
    f = sp["fault"]
    B, H, L = sp["B"], sp["H"], sp["L"]
    big = 1e160 if sp["dtype"] == "float64" else 3e19
    if f is None:
        return None
    arg, kind, _ = ATT_FAULTS[f]
    S = t["heads"].shape[1]
    Qn = L if t["queries"] is None else t["queries"].shape[1]
    if f == "nan_q":
        t["q"] = t["q"].clone(); t["q"][0, 0, -1, 0] = float("nan")
    elif f == "inf_k":
        t["k"] = t["k"].clone(); t["k"][-1, -1, 0, -1] = float("-inf")
    elif f == "overflow":
        if sp["dtype"] == "float16":
            return None                          # fp16 cannot hold an overflowing value
        t["q"] = torch.full_like(t["q"], big); t["k"] = torch.full_like(t["k"], big)
        t["qb"], t["kb"] = t["q"], t["k"]
        arg = "q"
    elif f == "nan_teacher":
        if t["teacher"].numel() == 0:
            return None
        t["teacher"] = t["teacher"].clone(); t["teacher"].view(-1)[-1] = float("nan")
    elif f == "neg_teacher":
        if t["teacher"].numel() == 0:
            return None
        t["teacher"] = t["teacher"].clone(); t["teacher"].view(-1)[0] = -0.05
    elif f == "dup_head":
        if S < 2 or H < 2:
            return None
        t["heads"] = t["heads"].clone(); t["heads"][0, 0] = 1; t["heads"][0, 1] = 1
    elif f in ("head_eq_H", "head_huge", "head_2p32", "head_lt_m1"):
        if S == 0:
            return None
        v = {"head_eq_H": H, "head_huge": 10 ** 6, "head_2p32": 2 ** 32, "head_lt_m1": -2}[f]
        t["heads"] = t["heads"].clone(); t["heads"][-1, 0] = v
    elif f in ("query_eq_L", "query_neg"):
        if t["queries"] is None or Qn == 0:
            return None
        t["queries"] = t["queries"].clone(); t["queries"][-1, -1] = L if f == "query_eq_L" else -1
    elif f == "mask_value":
        t["mask"] = t["mask"].clone(); t["mask"][0, -1] = 2
    elif f == "heads_float":
        t["heads"] = t["heads"].float()
    elif f == "queries_shape":
        t["queries"] = torch.zeros(B + 1, 2, dtype=torch.long)
    elif f == "mask_shape":
        t["mask"] = torch.ones(B, L + 1, dtype=torch.long)
    elif f == "mask_float":
        t["mask"] = t["mask"].float()
    elif f == "k_shape":
        t["k"] = torch.zeros(B, sp["Hkv"], L + 1, sp["D"], dtype=t["k"].dtype)
    elif f == "k_dtype":
        t["k"] = t["k"].to(torch.float64 if t["q"].dtype != torch.float64 else torch.float32)
    elif f == "hkv_divides":
        if H < 2:
            return None
        t["k"] = torch.zeros(B, H + 1, L, sp["D"], dtype=t["q"].dtype)
    elif f == "q_3d":
        t["q"] = t["q"][0]
    elif f == "teacher_shape":
        t["teacher"] = torch.zeros(B, S, Qn, L + 1)
    elif f == "scale_zero":
        t["scale"] = 0.0
    elif f == "scale_nan":
        t["scale"] = float("nan")
    elif f == "scale_str":
        t["scale"] = "big"
    elif f == "reduction":
        t["reduction"] = "average"
    elif f == "topk_index":
        if t["teacher"].numel() == 0:
            return None
        t["topk_fault"] = "index"
    elif f == "topk_kind":
        t["topk_fault"] = "kind"
    elif f == "qb_shape":
        t["qb"] = t["qb"][:, :, :-1] if L > 1 else torch.zeros(B, H, 2, sp["D"], dtype=t["q"].dtype)
    elif f == "nan_kb":
        t["kb"] = t["kb"].clone(); t["kb"][0, 0, 0, 0] = float("nan")
    elif f == "q_int":
        t["q"] = torch.zeros(t["q"].shape, dtype=torch.int32)
    elif f == "out_dtype":
        t["out_dtype"] = torch.int8
    return arg, kind


def _call_att(sp, t, backend, grad=True):
    """Run the op; returns (output, dq, dk) (grads None where not applicable)."""
    import torch
    import seekr_kernels as sk
    op, cv = sp["op"], sp["check_values"]
    q, k = t["q"], t["k"]
    if op in ("kl", "kl_topk") and grad and q.dtype.is_floating_point:
        q = q.detach().requires_grad_()
        k = k.detach().requires_grad_() if k.dtype.is_floating_point else k
    kw = dict(scale=t["scale"], backend=backend, check_values=cv)
    if op in ("kl", "kl_topk"):
        teacher = t["teacher"]
        if op == "kl_topk":
            kk = min(sp["topk"], teacher.shape[-1]) if teacher.shape[-1] else 1
            tk = sk.TopK.from_dense(teacher.float() if teacher.shape[-1] else torch.zeros(*teacher.shape[:-1], 1),
                                    max(1, kk))
            if t.get("topk_fault") == "index" and tk.indices.numel():
                tk.indices[..., 0] = teacher.shape[-1] + 3
            if t.get("topk_fault") == "kind":
                tk = sk.TopK(tk.values, tk.indices, tk.full_size, "logits", lse=tk.values[..., 0].float())
            teacher = tk
        out = sk.attention_kl(q, k, teacher, t["heads"], t["queries"], t["mask"],
                              reduction=t["reduction"], **kw)
        if q.requires_grad:
            w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
            gq, gk = torch.autograd.grad((out * w).sum(), (q, k), allow_unused=True)
            return out, gq, gk
        return out, None, None
    if op == "probs":
        return sk.attention_probs(q, k, t["heads"], t["queries"], t["mask"],
                                  out_dtype=t.get("out_dtype"), **kw), None, None
    return sk.attention_sqdiff(q, k, t["qb"], t["kb"], t["heads"], t["queries"], t["mask"], **kw), None, None


def run_attention(sp):
    import torch
    q, k, heads, queries, mask, teacher, qb, kb = _att_inputs(sp)
    t = dict(q=q, k=k, heads=heads, queries=queries, mask=mask, teacher=teacher, qb=qb, kb=kb,
             scale=sp["scale"], reduction=sp["reduction"])
    expected = _apply_att_fault(sp, t)
    backend = sp["backend"]
    expected = _with_fp64_refusal(expected, sp, "q_a" if sp["op"] == "sqdiff" else "q")
    outcome, why, got = _attempt(lambda: _call_att(sp, t, backend), expected, sp["fault"])
    if outcome:
        return outcome, why
    # The oracle: the torch backend in fp64 on the same (rounded) inputs. For a TopK
    # teacher the torch backend at the input dtype instead: its dropped-mass term takes
    # log(P_D + floor) with a floor that depends on the accumulation dtype (ops/attention_kl.py, _TAIL_FLOOR).
    t64 = dict(t)
    if sp["op"] != "kl_topk":
        for key in ("q", "k", "teacher", "qb", "kb"):
            t64[key] = t[key].double()
    ref = _call_att(sp, t64, "torch")
    tol = TOL[sp["dtype"]]
    # large scores: fp32 rounding of the scores themselves grows with their size
    z = float(max(1.0, (sp["scale"] or sp["D"] ** -0.5) * sp["D"] * sp["magnitude"] ** 2))
    if sp["dtype"] != "float64":
        tol = tol * (1.0 + z / 50.0)
    out_tol = tol if sp["op"] != "probs" else max(tol, {"float16": 1e-3, "bfloat16": 8e-3}.get(sp["dtype"], 0))
    # TopK's dropped bucket is conditioned by 1/P_D: scores rounded in another order
    # (kernel vs torch) move it by ~delta * error(z) / P_D. Its documented precision
    # (ops/attention_kl.py, tests/test_topk.py::test_bucket_with_sharpening_student_matches_fp64):
    # 3e-2 on values and 5e-2 on gradients while P_D is resolvable; below (rows whose
    # student tail is under the rounding of their scores) only finite and bounded.
    g_tol = tol
    if sp["op"] == "kl_topk":
        out_tol, g_tol = max(out_tol, 3e-2), max(tol, 5e-2)
        if _topk_tail_unresolvable(sp, t):
            # bounded by twice the larger of the TopK and the dense teacher's (fp64) pull
            t_dense = {**t, "q": t["q"].double(), "k": t["k"].double(), "teacher": t["teacher"].double()}
            dense = _call_att({**sp, "op": "kl"}, t_dense, "torch")
            for i, name in enumerate(("out", "dq", "dk")):
                a, b, c = got[i], ref[i], dense[i]
                if a is not None and not (bool(torch.isfinite(a).all()) and a.double().norm()
                                          <= 2 * max(b.double().norm(), c.double().norm()) + 1e-3):
                    return "silent_wrong", f"{name}: not finite and bounded (unresolvable tail)"
            return "ok", ""
    for name, a, b, tl in (("out", got[0], ref[0], out_tol), ("dq", got[1], ref[1], g_tol),
                           ("dk", got[2], ref[2], g_tol)):
        if a is None and b is None:
            continue
        if (a is None) != (b is None):
            return "silent_wrong", f"{name}: gradient missing on one side"
        why = _close(a, b, tl, name)
        if why:
            return "silent_wrong", why
    if sp["op"] == "probs":
        s = got[0].double().sum(-1)
        if not bool((((s - 1).abs() < 2e-2) | (s == 0)).all()):
            return "silent_wrong", "probability rows do not sum to 1 or 0"
    return "ok", ""


def _topk_tail_unresolvable(sp, t):
    """Does an active row's student mass on the dropped keys (P_D) lie under the rounding
    of its scores, eps * scale * |q_row| * max|k| (fp64 reference computation)?"""
    import torch
    import seekr_kernels as sk
    from seekr_kernels import reference
    from seekr_kernels._checks import check_attention_args
    q, k, teacher = t["q"].double(), t["k"].double(), t["teacher"].double()
    if teacher.numel() == 0:
        return False
    a = check_attention_args(q, k, t["heads"], t["queries"], t["mask"], t["scale"])
    p = reference.attention_probs(a, torch.float64)                          # [B, S, Q, L]
    tk = sk.TopK.from_dense(teacher.float(), max(1, min(sp["topk"], teacher.shape[-1])))
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, tk.indices.long(), True)
    pd = (p * ~kept).sum(-1)
    delta = (teacher * ~kept).sum(-1)
    h = a.heads.long().clamp_min(0)
    b = torch.arange(a.B)[:, None]
    qn = torch.linalg.vector_norm(q[b[..., None], h[..., None], a.queries.long()[:, None, :]], dim=-1)
    kn = torch.linalg.vector_norm(k, dim=-1).amax(-1)[b, h // a.group][..., None]
    eps = torch.finfo(torch.float64 if sp["dtype"] == "float64" else torch.float32).eps
    noise = 100 * eps * (a.scale * qn * kn).clamp_min(1.0)
    return bool((a.row_active & (delta > 1e-6) & (pd < noise)).any())


def run_logits(sp):
    import torch
    import seekr_kernels as sk
    g = torch.Generator().manual_seed(sp["seed"])
    N, L, V = sp["N"], sp["L"], sp["V"]
    dt = _dt(sp["dtype"])
    m = sp["magnitude"]
    s = (torch.randn(N, L, V, generator=g) * m).to(dt)
    tl_ = torch.randn(N, L, V, generator=g) * m
    labels = torch.randint(0, V, (N, L), generator=g)
    ign = torch.rand(N, L, generator=g) < sp["ignore_frac"]
    labels[ign] = -100
    f = sp["fault"]
    cv = sp["check_values"]
    expected = None
    teacher_kind = "topk" if sp["op"] == "lkl_topk" else "dense"
    reduction = sp["reduction"]
    # where a value fault goes: an ignored row (valid input) or a supervised one
    sup = (~ign).nonzero()
    ig = ign.nonzero()
    at = None
    if f in IGNORABLE:
        pool = ig if sp["on_ignored"] and len(ig) else sup
        if len(pool) == 0:
            f = None
        else:
            at = tuple(pool[0].tolist())
            if pool is sup:
                expected = LOGIT_FAULTS[f][:2]
                cv = True                  # a value fault on a read row is caught when checked
    elif f is not None:
        expected = LOGIT_FAULTS[f][:2]
    if sp["op"] == "from_dense":
        x = torch.softmax(tl_, -1).to(dt)
        kind = "probs"
        k = sp["topk"]
        if f == "fd_negative":
            x[0, 0, 0] = -0.01
        elif f == "fd_nan":
            x[-1, -1, -1] = float("nan")
        elif f == "fd_k":
            k = V + 1
        elif f == "fd_all_neginf":
            kind, x = "logits", tl_.to(dt)
            x[0, 0] = float("-inf")
        outcome, why, tk = _attempt(lambda: sk.TopK.from_dense(x, k, kind=kind), expected, f)
        if outcome:
            return outcome, why
        dense = tk.to_dense().double()
        want = torch.zeros(N, L, V, dtype=torch.float64).scatter_(-1, tk.indices.long(), x.double().gather(-1, tk.indices.long()))
        why = _close(dense, want, 0.0, "to_dense") or _close(tk.mass, x.double().sum(-1), 1e-5, "mass")
        kth = torch.topk(x.double(), k, -1).values[..., -1:]
        if not why and not bool((tk.values.double() >= kth - 1e-12).all()):
            why = "kept values are not the k largest"
        return ("silent_wrong", why) if why else ("ok", "")
    if f == "nan_student" and at is not None:
        s = s.clone(); s[at + (0,)] = float("nan")
    elif f == "all_neginf_student" and at is not None:
        s = s.clone(); s[at] = float("-inf")
    elif f == "inf_teacher" and at is not None:
        tl_[at + (V - 1,)] = float("inf")
    elif f == "labels_shape":
        labels = labels[:, :-1] if L > 1 else torch.zeros(N, 2, dtype=torch.long)
    elif f == "labels_float":
        labels = labels.float()
    elif f == "teacher_shape":
        tl_ = torch.zeros(N, L, V + 1)
    elif f == "reduction":
        reduction = "batchmean"
    elif f == "student_int":
        s = torch.zeros(N, L, V, dtype=torch.int64)
    teacher = tl_.to(dt) if teacher_kind == "dense" else None
    if teacher_kind == "topk":
        kk = min(sp["topk"], V)
        clean = torch.randn(N, L, V, generator=g) * m
        tk = sk.TopK.from_dense(clean, kk, kind="logits")
        if f == "topk_nan_values" and at is not None:
            tk.values[at] = float("nan"); tk.lse[at] = float("nan")
        elif f == "topk_index":
            tk.indices[..., 0] = V + 2
        elif f == "topk_kind":
            tk = sk.TopK(tk.values.abs(), tk.indices, V, "probs")
        teacher = tk
    if f == "topk_index":
        expected = LOGIT_FAULTS[f][:2] if len(sup) else None
        if expected is None:
            f = None                               # only ignored rows: never read
    backend = sp["backend"]
    expected = _with_fp64_refusal(expected, sp, "student_logits")

    def call(x, tch, bk):
        x = x.detach().requires_grad_() if x.dtype.is_floating_point else x
        out = sk.logits_kl(x, tch, labels, reduction=reduction, backend=bk, check_values=cv,
                           topk_mode=sp["mode"] if teacher_kind == "topk" else None)
        if not x.requires_grad:
            return out, None
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        (gx,) = torch.autograd.grad((out * w).sum(), x)
        return out, gx

    outcome, why, got = _attempt(lambda: call(s, teacher, backend), expected, f)
    if outcome:
        return outcome, why
    # oracle: torch backend, fp64, with every ignored row cleaned (never read, so equal)
    s64 = torch.where(ign[..., None], torch.zeros(()), s.double()) if s.dtype.is_floating_point else s
    if teacher_kind == "dense":
        t64 = torch.where(ign[..., None], torch.zeros(()), teacher.double())
    else:
        keep = ~ign[..., None]
        t64 = sk.TopK(torch.where(keep, teacher.values.double(), torch.zeros(())),
                      torch.where(keep, teacher.indices, torch.arange(teacher.k, dtype=torch.int32)), V, "logits",
                      lse=torch.where(~ign, teacher.lse.double(), torch.zeros(())))
    ref = call(s64, t64, "torch")
    tol = TOL[sp["dtype"]] * (1.0 + (m / 5.0 if sp["dtype"] != "float64" else 0.0))
    why = _close(got[0], ref[0], tol, "loss") or (got[1] is not None and _close(got[1], ref[1], tol, "grad"))
    if why:
        return "silent_wrong", why
    if got[1] is not None and not bool((got[1][ign] == 0).all()):
        return "silent_wrong", "gradient on ignored rows"
    return "ok", ""


def run_linear(sp):
    """One linear_logits_kl call against the fp64 torch oracle on the same inputs with every
    ignored row cleaned (no backend may read those rows, so the results must be equal)."""
    import torch
    import seekr_kernels as sk
    g = torch.Generator().manual_seed(sp["seed"])
    N, L, Hd, V = sp["N"], sp["L"], sp["Hd"], sp["V"]
    dt = _dt(sp["dtype"])
    m = sp["magnitude"]
    h = (torch.randn(N, L, Hd, generator=g) * m).to(dt)
    W = (torch.randn(V, Hd, generator=g) * (0.5 / max(1.0, Hd ** 0.5 / 2))).to(dt)
    b = (torch.randn(V, generator=g) * 0.3).to(dt) if sp["bias"] else None
    tl_ = torch.randn(N, L, V, generator=g) * 2
    labels = torch.randint(0, V, (N, L), generator=g)
    ign = torch.rand(N, L, generator=g) < sp["ignore_frac"]
    labels[ign] = -100
    hw = sp["hard_weight"]
    sw = 0.0 if sp["teacher"] == "none" else 1.0 - 0.5 * (hw == 1.0)
    f, cv = sp["fault"], sp["check_values"]
    sup, ig = (~ign).nonzero(), ign.nonzero()
    expected, at = None, None
    if f in LINEAR_IGNORABLE:
        pool = ig if sp["on_ignored"] and len(ig) else sup
        if len(pool) == 0:
            f = None
        else:
            at = tuple(pool[0].tolist())
            if pool is sup:
                expected, cv = LINEAR_FAULTS[f][:2], True
    elif f in ("inf_weight", "nan_weight", "neginf_weight_masked", "inf_bias", "label_range"):
        if f == "label_range" and (not hw or len(sup) == 0):
            f = None
        else:
            expected, cv = LINEAR_FAULTS[f][:2], True
    elif f is not None:
        expected = LINEAR_FAULTS[f][:2]
    if f == "nan_hidden" and at is not None:
        h = h.clone(); h[at + (0,)] = float("nan")
    elif f == "inf_hidden" and at is not None:
        h = h.clone(); h[at + (Hd - 1,)] = float("-inf")
    elif f == "inf_weight":
        W = W.clone(); W[V - 1, 0] = float("inf")
    elif f == "nan_weight":
        W = W.clone(); W[0, Hd - 1] = float("nan")
    elif f == "neginf_weight_masked":
        # -inf logits of entry 0 on every row (the softmax hides it): finite loss, NaN dhidden
        h = h.clone(); h[..., 0] = h[..., 0].abs() + 0.1
        labels[labels == 0] = -100 if V == 1 else 1
        W = W.clone(); W[0, 0] = float("-inf")
    elif f == "inf_bias":
        b = b.clone(); b[0] = float("inf")
    elif f == "nan_teacher" and at is not None:
        tl_[at + (V // 2,)] = float("nan")
    elif f == "label_range":
        labels = labels.clone(); labels[tuple(sup[0].tolist())] = V
    elif f == "labels_shape":
        labels = labels[:, :-1] if L > 1 else torch.zeros(N, 2, dtype=torch.long)
    elif f == "weight_shape":
        W = torch.zeros(V, Hd + 1, dtype=dt)
    elif f == "weight_dtype":
        W = W.to(torch.float64 if dt != torch.float64 else torch.float32)
    if sp["teacher"] == "dense":
        teacher = tl_.to(dt)
    elif sp["teacher"] == "none":
        teacher = None
    else:
        kk = min(sp["topk"], V)
        if sp["teacher"] == "topk":
            teacher = sk.TopK.from_dense(tl_, kk, kind="logits")
        else:
            teacher = sk.SampledTeacher.from_dense(tl_, kk, seed=sp["seed"] % 1000)
        if f == "topk_nan_values" and at is not None:
            teacher.values[at] = float("nan")
            if teacher.lse is not None:
                teacher.lse[at] = float("nan")
    backend = sp["backend"]
    expected = _with_fp64_refusal(expected, sp, "hidden")

    def call(h_, W_, b_, t_, bk):
        h_ = h_.detach().clone().requires_grad_()
        W_ = W_.detach().clone().requires_grad_() if W_.dtype.is_floating_point else W_
        b_ = None if b_ is None else b_.detach().clone().requires_grad_()
        loss = sk.linear_logits_kl(h_, W_, t_, labels, bias=b_, hard_weight=hw, soft_weight=sw,
                                   chunk_size=sp["chunk"], backend=bk, reduction=sp["reduction"],
                                   check_values=cv)
        grads = torch.autograd.grad(loss, [x for x in (h_, W_, b_) if x is not None])
        return (loss, *grads)

    outcome, why, got = _attempt(lambda: call(h, W, b, teacher, backend), expected, f)
    if outcome:
        return outcome, why
    keep = ~ign
    h64 = torch.where(keep[..., None], h.double(), torch.zeros(()))
    if isinstance(teacher, sk.TopK):
        k = teacher.k
        t64 = type(teacher)(torch.where(keep[..., None], teacher.values.double(), torch.zeros(())),
                            torch.where(keep[..., None], teacher.indices, torch.arange(k, dtype=torch.int32)),
                            V, teacher.kind,
                            lse=None if teacher.lse is None else torch.where(keep, teacher.lse.double(), torch.zeros(())))
    elif teacher is not None:
        t64 = torch.where(keep[..., None], teacher.double(), torch.zeros(()))
    else:
        t64 = None
    ref = call(h64, W.double(), None if b is None else b.double(), t64, "torch")
    tol = TOL[sp["dtype"]] * (1.0 + (m if sp["dtype"] != "float64" else 0.0))
    for name, a, r in zip(("loss", "dhidden", "dweight", "dbias"), got, ref):
        why = _close(a, r, tol, name)
        if why:
            return "silent_wrong", why
    if not bool((got[1][ign] == 0).all()):
        return "silent_wrong", "gradient on ignored rows"
    return "ok", ""


def run_files(sp, workdir):
    """Damage a saved cache / replay memory; it must be refused or load identical."""
    import random
    import shutil
    import torch
    import seekr_kernels as sk
    from seekr_kernels.seekr.memory import ReplayMemory, ReplayMemoryError, ReplaySample
    rng = random.Random(sp["seed"])
    g = torch.Generator().manual_seed(sp["seed"])
    d = tempfile.mkdtemp(dir=workdir)
    try:
        if sp["op"] == "cache":
            att = torch.softmax(torch.randn(2, 2, 3, 6, generator=g), -1)
            lg = torch.randn(2, 6, 9, generator=g)
            if sp["topk"]:
                att, lg = sk.TopK.from_dense(att, 3), sk.TopK.from_dense(lg, 4, kind="logits")
            obj = sk.TeacherCache({1: att}, lg, {1: torch.tensor([0, 2])}, torch.tensor([[1, 2, 5], [0, 3, 4]]),
                                  {"ids": torch.arange(12).reshape(2, 6)}, {"task": "fz", "n": sp["seed"] % 97})
            path = os.path.join(d, "c.safetensors")
            obj.save(path)
            files = [path]
            load = lambda: sk.TeacherCache.load(path)   # noqa: E731
            errors = (sk.TeacherCacheError,)
        else:
            mem = ReplayMemory()
            for ti in range(2):
                smp = []
                for i in range(2):
                    n = 4 + i
                    lgs = torch.randn(n - 1, 9, generator=g)
                    if sp["topk"]:
                        lgs = sk.TopK.from_dense(lgs, 3, kind="logits")
                    smp.append(ReplaySample(torch.randint(0, 9, (n,), generator=g), torch.arange(n) > 0, None, lgs, 1,
                                            {0: torch.softmax(torch.randn(1, n, n, generator=g), -1)}))
                mem.add_task(f"t{ti}", smp, {0: torch.tensor([1])})
            path = os.path.join(d, "memory")
            mem.save(path)
            obj = mem
            files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
            load = lambda: ReplayMemory.load(path)      # noqa: E731
            errors = (ReplayMemoryError,)
        target = files[int(sp["where"] * len(files)) % len(files)]
        raw = bytearray(open(target, "rb").read())
        pos = int(sp["where"] * max(1, len(raw) - 1))
        dmg = sp["damage"]
        if dmg == "flip":
            raw[pos] ^= sp["bits"]
        elif dmg == "truncate":
            raw = raw[:pos]
        elif dmg == "header":
            # an edit inside the JSON: change one digit or letter of the text part
            text_end = raw.find(b"}", 8) if sp["op"] == "cache" else len(raw)
            cands = [i for i in range(8, max(9, text_end)) if chr(raw[i]).isalnum()] if raw else []
            if cands:
                i = cands[rng.randrange(len(cands))]
                raw[i] = ord("7") if raw[i] != ord("7") else ord("3")
        elif dmg == "delete":
            os.remove(target)
            raw = None
        elif dmg == "swap" and len(files) > 1:
            other = files[(files.index(target) + 1) % len(files)]
            raw = bytearray(open(other, "rb").read())
        if raw is not None:
            open(target, "wb").write(bytes(raw))
        try:
            back = load()
        except errors:
            return "clear_error", ""
        except FileNotFoundError:
            return ("clear_error", "") if dmg == "delete" else ("wrong_error", "FileNotFoundError")
        except Exception as e:   # noqa: BLE001
            return "wrong_error", f"{type(e).__name__}: {str(e)[:300]}"
        return ("ok", "") if _same_obj(obj, back) else ("silent_wrong", f"{dmg} of {os.path.basename(target)} "
                                                                            "loaded with different content")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _same_obj(a, b):
    import torch
    import seekr_kernels as sk

    def same(x, y):
        if isinstance(x, sk.TopK):
            return isinstance(y, sk.TopK) and all(torch.equal(getattr(x, f), getattr(y, f))
                                                 for f in ("values", "indices")) and x.full_size == y.full_size
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        return x == y

    if isinstance(a, sk.TeacherCache):
        return (same(a.logits, b.logits) and a.meta == b.meta and sorted(a.attention) == sorted(b.attention)
                and all(same(a.attention[l], b.attention[l]) for l in a.attention)
                and all(same(a.heads[l], b.heads[l]) for l in a.heads) and same(a.queries, b.queries)
                and all(same(a.extra[n], b.extra[n]) for n in a.extra) and sorted(a.extra) == sorted(b.extra))
    if len(a.tasks) != len(b.tasks):
        return False
    for ta, tb in zip(a.tasks, b.tasks):
        if ta.name != tb.name or ta.meta != tb.meta or sorted(ta.heads) != sorted(tb.heads):
            return False
        if not all(same(ta.heads[l], tb.heads[l]) for l in ta.heads) or len(ta.samples) != len(tb.samples):
            return False
        for x, y in zip(ta.samples, tb.samples):
            if not (same(x.input_ids, y.input_ids) and same(x.answer_mask, y.answer_mask)
                    and same(x.logits, y.logits) and x.logits_start == y.logits_start
                    and sorted(x.attention) == sorted(y.attention)
                    and all(same(x.attention[l], y.attention[l]) for l in x.attention)):
                return False
    return True


def run_case(sp, workdir):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if sp["family"] == "attention":
            return run_attention(sp)
        if sp["family"] == "logits":
            return run_logits(sp)
        if sp["family"] == "linear":
            return run_linear(sp)
        return run_files(sp, workdir)


# ============================================================================ the campaign

def run_campaign(specs, *, case_timeout=120.0, label="fuzz"):
    """Run specs in subprocess workers; returns (Counter of outcomes, list of failures).

    A worker that dies (signal, abort) or hangs past ``case_timeout`` costs one ``crash``
    for the case it had started; a fresh worker continues after it.
    """
    counts = Counter()
    failures = []
    work = tempfile.mkdtemp(prefix=f"seekr-{label}-")
    spec_p = os.path.join(work, "specs.jsonl")
    with open(spec_p, "w") as f:
        for sp in specs:
            f.write(json.dumps(sp) + "\n")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("SEEKR_TEST_GPU", None)
    start = 0
    restarts = 0
    while start < len(specs):
        res_p = os.path.join(work, f"results-{start}.jsonl")
        log = open(os.path.join(work, f"worker-{start}.log"), "wb")
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), spec_p, res_p, str(start), work],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        last_progress, seen = time.monotonic(), 0
        while proc.poll() is None:
            time.sleep(0.05)
            n = _count_lines(res_p)
            if n != seen:
                seen, last_progress = n, time.monotonic()
            elif time.monotonic() - last_progress > case_timeout + (60 if seen == 0 else 0):
                proc.kill()
                proc.wait()
                break
        log.close()
        started, done = _read_results(res_p)
        for i, (outcome, why) in done.items():
            counts[outcome] += 1
            if outcome not in ("ok", "clear_error"):
                failures.append((outcome, why, specs[i]))
        nxt = max(list(done) + list(started) + [start - 1]) + 1
        if proc.returncode == 0 and nxt >= len(specs):
            break
        # the worker died or hung: the started case without a result is a crash
        crashed = [i for i in started if i not in done]
        if not crashed and nxt >= len(specs):
            break
        i = crashed[0] if crashed else nxt
        if not crashed and proc.returncode == 0:
            start = nxt
            continue
        counts["crash"] += 1
        tail = open(os.path.join(work, f"worker-{start}.log"), "rb").read()[-2000:].decode(errors="replace")
        failures.append(("crash", f"worker exit {proc.returncode}: {tail}", specs[i] if i < len(specs) else None))
        start = i + 1
        restarts += 1
        if restarts > 50:
            raise RuntimeError("fuzz: more than 50 worker crashes; giving up")
    return counts, failures


def _count_lines(p):
    try:
        with open(p, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _read_results(p):
    started, done = set(), {}
    try:
        with open(p) as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                r = json.loads(line)
                if "start" in r:
                    started.add(r["i"])
                else:
                    done[r["i"]] = (r["outcome"], r.get("why", ""))
    except FileNotFoundError:
        pass
    return started, done


def report(label, counts, failures, path=None):
    """Print (and append to $SEEKR_FUZZ_REPORT as JSON lines) the figures of a campaign."""
    line = {"campaign": label, "cases": sum(counts.values()), **{k: counts.get(k, 0) for k in OUTCOMES}}
    print(f"\n{label}: " + ", ".join(f"{k}={v}" for k, v in line.items() if k != "campaign"))
    for outcome, why, sp in failures[:10]:
        print(f"  {outcome}: {why}\n    spec={json.dumps(sp)}")
    path = path or os.environ.get("SEEKR_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    return line


def assert_clean(label, counts, failures):
    report(label, counts, failures)
    bad = {k: counts.get(k, 0) for k in ("silent_wrong", "wrong_error", "crash") if counts.get(k, 0)}
    assert not bad, f"{label}: {bad}; first: " + "; ".join(
        f"{o}: {w} spec={json.dumps(s)}" for o, w, s in failures[:3])
    assert math.isfinite(sum(counts.values()))
