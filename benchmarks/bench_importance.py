"""Time and peak memory of SEEKR's head-importance statistics, fused vs the published way.

Three parts:

1. ``kernels``: one attention layer at Llama-2-7B shapes (H = Hkv = 32, D = 128, B = 1),
   sequence length L:
   * task sensitivity — published: materialise dL/dA = dO V^T ([H, L, L], what autograd
     holds for eager attention) and take the mean of squares; fused:
     ``attention_grad_sq_sums`` (Frobenius <dO^T dO, V^T V>, and the blockwise causal
     variant), O(L D^2), no [L, L];
   * forgettability — published: full [H, L, L] softmax of both models, index the Q query
     rows, mean of squared differences; fused: ``attention_sqdiff`` (triton on CUDA,
     the slot-chunked torch path on CPU) over all H heads at the Q rows.
2. ``host``: host memory of forgettability at Llama-2-7B shapes (32 layers x 32 heads,
   50 samples, L = 1024, Q = 100, bf16): the arithmetic, then a measurement at exactly
   those layer shapes with synthetic q/k: the published way stores every head's rows of
   every layer per sample (measured for 1 and 2 samples, extrapolated to 50); ours holds
   one sample's pre-task k + q rows of all 32 layers on the host (``store="cpu"``, the
   worst case) while streaming the post-task layers through attention_sqdiff.
3. ``e2e`` (``--e2e``, slower): the real ``measure_forgettability`` with two patched
   2-layer models of Llama-2-7B layer shapes (vocabulary cut to 512 to keep weights
   small) against the published capture of every head's rows to the host.

    python -m benchmarks.bench_importance               # CPU, L in 256 512 1024
    python -m benchmarks.bench_importance --e2e         # + end-to-end pass (minutes)
    python -m benchmarks.bench_importance --gpu         # CUDA: bf16, triton, L up to 4096
    python -m benchmarks.bench_importance --quick       # L = 128; host part at 2 layers, L = 256

Every point runs in a fresh subprocess (peak memory: see common.py). Writes
importance_<device>.csv, importance_host.csv and importance_<device>.png into --out
(default ./bench-out/; the committed numbers: --out benchmarks/results).
"""
from __future__ import annotations

import argparse
import os

from benchmarks import common

H, D = 32, 128
LLAMA7B = dict(layers=32, heads=32, kv_heads=32, head_dim=128, samples=50, L=1024, Q=100, bytes=2)


# ============================================================================ 1. kernels

def _qk(L, dtype, device, seed=0, n=4):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, H, L, D, generator=g) * 0.5).to(device=device, dtype=dtype) for _ in range(n)]


