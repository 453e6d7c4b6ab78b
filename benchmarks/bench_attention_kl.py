"""Forward + backward time and peak memory of the fused attention-KL loss.

Compared at Llama-2-7B attention shapes (H = 32, D = 128, S = 4 selected heads, B = 1)
against
  (a) `eager`: what the published SEEKR code does — eager attention for all H heads
      ([B, H, L, L], fp32 softmax), index_select of heads and rows, log(p + 1e-8),
      KLDivLoss('batchmean') per sample, divided by B;
  (b) `torch-selected`: plain PyTorch on the selected heads only ([B, S, Q, L]);
  (c) `sdpa` (--gpu): plain scaled_dot_product_attention fwd+bwd of all H heads (with a
      value tensor), i.e. the attention the distillation loss rides along with.

    python -m benchmarks.bench_attention_kl              # CPU: L in 512, 1024, 2048
    python -m benchmarks.bench_attention_kl --gpu        # CUDA: bf16, L up to 8192
    python -m benchmarks.bench_attention_kl --quick      # L = 128, one repetition (seconds)

Each point runs in a fresh subprocess (see common.py for how time and peak memory are
measured).
Writes attention_kl_<device>.csv and .png into --out (default ./bench-out/; the committed
numbers: --out benchmarks/results) and prints the ratios.
"""
from __future__ import annotations

import argparse
import os

from benchmarks import common


def _inputs(L, Q, H, D, S, dtype, device):
    import torch

    from seekr_kernels import reference
    from seekr_kernels._checks import check_attention_args

    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, H, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    k = torch.randn(1, H, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    heads = torch.tensor([3, 9, 17, 30], device=device)[:S]
    queries = None if Q >= L else torch.sort(torch.randperm(L, generator=g)[:Q]).values[None].to(device)
    mask = torch.ones(1, L, dtype=torch.long, device=device)
    with torch.no_grad():
        tq = torch.randn(1, H, L, D, generator=g).to(device=device, dtype=dtype)
        ta = check_attention_args(tq, k.detach(), heads, queries, mask)
        teacher = reference.attention_probs(ta, dtype)
    return q, k, teacher, heads, queries, mask


def eager_published(q, k, teacher, heads, queries, mask):
    import torch

    B, H, L, D = q.shape
    z = (q @ k.transpose(-1, -2)).float() * D ** -0.5
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    z = z.masked_fill(~(causal & mask.bool()[:, None, None, :]), torch.finfo(torch.float32).min)
    p = torch.softmax(z, dim=-1)
    sel = p.index_select(1, heads)
    if queries is not None:
        sel = sel.index_select(2, queries[0])
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    loss = sum(kl(torch.log(sel[b] + 1e-8).flatten(0, 1), teacher[b].float().flatten(0, 1))
               for b in range(B)) / B
    return loss


def point(method, L, Q, H=32, D=128, S=4, dtype="float32", device="cpu", reps=3):
    """One measurement, run inside a fresh process."""
    import torch

    import seekr_kernels as sk

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    q, k, teacher, heads, queries, mask = _inputs(L, Q, H, D, S, dt, device)

    v = torch.randn_like(k).requires_grad_() if method == "sdpa" else None

    def step():
        q.grad = k.grad = None
        if method == "eager":
            loss = eager_published(q, k, teacher, heads, queries, mask)
        elif method == "sdpa":
            loss = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float().square().mean()
        else:
            backend = "torch" if method == "torch-selected" else method
            loss = sk.attention_kl(q, k, teacher, heads, queries, mask, backend=backend,
                                   check_values=False)
        loss.backward()
        return loss

    peak, ms = common.measure(step, device=device, warmup=1, reps=reps)
    loss = float(step())
    rows = S * min(Q, L)
    # Keys a row sees: all-rows causal -> (L + 1) / 2 on average; a random subset likewise.
    visible = (L + 1) / 2
    flops = 3 * 2 * rows * visible * D   # z = qk^T, dq = dz k, dk = dz^T q (recomputes not counted)
    return {"method": method, "L": L, "Q": min(Q, L), "H": H, "D": D, "S": S, "dtype": dtype,
            "device": device, "ms": round(ms, 3), "peak_mib": round(peak, 1),
            "gflops": round(flops / (ms * 1e-3) / 1e9, 2), "loss": loss}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_sweep_args(ap, "run on CUDA (bf16, L up to 8192)", reps=3)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--queries", type=int, nargs="*", default=None,
                    help="query rows per sample, 0 = all L (default: 100 and all; --quick 32 and all)")
    common.add_common_args(ap)
    args = ap.parse_args()
    out = common.out_dir(args)
    device, dtype, lengths, reps = common.sweep(args, cpu_lengths=[512, 1024, 2048],
                                                gpu_lengths=[1024, 2048, 4096, 8192])

    import torch

    from seekr_kernels import _backend
    q_few = 32 if args.quick else 100      # the "few query rows" point; the other is Q = L
    if args.methods:
        methods = args.methods
    else:
        methods = ["eager", "torch-selected"] + (["sdpa"] if args.gpu else [])
        for b in (["triton", "cuda"] if args.gpu else ["cpu"]):
            if _backend.available(b, torch.device(device))[0]:
                methods.append(b)
    print(f"machine: {common.machine()}")
    mm = common.matmul_gflops(device, getattr(torch, dtype), n=256 if args.quick else 1024,
                              reps=2 if args.quick else 20)
    n = 256 if args.quick else 1024
    print(f"torch.matmul [{n}x128]x[128x{n}] {dtype}: {mm:.1f} GFLOP/s")
    rows = [common.run_point("benchmarks.bench_attention_kl", "point",
                             dict(method=m, L=L, Q=Q, dtype=dtype, device=device, reps=reps),
                             ident=dict(method=m, L=L, Q=min(Q, L), matmul_gflops=round(mm, 1)),
                             label=f"L={L:5d} Q={min(Q, L):5d} {m:15s}", isolated=not args.quick,
                             show=lambda r: f"{r['ms']:10.2f} ms {r['peak_mib']:10.1f} MiB "
                                            f"{r['gflops']:8.2f} GFLOP/s  loss={r['loss']:.5f}")
            for L in lengths for Q in ([q or L for q in args.queries] if args.queries else (q_few, L))
            for m in methods]
    common.write_csv(os.path.join(out, f"attention_kl_{device}.csv"), rows)
    _ratios(rows, [m for m in methods if m not in ("eager", "torch-selected", "sdpa")])
    common.plot_lines(os.path.join(out, f"attention_kl_{device}.png"), [r for r in rows if r["Q"] == r["L"]],
                      x="L", xlabel="sequence length L (Q = L)",
                      panels=[dict(y="ms", title="fwd+bwd time (ms)"),
                              dict(y="peak_mib", floor=0.1, title="peak extra memory (MiB)")])


def _ratios(rows, fused):
    ok = {(r["method"], r["L"], r["Q"]): r for r in rows if "error" not in r}
    print("\nratios: the fused backend against each baseline")
    for f in fused:
        for (m, L, Q), r in sorted(ok.items(), key=lambda x: (x[0][1], x[0][2])):
            if m != f:
                continue
            for base in ("eager", "torch-selected", "sdpa"):
                b = ok.get((base, L, Q))
                if b:
                    print(f"  {f:7s} vs {base:15s} L={L:5d} Q={Q:5d}: {common.time_and_memory(r, b)}")

if __name__ == "__main__":
    main()
