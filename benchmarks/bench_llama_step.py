"""One SEEKR replay training step (forward + backward) of a Llama model, three ways.

  patched    this project: sk.patch_llama + sk.distill_attention; the attention output
             comes from SDPA, the attention-KL of the distilled heads from the fused
             op on each layer's post-RoPE q and k (backend "auto": the C++ kernels on CPU,
             Triton on CUDA).
  published  the published SEEKR way: eager attention with output_attentions=True (every
             layer keeps its [B, H, L, L] probabilities for backward), then per distilled
             layer index heads and rows, log(p + 1e-8), KLDivLoss('batchmean') per sample
             / B (seekr_kernels.reference.published_attention_kl), mean over layers.
  plain      SDPA with no distillation: the floor the patched step is compared with.

Every step is loss = CE(next token) + beta * attention loss (beta = 1e3, the official
default), then backward. All layers are distilled, S heads each, Q query rows (default
all L rows: the most work for the fused op; SEEKR's query budget makes Q smaller).

CPU (default): Llama-2-7B *attention* shapes (H = 32 heads of D = 128) on a narrow
residual stream (hidden 256, MLP 512, 4 layers, vocab 1024, B = 1, fp32) so that a step
takes seconds on a laptop-class CPU while the attention part -- what the three variants
differ in -- has the real size. L in 256, 512, 1024.

    python -m benchmarks.bench_llama_step                  # CPU
    python -m benchmarks.bench_llama_step --gpu            # CUDA, bf16, Llama-2-7B layers
    python -m benchmarks.bench_llama_step --quick          # tiny model (QUICK_SHAPE), L = 128

--gpu: Llama-2-7B layer shapes (hidden 4096, MLP 11008, H = 32, D = 128, vocab 32000),
4 layers, bf16 weights, L in 1024, 2048, 4096.

--real: the real pretrained SmolLM2-135M-Instruct (``python -m seekr_kernels.assets
smollm2``; 30 layers, 9 heads / 3 KV heads, D = 64, vocab 49152, tied embeddings; fp32 on
CPU, bf16 with --gpu), all its weights trained, L in 512, 1024, 2048 (the model's
positions reach 8192), batch --batch (default 1). Distilled: as many layers and heads as
the package's default budgets select for this shape (distill.layer_budget = 3/4 of the
layers = 22, distill.head_budget = 1/8 of the heads = 33), placed at random (seeded) --
the step's cost depends on how many heads each layer distils, not on which -- and --queries
rows per sample (default all L; SEEKR's default query budget is 100). The input is random
tokens and the teacher rows random causal softmax rows: the work is the same as with real
text and captured rows. Writes llama_step_<device>_real.csv / .png. On a CPU a step at
L = 2048 takes about a minute: ``--one-step`` times the one step each fresh-process memory
run measures instead of separate interleaved rounds (half the cost; one step per point).

Peak memory: each (variant, L) runs in a fresh subprocess (common.run_isolated). It builds
the model, the batch and the teacher, runs one warm-up step (allocating the .grad buffers
and any one-time state), then measures one step with common.peak_mib (RSS high-water
mark, VmHWM, reset through /proc/self/clear_refs, minus RSS before): the step's peak
extra memory, activations saved for backward and temporaries. glibc's mmap threshold is
pinned (MALLOC_MMAP_THRESHOLD_) so that every large tensor is its own mmap, returned to
the OS when freed: otherwise memory freed by the warm-up step would be reused from the
heap without raising RSS, and the delta would read low. On CUDA:
torch.cuda.max_memory_allocated over the step, minus what was allocated before it.

Writes llama_step_<device>.csv and .png into --out (default ./bench-out/; the committed
numbers: --out benchmarks/results) and prints the ratios against the targets (CPU:
patched <= 1.5x plain time and >= 3x less peak memory than published at L = 1024; GPU:
patched <= 1.15x plain time).
"""
from __future__ import annotations

import argparse
import os

from benchmarks import common

BETA = 1e3

CPU_SHAPE = dict(hidden=256, mlp=512, layers=4, heads=32, kv_heads=32, head_dim=128, vocab=1024,
                 dtype="float32")
GPU_SHAPE = dict(hidden=4096, mlp=11008, layers=4, heads=32, kv_heads=32, head_dim=128, vocab=32000,
                 dtype="bfloat16")
# SmolLM2-135M-Instruct (the --real model; the numbers are read back from its config).
REAL_SHAPE = dict(hidden=576, mlp=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152, real=True)
QUICK_SHAPE = dict(hidden=64, mlp=128, layers=2, heads=8, kv_heads=8, head_dim=32, vocab=256)


