"""Triton kernels for the fused attention-KL loss (docs/DESIGN.md §2).

Three kernels, none of which ever holds more than a [BLOCK_M, BLOCK_N] tile of scores:

* ``_fwd``: one program per (tile of selected query rows, sample x slot). It streams key
  blocks up to the tile's last query position (the causal mask hides the rest) and keeps,
  per row, the online max/sum of the log-sum-exp plus the three teacher sums
  (sum t, sum t*z, sum t log t). Writes the row KL, lse and T — nothing of size L.
* ``_bwd_dq``: same grid; recomputes p = exp(z - lse) block by block and accumulates
  dq_row = scale * sum_j g*(T*p_j - t_j) k_j into a [B, S, Q, D] buffer, which the
  launcher scatters into dq (rows may repeat a position, so the scatter accumulates).
* ``_bwd_dk``: one program per (key block, sample x kv head). It visits every slot of
  the sample whose head reads this kv head and every row tile that can see the block,
  accumulating dk_j = scale * sum_rows g*(T*p_j - t_j) q_row in registers. Each dk
  element is owned by exactly one program, so the result is deterministic (no atomics);
  the price is a second recomputation of the scores, cheap next to the teacher reads.

The teacher is read with its own strides (any layout); q and k too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import AttnArgs, triton_entry_checks
from ._configs import block_d_for, choose, tile_kernel_specs
from ._tiles import dot_config, key_block, load_rows, mm, row_positions, row_tile


@triton.jit
def _scores(q, K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK, b, L, D, pos, active,
            scale, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """z = scale * q k^T for one key block, the keys, and which keys each row may see."""
    k, valid = key_block(K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK, b, L, D, pos, active)
    return k, mm(q, tl.trans(k), DOT_PREC, UPCAST, tl.float32) * scale, valid


@triton.jit
def _row_tile_setup(Q, HEADS, QPOS, KMASK, stride_qb, stride_qh, stride_ql, stride_qd, stride_kb,
                    stride_kh, stride_tb, stride_ts, pid_bs, S, Qn, L, D, G,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of this program's tile, their query vectors, and the k / teacher base offsets."""
    b, s, h, hh, offs_m, pos, active, hi = row_tile(HEADS, QPOS, KMASK, tl.program_id(0), pid_bs,
                                                    S, Qn, L, BLOCK_M)
    b64 = b.to(tl.int64)
    q = load_rows(Q, stride_qb, stride_qh, stride_ql, stride_qd, b, hh, pos, active,
                  tl.arange(0, BLOCK_D), D)
    kbase = b64 * stride_kb + (hh // G).to(tl.int64) * stride_kh
    tbase = b64 * stride_tb + s.to(tl.int64) * stride_ts
    return b, hh, offs_m, pos, active, hi, q, kbase, tbase


@triton.jit
def _fwd(Q, K, T, TM_IN, HEADS, QPOS, KMASK, ROWS, LSE, TOUT,
         stride_qb, stride_qh, stride_ql, stride_qd,
         stride_kb, stride_kh, stride_kl, stride_kd,
         stride_tb, stride_ts, stride_tq, stride_tl,
         S, Qn, L, D, G, scale,
         HAS_TEACHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_bs = tl.program_id(1)
    b, hh, offs_m, pos, active, hi, q, kbase, tbase = _row_tile_setup(
        Q, HEADS, QPOS, KMASK, stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh,
        stride_tb, stride_ts, pid_bs, S, Qn, L, D, G, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    # Keys past the last active query position of the tile (hi) are causally hidden.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_sum = tl.zeros([BLOCK_M], tl.float32)
    tz_sum = tl.zeros([BLOCK_M], tl.float32)
    tlogt_sum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k, z, valid = _scores(q, K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK, b, L, D,
                              pos, active, scale, DOT_PREC, UPCAST)
        z = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no key yet
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m_i = m_new
        if HAS_TEACHER:
            t = tl.load(T + tbase + offs_m[:, None].to(tl.int64) * stride_tq
                        + offs_n[None, :].to(tl.int64) * stride_tl,
                        mask=valid, other=0.0).to(tl.float32)
            t_sum += tl.sum(t, axis=1)
            tz_sum += tl.sum(t * tl.where(valid, z, 0.0), axis=1)
            tlogt_sum += tl.sum(tl.where(t > 0, t * tl.log(tl.where(t > 0, t, 1.0)), 0.0), axis=1)

    lse = tl.where(active, m_i + tl.log(tl.where(active, l_i, 1.0)), 0.0)
    out_off = pid_bs.to(tl.int64) * Qn + offs_m
    m_in = offs_m < Qn
    if HAS_TEACHER:
        rows = tlogt_sum - tz_sum + t_sum * lse
    else:
        t_sum = tl.load(TM_IN + out_off, mask=m_in, other=0.0)
        rows = t_sum * lse
    tl.store(ROWS + out_off, tl.where(active, rows, 0.0), mask=m_in)
    tl.store(LSE + out_off, lse, mask=m_in)
    tl.store(TOUT + out_off, tl.where(active, t_sum, 0.0), mask=m_in)


@triton.jit
def _dz(z, valid, lse, tm, g, T, tbase, offs_m, offs_n, stride_tq, stride_tl, HAS_TEACHER: tl.constexpr):
    """dKL/dz for one score tile: g * (T * p - t) on visible keys, 0 elsewhere."""
    # Hidden keys go to exp(-inf) = 0 directly, never through exp(large) then a select.
    p = tl.exp(tl.where(valid, z - lse[:, None], float("-inf")))
    dz = tm[:, None] * p
    if HAS_TEACHER:
        t = tl.load(T + tbase + offs_m[:, None].to(tl.int64) * stride_tq
                    + offs_n[None, :].to(tl.int64) * stride_tl, mask=valid, other=0.0).to(tl.float32)
        dz = dz - t
    return g[:, None] * dz


@triton.jit
def _bwd_dq(Q, K, T, HEADS, QPOS, KMASK, LSE, TM, GRAD, DQR,
            stride_qb, stride_qh, stride_ql, stride_qd,
            stride_kb, stride_kh, stride_kl, stride_kd,
            stride_tb, stride_ts, stride_tq, stride_tl,
            S, Qn, L, D, G, scale,
            HAS_TEACHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_bs = tl.program_id(1)
    b, hh, offs_m, pos, active, hi, q, kbase, tbase = _row_tile_setup(
        Q, HEADS, QPOS, KMASK, stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh,
        stride_tb, stride_ts, pid_bs, S, Qn, L, D, G, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    row_off = pid_bs.to(tl.int64) * Qn + offs_m
    m_in = offs_m < Qn
    lse = tl.load(LSE + row_off, mask=m_in, other=0.0)
    tm = tl.load(TM + row_off, mask=m_in, other=0.0)
    g = tl.where(active, tl.load(GRAD + row_off, mask=m_in, other=0.0), 0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k, z, valid = _scores(q, K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK, b, L, D,
                              pos, active, scale, DOT_PREC, UPCAST)
        dz = _dz(z, valid, lse, tm, g, T, tbase, offs_m, offs_n, stride_tq, stride_tl, HAS_TEACHER)
        acc += mm(dz.to(k.dtype), k, DOT_PREC, UPCAST, tl.float32)
    tl.store(DQR + row_off[:, None] * D + offs_d[None, :], acc * scale,
             mask=m_in[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dk(Q, K, T, HEADS, QPOS, KMASK, LSE, TM, GRAD, DK,
            stride_qb, stride_qh, stride_ql, stride_qd,
            stride_kb, stride_kh, stride_kl, stride_kd,
            stride_tb, stride_ts, stride_tq, stride_tl,
            S, Qn, L, D, G, Hkv, scale,
            HAS_TEACHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    kvh = pid_bk % Hkv
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_start = pid_n * BLOCK_N
    kbase = b64 * stride_kb + kvh.to(tl.int64) * stride_kh

    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for s in range(0, S):
        h = tl.load(HEADS + b * S + s)
        if (h >= 0) & (h // G == kvh):
            tbase = b64 * stride_tb + (b64 * 0 + s) * stride_ts   # int64 (s may be a python int)
            for start_m in range(0, Qn, BLOCK_M):
                offs_m = start_m + offs_m0
                pos, active = row_positions(QPOS, KMASK, b, Qn, L, offs_m, h)
                # A row tile whose queries all precede this key block sees none of it.
                if tl.max(tl.where(active, pos, -1), axis=0) >= n_start:
                    q = load_rows(Q, stride_qb, stride_qh, stride_ql, stride_qd, b, h, pos, active,
                                  offs_d, D)
                    k, z, valid = _scores(q, K, kbase, offs_n, offs_d, stride_kl, stride_kd, KMASK,
                                          b, L, D, pos, active, scale, DOT_PREC, UPCAST)
                    row_off = (b * S + s).to(tl.int64) * Qn + offs_m
                    m_in = offs_m < Qn
                    lse = tl.load(LSE + row_off, mask=m_in, other=0.0)
                    tm = tl.load(TM + row_off, mask=m_in, other=0.0)
                    g = tl.where(active, tl.load(GRAD + row_off, mask=m_in, other=0.0), 0.0)
                    dz = _dz(z, valid, lse, tm, g, T, tbase, offs_m, offs_n, stride_tq, stride_tl,
                             HAS_TEACHER)
                    acc += mm(tl.trans(dz.to(q.dtype)), q, DOT_PREC, UPCAST, tl.float32)
    # DK is a contiguous [B, Hkv, L, D] output; every element is written (zeros if unseen).
    dk_off = (pid_bk.to(tl.int64) * L + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(DK + dk_off, (acc * scale).to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < L) & (offs_d[None, :] < D))


def _teacher_args(teacher, a):
    if teacher is None:
        return a.q, (0, 0, 0, 0)   # dummy pointer, never read (HAS_TEACHER=False)
    return teacher, tuple(teacher.stride())


def _acc_dtype(a):
    return torch.float64 if a.q.dtype == torch.float64 else torch.float32


def _launch(kernel, fn, grid_of, a, has_t, args):
    """Launch ``fn`` with the configuration ``choose`` picks (autotuned on CUDA)."""
    bd = block_d_for(a.D)
    prec, up, _ = dot_config(a.q.dtype, a.q.is_cuda)

    def run(tile):
        return fn[grid_of(tile)](*args, HAS_TEACHER=has_t, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                 BLOCK_D=bd, DOT_PREC=prec, UPCAST=up, num_warps=tile.num_warps,
                                 num_stages=tile.num_stages)
    run(choose(kernel, a.q, bd, has_t, a.L, a.Q, run))


def attention_kl_fwd(a: AttnArgs, teacher, tmass):
    """Per-row KL, lse and teacher mass, each [B, S, Q] fp32 (fp64 input is refused)."""
    triton_entry_checks(a)
    acc = _acc_dtype(a)
    rows = torch.empty(a.B, a.S, a.Q, device=a.q.device, dtype=acc)
    lse = torch.empty_like(rows)
    tout = torch.empty_like(rows)
    t, ts = _teacher_args(teacher, a)
    tm_in = tmass if tmass is not None else rows
    _launch("attention_kl_fwd", _fwd, lambda c: (triton.cdiv(a.Q, c.block_m), a.B * a.S), a,
            teacher is not None,
            (a.q, a.k, t, tm_in, a.heads, a.queries, a.key_mask, rows, lse, tout,
             *a.q.stride(), *a.k.stride(), *ts, a.S, a.Q, a.L, a.D, a.group, a.scale))
    return rows, lse, tout


def attention_kl_bwd(a: AttnArgs, teacher, lse, tmass, grad_rows):
    """Gradients of sum(grad_rows * rows) with respect to q and k."""
    triton_entry_checks(a)
    t, ts = _teacher_args(teacher, a)
    has_t = teacher is not None
    grad_rows = grad_rows.to(lse.dtype).contiguous()
    dq_rows = torch.empty(a.B, a.S, a.Q, a.D, device=a.q.device, dtype=lse.dtype)
    _launch("attention_kl_dq", _bwd_dq, lambda c: (triton.cdiv(a.Q, c.block_m), a.B * a.S), a, has_t,
            (a.q, a.k, t, a.heads, a.queries, a.key_mask, lse, tmass, grad_rows, dq_rows,
             *a.q.stride(), *a.k.stride(), *ts, a.S, a.Q, a.L, a.D, a.group, a.scale))
    dk = torch.empty(a.B, a.Hkv, a.L, a.D, device=a.k.device, dtype=a.k.dtype)
    _launch("attention_kl_dk", _bwd_dk, lambda c: (triton.cdiv(a.L, c.block_n), a.B * a.Hkv), a, has_t,
            (a.q, a.k, t, a.heads, a.queries, a.key_mask, lse, tmass, grad_rows, dk,
             *a.q.stride(), *a.k.stride(), *ts, a.S, a.Q, a.L, a.D, a.group, a.Hkv, a.scale))
    return scatter_dq(a, dq_rows), dk


def scatter_dq(a: AttnArgs, dq_rows):
    """dq [B, H, L, D] from per-row gradients [B, S, Q, D] (repeated positions add up)."""
    dq = torch.zeros(a.B, a.H, a.L, a.D, device=a.q.device, dtype=dq_rows.dtype)
    b = torch.arange(a.B, device=a.q.device)[:, None, None].expand(a.B, a.S, a.Q)
    h = a.heads.long().clamp_min(0)[:, :, None].expand(a.B, a.S, a.Q)
    i = a.queries.long()[:, None, :].expand(a.B, a.S, a.Q)
    act = a.row_active
    dq.index_put_((b[act], h[act], i[act]), dq_rows[act], accumulate=True)
    return dq.to(a.q.dtype)


def compile_specs():
    """Every configuration the launchers above use on CUDA (defaults and autotuning
    candidates), with and without a teacher, as gpu_compile_check.py compiles them."""
    strides = [(tuple(f"stride_{x}{d}" for d in "bhld"), x) for x in "qk"]
    strides.append((("stride_tb", "stride_ts", "stride_tq", "stride_tl"), "t"))
    f32 = torch.float32

    def pointers(out, **extra):
        return lambda dt, has_t: dict(Q=dt, K=dt, T=dt, HEADS=torch.int32, QPOS=torch.int32,
                                      KMASK=torch.int32, **{k: (dt if v is None else v) for k, v in
                                                            dict(out, **extra).items()})
    bwd = dict(LSE=f32, TM=f32, GRAD=f32)
    return (tile_kernel_specs(_fwd, "attention_kl_fwd", strides, pointers(
                dict(TM_IN=f32, ROWS=f32, LSE=f32, TOUT=f32)), teachers=(True, False))
            + tile_kernel_specs(_bwd_dq, "attention_kl_dq", strides, pointers(bwd, DQR=f32),
                                teachers=(True, False))
            + tile_kernel_specs(_bwd_dk, "attention_kl_dk", strides, pointers(bwd, DK=None),
                                teachers=(True, False)))
