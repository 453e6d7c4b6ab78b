"""Logits distillation benchmarks: the fused lm_head + logits term, logits_kl against the
published computation, and TopK quality.

Sections (``--section``; default ``linear``):

linear   Forward + backward time and peak memory of the replay logits loss
         0.5 * CE(labels) + 0.5 * distillation, starting from the final hidden states
         h [T, Hd] and the lm_head W [V, Hd] (fp32 on CPU), for
           materialised   logits = h @ W.T, then F.cross_entropy + sk.logits_kl (today's path)
           published      logits = h @ W.T, then CrossEntropyLoss on s[sel] against labels
                          and against softmax(t[sel]) (the SEEKR reference code)
           fused-dense    sk.linear_logits_kl with the dense teacher
           fused-topk     sk.linear_logits_kl with a TopK teacher (k = --k, default 256)
           fused-sampled  sk.linear_logits_kl with a SampledTeacher (k = --k)
           liger-jsd      Liger-Kernel's chunked LigerFusedLinearJSDLoss (plain torch,
                          compiled=False, its default chunk of 1024 rows) with beta = 0,
                          i.e. KL(teacher || student): the same gradient as the logits term,
                          but it recomputes the teacher logits from teacher hidden states and
                          a teacher lm_head per chunk (it has no cached-teacher-logits input).
         Dense teachers are bf16 [T, V] (as a cache holds them); 25% of the rows are
         prompt (label -100). Cases: T = 2048 and 4096 with Hd = 1024, T = 2048 with
         Hd = 4096; V = 32000 and 128256 (``--quick``: T = 256, Hd = 64, V = 2000/8000).
         liger-jsd needs ``pip install liger-kernel``; without it that column is left out.
logits   logits_kl on given student logits against the published computation (issue 3).
topk-quality  TopK modes against the dense teacher on synthetic LM-like logits.

Measurement: every (impl, case) runs in a fresh subprocess (common.run_isolated), one at
a time. Peak memory = extra memory of the first call (common.peak_mib; inputs are built
before and not counted); it includes the gradients every path returns (dW [V, Hd] and
dh). Time: minimum over ``--reps`` calls after it (common.timings; the CPU is shared; the
median is in the CSV). ``--gpu``: bf16, T = 8192, Hd = 4096.

Results go to ``--out DIR`` (default ``./bench-out/``; committed results are replaced only
when asked: ``--out benchmarks/results``): CSV per section, + PNG for ``linear``.
``--quick``: tiny shapes, one process for the whole run (benchmarks/common.py).

    python -m benchmarks.bench_logits_kl --quick --out /tmp/x
    python -m benchmarks.bench_logits_kl --out benchmarks/results          # the full table
    python -m benchmarks.bench_logits_kl --section logits --out DIR
    python -m benchmarks.bench_logits_kl --section topk-quality --out DIR
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics

from benchmarks import common

HW = SW = 0.5                   # SEEKR's (1 - a) * CE + a * KL with a = 0.5


def _inputs(N, L, V, dtype, device, prompt_frac=0.3):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(N, L, V, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_()
    t = (torch.randn(N, L, V, generator=g) * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (N, L), generator=g).to(device)
    labels[:, : int(prompt_frac * L)] = -100          # prompt tokens are not distilled
    return s, t, labels


def published(s, t, labels):
    import torch
    import torch.nn.functional as F

    idx = torch.nonzero(labels != -100, as_tuple=True)
    return torch.nn.CrossEntropyLoss()(s[idx], F.softmax(t[idx], dim=-1))


def point(impl, N, L, V, dtype, device, k=0, reps=3):
    """One measurement (run in a subprocess): peak MiB and median ms of forward+backward."""
    import torch

    import seekr_kernels as sk
    dt = getattr(torch, dtype)
    s, t, labels = _inputs(N, L, V, dt, device)
    if k:
        t = sk.TopK.from_dense(t, k, kind="logits")
    backend = "triton" if device == "cuda" else "torch"

    def step():
        if impl == "published":
            loss = published(s, t, labels)
        else:
            loss = sk.logits_kl(s, t, labels, backend=backend)
        loss.backward()
        s.grad = None
        return loss

    peak = common.peak_mib(step, device)
    times = common.timings(step, device, warmup=0, reps=reps)
    ms, ms_median = min(times), statistics.median(times)
    grad_mib = s.numel() * s.element_size() / 2**20
    return {"impl": impl if not k else f"{impl}-topk{k}", "N": N, "L": L, "V": V, "dtype": dtype,
            "device": device, "peak_mib": round(peak, 1), "grad_mib": round(grad_mib, 1),
            "overhead_mib": round(peak - grad_mib, 1), "ms": round(ms, 1), "ms_median": round(ms_median, 1),
            "loss": float(step().detach())}


def bench(args):
    device = "cuda" if args.gpu else "cpu"
    if args.quick:
        args.N, args.L, args.V = 1, 64, 2000
    dtypes = ["bfloat16"] if args.gpu else ["float32", "bfloat16"]
    rows = []
    for dtype in dtypes:
        pts = {}
        for impl, k in (("published", 0), ("logits_kl", 0), ("logits_kl", args.k)):
            r = common.run_point("benchmarks.bench_logits_kl", "point",
                                 dict(impl=impl, N=args.N, L=args.L, V=args.V, dtype=dtype, device=device, k=k,
                                      reps=args.reps), isolated=not args.quick,
                                 label=f"{impl if not k else f'{impl}-topk{k}':>18s} {dtype:>9s}",
                                 show=lambda r: f" peak {r['peak_mib']:7.1f} MiB (beyond the gradient "
                                                f"{r['overhead_mib']:6.1f})  {r['ms']:8.1f} ms  loss {r['loss']:.5f}")
            if "error" in r:
                continue
            pts[r["impl"]] = r
            rows.append(r)
        base = pts.get("published")
        for name, r in pts.items():
            if base and name != "published":
                r["mem_ratio_vs_published"] = round(base["peak_mib"] / max(r["peak_mib"], 1e-3), 2)
                r["overhead_ratio_vs_published"] = round(base["overhead_mib"] / max(r["overhead_mib"], 1.0), 1)
                r["speedup_vs_published"] = round(base["ms"] / max(r["ms"], 1e-3), 2)
                print(f"  {name} vs published ({dtype}): peak memory "
                      f"{common.ratio(r['peak_mib'], base['peak_mib'], 'memory', floor=0.1)} "
                      f"(beyond the gradient {common.ratio(r['overhead_mib'], base['overhead_mib'], 'memory', floor=1.0)}), "
                      f"time {common.ratio(r['ms'], base['ms'], floor=1e-3)}")
    print("machine:", common.machine())
    common.write_csv(os.path.join(args.out, f"logits_kl_{device}.csv"), rows)


# ------------------------------------------------------------------------ TopK quality
def _lm_like(R, V, temp, drift, seed=0):
    """Synthetic LM-like logits: a Zipf prior over the vocabulary plus context noise, at
    temperature ``temp``; the student is the teacher plus ``drift`` noise and an offset."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(V, generator=g).float() + 1
    t = (-1.1 * torch.log(rank) + 2.0 * torch.randn(R, V, generator=g)) / temp
    s = t + drift * torch.randn(R, V, generator=g) + 3.0
    return s[None], t[None]


