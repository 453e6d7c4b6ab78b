"""Teacher-side benchmark: capture cost, cache size, and the quality cost of TopK.

Three sections (``--section`` picks one; default all):

capture  Time and peak memory of capturing the attention rows of S selected heads for
         every query of one layer: ``sk.attention_probs`` (each available backend) against
         the eager capture the reference relies on (``output_attentions=True``: scores
         [B, H, L, L] + additive mask, fp32 softmax, cast, then slicing heads/rows). Only
         the attention-weight part of eager attention is timed (no attn @ V), and only one
         layer: a real ``output_attentions=True`` forward keeps every layer's [B, H, L, L]
         alive at once, so the eager numbers here are a lower bound.
         Each (method, L) runs in a fresh subprocess that builds the inputs, makes one
         warm-up call and frees it, then measures the peak extra memory of one call
         (common.peak_mib: on CPU the resident-set high-water mark after malloc_trim and a
         reset, so every byte the call touched -- torch, numpy, C++ buffers, its output --
         counts, with no sampling) and the median time of --reps calls (common.timings).
cache    Bytes of teacher cache per replayed sample at Llama-2-7B shapes (and with Llama-3's
         128256-token vocabulary), analytically from the storage formats (no allocation):
         dense, TopK with int32 indices (in memory), TopK with packed indices (on disk:
         int16, plus bit-packed high bits above 65536), and the sampled teacher.
quality  On a tiny Llama (transformers, eager attention) trained briefly on made-up data:
         capture the teacher (attention rows of selected heads for a query budget, and
         logits), train on a second made-up task, then compare the attention-KL and the
         logits distillation loss with the dense teacher against TopK teachers per k:
         relative error of the value and cosine of the gradient w.r.t. all parameters.
         Sampled teachers (sk.SampledTeacher, priority sampling) at the same bytes as each
         TopK (k + 1 slots: no lse), over --q-draws seeds: per-draw error and cosine, and
         the cosine of the draws' mean gradient (the bias: -> 1 for an unbiased teacher).

Writes teacher_capture.csv, teacher_cache_bytes.csv, teacher_topk_quality.csv and
teacher.png into --out (default ./bench-out/; the committed numbers: --out
benchmarks/results) and prints the numbers and ratios. ``--quick``: L = 128 for capture and a
tiny quality run (L = 64, vocabulary 256, a few steps, one k each, two sampled draws) -
seconds. ``--replot`` redraws the summary and the plot from the CSVs already in --out.

    python -m benchmarks.bench_teacher                       # every section, CPU
    python -m benchmarks.bench_teacher --section cache       # the byte table only
    python -m benchmarks.bench_teacher --quick --out /tmp/t  # smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import seekr_kernels as sk
from benchmarks import common
from seekr_kernels.ops.attention_probs import attention_probs
from seekr_kernels.ops.teachers import TopK

warnings.filterwarnings("ignore", message="seekr_kernels: .* falls back")


# ============================================================================ capture

def _eager_capture(q, k, heads, mask, scale):
    """What `output_attentions=True` costs for one layer: full weights, then the slice."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    kk = k[:, :, None].expand(B, k.shape[1], G, L, D).reshape(B, H, L, D)   # repeat_kv
    w = torch.matmul(q, kk.transpose(2, 3)) * scale
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    add = torch.zeros(B, 1, L, L, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
    w = torch.softmax(w + add, dim=-1, dtype=torch.float32).to(q.dtype)
    return w[:, heads]                                                         # [B, S, L, L]


def capture_point(method, device, dtype, B, H, Hkv, L, D, S, reps):
    """One (method, L) measurement; runs in a fresh process (in this one under --quick)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    q = torch.randn(B, H, L, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=dt)
    heads = torch.randperm(H, device=dev)[:S]
    mask = torch.ones(B, L, dtype=torch.long, device=dev)
    mask[:, : L // 16] = 0                                 # some left padding
    scale = D ** -0.5
    if method == "eager":
        fn = lambda: _eager_capture(q, k, heads, mask, scale)  # noqa: E731
    else:
        fn = lambda: attention_probs(q, k, heads, None, mask, scale=scale, backend=method)  # noqa: E731
    out = fn()                                             # the warm-up call
    nbytes = out.numel() * out.element_size()
    del out
    peak = common.peak_mib(fn, dev) * 2**20
    times = common.timings(fn, dev, warmup=0, reps=reps)
    return {"peak_bytes": peak, "out_bytes": nbytes, "time_s": statistics.median(times) / 1e3}


def _capture_backends(dev):
    from seekr_kernels._backend import available
    names = ["triton", "cuda"] if dev.type == "cuda" else ["cpu"]
    return [n for n in names if available(n, dev)[0]] + ["torch"]


def run_capture(args):
    dev = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    methods = ["eager"] + _capture_backends(dev)
    rows = []
    print(f"\n== capture: B={args.batch} H={args.heads} Hkv={args.kv_heads} D={args.dim} "
          f"S={args.slots} (all L query rows) {dtype} on {dev} ==")
    for L in args.lengths:
        res = {}
        for m in methods:
            cfg = dict(method=m, device=str(dev), dtype=dtype, B=args.batch, H=args.heads,
                       Hkv=args.kv_heads, L=L, D=args.dim, S=args.slots, reps=args.reps)
            r = common.run_isolated("benchmarks.bench_teacher", "capture_point", cfg, isolated=not args.quick)
            if "error" in r:
                print(f"  L={L:5d} {m:7s} ERROR {r['error']}")
                continue
            res[m] = r
            rows.append({"L": L, "method": m, "dtype": dtype, "device": dev.type,
                         "time_ms": round(r["time_s"] * 1e3, 3), "peak_MiB": round(r["peak_bytes"] / 2**20, 2),
                         "out_MiB": round(r["out_bytes"] / 2**20, 2)})
        e = res.get("eager")
        for m, r in res.items():
            ratio = ""
            if e and m != "eager":
                ratio = (f"  vs eager: memory {common.ratio(r['peak_bytes'], e['peak_bytes'], 'memory', 1, floor=1)}, "
                         f"time {common.ratio(r['time_s'], e['time_s'])}")
            print(f"  L={L:5d} {m:7s} {r['time_s'] * 1e3:9.1f} ms  peak {r['peak_bytes'] / 2**20:8.1f} MiB "
                  f"(output {r['out_bytes'] / 2**20:.1f} MiB){ratio}")
    if rows:
        common.write_csv(os.path.join(args.out_dir, "teacher_capture.csv"), rows)
    return rows


# ============================================================================ cache
def cache_rows(layers=32, heads=32, sel_heads=128, L=1024, vocab=32000, queries=(100, None),
               k_attn=(8, 32, 128), k_logits=(16, 64, 256)):
    """Bytes per replayed sample of each storage format (analytic).

    reference: selected heads' rows in the model dtype (bf16 under the official DeepSpeed
    config) + full-vocabulary logits of every position as returned by transformers 4.31's
    LlamaForCausalLM (upcast to fp32) + int64 query positions.
    dense bf16: the same rows and logits in bf16, int32 query positions.
    topk int32: per row k bf16 values + k int32 indices (TopK in memory) + one fp32
    (attention: row mass, logits: lse), int32 query positions.
    topk packed: the same with indices as TeacherCache / ReplayMemory store them
    (ops.teachers.pack_indices: int16, plus bit-packed high bits when the size exceeds 65536:
    2.125 bytes at V = 128256 and k = 256).
    sampled: attention as topk packed; logits a SampledTeacher of k + 1 slots (bf16
    weights + packed indices, no lse): the same bytes as the TopK of k logits.
    (``layers`` and ``heads`` only set how many heads exist; the caches hold sel_heads.)
    """
    from seekr_kernels.ops.teachers import packed_nbytes
    assert sel_heads <= layers * heads
    out = []
    for Qb in queries:
        Q = L if Qb is None else Qb
        arows, lrows = sel_heads * Q, L
        ref_a, ref_l, ref_q = arows * L * 2, lrows * vocab * 4, Q * 8
        den_a, den_l, den_q = arows * L * 2, lrows * vocab * 2, Q * 4
        ref = ref_a + ref_l + ref_q
        base = {"Q": Q, "L": L, "vocab": vocab, "sel_heads": sel_heads}
        out.append({**base, "format": "reference", "k_attn": "", "k_logits": "",
                    "attn_bytes": ref_a, "logits_bytes": ref_l, "total_bytes": ref, "x_smaller": 1.0})
        den = den_a + den_l + den_q
        out.append({**base, "format": "dense bf16", "k_attn": "", "k_logits": "",
                    "attn_bytes": den_a, "logits_bytes": den_l, "total_bytes": den,
                    "x_smaller": round(ref / den, 2)})
        for fmt in ("topk int32", "topk packed", "sampled"):
            for ka, kl in ((ka, kl) for ka in k_attn for kl in k_logits):
                ia = 4 if fmt == "topk int32" else packed_nbytes(ka, L)
                ta = arows * (ka * (2 + ia) + 4)
                if fmt == "sampled":
                    tlg = lrows * (kl + 1) * (2 + packed_nbytes(kl + 1, vocab))
                else:
                    il = 4 if fmt == "topk int32" else packed_nbytes(kl, vocab)
                    tlg = lrows * (kl * (2 + il) + 4)
                tot = int(ta + tlg + den_q)
                out.append({**base, "format": fmt, "k_attn": ka, "k_logits": kl, "attn_bytes": int(ta),
                            "logits_bytes": int(tlg), "total_bytes": tot, "x_smaller": round(ref / tot, 2)})
    return out


def run_cache(args):
    rows = []
    for vocab, name in ((32000, "Llama-2-7B"), (128256, "Llama-2-7B shapes with Llama-3's vocabulary")):
        part = cache_rows(vocab=vocab)
        rows += part
        print(f"\n== teacher cache bytes per replayed sample, {name} (32 layers x 32 heads, "
              f"128 selected heads, L=1024, vocab {vocab}) ==")
        for r in part:
            ks = f"k_attn={r['k_attn']:>3} k_logits={r['k_logits']:>3}" if r["k_attn"] != "" else " " * 25
            print(f"  Q={r['Q']:5d} {r['format']:11s} {ks}  attention {r['attn_bytes'] / 2**20:8.2f} MiB  "
                  f"logits {r['logits_bytes'] / 2**20:8.2f} MiB  total {r['total_bytes'] / 2**20:8.2f} MiB  "
                  f"{r['x_smaller']:7.1f}x smaller than reference")
    common.write_csv(os.path.join(args.out_dir, "teacher_cache_bytes.csv"), rows)
    return rows


# ============================================================================ quality
def _markov(vocab, succ, gen):
    nxt = torch.randint(0, vocab, (vocab, succ), generator=gen)
    w = torch.distributions.Dirichlet(torch.full((succ,), 0.5)).sample((vocab,))
    return nxt, w


def _make_batch(chain, B, L, vocab, gen, pad_max=0):
    """Made-up sequences: a sparse Markov chain with copied spans (so that some heads learn
    to look far back), left padding of up to pad_max tokens, labels on the second half."""
    nxt, w = chain
    ids = torch.empty(B, L, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (B,), generator=gen)
    for i in range(1, L):
        c = torch.multinomial(w[ids[:, i - 1]], 1, generator=gen).squeeze(1)
        ids[:, i] = nxt[ids[:, i - 1], c]
    span = max(8, L // 8)
    for b in range(B):                      # copy a span from the first half into the second
        src = int(torch.randint(0, L // 2 - span, (1,), generator=gen))
        dst = int(torch.randint(L // 2, L - span, (1,), generator=gen))
        ids[b, dst:dst + span] = ids[b, src:src + span]
    mask = torch.ones(B, L, dtype=torch.long)
    if pad_max:
        for b in range(B):
            p = int(torch.randint(0, pad_max + 1, (1,), generator=gen))
            mask[b, :p] = 0
            ids[b, :p] = 0
    labels = ids.clone()
    labels[:, : L // 2] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


_STORE = {}


def _register_capture():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def capture(module, query, key, value, attention_mask, **kw):
        _STORE[module.layer_idx] = (query, key)
        return eager_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("seekr_bench_capture", capture)
    # Registered under the same name, or the model would build no mask at all (docs/DESIGN.md §6).
    AttentionMaskInterface.register("seekr_bench_capture", eager_mask)


def _train(model, chain, steps, args, gen, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids, mask, labels = _make_batch(chain, args.q_batch, args.q_len, args.q_vocab, gen, args.q_len // 8)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def _local_logits_loss(student_logits, teacher, labels, tail="kept"):
    """Local torch formula (not the package op): the published term, CE(student,
    softmax(teacher)) averaged over tokens whose label != -100. TopK teachers use the exact
    kept probabilities exp(v - lse); tail='kept' ignores the dropped mass, tail='bucket'
    adds -delta * log(student mass on the dropped tokens) (dropped tokens as one bucket)."""
    tok = labels != -100
    logq = torch.log_softmax(student_logits[tok].float(), -1)
    if not isinstance(teacher, TopK):
        return -(torch.softmax(teacher[tok].float(), -1) * logq).sum(-1).mean()
    p = teacher.probs()[tok].float()
    lq = logq.gather(-1, teacher.indices.long()[tok])
    ce = -(p * lq).sum(-1)
    if tail == "bucket":
        delta = (1 - p.sum(-1)).clamp_min(0)
        log_qd = torch.log(torch.clamp_min(-torch.expm1(torch.logsumexp(lq, -1).clamp_max(0)), 1e-20))
        ce = ce - delta * log_qd
    return ce.mean()


def _logits_variants():
    """(name, fn) pairs: the package's logits_kl if it exists, and the local formulas."""
    out = []
    try:
        from seekr_kernels.ops.logits_kl import logits_kl
        out.append(("sk.logits_kl", logits_kl))
    except Exception:
        pass
    out.append(("local kept", lambda s, t, y: _local_logits_loss(s, t, y, "kept")))
    out.append(("local bucket", lambda s, t, y: _local_logits_loss(s, t, y, "bucket")))
    return out


