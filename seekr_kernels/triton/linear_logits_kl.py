"""Triton kernels of the fused lm_head + logits-distillation loss (ops/linear_logits_kl.py).

The op works through the supervised token rows in chunks of c rows. Per chunk:

1. ``_logits_fwd``, grid (c / BLOCK_M, V / BLOCK_N): one [BLOCK_M, BLOCK_N] tile of the
   logits z = h W^T + b per program, a tl.dot loop over the hidden size (tensor cores for
   bf16/fp16, fp32 accumulation). It stores the tile (in the input dtype, so the chunk
   buffer is [c, V] of bf16/fp16/fp32) and, in the same epilogue, the tile's partial
   row statistics, each relative to the tile's own maximum:
       m = max z,  d = sum exp(z - m),  a = sum exp(z - m) (z - m),  sum z,
       m_t = max t,  d_t = sum exp(t - m_t),  a_t = sum exp(t - m_t) z     (dense teacher t)
   The partials are merged across tiles in torch (a few numbers per row and tile):
       lse_s = M + log sum_b d_b e^(m_b - M),  sum_v q log q = [sum_b e^(m_b-M) (a_b +
       (m_b - M) d_b)] / D - log D,  lse_t likewise,  sum_v p_v z_v = A_t / D_t.
   Statistics are taken of the *stored* (rounded) tile, so the loss and the gradient
   below see the same logits, as the materialised bf16 path does.
2. ``_grad_rows``, one program per row streaming V: overwrites the chunk buffer in place
   with dloss/dz = A_r softmax(z) - B_r p - U_r - C_r [v = label_r] (softmax(z) and p
   recomputed from the merged lse values). Sparse-teacher corrections on the k kept
   positions and the two gradient products dh = dz W, dW += dz^T h run in torch (cuBLAS).

So the [tokens, V] logits exist for one chunk at a time and only 7 fp32 partials per
row and vocabulary tile survive the epilogue.

Interpreter (TRITON_INTERPRET=1, CPU tensors): small tiles; its bf16/fp16 tl.dot is not
trustworthy, so half-precision tiles are multiplied as fp32 copies there (_tiles.mm).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import mm

# Finite start for maxima: exp(m_old - m_new) stays 0/1 for all -inf tiles (see logits_kl.py).
_NEG = tl.constexpr(-3.0e38)

#: Number of fp32 partial statistics per (row, vocabulary tile) written by _logits_fwd.
NSTAT = 7


@triton.jit
def _logits_fwd(H, W, BIAS, T, Z, P,
                C, V, D, NVB, h_sr, w_sr, t_sr, z_sr,
                HAS_BIAS: tl.constexpr, HAS_T: tl.constexpr, QLOGQ: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rin = rows < C
    cin = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        kin = kk < D
        a = tl.load(H + rows64[:, None] * h_sr + kk[None, :], mask=rin[:, None] & kin[None, :], other=0.0)
        b = tl.load(W + cols64[:, None] * w_sr + kk[None, :], mask=cin[:, None] & kin[None, :], other=0.0)
        acc += mm(a, tl.trans(b), DOT_PREC, UPCAST, tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cin, other=0.0).to(tl.float32)[None, :]
    z = acc.to(Z.dtype.element_ty)
    tl.store(Z + rows64[:, None] * z_sr + cols64[None, :], z, mask=rin[:, None] & cin[None, :])

    zf = tl.where(cin[None, :], z.to(tl.float32), float("-inf"))
    m = tl.maximum(tl.max(zf, 1), _NEG)
    e = tl.exp(zf - m[:, None])
    pidx = rows64 * NVB + pid_n
    stride = C * NVB                     # P is [NSTAT, C, NVB]
    tl.store(P + pidx, m, mask=rin)
    tl.store(P + stride + pidx, tl.sum(e, 1), mask=rin)
    if QLOGQ:
        tl.store(P + 2 * stride + pidx, tl.sum(e * tl.where(e > 0, zf - m[:, None], 0.0), 1), mask=rin)
    tl.store(P + 3 * stride + pidx, tl.sum(tl.where(cin[None, :], zf, 0.0), 1), mask=rin)
    if HAS_T:
        t = tl.load(T + rows64[:, None] * t_sr + cols64[None, :], mask=rin[:, None] & cin[None, :],
                    other=float("-inf")).to(tl.float32)
        mt = tl.maximum(tl.max(t, 1), _NEG)
        et = tl.exp(t - mt[:, None])
        tl.store(P + 4 * stride + pidx, mt, mask=rin)
        tl.store(P + 5 * stride + pidx, tl.sum(et, 1), mask=rin)
        # an entry the teacher gives no mass contributes 0 whatever z is
        tl.store(P + 6 * stride + pidx, tl.sum(et * tl.where(et > 0, zf, 0.0), 1), mask=rin)


@triton.jit
def _grad_rows(Z, T, LSE_S, LSE_T, A, B, U, CL, LABEL, V, z_sr, t_sr,
               HAS_T: tl.constexpr, HAS_LABEL: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    z_row = Z + r * z_sr
    t_row = T + r * t_sr
    lse_s = tl.load(LSE_S + r)
    a = tl.load(A + r)
    u = tl.load(U + r)
    lse_t = 0.0
    bco = 0.0
    if HAS_T:
        lse_t = tl.load(LSE_T + r)
        bco = tl.load(B + r)
    lab = -1
    cl = 0.0
    if HAS_LABEL:
        lab = tl.load(LABEL + r)
        cl = tl.load(CL + r)
    offs = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        inb = cols < V
        z = tl.load(z_row + cols, mask=inb, other=0.0).to(tl.float32)
        d = a * tl.exp(z - lse_s) - u
        if HAS_T:
            t = tl.load(t_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
            d = d - bco * tl.exp(t - lse_t)
        if HAS_LABEL:
            d = tl.where(cols == lab, d - cl, d)
        tl.store(z_row + cols, d.to(Z.dtype.element_ty), mask=inb)


# ---------------------------------------------------------------------------- launch configs
_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def gemm_config(dtype, cuda=True):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, DOT_PREC, UPCAST) of _logits_fwd.

    CUDA, bf16/fp16: 64 x 128 x 64 tiles, 8 warps, 3 stages (tensor cores; ahead-of-time
    compile with the JIT's divisibility hints: 112 registers on sm_90, 128 on sm_80, no
    spills; 128 x 128 needs 185+ registers for the epilogue's extra teacher tile, 4 warps
    230+). fp32: exact "ieee" products like torch's default fp32 matmul, or "tf32" when
    torch.backends.cuda.matmul.allow_tf32 is set; 64 x 64 x 32, 8 warps (80 / 126
    registers; 4 warps spill on sm_90).
    Interpreter: 16-wide tiles (tl.dot's minimum), half tiles upcast (_tiles.mm).
    """
    if not cuda:
        return 16, 16, 16, 1, 1, "ieee", dtype in (torch.bfloat16, torch.float16)
    if dtype == torch.float32:
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return 64, 64, 32, 8, 3, prec, False
    return 64, 128, 64, 8, 3, "tf32", False


