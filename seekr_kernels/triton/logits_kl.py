"""Triton kernels for logits distillation: CE(student logits, softmax(teacher logits)).

For one token row r with student logits s [V] and teacher logits t [V]:

    lse_s  = log sum_v exp(s_v)              lse_t = log sum_v exp(t_v)
    p_v    = exp(t_v - lse_t)                (teacher probabilities)
    loss_r = sum_v -p_v * (s_v - lse_s) = lse_s - sum_v p_v s_v
    dloss_r / ds_v = softmax(s)_v - p_v

Two kernels, one program per token row, each streaming the vocabulary in BLOCK chunks, so
nothing larger than a [BLOCK] vector is ever held and no fp32 copy of [N, L, V] exists:

* ``_fwd``: lse_s, lse_t and sum_v p_v s_v in ONE pass. Every lane keeps its own online
  max/sum (m, d) for the student and the teacher plus a = sum exp(t - m_t) * s, rescaled
  by exp(m_old - m_new) whenever the teacher max grows (the FlashAttention trick applied
  to a dot product instead of a sum). The lanes are merged once at the end. Without a
  dense teacher (TopK path) it returns instead sum_v s_v and sum_v q_v log q_v
  (q = softmax(s)), which the TopK dropped-mass terms need.
* ``_bwd``: recomputes softmax(s) and p from the saved per-row lse and writes
  d s_v = A_r * softmax(s)_v - (A_r * p_v  |  U_r) in the student's dtype.

Unlike a fused cross-entropy that writes the gradient into the logits during the forward
(in place), the student logits here stay untouched: the same tensor also feeds the
model's own CE loss. The backward re-reads s (and t) instead; only 3-4 fp32 numbers per
row live between forward and backward.

Rows whose label is ignored are never read (their outputs stay 0, their gradient rows
are written as zeros), so NaN in padded positions cannot leak into the loss.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Start value of the running maxima: finite, so exp(m_old - m_new) stays 0 or 1 when a
# whole chunk is -inf (an -inf start would give exp(-inf + inf) = NaN). A constexpr: compiled
# @jit code may read no other kind of global (the interpreter does not mind, a GPU build fails).
_NEG = tl.constexpr(-3.0e38)


def _refuse_fp64(s):
    # The kernels accumulate in fp32; fp64 logits would come back fp32-accurate in fp64.
    if s.dtype == torch.float64:
        raise TypeError("student_logits: dtype torch.float64 is not supported by the triton "
                        "backend (its kernels accumulate in fp32); use backend='torch' for fp64")


@triton.jit
def _fwd(S, T, VALID, LOSS, LSE_S, LSE_T, SUM_S, QLOGQ,
         L, V, s_sn, s_sl, t_sn, t_sl,
         HAS_T: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = r // L
    l = r % L
    if tl.load(VALID + r) != 0:
        s_row = S + n * s_sn + l * s_sl
        t_row = T + n * t_sn + l * t_sl
        offs = tl.arange(0, BLOCK)
        m_s = tl.full([BLOCK], _NEG, tl.float32)
        d_s = tl.zeros([BLOCK], tl.float32)
        sum_s = tl.zeros([BLOCK], tl.float32)
        a_s = tl.zeros([BLOCK], tl.float32)
        m_t = tl.full([BLOCK], _NEG, tl.float32)
        d_t = tl.zeros([BLOCK], tl.float32)
        a_t = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            inb = cols < V
            s = tl.load(s_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_s, s)
            alpha_s = tl.exp(m_s - m_new)
            e_s = tl.exp(s - m_new)
            if not HAS_T:
                # a_s = sum exp(s - m) * (s - m), kept relative to the running max so that
                # sum q log q = A/D - log D needs no large cancelling terms.
                a_s = alpha_s * (a_s + (m_s - m_new) * d_s) + e_s * tl.where(e_s > 0, s - m_new, 0.0)
            d_s = d_s * alpha_s + e_s
            m_s = m_new
            sum_s += tl.where(inb, s, 0.0)
            if HAS_T:
                t = tl.load(t_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
                mt_new = tl.maximum(m_t, t)
                alpha = tl.exp(m_t - mt_new)
                e = tl.exp(t - mt_new)
                d_t = d_t * alpha + e
                # an entry the teacher gives no mass contributes 0 even where s = -inf
                a_t = a_t * alpha + e * tl.where(e > 0, s, 0.0)
                m_t = mt_new
        ms = tl.max(m_s, 0)
        sc_s = tl.exp(m_s - ms)
        ds = tl.sum(d_s * sc_s, 0)
        lse_s = ms + tl.log(ds)
        tl.store(LSE_S + r, lse_s)
        tl.store(SUM_S + r, tl.sum(sum_s, 0))
        if not HAS_T:
            as_ = tl.sum(sc_s * (a_s + (m_s - ms) * d_s), 0)
            tl.store(QLOGQ + r, as_ / ds - tl.log(ds))
        if HAS_T:
            mt = tl.max(m_t, 0)
            scale = tl.exp(m_t - mt)
            dt = tl.sum(d_t * scale, 0)
            at = tl.sum(a_t * scale, 0)
            tl.store(LSE_T + r, mt + tl.log(dt))
            tl.store(LOSS + r, lse_s - at / dt)


@triton.jit
def _bwd(S, T, G, LSE_S, LSE_T, A, U,
         L, V, s_sn, s_sl, t_sn, t_sl,
         HAS_T: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = r // L
    l = r % L
    a = tl.load(A + r)
    u = tl.load(U + r)
    g_row = G + r * V
    offs = tl.arange(0, BLOCK)
    if (a != 0.0) | (u != 0.0):
        s_row = S + n * s_sn + l * s_sl
        t_row = T + n * t_sn + l * t_sl
        lse_s = tl.load(LSE_S + r)
        lse_t = 0.0
        if HAS_T:
            lse_t = tl.load(LSE_T + r)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            inb = cols < V
            s = tl.load(s_row + cols, mask=inb, other=0.0).to(tl.float32)
            d = a * tl.exp(s - lse_s)
            if HAS_T:
                t = tl.load(t_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
                d = d - a * tl.exp(t - lse_t)
            else:
                d = d - u
            tl.store(g_row + cols, d.to(G.dtype.element_ty), mask=inb)
    else:
        # Ignored row (or zero incoming gradient): its gradient is exactly 0.
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            tl.store(g_row + cols, tl.zeros([BLOCK], tl.float32).to(G.dtype.element_ty),
                     mask=cols < V)


def launch_config(V, block=None):
    """(BLOCK, num_warps) of both kernels for vocabulary size V (``block`` overrides BLOCK).

    A chunk of up to 4096 entries per step keeps 7 fp32 [BLOCK] vectors live in the forward;
    8 warps from 2048 up give every thread at most 16 entries of each.
    """
    B = int(block) if block is not None else min(triton.next_power_of_2(V), 4096)
    return B, (8 if B >= 2048 else 4)


def logits_kl_fwd(s, t, valid, block=None):
    """Per-row statistics of ``s [N, L, V]`` (last dim contiguous) against ``t`` or None.

    ``valid``: bool/int [N*L] (flattened row order n * L + l). Returns fp32 [N*L] tensors
    (loss, lse_s, lse_t, sum_s, qlogq): qlogq = sum_v softmax(s)_v log softmax(s)_v is
    computed only without a teacher (TopK path), loss and lse_t only with one; every
    output is 0 on invalid rows.
    """
    _refuse_fp64(s)
    N, L, V = s.shape
    R = N * L
    dev = s.device
    loss = torch.zeros(R, device=dev, dtype=torch.float32)
    lse_s = torch.zeros_like(loss)
    lse_t = torch.zeros_like(loss)
    sum_s = torch.zeros_like(loss)
    qlogq = torch.zeros_like(loss)
    if R == 0:
        return loss, lse_s, lse_t, sum_s, qlogq
    assert s.stride(-1) == 1 and (t is None or t.stride(-1) == 1)
    valid = valid.reshape(-1).to(torch.int8).contiguous()
    B, nw = launch_config(V, block)
    has_t = t is not None
    tt = t if has_t else s
    _fwd[(R,)](s, tt, valid, loss, lse_s, lse_t, sum_s, qlogq,
               L, V, s.stride(0), s.stride(1), tt.stride(0), tt.stride(1),
               HAS_T=has_t, BLOCK=B, num_warps=nw, num_stages=3)
    return loss, lse_s, lse_t, sum_s, qlogq


def logits_kl_bwd(s, t, lse_s, lse_t, A, U, block=None):
    """Gradient [N, L, V] (contiguous, s's dtype): A_r * softmax(s) - (A_r * p | U_r).

    ``A``, ``U``: fp32 [N*L]; rows where both are 0 get an all-zero gradient row.
    """
    _refuse_fp64(s)
    N, L, V = s.shape
    R = N * L
    grad = torch.empty((N, L, V), device=s.device, dtype=s.dtype)
    if R == 0:
        return grad
    B, nw = launch_config(V, block)
    has_t = t is not None
    tt = t if has_t else s
    _bwd[(R,)](s, tt, grad, lse_s, lse_t, A.float().contiguous(), U.float().contiguous(),
               L, V, s.stride(0), s.stride(1), tt.stride(0), tt.stride(1),
               HAS_T=has_t, BLOCK=B, num_warps=nw, num_stages=3)
    return grad


def compile_specs():
    """Both kernels as the launchers above run them on CUDA: fp32/bf16/fp16 logits, with a
    dense teacher and without one (the TopK path), for a real vocabulary (V = 32000; every
    V > 2048 gives the same BLOCK = 4096 and 8 warps). Vocabularies of toy models (smaller
    BLOCK) are left out to keep the matrix within CI's time."""
    from ._configs import DTYPES, kernel_spec

    specs = []
    L = 4096   # representative contiguous [N, L, V] logits
    for dtype in DTYPES:
        for V in (32000,):
            B, nw = launch_config(V)
            for has_t in (True, False):
                ints = dict(L=L, V=V, s_sn=L * V, s_sl=V, t_sn=L * V, t_sl=V)
                f32 = torch.float32
                fwd = dict(S=dtype, T=dtype, VALID=torch.int8, LOSS=f32, LSE_S=f32, LSE_T=f32, SUM_S=f32,
                           QLOGQ=f32)
                bwd = dict(S=dtype, T=dtype, G=dtype, LSE_S=f32, LSE_T=f32, A=f32, U=f32)
                for name, fn, ptrs in (("logits_kl_fwd", _fwd, fwd), ("logits_kl_bwd", _bwd, bwd)):
                    specs.append(kernel_spec(fn, name, pointers=ptrs, ints=ints,
                                             constexprs=dict(HAS_T=has_t, BLOCK=B), num_warps=nw,
                                             num_stages=3, dtype=dtype, expect_mma=False, vocab=V,
                                             teacher=has_t, role="default"))
    return specs
