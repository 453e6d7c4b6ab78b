"""Autotuning of the Triton attention-KL kernels on CUDA: what the tuner picks and gains.

Per (dtype, head dim D, length L) at Llama-2-7B attention shapes (B = 1, H = 32 heads,
S = 4 selected heads, all L query rows, a [B, S, L, L] teacher in the input dtype):

* fwd+bwd time with SEEKR_AUTOTUNE=0 (the fixed default tiles) and with autotuning on
  (after the first call, which tunes: its wall time is reported as tune_s);
* forward-only time (tuned) and the forward's teacher-read bandwidth, teacher bytes /
  forward time, against this device's copy bandwidth (bytes read + written by a large
  device-to-device copy) -- the target is >= 50% of it;
* the tiles the tuner chose; every candidate's time goes to a second CSV.

    python -m benchmarks.bench_autotune --out OUT        # CUDA
    python -m benchmarks.bench_autotune --quick          # CPU interpreter, tiny: the code path only

Writes autotune_<device>.csv and autotune_candidates_<device>.csv into --out (default
./bench-out/; rewritten after every point, so a time-boxed run keeps what it finished).
Times: common.timings, the median of --reps calls after one warm-up call (which compiles,
and tunes when on); on CUDA event-timed, as the tuner itself times its candidates.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchmarks import common


def _time_ms(fn, device, reps):
    """Median ms of fn() after one warm-up call (which compiles, and tunes when on)."""
    return statistics.median(common.timings(fn, device, warmup=1, reps=reps))


def copy_gbps(device, nbytes=2 << 30, reps=10):
    """Device-to-device copy: (bytes read + bytes written) / time."""
    import torch
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), device, reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def point(dtype, D, L, device="cuda", H=32, S=4, reps=10):
    """One (dtype, D, L) measurement; returns the CSV row."""
    import torch

    import seekr_kernels as sk
    from seekr_kernels import reference
    from seekr_kernels._checks import check_attention_args
    from seekr_kernels.triton import _configs

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(L + D)
    q = torch.randn(1, H, L, D, generator=g).to(device, dt).requires_grad_()
    k = torch.randn(1, H, L, D, generator=g).to(device, dt).requires_grad_()
    heads = torch.tensor([3, 9, 17, 30][:S], device=device)
    mask = torch.ones(1, L, dtype=torch.long, device=device)
    with torch.no_grad():
        tq = torch.randn(1, H, L, D, generator=g).to(device, dt)
        teacher = reference.attention_probs(check_attention_args(tq, k.detach(), heads, None, mask), dt)
    del tq

    def fwd():
        return sk.attention_kl(q, k, teacher, heads, None, mask, backend="triton", check_values=False)

    def step():
        q.grad = k.grad = None
        fwd().backward()

    row = {"dtype": dtype, "D": D, "L": L, "H": H, "S": S, "device": device}
    os.environ["SEEKR_AUTOTUNE"] = "0"
    row["fixed_ms"] = round(_time_ms(step, device, reps), 3)
    with torch.no_grad():
        row["fixed_fwd_ms"] = round(_time_ms(fwd, device, reps), 3)
    os.environ["SEEKR_AUTOTUNE"] = "1"
    n_log = len(_configs.TUNING_LOG)
    t0 = time.perf_counter()
    step()                                     # tunes fwd, dq and dk (first call per key)
    if device == "cuda":
        torch.cuda.synchronize()
    row["tune_s"] = round(time.perf_counter() - t0, 2)
    row["tuned_ms"] = round(_time_ms(step, device, reps), 3)
    with torch.no_grad():
        row["tuned_fwd_ms"] = round(_time_ms(fwd, device, reps), 3)
    row["speedup"] = round(row["fixed_ms"] / row["tuned_ms"], 3)
    tb = teacher.numel() * teacher.element_size()
    row["teacher_mb"] = round(tb / 2**20, 1)
    row["teacher_gbps"] = round(tb / (row["tuned_fwd_ms"] * 1e-3) / 1e9, 1)
    new = [e for e in _configs.TUNING_LOG[n_log:] if "best" in e]
    for e in new:
        row[f"{e['key'][0].replace('attention_kl_', '')}_tile"] = "x".join(map(str, e["best"]))
    cands = []
    for e in _configs.TUNING_LOG[n_log:]:
        if "best" in e:
            for tile, ms in e["ms"].items():
                cands.append({"kernel": e["key"][0], "dtype": dtype, "D": D, "L": L,
                              "tile": "x".join(map(str, tile)), "ms": round(ms, 4) if ms != float("inf") else "",
                              "chosen": tuple(tile) == tuple(e["best"])})
        else:
            cands.append({"kernel": e["key"][0], "dtype": dtype, "D": D, "L": L,
                          "tile": "x".join(map(str, e["tile"])), "ms": "", "chosen": False, "error": e["error"]})
    return row, cands


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=10)
    common.add_common_args(ap)          # --quick: CPU interpreter, L = 64, D = 16: the code path only
    args = ap.parse_args()
    out = common.out_dir(args)
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"
        device, lengths, dims, reps = "cpu", [64], [16], 1
    else:
        device, lengths, dims, reps = "cuda", args.lengths, args.head_dims, args.reps
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_autotune: needs a CUDA device (or --quick)")
    print(f"machine: {common.machine()}")
    bw = copy_gbps(device) if device == "cuda" else float("nan")
    print(f"device copy bandwidth (read + write): {bw:.0f} GB/s")
    rows, cands = [], []
    for dtype in args.dtypes:
        for D in dims:
            for L in lengths:
                row, c = point(dtype, D, L, device, reps=reps)
                row["copy_gbps"] = round(bw, 1)
                row["teacher_pct_of_copy"] = round(100 * row["teacher_gbps"] / bw, 1) if bw == bw else ""
                rows.append(row)
                cands += c
                print(f"{dtype:8s} D={D:3d} L={L:5d}: fixed {row['fixed_ms']:8.3f} ms  tuned {row['tuned_ms']:8.3f} ms "
                      f"({common.ratio(row['tuned_ms'], row['fixed_ms'])}, tuning {row['tune_s']:.1f} s)  "
                      f"fwd {row['tuned_fwd_ms']:.3f} ms, "
                      f"teacher {row['teacher_gbps']:.0f} GB/s = {row['teacher_pct_of_copy']}% of copy  "
                      f"tiles fwd {row.get('fwd_tile')} dq {row.get('dq_tile')} dk {row.get('dk_tile')}")
                common.write_csv(os.path.join(out, f"autotune_{device}.csv"), rows, say=False)
                common.write_csv(os.path.join(out, f"autotune_candidates_{device}.csv"), cands, say=False)
    print(f"wrote {os.path.join(out, f'autotune_{device}.csv')}, autotune_candidates_{device}.csv")


if __name__ == "__main__":
    main()