def _shape(device, quick=False, real=False):
    if real:
        return dict(REAL_SHAPE, dtype="bfloat16" if device == "cuda" else "float32")
    if quick:       # a smoke run: every variant's code path, at a size where it takes ms
        return dict(QUICK_SHAPE, dtype="bfloat16" if device == "cuda" else "float32")
    return GPU_SHAPE if device == "cuda" else CPU_SHAPE


def _model(L, shape, device):
    """The model of a run: a random-initialised one of ``shape`` or, for --real, SmolLM2."""
    import torch
    import transformers

    dtype = getattr(torch, shape["dtype"])
    if shape.get("real"):
        from seekr_kernels.assets import smollm2_path
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype).to(device)
        model.config.use_cache = False
        return model.train()
    cfg = transformers.LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
        vocab_size=shape["vocab"], max_position_embeddings=max(L, 128), use_cache=False)
    # Initialised where it runs: on CUDA a 7B-shaped model's CPU init costs more than its steps.
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype=dtype).train()


def default_heads(n_layers, n_heads, generator):
    """{layer: head indices} of the size the package's default budgets give a model of this
    shape (SeekrRecipe: 3/4 of the layers, 1/8 of all heads), placed at random over
    layer_budget random layers."""
    import torch
    lb = max(1, round(0.75 * n_layers))
    hb = max(1, (n_layers * n_heads) // 8)
    layers = torch.randperm(n_layers, generator=generator)[:lb]
    cells = torch.randperm(lb * n_heads, generator=generator)[:hb]
    out = {}
    for c in sorted(cells.tolist()):
        out.setdefault(int(layers[c // n_heads]), []).append(c % n_heads)
    return {l: torch.tensor(sorted(h)) for l, h in sorted(out.items())}


def _build(L, Q, S, shape, device, seed=0, batch=1):
    import torch

    torch.manual_seed(seed)
    dtype = getattr(torch, shape["dtype"])
    model = _model(L, shape, device)
    g = torch.Generator().manual_seed(seed + 1)
    B = batch
    ids = torch.randint(0, shape["vocab"], (B, L), generator=g).to(device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    if shape.get("real"):
        heads = {l: h.to(device) for l, h in default_heads(shape["layers"], shape["heads"], g).items()}
    else:
        heads = {l: torch.randperm(shape["heads"], generator=g)[:S].to(device) for l in range(shape["layers"])}
    queries = None if Q >= L else torch.stack(
        [torch.sort(torch.randperm(L, generator=g)[:Q]).values for _ in range(B)]).to(device)
    Qn = L if queries is None else Q
    qpos = torch.arange(L).expand(B, L) if queries is None else queries.cpu()
    valid = (torch.arange(L)[None, None, None, :] <= qpos[:, None, :, None]).to(device)
    teacher = {}
    for l, h in heads.items():
        z = torch.randn(B, len(h), Qn, L, generator=g).to(device)
        teacher[l] = (torch.softmax(z.masked_fill(~valid, float("-inf")), -1)).to(dtype=dtype)
    return model, ids, mask, heads, queries, teacher


def _stepper(method, L, Q, S, device, shape, backend, batch=1):
    """Build the model for one variant and return (step, kernel name, last-loss dict)."""
    import torch

    import seekr_kernels as sk
    from seekr_kernels import reference
    from seekr_kernels._backend import resolve

    model, ids, mask, heads, queries, teacher = _build(L, Q, S, shape, device, batch=batch)
    if method == "published":
        model.set_attn_implementation("eager")
    elif method.startswith("patched"):
        sk.patch_llama(model)
    be = "torch" if method == "patched-torch" else backend
    used = {}

    def step():
        model.zero_grad(set_to_none=False)
        if method == "plain":
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            attn = out.loss.new_zeros(())
        elif method == "published":
            out = model(input_ids=ids, attention_mask=mask, labels=ids, output_attentions=True)
            attn = torch.stack([reference.published_attention_kl(out.attentions[l], teacher[l], heads[l],
                                                                 queries, mask) for l in sorted(heads)]).mean()
        else:
            with sk.distill_attention(model, heads, queries, teacher, mask, backend=be,
                                      check_values=False) as d:
                out = model(input_ids=ids, attention_mask=mask, labels=ids)
            attn = d.loss()
        loss = out.loss.float() + BETA * attn.float()
        loss.backward()
        used["attn"] = attn.detach().item()
        used["ce"] = out.loss.detach().item()
        del out
        if device == "cuda":
            torch.cuda.synchronize()

    kernel = {"plain": "-", "published": "eager"}.get(
        method, "torch" if be == "torch" else resolve(be, torch.device(device), "attention_kl"))
    return step, kernel, used


def _setup(device, threads=0, quick=False, real=False):
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    return _shape(device, quick, real)


def memory_point(method, L, Q, S=4, device="cpu", backend="auto", threads=0, quick=False, real=False, batch=1):
    """Peak extra memory of one step of one variant, in a fresh process (module docstring)."""
    shape = _setup(device, threads, quick, real)
    step, kernel, used = _stepper(method, L, Q, S, device, shape, backend, batch)
    took = {}

    def timed():
        took["ms"], took["cpu_ms"] = common.time_call(step, device)
    peak = common.peak_mib(timed, device, warmup=1)      # warm-up: .grad buffers, one-time state
    return {"method": method, "kernel": kernel, "peak_mib": round(peak, 1), "ce": used["ce"],
            "attn_loss": used["attn"], "step_ms": round(took["ms"], 1), "step_cpu_ms": round(took["cpu_ms"], 1)}


def timing_point(methods, L, Q, S=4, device="cpu", backend="auto", reps=3, threads=0, quick=False, real=False,
                 batch=1):
    """Median step time of every variant, measured in one process in interleaved rounds.

    Interleaving (plain, patched, published, plain, ...) keeps the ratios fair on a shared
    machine whose load drifts; wall time and process CPU time are both reported.
    """
    import statistics

    shape = _setup(device, threads, quick, real)
    steps = {m: _stepper(m, L, Q, S, device, shape, backend, batch)[0] for m in methods}
    for m in methods:
        steps[m]()                           # warm-up
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for _ in range(reps):
        for m in methods:
            w, c = common.time_call(steps[m], device)
            wall[m].append(w)
            cpu[m].append(c)
    return {m: {"ms": round(statistics.median(wall[m]), 1), "cpu_ms": round(statistics.median(cpu[m]), 1)}
            for m in methods}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_sweep_args(ap, "CUDA, bf16, Llama-2-7B layer shapes", reps=3)
    ap.add_argument("--queries", type=int, default=None, help="query rows per sample (default: all L)")
    ap.add_argument("--heads", type=int, default=4, help="distilled heads per layer")
    ap.add_argument("--methods", nargs="*", default=["plain", "patched", "published"],
                    help="plain, patched, published, patched-torch (fused op on the torch backend)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default); 1 gives steadier numbers on a busy machine")
    ap.add_argument("--plot-only", action="store_true", help="reprint ratios and replot from the CSV in --out")
    ap.add_argument("--real", action="store_true",
                    help="the real SmolLM2-135M-Instruct, default-budget heads, L in 512 1024 2048 (docstring)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    ap.add_argument("--one-step", action="store_true",
                    help="no interleaved timing rounds: each variant's time is that of the one step its "
                         "fresh-process memory run measures (after one warm-up); halves the cost where a "
                         "step takes a minute (--real at L = 2048 on a CPU)")
    common.add_common_args(ap)
    args = ap.parse_args()
    if args.real and args.quick:
        ap.error("--real and --quick: --real runs the real model's own shape; --quick is the tiny one")
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: must be at least 1")
    out = common.out_dir(args)
    if args.real:
        device, _, lengths, reps = common.sweep(args, cpu_lengths=[512, 1024, 2048], gpu_lengths=[512, 1024, 2048])
    else:
        device, _, lengths, reps = common.sweep(args, cpu_lengths=[256, 512, 1024], gpu_lengths=[1024, 2048, 4096])
    stem = f"llama_step_{device}" + ("_real" if args.real else "")
    if args.plot_only:
        rows = common.read_csv(os.path.join(out, stem + ".csv"))
        _ratios(rows, args.gpu, args.real)
        _plot(rows, os.path.join(out, stem + ".png"))
        return

    # Every big tensor its own mmap, unmapped when freed: see the module docstring.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    print(f"machine: {common.machine()}")
    shape = _shape(device, args.quick, args.real)
    if args.real:
        import torch
        heads = default_heads(shape["layers"], shape["heads"], torch.Generator().manual_seed(1))
        print(f"model: SmolLM2-135M-Instruct ({shape['dtype']}), B={args.batch}, {sum(map(len, heads.values()))} "
              f"heads on {len(heads)} layers (the default budgets), Q={'L' if args.queries is None else args.queries}")
    else:
        print(f"shape: {shape}, B={args.batch}, S={args.heads} heads on each of {shape['layers']} layers, "
              f"Q={'L' if args.queries is None else args.queries}")
    rows = []
    for L in lengths:
        Q = L if args.queries is None else min(args.queries, L)
        t = {} if args.one_step else common.run_isolated(
            "benchmarks.bench_llama_step", "timing_point",
            dict(methods=args.methods, L=L, Q=Q, S=args.heads, device=device, reps=reps, threads=args.threads,
                 quick=args.quick, real=args.real, batch=args.batch),
            isolated=not args.quick)
        for m in args.methods:
            r = common.run_isolated("benchmarks.bench_llama_step", "memory_point",
                                    dict(method=m, L=L, Q=Q, S=args.heads, device=device,
                                         threads=args.threads, quick=args.quick, real=args.real,
                                         batch=args.batch),
                                    isolated=not args.quick)
            if args.one_step:
                if "step_ms" in r:
                    r.update(ms=r["step_ms"], cpu_ms=r["step_cpu_ms"])
            elif "error" in t:
                r.setdefault("error", "timing: " + t["error"])
            else:
                r.update(t[m])
            r.update(method=m, L=L, Q=Q, S="default" if args.real else args.heads, B=args.batch,
                     timing="one step" if args.one_step else f"median of {reps}",
                     model="SmolLM2-135M-Instruct" if args.real else "random", threads=args.threads,
                     layers=shape["layers"], H=shape["heads"], D=shape["head_dim"], hidden=shape["hidden"], dtype=shape["dtype"], device=device)
            rows.append(common.report(r, f"L={L:5d} {m:14s}",
                                      lambda r: f"[{r['kernel']:5s}] {r['ms']:9.1f} ms (cpu {r['cpu_ms']:9.1f} ms) "
                                                f"{r['peak_mib']:9.1f} MiB  ce={r['ce']:.4f} attn={r['attn_loss']:.5f}"))
    common.write_csv(os.path.join(out, stem + ".csv"), rows)
    _ratios(rows, args.gpu, args.real)
    _plot(rows, os.path.join(out, stem + ".png"))


def _ratios(rows, gpu, real=False):
    ok = {(r["method"], int(r["L"])): {k: (float(v) if k in ("ms", "cpu_ms", "peak_mib") else v)
                                       for k, v in r.items()}
          for r in rows if not r.get("error")}
    cpu = not gpu
    print("\nratios: the patched step against plain SDPA and against the published step"
          + (" (time: wall, and process CPU time in brackets)" if cpu else ""))

    def tr(a, b):
        t = common.ratio(a["ms"], b["ms"])
        return t + (f" (cpu {common.ratio(a['cpu_ms'], b['cpu_ms'])})" if cpu else "")

    def mem(a, b):
        return common.ratio(a["peak_mib"], b["peak_mib"], "memory", floor=0.1)
    for L in sorted({L for _, L in ok}):
        p, pl, pub = ok.get(("patched", L)), ok.get(("plain", L)), ok.get(("published", L))
        if p is None:
            continue
        line = f"  L={L:5d}:"
        if pl:
            line += f" patched vs plain: time {tr(p, pl)}, memory {mem(p, pl)}"
        if pub:
            line += f" | patched vs published: time {tr(p, pub)}, memory {mem(p, pub)}"
        print(line)
    # The targets are stated at one length and shape; a run without it (--quick, --lengths,
    # --real) prints none.
    if real:
        return
    target_L = 4096 if gpu else 1024
    p, pl, pub = ok.get(("patched", target_L)), ok.get(("plain", target_L)), ok.get(("published", target_L))
    if p and pl:
        lim = 1.15 if gpu else 1.5
        t = p["ms"] / pl["ms"]
        extra = f" (cpu time {common.ratio(p['cpu_ms'], pl['cpu_ms'])})" if cpu else ""
        print(f"target: patched takes at most {lim}x plain's time at L={target_L}: "
              f"{common.ratio(p['ms'], pl['ms'])}{extra}: {'MET' if t <= lim else 'MISSED'}")
    if p and pub and not gpu:
        m = pub["peak_mib"] / max(p["peak_mib"], 0.1)
        print(f"target: patched uses >= 3x less peak memory than published at L={target_L}: "
              f"{mem(p, pub)}: {'MET' if m >= 3 else 'MISSED'}")


def _plot(rows, path):
    ok = [r for r in rows if not r.get("error")]
    # Process CPU time on CPU: on a shared machine wall time mostly measures the neighbours.
    tkey = "ms" if not ok or ok[0].get("device") == "cuda" else "cpu_ms"
    r0 = ok[0] if ok else {}
    common.plot_lines(path, rows, x="L", xlabel="sequence length L",
                      panels=[dict(y=tkey, title="step time, fwd+bwd (ms)" if tkey == "ms"
                                   else "step CPU time, fwd+bwd (ms)"),
                              dict(y="peak_mib", floor=0.1, title="peak extra memory of the step (MiB)")],
                      suptitle=f"Llama replay step, {r0.get('layers')} distilled layers, H={r0.get('H')} "
                               f"D={r0.get('D')}, {r0.get('device')}")


if __name__ == "__main__":
    main()