def topk_quality(args):
    import torch

    import seekr_kernels as sk
    from seekr_kernels.ops.logits_kl import TOPK_MODES

    if args.quick:
        args.rows, args.V = 16, 2000
    rows = []
    V = args.V
    for temp, drift in ((0.5, 0.3), (0.7, 0.3), (0.7, 1.0), (0.7, 2.0), (1.0, 0.3), (1.0, 1.0)):
        s, t = _lm_like(args.rows, V, temp, drift)
        labels = torch.zeros(s.shape[:2], dtype=torch.long)
        sd = s.clone().requires_grad_()
        vd = sk.logits_kl(sd, t, labels, backend="torch")
        gd, = torch.autograd.grad(vd, sd)
        p = torch.softmax(t, -1)
        ent = float(-(p * torch.log_softmax(t, -1)).sum(-1).mean())
        for k in (16, 64, 256):
            tk = sk.TopK.from_dense(t, k, kind="logits")
            kept = float(tk.probs().sum(-1).mean())
            for mode in TOPK_MODES:
                sm = s.clone().requires_grad_()
                v = sk.logits_kl(sm, tk, labels, backend="torch", topk_mode=mode)
                g, = torch.autograd.grad(v, sm)
                r = {"teacher_temp": temp, "student_drift": drift, "teacher_entropy": round(ent, 3),
                     "k": k, "kept_mass": round(kept, 4), "mode": mode,
                     "rel_err_value": float(abs(v.detach() - vd.detach()) / vd.detach()),
                     "grad_cosine": float(torch.nn.functional.cosine_similarity(g.flatten(), gd.flatten(), 0)),
                     "grad_rel_err": float((g - gd).norm() / gd.norm())}
                rows.append(r)
        print(f"temp {temp} drift {drift} (teacher entropy {ent:.2f} nats)")
        for k in (16, 64, 256):
            cells = [f"{r['mode']}: {r['rel_err_value']:.4f} / {r['grad_cosine']:.4f}"
                     for r in rows if r["teacher_temp"] == temp and r["student_drift"] == drift and r["k"] == k]
            print(f"  k={k:3d} (rel. value error / grad cosine)  " + "   ".join(cells))
    common.write_csv(os.path.join(args.out, "logits_kl_topk_quality.csv"), rows)


