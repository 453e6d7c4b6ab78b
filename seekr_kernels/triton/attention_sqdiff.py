"""Triton kernel for forgettability: sum_j (p_a_j - p_b_j)^2 per selected attention row.

Two models ``a`` (e.g. before a task) and ``b`` (after it) give, for row r = (b, s, i) of
head h = heads[b, s] and valid keys V = {j <= i, mask[b, j] = 1},

    p_x_j = exp(z_x_j - lse_x),   z_x_j = scale * q_x[b, h, i] . k_x[b, h // G, j],   x in {a, b}

and the kernel writes ``rows[b, s, i] = sum_{j in V} (p_a_j - p_b_j)^2`` (fp32; fp64 input
is refused, as by every Triton kernel). Keys outside V are 0 in both maps and add nothing.

One program per (tile of BLOCK_M query rows, sample x slot), two passes over key blocks:

* pass 1 keeps online max / sum-of-exp of both score rows (the lse of each model);
* pass 2 recomputes both score blocks, normalises them and accumulates the squared
  difference.

Two passes rather than one: the one-pass identity sum p_a^2 + sum p_b^2 - 2 sum p_a p_b
(all three are online log-sum-exps) cancels catastrophically exactly where this op is
used, on small changes of attention, so the difference is formed entry by entry from
normalised probabilities. Nothing of size [L] per row is ever written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import AttnArgs, triton_entry_checks
from ._configs import block_d_for, choose, tile_kernel_specs
from ._tiles import dot_config, load_rows, mm, row_tile

_LOG2E = 1.4426950408889634


@triton.jit
def _block_scores(q, K, kbase, offs_n, offs_d, stride_kl, stride_kd, L, D, valid, scale2,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Base-2 scores of one key block, -inf where the row may not see the key."""
    n_in = offs_n < L
    k = tl.load(K + kbase + offs_n[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd,
                mask=n_in[:, None] & (offs_d[None, :] < D), other=0.0)
    z = mm(q, tl.trans(k), DOT_PREC, UPCAST, ACC) * scale2
    return tl.where(valid, z, float("-inf"))


@triton.jit
def _online(m_i, l_i, z):
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no valid key yet
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _both_scores(qa, qb, KA, KB, ka_base, kb_base, offs_n, offs_d, s_ka_l, s_ka_d, s_kb_l, s_kb_d,
                 KMASK, b, L, D, pos, active, scale2,
                 DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Visibility of one key block and both models' base-2 scores on it (pass 1 and 2 alike)."""
    n_in = offs_n < L
    kreal = tl.load(KMASK + b * L + offs_n, mask=n_in, other=0) != 0
    valid = active[:, None] & (offs_n[None, :] <= pos[:, None]) & (kreal & n_in)[None, :]
    za = _block_scores(qa, KA, ka_base, offs_n, offs_d, s_ka_l, s_ka_d, L, D, valid, scale2,
                       DOT_PREC, UPCAST, ACC)
    zb = _block_scores(qb, KB, kb_base, offs_n, offs_d, s_kb_l, s_kb_d, L, D, valid, scale2,
                       DOT_PREC, UPCAST, ACC)
    return valid, za, zb


@triton.jit
def _sqdiff_kernel(QA, KA, QB, KB, HEADS, QPOS, KMASK, OUT,
                   s_qa_b, s_qa_h, s_qa_l, s_qa_d,
                   s_ka_b, s_ka_h, s_ka_l, s_ka_d,
                   s_qb_b, s_qb_h, s_qb_l, s_qb_d,
                   s_kb_b, s_kb_h, s_kb_l, s_kb_d,
                   S, Qn, L, D, G, scale2,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_bs = tl.program_id(1)          # b * S + s
    b, s, h, hh, offs_m, pos, active, hi = row_tile(HEADS, QPOS, KMASK, tl.program_id(0), pid_bs,
                                                    S, Qn, L, BLOCK_M)
    m_in = offs_m < Qn
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qa = load_rows(QA, s_qa_b, s_qa_h, s_qa_l, s_qa_d, b, hh, pos, active, offs_d, D)
    qb = load_rows(QB, s_qb_b, s_qb_h, s_qb_l, s_qb_d, b, hh, pos, active, offs_d, D)
    b64 = b.to(tl.int64)
    kv64 = (hh // G).to(tl.int64)
    ka_base = b64 * s_ka_b + kv64 * s_ka_h
    kb_base = b64 * s_kb_b + kv64 * s_kb_h

    # Pass 1: base-2 log-sum-exp of both models' rows, online.
    ma = tl.full([BLOCK_M], float("-inf"), ACC)
    la = tl.zeros([BLOCK_M], ACC)
    mb = tl.full([BLOCK_M], float("-inf"), ACC)
    lb = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, hi, BLOCK_N):
        valid, za, zb = _both_scores(qa, qb, KA, KB, ka_base, kb_base, start_n + offs_n0, offs_d,
                                     s_ka_l, s_ka_d, s_kb_l, s_kb_d, KMASK, b, L, D, pos, active,
                                     scale2, DOT_PREC, UPCAST, ACC)
        ma, la = _online(ma, la, za)
        mb, lb = _online(mb, lb, zb)
    lse_a = tl.where(la > 0, ma + tl.log2(tl.where(la > 0, la, 1.0)), 0.0)
    lse_b = tl.where(lb > 0, mb + tl.log2(tl.where(lb > 0, lb, 1.0)), 0.0)

    # Pass 2: sum over valid keys of (p_a - p_b)^2, from normalised probabilities.
    acc = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, hi, BLOCK_N):
        valid, za, zb = _both_scores(qa, qb, KA, KB, ka_base, kb_base, start_n + offs_n0, offs_d,
                                     s_ka_l, s_ka_d, s_kb_l, s_kb_d, KMASK, b, L, D, pos, active,
                                     scale2, DOT_PREC, UPCAST, ACC)
        diff = tl.where(valid, tl.exp2(za - lse_a[:, None]) - tl.exp2(zb - lse_b[:, None]), 0.0)
        acc += tl.sum(diff * diff, axis=1)
    tl.store(OUT + pid_bs.to(tl.int64) * Qn + offs_m, tl.where(active, acc, 0.0), mask=m_in)


def attention_sqdiff_rows(a: AttnArgs, q_b: torch.Tensor, k_b: torch.Tensor) -> torch.Tensor:
    """Rows [B, S, Q] for validated args (``a`` holds model a's q/k; ``q_b``/``k_b`` alike)."""
    triton_entry_checks(a)
    out_dtype = torch.float64 if a.q.dtype == torch.float64 else torch.float32
    out = torch.empty(a.B, a.S, a.Q, device=a.q.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    bd = block_d_for(a.D)
    prec, up, acc = dot_config(a.q.dtype, a.q.is_cuda)

    def run(tile):
        return _sqdiff_kernel[(triton.cdiv(a.Q, tile.block_m), a.B * a.S)](
            a.q, a.k, q_b, k_b, a.heads, a.queries, a.key_mask, out,
            *a.q.stride(), *a.k.stride(), *q_b.stride(), *k_b.stride(),
            a.S, a.Q, a.L, a.D, a.group, a.scale * _LOG2E,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=bd, DOT_PREC=prec, UPCAST=up, ACC=acc,
            num_warps=tile.num_warps, num_stages=tile.num_stages)
    run(choose("attention_sqdiff", a.q, bd, False, a.L, a.Q, run))
    return out


def compile_specs():
    """The CUDA launch configuration above (both models' q and k contiguous), as
    gpu_compile_check.py compiles it."""
    strides = [(tuple(f"s_{x}{m}_{d}" for d in "bhld"), x) for x in "qk" for m in "ab"]
    return tile_kernel_specs(_sqdiff_kernel, "attention_sqdiff", strides, lambda dt, _: dict(
        QA=dt, KA=dt, QB=dt, KB=dt, HEADS=torch.int32, QPOS=torch.int32, KMASK=torch.int32, OUT=torch.float32))