def sens_point(method, L, dtype="float32", device="cpu", reps=3):
    import torch

    from seekr_kernels.seekr.importance import attention_grad_sq_sums
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    dO = torch.randn(1, L, H, D, generator=g).to(device=device, dtype=dt)
    v = torch.randn(1, H, L, D, generator=g).to(device=device, dtype=dt)

    def published():
        gA = dO.transpose(1, 2).float() @ v.float().transpose(-1, -2)     # dL/dA [1, H, L, L]
        return (gA ** 2).mean((2, 3))

    def fused(region):
        return lambda: attention_grad_sq_sums(dO, v, None, region)[0] / (L * L if region == "full" else L * (L + 1) / 2)

    fn = published if method == "published" else fused(method.split("-")[1])
    peak, ms = common.measure(fn, device=device, warmup=1, reps=reps)
    out = fn()
    ref = published() if method == "fused-full" else None
    err = None if ref is None else float(((out - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    return {"stat": "sensitivity", "method": method, "L": L, "Q": L, "dtype": dtype, "device": device,
            "ms": round(ms, 3), "peak_mib": round(peak, 1), "max_rel_err_vs_published": err}


def forget_point(method, L, Q=100, dtype="float32", device="cpu", reps=3):
    import torch

    from seekr_kernels.ops.attention_sqdiff import attention_sqdiff
    dt = getattr(torch, dtype)
    qa, ka, qb, kb = _qk(L, dt, device)
    qb = qa + 0.1 * qb
    kb = ka + 0.1 * kb
    g = torch.Generator().manual_seed(1)
    queries = torch.sort(torch.randperm(L, generator=g)[:Q]).values[None].to(device)
    heads = torch.arange(H, device=device)

    def published():
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()

        def probs(q, k):
            z = (q @ k.transpose(-1, -2)).float() * D ** -0.5
            return torch.softmax(z.masked_fill(~causal, torch.finfo(torch.float32).min), -1).to(dt)
        a = probs(qa, ka)[:, :, queries[0]]
        b = probs(qb, kb)[:, :, queries[0]]
        return ((a.float() - b.float()) ** 2).mean((2, 3))              # [1, H]

    def fused():
        return attention_sqdiff(qa, ka, qb, kb, heads, queries, scale=D ** -0.5, backend=method,
                                check_values=False).sum(2) / (Q * L)

    fn = published if method == "published" else fused
    peak, ms = common.measure(fn, device=device, warmup=1, reps=reps)
    out = fn()
    ref = published()
    err = float(((out - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    return {"stat": "forgettability", "method": method, "L": L, "Q": Q, "dtype": dtype, "device": device,
            "ms": round(ms, 3), "peak_mib": round(peak, 1), "max_rel_err_vs_published": err}


# ============================================================================ 2. host memory

def host_arithmetic(c=LLAMA7B):
    """Bytes at Llama-2-7B shapes (``LLAMA7B``), by formula."""
    rows = c["samples"] * c["layers"] * c["heads"] * c["Q"] * c["L"] * c["bytes"]
    rows_all = c["samples"] * c["layers"] * c["heads"] * c["L"] * c["L"] * c["bytes"]
    k_layer = c["L"] * c["kv_heads"] * c["head_dim"] * c["bytes"]
    q_rows_layer = c["Q"] * c["heads"] * c["head_dim"] * c["bytes"]
    qk_all = c["samples"] * c["layers"] * (k_layer + q_rows_layer)
    stash_sample = c["layers"] * (k_layer + q_rows_layer)
    acc = c["layers"] * c["heads"] * 8 * 2
    return {
        "published_before_rows": rows, "published_before_plus_after_rows": 2 * rows,
        "published_all_rows_before": rows_all, "store_all_pretask_qk": qk_all,
        "ours_stash_per_sample": stash_sample, "ours_accumulators": acc,
    }


def host_point(method, samples, layers=32, L=1024, Q=100):
    """Peak host memory of the forgettability bookkeeping at Llama-2-7B layer shapes."""
    import torch

    from seekr_kernels.ops.attention_sqdiff import attention_sqdiff
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    queries = torch.sort(torch.randperm(L, generator=g)[:Q]).values[None]
    heads = torch.arange(H)
    # Activations of one layer are regenerated from a seed rather than kept: in the real
    # flow they come out of the model's forward, which holds them only for that layer.
    def layer_qk(s, l, which):
        gg = torch.Generator().manual_seed(s * 1000 + l * 2 + which)
        q = (torch.randn(1, H, L, D, generator=gg) * 0.5).to(dt)
        k = (torch.randn(1, H, L, D, generator=gg) * 0.5).to(dt)
        return q, k

    stored = 0
    with common.peak_memory() as peak:
        if method == "published":
            keep = []     # pre-task rows of every head, layer and sample (bf16), until the task ends
            for s in range(samples):
                for l in range(layers):
                    q, k = layer_qk(s, l, 0)
                    z = (q[:, :, queries[0]].float() @ k.float().transpose(-1, -2)) * D ** -0.5
                    causal = torch.arange(L)[None, :] <= queries[0][:, None]
                    keep.append(torch.softmax(z.masked_fill(~causal, float("-inf")), -1).to(dt))
                    del q, k, z
            stored = sum(t.numel() * t.element_size() for t in keep)
        else:
            acc = torch.zeros(layers, H, dtype=torch.float64)
            for s in range(samples):
                stash = {}
                for l in range(layers):          # pass over model_before: keep k + q rows per layer
                    q, k = layer_qk(s, l, 0)
                    stash[l] = (q[:, :, queries[0]].clone(), k)
                    del q
                stored = max(stored, sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                                         for a, b in stash.values()))
                for l in range(layers):          # pass over model_after: stream and drop
                    q_rows, k_a = stash.pop(l)
                    q_b, k_b = layer_qk(s, l, 1)
                    q_a = torch.zeros_like(q_b)
                    q_a[:, :, queries[0]] = q_rows
                    rows = attention_sqdiff(q_a, k_a, q_b, k_b, heads, queries, backend="torch", check_values=False)
                    acc[l] += rows[0].double().sum(1) / (Q * L)
                    del q_rows, k_a, q_b, k_b, q_a, rows
    return {"method": method, "samples": samples, "layers": layers, "L": L, "Q": Q,
            "stored_mib": round(stored / 2**20, 1), "peak_host_mib": round(peak.mib, 1)}


# ============================================================================ 3. end to end

def e2e_point(method, samples=2, L=512, Q=100, layers=2):
    import copy
    import time
    import warnings

    import torch
    import transformers

    import seekr_kernels as sk
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=H * D, intermediate_size=4096, num_hidden_layers=layers,
                                   num_attention_heads=H, num_key_value_heads=H, vocab_size=512,
                                   max_position_embeddings=max(L, 1024))
    before = transformers.LlamaForCausalLM(cfg).eval()
    before.set_attn_implementation("sdpa")
    after = copy.deepcopy(before)
    with torch.no_grad():
        for p in after.parameters():
            p.mul_(1.01)
    before, after = sk.patch_llama(before), sk.patch_llama(after)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(samples):
        ids = torch.randint(0, 512, (1, L), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones(1, L, dtype=torch.long),
                        "queries": torch.sort(torch.randperm(L, generator=g)[:Q]).values[None]})
    with common.peak_memory() as peak:
        t0 = time.perf_counter()
        if method == "published":
            heads = {l: torch.arange(H) for l in range(layers)}
            stored = []
            for model in (before, after):
                for b in batches:
                    with torch.no_grad(), sk.capture_attention(model, heads, b["queries"], b["attention_mask"],
                                                               dtype=torch.bfloat16, device="cpu",
                                                               backend="torch") as c:
                        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                    stored.append(c.rows)
            nbytes = sum(r.numel() * r.element_size() for d in stored for r in d.values())
        else:
            meter = sk.seekr.importance.ForgettabilityMeter(store="cpu", backend="torch")
            for b in batches:
                meter.update(before, after, b)
            nbytes = meter.peak_stored_bytes
        sec = time.perf_counter() - t0
    return {"method": method, "samples": samples, "layers": layers, "L": L, "Q": Q,
            "stored_mib": round(nbytes / 2**20, 1), "peak_host_mib": round(peak.mib, 1), "seconds": round(sec, 2)}


# ============================================================================ main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_sweep_args(ap, "run the kernel part on CUDA (bf16, triton)", reps=7)
    ap.add_argument("--skip-host", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="also run the end-to-end forgettability pass")
    common.add_common_args(ap)
    args = ap.parse_args()
    out = common.out_dir(args)
    device, dtype, lengths, reps = common.sweep(args, cpu_lengths=[256, 512, 1024], gpu_lengths=[1024, 2048, 4096])
    print(f"machine: {common.machine()}")
    if args.skip_kernels:
        lengths = []
    stats = {"sensitivity": ("sens_point", ["published", "fused-full", "fused-causal"]),
             "forgettability": ("forget_point", ["published", "triton" if args.gpu else "torch"])}
    rows = [common.run_point("benchmarks.bench_importance", func, dict(method=m, L=L, dtype=dtype, device=device,
                                                                       reps=reps),
                             ident=dict(stat=stat, method=m, L=L), label=f"{stat:15s} L={L:5d} {m:13s}",
                             show=_show_kernel, isolated=not args.quick)
            for L in lengths for stat, (func, methods) in stats.items() for m in methods]
    if rows:
        common.write_csv(os.path.join(out, f"importance_{device}.csv"), rows)
        _ratios(rows)
        common.plot_lines(os.path.join(out, f"importance_{device}.png"), rows, x="L", xlabel="sequence length L",
                          panels=[dict(y="peak_mib", floor=0.1, where=lambda r, s=stat: r["stat"] == s,
                                       title=f"{stat}: peak extra memory (MiB), one layer") for stat in stats])

    if args.skip_host:
        return
    print("\nhost memory of forgettability at Llama-2-7B shapes "
          "(32 layers x 32 heads, 50 samples, L=1024, Q=100, bf16), by formula:")
    ar = host_arithmetic()
    for k, v in ar.items():
        print(f"  {k:36s} {v / 2**30:10.3f} GiB")
    host_rows = [{"kind": "formula", "method": k, "bytes": v} for k, v in ar.items()]
    # glibc raises its mmap threshold after freeing large blocks, after which freed tensors
    # stay in the heap and RSS over-reports live memory by hundreds of MiB at random; a
    # fixed threshold keeps large tensors mmap-backed so the peak follows what is alive.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    host = dict(layers=2, L=256, Q=32) if args.quick else dict(layers=32, L=1024, Q=100)
    shapes = "--quick: 2 layers, L=256, Q=32" if args.quick else "those layer shapes"
    print(f"measured (synthetic q/k at {shapes}, fresh process each, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}):")
    meas = {}
    for m in ("published", "ours"):
        for n in (1, 2):
            r = common.run_point("benchmarks.bench_importance", "host_point", dict(method=m, samples=n, **host),
                                 ident=dict(kind="measured", method=m, samples=n), label=f"  {m:10s} samples={n}:",
                                 show=lambda r: f"stored {r['stored_mib']:8.1f} MiB, "
                                                f"peak host {r['peak_host_mib']:8.1f} MiB",
                                 isolated=not args.quick)
            host_rows.append(r)
            meas[(m, n)] = r
    if all("error" not in meas.get((m, n), {"error": 1}) for m in ("published", "ours") for n in (1, 2)):
        # The stored bytes grow exactly linearly; the peak's own slope is noisy (allocator
        # fragmentation), so extrapolate peak(1 sample) + 49 x stored bytes per sample.
        per = meas[("published", 2)]["stored_mib"] - meas[("published", 1)]["stored_mib"]
        pub50 = meas[("published", 1)]["peak_host_mib"] + 49 * per
        ours = max(meas[("ours", 1)]["peak_host_mib"], meas[("ours", 2)]["peak_host_mib"])
        print(f"  extrapolated to 50 samples: published {pub50 / 1024:.2f} GiB (pre-task rows only; the "
              f"post-task rows double it), ours {ours:.0f} MiB, flat in the number of samples "
              f"(stash on the host, the worst case): ours {common.ratio(ours, pub50, 'memory', 0, floor=1)}")
        host_rows.append({"kind": "extrapolated", "method": "published", "samples": 50,
                          "peak_host_mib": round(pub50, 1)})
        host_rows.append({"kind": "extrapolated", "method": "ours", "samples": 50, "peak_host_mib": round(ours, 1)})
    if args.e2e:
        e2e = dict(L=128, Q=32, samples=1) if args.quick else dict(L=512, Q=100, samples=2)
        print(f"end to end (2 patched layers of Llama-2-7B shape, vocab 512, L={e2e['L']}, Q={e2e['Q']}, "
              f"{e2e['samples']} samples):")
        for m in ("published", "ours"):
            host_rows.append(common.run_point(
                "benchmarks.bench_importance", "e2e_point", dict(method=m, **e2e), timeout=1800,
                ident=dict(kind="e2e", method=m), label=f"  {m:10s}:", isolated=not args.quick,
                show=lambda r: f"stored {r['stored_mib']:8.1f} MiB, peak host {r['peak_host_mib']:8.1f} MiB, "
                               f"{r['seconds']:.1f} s"))
    common.write_csv(os.path.join(out, "importance_host.csv"), host_rows)


def _show_kernel(r):
    err = r.get("max_rel_err_vs_published")
    e = "" if err is None else f"  max rel err vs published {err:.1e}"
    return f"{r['ms']:10.2f} ms {r['peak_mib']:9.1f} MiB{e}"


def _ratios(rows):
    ok = {(r["stat"], r["method"], r["L"]): r for r in rows if "error" not in r}
    print("\nratios: the fused way against the published one")
    for (stat, m, L), r in sorted(ok.items(), key=lambda x: (x[0][0], x[0][2], x[0][1])):
        if m == "published":
            continue
        b = ok.get((stat, "published", L))
        if b:
            print(f"  {stat:15s} {m:13s} L={L:5d}: {common.time_and_memory(r, b)}")


if __name__ == "__main__":
    main()
