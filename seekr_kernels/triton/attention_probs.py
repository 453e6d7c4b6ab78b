"""Triton kernel for teacher capture: softmax rows of selected heads and query rows.

One program per (tile of BLOCK_M selected query rows, sample x slot), two passes over
key blocks (docs/DESIGN.md §2, teacher capture):

* pass 1 streams key blocks up to the tile's last query position and keeps the online
  max / sum of exp per row, i.e. lse over the valid keys j <= i with mask[b, j] = 1;
* pass 2 recomputes the scores block by block and writes p_j = exp(z_j - lse) for valid
  keys and 0 for future or padded keys; blocks past the tile's last position, and whole
  rows of empty slots or padded queries, are written as zeros without any compute.

Only the [B, S, Q, L] output is ever written; nothing of size [H, L, L] exists.
Scores are kept in base 2 (z * log2(e)) so both passes use exp2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import AttnArgs, triton_entry_checks
from ._configs import block_d_for, choose, tile_kernel_specs
from ._tiles import dot_config, key_block, load_rows, mm, row_tile

_LOG2E = 1.4426950408889634


@triton.jit
def _scores2(q, K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK, b, L, D, pos, active,
             scale2, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Base-2 scores z * log2(e) of one key block, -inf where the row may not see the key."""
    k, valid = key_block(K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK, b, L, D, pos, active)
    z = mm(q, tl.trans(k), DOT_PREC, UPCAST, ACC) * scale2
    return tl.where(valid, z, float("-inf")), valid


@triton.jit
def _probs_kernel(Q, K, HEADS, QPOS, KMASK, OUT,
                  stride_qb, stride_qh, stride_ql, stride_qd,
                  stride_kb, stride_kh, stride_kl, stride_kd,
                  S, Qn, L, D, G, scale2,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_bs = tl.program_id(1)          # b * S + s
    b, s, h, hh, offs_m, pos, active, hi = row_tile(HEADS, QPOS, KMASK, tl.program_id(0), pid_bs,
                                                    S, Qn, L, BLOCK_M)
    m_in = offs_m < Qn
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q, stride_qb, stride_qh, stride_ql, stride_qd, b, hh, pos, active, offs_d, D)
    kbase = b.to(tl.int64) * stride_kb + (hh // G).to(tl.int64) * stride_kh

    # Pass 1: base-2 log-sum-exp over the valid keys, online.
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, hi, BLOCK_N):
        z, valid = _scores2(q, K, kbase, start_n + offs_n0, offs_d, stride_kl, stride_kd, KMASK,
                            b, L, D, pos, active, scale2, DOT_PREC, UPCAST, ACC)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no key yet
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
        m_i = m_new
    # Rows without a valid key (inactive) get lse 0; pass 2 writes zeros for them anyway.
    lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), 0.0)

    # Pass 2: p = exp2(z - lse2) on valid keys, 0 on the others.
    row_base = (pid_bs.to(tl.int64) * Qn + offs_m) * L          # int64 offsets into OUT
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        z, valid = _scores2(q, K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK,
                            b, L, D, pos, active, scale2, DOT_PREC, UPCAST, ACC)
        p = tl.where(valid, tl.exp2(z - lse2[:, None]), 0.0)
        tl.store(OUT + row_base[:, None] + offs_n[None, :], p.to(OUT.dtype.element_ty),
                 mask=m_in[:, None] & (offs_n[None, :] < L))
    # Keys past the tile's horizon: zeros, no compute (the whole row for inactive tiles).
    zeros = tl.zeros([BLOCK_M, BLOCK_N], OUT.dtype.element_ty)
    for start_n in range(tl.cdiv(hi, BLOCK_N) * BLOCK_N, L, BLOCK_N):
        offs_n = start_n + offs_n0
        tl.store(OUT + row_base[:, None] + offs_n[None, :], zeros,
                 mask=m_in[:, None] & (offs_n[None, :] < L))


def attention_probs(a: AttnArgs, out_dtype: torch.dtype) -> torch.Tensor:
    """Softmax rows [B, S, Q, L] (contiguous, ``out_dtype``) for validated args."""
    triton_entry_checks(a)
    out = torch.empty(a.B, a.S, a.Q, a.L, device=a.q.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    bd = block_d_for(a.D)
    prec, up, acc = dot_config(a.q.dtype, a.q.is_cuda)

    def run(tile):
        return _probs_kernel[(triton.cdiv(a.Q, tile.block_m), a.B * a.S)](
            a.q, a.k, a.heads, a.queries, a.key_mask, out, *a.q.stride(), *a.k.stride(),
            a.S, a.Q, a.L, a.D, a.group, a.scale * _LOG2E,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=bd, DOT_PREC=prec, UPCAST=up, ACC=acc,
            num_warps=tile.num_warps, num_stages=tile.num_stages)
    run(choose("attention_probs", a.q, bd, False, a.L, a.Q, run))
    return out


def compile_specs():
    """The CUDA launch configuration above (output in the input's dtype, the default), as
    gpu_compile_check.py compiles it."""
    strides = [(tuple(f"stride_{x}{d}" for d in "bhld"), x) for x in "qk"]
    return tile_kernel_specs(_probs_kernel, "attention_probs", strides, lambda dt, _: dict(
        Q=dt, K=dt, HEADS=torch.int32, QPOS=torch.int32, KMASK=torch.int32, OUT=dt))