def run_quality(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    _register_capture()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    V, L = args.q_vocab, args.q_len
    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=L,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "seekr_bench_capture"
    model = LlamaForCausalLM(cfg)
    nl, H = cfg.num_hidden_layers, cfg.num_attention_heads
    chain_a, chain_b = _markov(V, 6, gen), _markov(V, 6, gen)
    t0 = time.time()
    la = _train(model, chain_a, args.q_steps_a, args, gen, 3e-3)
    print(f"\n== quality: tiny Llama ({nl} layers, {H} heads / {cfg.num_key_value_heads} kv, "
          f"L={L}, vocab {V}); task A loss after {args.q_steps_a} steps: {la:.3f} ({time.time() - t0:.0f}s) ==")

    # Teacher capture on the replay batch (left padded), S heads per layer, Q random queries.
    ids, mask, labels = _make_batch(chain_a, args.q_batch, L, V, gen, L // 8)
    B, S, Qn = ids.shape[0], args.q_slots, args.q_queries
    heads = torch.stack([torch.randperm(H, generator=gen)[:S] for _ in range(nl)])        # [layers, S]
    queries = torch.stack([torch.sort(torch.randint(0, L, (Qn,), generator=gen))[0] for _ in range(B)])
    scale = model.model.layers[0].self_attn.scaling
    with torch.no_grad():
        tlogits = model(input_ids=ids, attention_mask=mask).logits.float()
        tattn = [attention_probs(*_STORE[l], heads[l], queries, mask, scale=scale) for l in range(nl)]
    logit_fns = _logits_variants()

    def grads_of(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()

    def student_losses(attn_teachers, logit_teacher, mode=None, logit_fn=None):
        out = model(input_ids=ids, attention_mask=mask)
        res = {}
        if attn_teachers is not None:
            terms = []
            for l in range(nl):
                q, k = _STORE[l]
                t = attn_teachers[l]
                if mode is not None and isinstance(t, TopK):
                    from seekr_kernels._checks import check_attention_args
                    from seekr_kernels.ops.attention_kl import attention_kl_topk_rows
                    from seekr_kernels._backend import resolve
                    from seekr_kernels._checks import reduce_rows
                    a = check_attention_args(q, k, heads[l], queries, mask, scale)
                    rows = attention_kl_topk_rows(a, t, resolve("auto", q.device, "attention_kl"), True,
                                                  mode=mode)
                    terms.append(reduce_rows(rows, a.row_active, "batchmean"))
                else:
                    terms.append(sk.attention_kl(q, k, t, heads[l], queries, mask, scale=scale))
            res["attn"] = sum(terms) / nl
        if logit_teacher is not None:
            res["logits"] = (logit_fn or logit_fns[0][1])(out.logits, logit_teacher, labels)
        return res

    rows = []
    steps_done = 0   # the student is trained incrementally from one drift level to the next
    for drift in sorted(args.q_drift):
        if drift > steps_done:
            _train(model, chain_b, drift - steps_done, args, gen, 3e-3)
            steps_done = drift
        dense_a = student_losses(tattn, None)["attn"]
        g_dense_a = grads_of(dense_a)
        dense_l = student_losses(None, tlogits, logit_fn=_local_logits_loss)["logits"]
        g_dense_l = grads_of(dense_l)
        print(f"  student after {drift} steps of task B: dense attention-KL {float(dense_a.detach()):.5f}, "
              f"dense logits loss {float(dense_l.detach()):.5f}")

        def record(what, variant, k, mode, loss, g, dense, g_dense, extra=None):
            rel = abs(float(loss) - float(dense)) / max(abs(float(dense)), 1e-30)
            cos = float(torch.nn.functional.cosine_similarity(g, g_dense, dim=0))
            r = {"drift_steps": drift, "loss": what, "teacher": variant, "k": k, "mode": mode or "",
                 "value": float(loss), "dense_value": float(dense), "rel_err": rel, "grad_cos": cos}
            if extra:
                r.update(extra)
            rows.append(r)
            dm = f"  dropped mass {extra['dropped_mass']:.4f}" if extra and "dropped_mass" in extra else ""
            dm += f"  draw {extra['draw']}" if extra and "draw" in extra else ""
            print(f"    {what:6s} {variant:10s} k={str(k):>4} {mode or '':22s} value {float(loss):.5f} "
                  f"rel.err {rel * 100:7.3f}%  grad cos {cos:.5f}{dm}")

        # bf16 storage of the dense rows: the quantisation floor every cache format pays.
        bf = [t.to(torch.bfloat16) for t in tattn]
        la_ = student_losses(bf, None)["attn"]
        record("attn", "dense bf16", L, None, la_, grads_of(la_), dense_a, g_dense_a)
        for k in args.q_k_attn:
            tk = [TopK.from_dense(t, min(k, L)).to(dtype=torch.bfloat16) for t in tattn]
            kept = float(sum(t.mass.sum() - t.values.float().sum() for t in tk) / sum(t.mass.sum() for t in tk))
            for mode in ("bucket", "kept", "renorm", "full_lse"):
                la_ = student_losses(tk, None, mode)["attn"]
                record("attn", "topk bf16", k, mode, la_, grads_of(la_), dense_a, g_dense_a,
                       {"dropped_mass": kept})
        for name, fn in logit_fns:
            ll = student_losses(None, tlogits.to(torch.bfloat16), logit_fn=fn)["logits"]
            record("logits", "dense bf16", V, name, ll, grads_of(ll), dense_l, g_dense_l)
        for k in args.q_k_logits:
            tk = TopK.from_dense(tlogits, min(k, V), kind="logits").to(dtype=torch.bfloat16)
            dropped = float(1 - tk.probs()[labels != -100].sum(-1).mean())
            for name, fn in logit_fns:
                ll = student_losses(None, tk, logit_fn=fn)["logits"]
                record("logits", "topk bf16", k, name, ll, grads_of(ll), dense_l, g_dense_l,
                       {"dropped_mass": dropped})
            # Sampled teacher at the same bytes (k + 1 slots of bf16 weight + index, no lse),
            # one row per draw, then the mean over draws (value and gradient).
            gsum, vsum = 0, 0.0
            for d in range(args.q_draws):
                st = sk.SampledTeacher.from_dense(tlogits, min(k + 1, V), seed=d, dtype=torch.bfloat16)
                ll = student_losses(None, st, logit_fn=logit_fns[0][1])["logits"]
                g = grads_of(ll)
                gsum, vsum = gsum + g, vsum + float(ll)
                record("logits", "sampled bf16", k, "sk.logits_kl", ll, g, dense_l, g_dense_l, {"draw": d})
            record("logits", "sampled bf16 mean", k, "sk.logits_kl", vsum / args.q_draws, gsum / args.q_draws,
                   dense_l, g_dense_l, {"draw": f"mean of {args.q_draws}"})
    common.write_csv(os.path.join(args.out_dir, "teacher_topk_quality.csv"), rows)
    return rows


def summarize(capture, cache, quality, rel_max=0.05, cos_min=0.99):
    """Print the headline ratios and the smallest k meeting the quality target."""
    print("\n== summary ==")
    if capture:
        for L in sorted({r["L"] for r in capture}):
            e = next((r for r in capture if r["L"] == L and r["method"] == "eager"), None)
            for r in capture:
                if r["L"] == L and r["method"] != "eager" and e:
                    print(f"  capture L={L}: {r['method']} vs eager: peak memory "
                          f"{common.ratio(r['peak_MiB'], e['peak_MiB'], 'memory', 1, floor=1e-3)}, "
                          f"time {common.ratio(r['time_ms'], e['time_ms'])}")
    best = {}
    if quality:
        last = max(r["drift_steps"] for r in quality)
        for what, mode in (("attn", "bucket"), ("logits", "sk.logits_kl")):
            ok = [r for r in quality if r["loss"] == what and r["mode"] == mode and r["teacher"] == "topk bf16"
                  and all(x["rel_err"] < rel_max and x["grad_cos"] > cos_min for x in quality
                          if x["loss"] == what and x["mode"] == mode and x["k"] == r["k"]
                          and x["teacher"] == "topk bf16")]
            ks = sorted({r["k"] for r in ok})
            best[what] = ks[0] if ks else None
            print(f"  {what} ({mode}): smallest k with rel.err < {rel_max:.0%} and grad cos > {cos_min} at every "
                  f"drift level: {best[what] if ks else 'none of the k tried'}")
        _ = last
    if quality:
        for k in sorted({r["k"] for r in quality if r["teacher"] == "sampled bf16"}):
            for drift in sorted({r["drift_steps"] for r in quality}):
                tk = next((r for r in quality if r["teacher"] == "topk bf16" and r["mode"] == "sk.logits_kl"
                           and r["k"] == k and r["drift_steps"] == drift), None)
                sd = [r for r in quality if r["teacher"] == "sampled bf16" and r["k"] == k
                      and r["drift_steps"] == drift]
                mean = next((r for r in quality if r["teacher"] == "sampled bf16 mean" and r["k"] == k
                             and r["drift_steps"] == drift), None)
                if tk and sd and mean:
                    print(f"  logits at equal bytes, k={k}, drift {drift}: TopK rel.err {tk['rel_err']:.2%} cos "
                          f"{tk['grad_cos']:.4f}; sampled (one draw, mean of {len(sd)}) rel.err "
                          f"{statistics.mean(r['rel_err'] for r in sd):.2%} cos "
                          f"{statistics.mean(r['grad_cos'] for r in sd):.4f}; mean of the draws: rel.err "
                          f"{mean['rel_err']:.2%} cos {mean['grad_cos']:.4f}")
    if cache:
        for Q in sorted({r["Q"] for r in cache}):
            ref = next((r["total_bytes"] for r in cache if r["Q"] == Q and r["format"] == "reference"), None)
            for r in cache:
                if r["Q"] == Q and r["format"] != "reference" and r["format"] != "dense bf16" and (
                        r["k_attn"] == best.get("attn") and r["k_logits"] == best.get("logits")):
                    print(f"  cache V={r['vocab']} Q={Q}: {r['format']} k_attn={r['k_attn']} k_logits={r['k_logits']}: "
                          f"{r['total_bytes'] / 2**20:.2f} MiB/sample, {r['x_smaller']:.1f}x smaller than the reference")


def plot(out, capture, cache, quality):
    fig, ax = common.figure(3, figsize=(16, 4.5))
    if fig is None:
        return
    if capture:
        common.line_panel(ax[0], capture, x="L", y="peak_MiB", xlabel="L", ylabel="peak MiB (one layer)",
                          title="capture peak memory")
    if cache:
        # Reference, dense bf16 and the matched (k_attn, k_logits) pairs, per query budget.
        pairs = {(8, 16), (32, 64), (128, 256)}
        sel = [r for r in cache if r["vocab"] == 32000 and (r["format"] in ("reference", "dense bf16")
                                                            or (r["k_attn"], r["k_logits"]) in pairs)]
        names = list(dict.fromkeys(
            r["format"] + (f" {r['k_attn']}/{r['k_logits']}" if r["k_attn"] != "" else "") for r in sel))
        series = {f"Q={Q}": [next(r["total_bytes"] / 2**20 for r in sel if r["Q"] == Q and r["format"] + (
                      f" {r['k_attn']}/{r['k_logits']}" if r["k_attn"] != "" else "") == n) for n in names]
                  for Q in sorted({r["Q"] for r in sel})}
        common.bar_panel(ax[1], names, series, rotation=45, ylabel="MiB per replayed sample",
                         title="teacher cache, Llama-2-7B shapes (k attn/logits)")
    if quality:
        last = max(r["drift_steps"] for r in quality)
        for (what, mode), style in ((("attn", "bucket"), "o-"), (("attn", "kept"), "s--"),
                                    (("attn", "renorm"), "^:"), (("attn", "full_lse"), "v-."),
                                    (("logits", "local kept"), "D--"), (("logits", "local bucket"), "D-"),
                                    (("logits", "sk.logits_kl"), "x-")):
            rs = [r for r in quality if r["loss"] == what and r["mode"] == mode and r["teacher"] == "topk bf16"
                  and r["drift_steps"] == last]
            if rs:
                ax[2].plot([r["k"] for r in rs], [r["rel_err"] * 100 for r in rs], style,
                           label=f"{what} {mode} rel.err %")
                ax[2].plot([r["k"] for r in rs], [(1 - r["grad_cos"]) * 100 for r in rs], style, alpha=0.4,
                           label=f"{what} {mode} (1-cos)x100")
        for teacher, style in (("sampled bf16", "P-"), ("sampled bf16 mean", "*-")):
            ks = sorted({r["k"] for r in quality if r["teacher"] == teacher and r["drift_steps"] == last})
            if ks:
                agg = [[r for r in quality if r["teacher"] == teacher and r["k"] == k and r["drift_steps"] == last]
                       for k in ks]
                ax[2].plot(ks, [statistics.mean(r["rel_err"] for r in a) * 100 for a in agg], style,
                           label=f"logits {teacher} rel.err %")
                ax[2].plot(ks, [statistics.mean(1 - r["grad_cos"] for r in a) * 100 for a in agg], style,
                           alpha=0.4, label=f"logits {teacher} (1-cos)x100")
        ax[2].set_xscale("log", base=2)
        ax[2].set_yscale("log")
        ax[2].set_xlabel("k (sampled: k + 1 slots, same bytes)")
        ax[2].set_title(f"TopK quality (student after {last} steps)")
        ax[2].legend(fontsize=6)
    common.save(fig, os.path.join(out, "teacher.png"))


# --quick: seconds, not minutes; every section still runs end to end.
QUICK = dict(lengths=[128], reps=1, q_len=64, q_vocab=256, q_batch=2, q_queries=16, q_steps_a=5,
             q_drift=[2], q_k_attn=[8], q_k_logits=[16], q_draws=2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=["all", "capture", "cache", "quality"], default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="capture dtype (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--q-len", type=int, default=256)
    p.add_argument("--q-vocab", type=int, default=2048)
    p.add_argument("--q-batch", type=int, default=4)
    p.add_argument("--q-slots", type=int, default=4)
    p.add_argument("--q-queries", type=int, default=100)
    p.add_argument("--q-steps-a", type=int, default=150)
    p.add_argument("--q-drift", type=int, nargs="+", default=[10, 100])
    p.add_argument("--q-k-attn", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--q-k-logits", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--q-draws", type=int, default=8, help="sampled-teacher draws per k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", action="store_true",
                   help="redraw summary and plot from the CSVs already in --out")
    common.add_common_args(p)
    args = p.parse_args()
    if args.quick:      # re-parsed so that a flag given explicitly still wins over QUICK
        p.set_defaults(**QUICK)
        args = p.parse_args()
    args.out_dir = common.out_dir(args)
    if args.replot:
        cap, cache, qual = (common.read_csv(path) if os.path.exists(path) else None
                            for path in (os.path.join(args.out_dir, n) for n in
                                         ("teacher_capture.csv", "teacher_cache_bytes.csv",
                                          "teacher_topk_quality.csv")))
        summarize(cap, cache, qual)
        plot(args.out_dir, cap, cache, qual)
        return
    if not args.quick:  # a smoke run keeps the caller's thread setting (OMP_NUM_THREADS)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    cap = run_capture(args) if args.section in ("all", "capture") else None
    cache = run_cache(args) if args.section in ("all", "cache") else None
    qual = run_quality(args) if args.section in ("all", "quality") else None
    summarize(cap, cache, qual)
    plot(args.out_dir, cap, cache, qual)


if __name__ == "__main__":
    main()