#: num_stages of _grad_rows (Triton's CUDA default, stated so compile_specs matches the launch).
ROW_STAGES = 3


def row_config(V, cuda=True, block=None):
    """(BLOCK, num_warps) of _grad_rows."""
    if block is not None:
        b = int(block)
    else:
        b = min(triton.next_power_of_2(V), 4096 if cuda else 1024)
    return b, (8 if b >= 2048 else 4)


def logits_chunk(h, w, b, t, qlogq):
    """Logits z = h w^T + b of one chunk (dtype of h) and the merged row statistics.

    h [c, D], w [V, D] (last dims contiguous), b [V] or None, t [c, V] dense teacher
    (last dim contiguous) or None. Returns (z, stats) with stats a dict of fp32 [c]
    tensors: lse_s, sum_s, and qlogq (if asked) / lse_t and pz = sum_v softmax(t)_v z_v
    (with a teacher).
    """
    c, D = h.shape
    V = w.shape[0]
    cuda = h.is_cuda
    BM, BN, BK, warps, stages, prec, upcast = gemm_config(h.dtype, cuda)
    nvb = triton.cdiv(V, BN)
    z = torch.empty((c, V), device=h.device, dtype=h.dtype)
    P = torch.empty((NSTAT, c, nvb), device=h.device, dtype=torch.float32)
    has_t = t is not None
    tt = t if has_t else z
    bb = b if b is not None else z
    grid = (triton.cdiv(c, BM), nvb)
    _logits_fwd[grid](h, w, bb, tt, z, P, c, V, D, nvb, h.stride(0), w.stride(0), tt.stride(0), z.stride(0),
                      HAS_BIAS=b is not None, HAS_T=has_t, QLOGQ=bool(qlogq) and not has_t,
                      BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_PREC=prec, UPCAST=upcast,
                      num_warps=warps, num_stages=stages)
    return z, merge_partials(P, has_t, qlogq)


def merge_partials(P, has_t, qlogq):
    """Row statistics from the per-tile partials P [NSTAT, c, nvb] (module docstring)."""
    m, d, a, s = P[0], P[1], P[2], P[3]
    M = m.amax(1, keepdim=True)
    sc = torch.exp(m - M)
    Dn = (d * sc).sum(1)
    out = {"lse_s": M.squeeze(1) + torch.log(Dn), "sum_s": s.sum(1)}
    if qlogq and not has_t:
        out["qlogq"] = (sc * (a + (m - M) * d)).sum(1) / Dn - torch.log(Dn)
    if has_t:
        mt, dt, at = P[4], P[5], P[6]
        Mt = mt.amax(1, keepdim=True)
        sct = torch.exp(mt - Mt)
        Dt = (dt * sct).sum(1)
        out["lse_t"] = Mt.squeeze(1) + torch.log(Dt)
        out["pz"] = (at * sct).sum(1) / Dt
    return out