# ------------------------------------------------------------------------ linear (issue 13)
LINEAR_IMPLS = ("materialised", "published", "fused-dense", "fused-topk", "fused-sampled", "liger-jsd")


def _teacher_logits(T, V, g, device):
    """bf16 [T, V] teacher logits, generated in row chunks (no fp32 [T, V] temporary)."""
    import torch
    t = torch.empty(T, V, dtype=torch.bfloat16, device=device)
    step = max(1, (1 << 24) // V)
    for r in range(0, T, step):
        t[r:r + step] = torch.randn(min(step, T - r), V, generator=g, device=device) * 3
    return t


def linear_point(impl, T, Hd, V, k=256, reps=2, device="cpu", dtype="float32", chunk=None):
    """One (impl, case) measurement; runs in its own process."""
    import gc

    import torch
    import torch.nn.functional as F

    import seekr_kernels as sk
    dt = getattr(torch, dtype)
    # drawn on the device: on a GPU the CPU would take longer to draw the inputs than to run
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(T, Hd, generator=g, device=device).to(dt).requires_grad_()
    W = (torch.randn(V, Hd, generator=g, device=device) * Hd ** -0.5).to(dt).requires_grad_()
    lab = torch.randint(0, V, (T,), generator=g, device=device)
    lab[: T // 4] = -100
    teacher = th = tW = None
    if impl == "liger-jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        th = torch.randn(T, Hd, generator=g, device=device).to(dt)
        tW = (torch.randn(V, Hd, generator=g, device=device) * Hd ** -0.5).to(dt)
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=HW, weight_soft_loss=SW, beta=0.0,
                                        compiled=device == "cuda")
    else:
        teacher = _teacher_logits(T, V, g, device)
        if impl == "fused-topk":
            teacher = sk.TopK.from_dense(teacher, k, kind="logits")
        elif impl == "fused-sampled":
            teacher = sk.SampledTeacher.from_dense(teacher, k, seed=0, dtype=torch.bfloat16)
    gc.collect()
    backend = "auto" if device == "cuda" else "chunked"

    last = {}

    def step():
        if impl == "materialised":
            lg = h @ W.t()
            loss = HW * F.cross_entropy(lg, lab) + SW * sk.logits_kl(lg[None], teacher[None], lab[None])
        elif impl == "published":
            lg = h @ W.t()
            sel = torch.nonzero(lab != -100, as_tuple=True)
            s = lg[sel]
            loss = (HW * torch.nn.CrossEntropyLoss()(s, lab[sel])
                    + SW * torch.nn.CrossEntropyLoss()(s, F.softmax(teacher[sel].float(), dim=-1)))
        elif impl == "liger-jsd":
            loss = liger(h, W, th, tW, lab)
        else:
            loss = sk.linear_logits_kl(h, W, teacher, lab, hard_weight=HW, soft_weight=SW, backend=backend,
                                       chunk_size=chunk)
        loss.backward()
        h.grad = W.grad = None
        last["loss"] = loss

    peak = common.peak_mib(step, device)
    times = common.timings(step, device, warmup=0, reps=reps)
    grads_mib = (V * Hd + T * Hd) * h.element_size() / 2 ** 20
    return {"impl": impl, "T": T, "Hd": Hd, "V": V, "k": k if impl in ("fused-topk", "fused-sampled") else "",
            "dtype": dtype, "device": device, "peak_mib": round(peak, 1), "grads_mib": round(grads_mib, 1),
            "beyond_grads_mib": round(peak - grads_mib, 1), "ms": round(min(times), 1),
            "ms_median": round(statistics.median(times), 1), "loss": float(last["loss"].detach())}


def _case(text):
    """A ``--cases`` item: T x Hd x V."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected T x Hd x V as positive integers (2048x1024x128256), got {text!r}")
    return tuple(int(p) for p in parts)


def linear_cases(args):
    if args.cases:
        return list(args.cases)
    if args.gpu:
        return [(8192, 4096, 32000), (8192, 4096, 128256)]
    if args.quick:
        return [(256, 64, 2000), (256, 64, 8000)]
    return [(T, Hd, V) for (T, Hd) in ((2048, 1024), (4096, 1024), (2048, 4096)) for V in (32000, 128256)]


def linear(args):
    device = "cuda" if args.gpu else "cpu"
    dtype = "bfloat16" if args.gpu else "float32"
    impls = args.impls or LINEAR_IMPLS
    if "liger-jsd" in impls and not args.impls and importlib.util.find_spec("liger_kernel") is None:
        print("liger-kernel is not installed (pip install liger-kernel): no liger-jsd column")
        impls = [i for i in impls if i != "liger-jsd"]
    rows = []
    for T, Hd, V in linear_cases(args):
        pts = {}
        for impl in impls:
            r = common.run_point("benchmarks.bench_logits_kl", "linear_point",
                                 dict(impl=impl, T=T, Hd=Hd, V=V, k=args.k, reps=args.reps, device=device,
                                      dtype=dtype), timeout=7200, isolated=not args.quick,
                                 ident=dict(impl=impl, T=T, Hd=Hd, V=V), label=f"T={T:5d} Hd={Hd:5d} V={V:6d} {impl:>14s}:",
                                 show=lambda r: f"peak {r['peak_mib']:8.1f} MiB (beyond the gradients "
                                                f"{r['beyond_grads_mib']:8.1f})  {r['ms']:9.1f} ms  loss {r['loss']:.4f}")
            rows.append(r)
            if "error" not in r:
                pts[impl] = r
        base, lig = pts.get("materialised"), pts.get("liger-jsd")
        for name, r in pts.items():
            if base and name != "materialised":
                r["mem_x_less_than_materialised"] = round(base["peak_mib"] / max(r["peak_mib"], 1e-3), 2)
                r["time_vs_materialised"] = round(r["ms"] / max(base["ms"], 1e-3), 2)
            if lig and name.startswith("fused"):
                r["mem_x_less_than_liger"] = round(lig["peak_mib"] / max(r["peak_mib"], 1e-3), 2)
                r["time_vs_liger"] = round(r["ms"] / max(lig["ms"], 1e-3), 2)
            if "mem_x_less_than_materialised" in r:
                extra = (f"; vs Liger: memory {common.ratio(r['peak_mib'], lig['peak_mib'], 'memory', floor=0.1)}, "
                         f"time {common.ratio(r['ms'], lig['ms'], floor=1e-3)}" if "mem_x_less_than_liger" in r else "")
                print(f"    {name}: peak memory {common.ratio(r['peak_mib'], base['peak_mib'], 'memory', floor=0.1)}"
                      f" than materialised, time {common.ratio(r['ms'], base['ms'], floor=1e-3)}{extra}", flush=True)
        # after every case: a time-boxed run keeps what it measured
        common.write_csv(os.path.join(args.out, f"linear_logits_kl_{device}.csv"), rows, say=False)
    print("machine:", common.machine())
    print("wrote", os.path.join(args.out, f"linear_logits_kl_{device}.csv"))
    plot_linear(rows, os.path.join(args.out, f"linear_logits_kl_{device}.png"))
    return rows


def plot_linear(rows, path):
    """Grouped bars per (T, Hd, V) case, one bar per implementation: peak memory and time."""
    fig, axes = common.figure(2, figsize=(14, 4.5))
    if fig is None:
        return
    rows = [r for r in rows if "error" not in r]
    cases = list(dict.fromkeys((r["T"], r["Hd"], r["V"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for ax, key, title in ((axes[0], "peak_mib", "peak memory (MiB, incl. dW and dh)"),
                           (axes[1], "ms", "forward + backward (ms)")):
        series = {impl: [next((r[key] for r in rows if (r["T"], r["Hd"], r["V"]) == c and r["impl"] == impl), 0)
                         for c in cases] for impl in impls}
        common.bar_panel(ax, [f"T={T}\nHd={Hd}\nV={V}" for T, Hd, V in cases], series, title=title,
                         legend=ax is axes[0])
    common.save(fig, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=["linear", "logits", "topk-quality"], default="linear")
    ap.add_argument("--topk-quality", action="store_true", help="same as --section topk-quality")
    ap.add_argument("--cases", nargs="+", metavar="TxHdxV", default=None, type=_case,
                    help="linear section: these cases instead (e.g. 2048x1024x128256)")
    ap.add_argument("--gpu", action="store_true", help="CUDA: triton backend, bf16")
    ap.add_argument("--impls", nargs="+", choices=LINEAR_IMPLS, default=None)
    ap.add_argument("--N", type=int, default=2)
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--k", type=int, default=None, help="TopK / sampled k (linear: 256, logits: 64)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--rows", type=int, default=256, help="token rows for topk-quality")
    common.add_common_args(ap)
    args = ap.parse_args()
    if args.topk_quality:
        args.section = "topk-quality"
    args.out = common.out_dir(args)
    if args.section == "linear":
        args.k = args.k or (16 if args.quick else 256)
        args.reps = args.reps or (1 if args.quick else 2)
        linear(args)
    elif args.section == "logits":
        args.k = args.k or (16 if args.quick else 64)
        args.reps = args.reps or (1 if args.quick else 5)
        bench(args)
    else:
        topk_quality(args)


if __name__ == "__main__":
    main()
