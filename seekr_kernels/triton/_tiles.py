"""Pieces every selected-row attention kernel shares.

A program owns a tile of BLOCK_M selected query rows of one (sample, slot) and walks key
blocks of the slot's kv head. These helpers load that tile and one key block with the
same masking rules everywhere: a row is active when its slot holds a head and its query
is a real token; a key is visible when it is causal (j <= i) and a real token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """a @ b accumulated in ACC. UPCAST: the interpreter's bf16 tl.dot is wrong (triton 3.9
    multiplies the raw bit patterns), so there bf16 tiles are multiplied as fp32 copies."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee").to(ACC)
    return tl.dot(a, b, input_precision=DOT_PREC).to(ACC)


@triton.jit
def row_tile(HEADS, QPOS, KMASK, pid_m, pid_bs, S, Qn, L, BLOCK_M: tl.constexpr):
    """The tile's sample b, slot s, head h (-1 = empty), clamped head hh, row offsets, query
    positions, which rows are active, and the causal end hi (last active position + 1)."""
    b = pid_bs // S
    s = pid_bs % S
    h = tl.load(HEADS + pid_bs)
    hh = tl.maximum(h, 0)              # empty slots read head 0 but have no active row
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos, active = row_positions(QPOS, KMASK, b, Qn, L, offs_m, h)
    hi = tl.max(tl.where(active, pos, -1), axis=0) + 1
    return b, s, h, hh, offs_m, pos, active, hi


@triton.jit
def row_positions(QPOS, KMASK, b, Qn, L, offs_m, h):
    m_in = offs_m < Qn
    pos = tl.load(QPOS + b * Qn + offs_m, mask=m_in, other=0)
    qreal = tl.load(KMASK + b * L + pos, mask=m_in, other=0) != 0
    # Broadcast the head before comparing: a scalar bool in a mask trips the interpreter.
    return pos, m_in & qreal & ((offs_m * 0 + h) >= 0)


@triton.jit
def load_rows(Q, stride_b, stride_h, stride_l, stride_d, b, h, pos, active, offs_d, D):
    """Query vectors [BLOCK_M, BLOCK_D] of the tile's rows (zeros on inactive rows)."""
    return tl.load(Q + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
                   + pos[:, None].to(tl.int64) * stride_l + offs_d[None, :] * stride_d,
                   mask=active[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def key_block(K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK, b, L, D, pos, active):
    """Keys [BLOCK_N, BLOCK_D] of one block and the [BLOCK_M, BLOCK_N] visibility mask."""
    n_in = offs_n < L
    k = tl.load(K + kbase + offs_n[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd,
                mask=n_in[:, None] & (offs_d[None, :] < D), other=0.0)
    kreal = tl.load(KMASK + b * L + offs_n, mask=n_in, other=0) != 0
    valid = active[:, None] & (offs_n[None, :] <= pos[:, None]) & (kreal & n_in)[None, :]
    return k, valid


def dot_config(dtype: torch.dtype, on_cuda: bool):
    """(DOT_PREC, UPCAST, ACC) of the tile kernels for inputs of ``dtype``.

    fp32/fp64 inputs multiply exactly ("ieee", no TF32) so results match the reference;
    16-bit inputs use the tensor cores (the precision argument is ignored for them).
    """
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    upcast = (not on_cuda) and dtype == torch.bfloat16
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return prec, upcast, acc