def grad_rows(z, t, lse_s, lse_t, A, B, U, CL, label, block=None):
    """In place: z[r, v] <- A_r softmax(z_r)_v - B_r softmax(t_r)_v - U_r - CL_r [v == label_r].

    All coefficients fp32 [c]; t/lse_t/B None without a dense teacher, label/CL None
    without the hard term.
    """
    c, V = z.shape
    if c == 0:
        return z
    BLOCK, warps = row_config(V, z.is_cuda, block)
    has_t, has_l = t is not None, label is not None
    f32 = (lambda x: x.float().contiguous())
    tt = t if has_t else z
    dummy = lse_s
    _grad_rows[(c,)](z, tt, f32(lse_s), f32(lse_t) if has_t else dummy, f32(A), f32(B) if has_t else dummy,
                     f32(U), f32(CL) if has_l else dummy,
                     label.to(torch.int32).contiguous() if has_l else dummy, V, z.stride(0), tt.stride(0),
                     HAS_T=has_t, HAS_LABEL=has_l, BLOCK=BLOCK, num_warps=warps, num_stages=ROW_STAGES)
    return z


# ---------------------------------------------------------------------------- compile matrix
def compile_specs():
    """Both kernels as the launchers above run them on CUDA, in the form
    ``scripts/gpu_compile_check.py`` compiles for sm_80 / sm_90 (``_configs.kernel_spec``).

    Representative call: Hd = 4096, V = 32000, a chunk of 1024 rows (``default_chunk`` at
    T = 8192), contiguous tensors. V = 128256 compiles to the same binaries (every integer
    keeps its specialisation: V, the row strides and the chunk are multiples of 16, the
    number of vocabulary tiles is not) and is left out to keep the matrix within CI's time.

    ``_logits_fwd``: fp32/bf16/fp16 with a dense teacher, with the student-only statistics
    of a sparse teacher (qlogq, for ``student_tail``) and with neither (hard CE only /
    ``kept``), with and without bias; fp32 also with tf32 products (what the launcher picks
    when ``torch.backends.cuda.matmul.allow_tf32`` is set), which like bf16/fp16 must lower
    to tensor-core MMA. ``_grad_rows``: with and without the dense teacher and label term.
    """
    from ._configs import DTYPES, Tile, kernel_spec

    Hd, V, C = 4096, 32000, 1024
    f32 = torch.float32
    specs = []
    for dtype in DTYPES:
        BM, BN, BK, warps, stages, prec, upcast = gemm_config(dtype, cuda=True)
        precs = ("ieee", "tf32") if dtype == f32 else (prec,)
        for prec in precs:
            variants = ((True, False, False), (True, False, True), (False, True, False), (False, False, False),
                        (False, False, True))
            if dtype == f32 and prec == "tf32":
                variants = variants[:1]
            for has_t, qlogq, has_b in variants:
                specs.append(kernel_spec(
                    _logits_fwd, "linear_logits_kl_fwd",
                    pointers=dict(H=dtype, W=dtype, BIAS=dtype, T=dtype, Z=dtype, P=f32),
                    ints=dict(C=C, V=V, D=Hd, NVB=triton.cdiv(V, BN), h_sr=Hd, w_sr=Hd, t_sr=V, z_sr=V),
                    constexprs=dict(HAS_BIAS=has_b, HAS_T=has_t, QLOGQ=qlogq, BLOCK_M=BM, BLOCK_N=BN,
                                    BLOCK_K=BK, DOT_PREC=prec, UPCAST=upcast),
                    tile=Tile(BM, BN, warps, stages), dtype=dtype, expect_mma=prec == "tf32",
                    vocab=V, teacher=has_t, role="default"))
        BLOCK, warps = row_config(V, cuda=True)
        for has_t, has_l in ((True, True), (True, False), (False, True), (False, False)):
            specs.append(kernel_spec(
                _grad_rows, "linear_logits_kl_rows",
                pointers=dict(Z=dtype, T=dtype, LSE_S=f32, LSE_T=f32, A=f32, B=f32, U=f32, CL=f32,
                              LABEL=torch.int32),
                ints=dict(V=V, z_sr=V, t_sr=V), constexprs=dict(HAS_T=has_t, HAS_LABEL=has_l, BLOCK=BLOCK),
                num_warps=warps, num_stages=ROW_STAGES, dtype=dtype, expect_mma=False, vocab=V,
                teacher=has_t, role="default"))
    return specs
