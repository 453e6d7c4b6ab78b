"""Python glue of the native backends.

``module_for("cpu")`` wraps the C++/OpenMP extension ``seekr_kernels._C`` (csrc/,
python/bindings.cpp); ``module_for("cuda")`` returns :mod:`seekr_kernels._native_cuda`.
Both give the surface the ops expect from a fused backend:

* ``attention_kl_fwd(a, teacher, tmass) -> (rows, lse, T)``, each [B, S, Q]
* ``attention_kl_bwd(a, teacher, lse, T, grad_rows) -> (dq, dk)`` in q's dtype and shapes
* ``attention_probs(a, out_dtype) -> [B, S, Q, L]``
* ``attention_sqdiff(a, q_b, k_b) -> [B, S, Q]`` (cpu only; ``a`` holds model a's q and k)

where ``a`` is the :class:`~seekr_kernels._checks.AttnArgs` of a validated call.

The extensions do not link libtorch. This module makes every tensor contiguous, allocates
the outputs and passes raw ``data_ptr()`` integers, dims and dtype codes; the Python
references it holds keep the tensors alive for the duration of the call, and the C++ side
releases the GIL while it computes. The C++ code re-checks dims, dtype codes and index
ranges and raises ValueError on anything inconsistent.
"""
from __future__ import annotations

import importlib

import torch

from ._checks import AttnArgs, ensure_index_ranges

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _ext():
    try:
        return importlib.import_module("seekr_kernels._C")
    except ImportError as e:
        raise RuntimeError(
            "the C++ extension seekr_kernels._C is not built (reinstall with `pip install -e .`; "
            f"it needs cmake and a C++ compiler): {e}") from e


def dtype_code(name, dtype, backend="cpu"):
    """The native dtype code of a tensor argument (shared by the cpu and cuda glue)."""
    if dtype not in DTYPE_CODES:
        raise TypeError(f"{name}: dtype {dtype} is not supported by the {backend} backend "
                        f"(expected one of {list(DTYPE_CODES)})")
    return DTYPE_CODES[dtype]


_code = dtype_code


def _acc_dtype(a: AttnArgs):
    return torch.float64 if a.q.dtype == torch.float64 else torch.float32


def _require_cpu(**tensors):
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name}: the cpu backend needs CPU tensors, got a tensor on {t.device}")


def _inputs(a: AttnArgs):
    """q, k (contiguous, same dtype), int32 index tensors and the dims tuple."""
    _require_cpu(q=a.q, k=a.k, heads=a.heads, queries=a.queries, attention_mask=a.key_mask)
    # The C++ side re-checks these too; checking here first (a few hundred ints on the
    # host) gives the same messages, naming the user's arguments, as the other backends.
    ensure_index_ranges(a)
    if a.k.dtype != a.q.dtype:
        raise TypeError(f"k: dtype {a.k.dtype} differs from q's dtype {a.q.dtype}")
    q = a.q.detach().contiguous()
    k = a.k.detach().contiguous()
    idx = [t.to(torch.int32).contiguous() for t in (a.heads, a.queries, a.key_mask)]
    dims = (a.B, a.H, a.Hkv, a.L, a.D, a.S, a.Q)
    return q, k, idx, dims


def _teacher(teacher, a: AttnArgs):
    if teacher is None:
        return None, 0
    _require_cpu(teacher=teacher)
    code = _code("teacher", teacher.dtype)
    if tuple(teacher.shape) != (a.B, a.S, a.Q, a.L):
        raise ValueError(f"teacher: expected shape {[a.B, a.S, a.Q, a.L]}, got {list(teacher.shape)}")
    return teacher.detach().contiguous(), code


def _rows_arg(name, t, a: AttnArgs, acc):
    _require_cpu(**{name: t})
    if tuple(t.shape) != (a.B, a.S, a.Q):
        raise ValueError(f"{name}: expected shape {[a.B, a.S, a.Q]}, got {list(t.shape)}")
    return t.detach().to(acc).contiguous()


def _ptr(t):
    return 0 if t is None else t.data_ptr()


class _CpuBackend:
    """The fused-backend surface over ``seekr_kernels._C`` (see the module docstring)."""

    name = "cpu"

    def attention_kl_fwd(self, a: AttnArgs, teacher, tmass):
        """Per-row KL, lse and teacher mass [B, S, Q] (fp32; fp64 for fp64 q).

        ``teacher=None``: rows = tmass * lse and T = tmass (tmass [B, S, Q]).
        """
        C = _ext()
        q, k, (heads, queries, kmask), dims = _inputs(a)
        acc = _acc_dtype(a)
        t, tcode = _teacher(teacher, a)
        tm = None
        if t is None:
            if tmass is None:
                raise ValueError("tmass: needed when teacher is None")
            tm = _rows_arg("tmass", tmass, a, acc)
        rows = torch.empty(a.B, a.S, a.Q, dtype=acc)
        lse = torch.empty_like(rows)
        T = torch.empty_like(rows)
        C.attention_kl_fwd(q.data_ptr(), k.data_ptr(), _ptr(t), tcode, _ptr(tm),
                           heads.data_ptr(), queries.data_ptr(), kmask.data_ptr(),
                           rows.data_ptr(), lse.data_ptr(), T.data_ptr(),
                           *dims, _code("q", q.dtype), float(a.scale))
        return rows, lse, T

    def attention_kl_bwd(self, a: AttnArgs, teacher, lse, T, grad_rows):
        """Gradients of sum(grad_rows * rows) w.r.t. q and k, in q's dtype.

        Deterministic: dk is owned per (sample, kv head, key block) and dq per group of
        query positions, so there are no atomics and the summation order is fixed.
        """
        C = _ext()
        q, k, (heads, queries, kmask), dims = _inputs(a)
        acc = _acc_dtype(a)
        t, tcode = _teacher(teacher, a)
        lse = _rows_arg("lse", lse, a, acc)
        T = _rows_arg("T", T, a, acc)
        g = _rows_arg("grad_rows", grad_rows, a, acc)
        dq = torch.empty(a.B, a.H, a.L, a.D, dtype=acc)
        dk = torch.empty(a.B, a.Hkv, a.L, a.D, dtype=acc)
        C.attention_kl_bwd(q.data_ptr(), k.data_ptr(), _ptr(t), tcode,
                           heads.data_ptr(), queries.data_ptr(), kmask.data_ptr(),
                           lse.data_ptr(), T.data_ptr(), g.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                           *dims, _code("q", q.dtype), float(a.scale))
        return dq.to(a.q.dtype), dk.to(a.k.dtype)

    def attention_probs(self, a: AttnArgs, out_dtype):
        """Student attention rows [B, S, Q, L] of the selected heads in ``out_dtype``:
        softmax over the valid keys, 0 on hidden keys and inactive rows."""
        C = _ext()
        q, k, (heads, queries, kmask), dims = _inputs(a)
        out = torch.empty(a.B, a.S, a.Q, a.L, dtype=out_dtype)
        C.attention_probs(q.data_ptr(), k.data_ptr(), heads.data_ptr(), queries.data_ptr(),
                          kmask.data_ptr(), out.data_ptr(), _code("out_dtype", out_dtype),
                          *dims, _code("q", q.dtype), float(a.scale))
        return out


    def attention_sqdiff(self, a: AttnArgs, q_b, k_b):
        """Per-row sum over the valid keys of (p_a - p_b)^2 [B, S, Q] (fp32; fp64 for fp64
        q): p_a from ``a.q``/``a.k``, p_b from ``q_b``/``k_b``; 0 on inactive rows."""
        C = _ext()
        q, k, (heads, queries, kmask), dims = _inputs(a)
        _require_cpu(q_b=q_b, k_b=k_b)
        for name, t, ref in (("q_b", q_b, q), ("k_b", k_b, k)):
            if t.dtype != ref.dtype:
                raise TypeError(f"{name}: dtype {t.dtype} differs from model a's dtype {ref.dtype}")
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"{name}: shape {list(t.shape)} differs from model a's {list(ref.shape)}")
        qb = q_b.detach().contiguous()
        kb = k_b.detach().contiguous()
        rows = torch.empty(a.B, a.S, a.Q, dtype=_acc_dtype(a))
        C.attention_sqdiff(q.data_ptr(), k.data_ptr(), qb.data_ptr(), kb.data_ptr(), heads.data_ptr(),
                           queries.data_ptr(), kmask.data_ptr(), rows.data_ptr(), *dims,
                           _code("q", q.dtype), float(a.scale))
        return rows


_CPU = _CpuBackend()


def module_for(backend: str):
    """The fused-backend object for ``backend`` ("cpu" or "cuda")."""
    if backend == "cpu":
        _ext()
        return _CPU
    if backend == "cuda":
        try:
            return importlib.import_module("seekr_kernels._native_cuda")
        except ImportError as e:
            raise RuntimeError(f"backend 'cuda': seekr_kernels._native_cuda is unavailable ({e})") from e
    raise ValueError(f"backend: no native module for {backend!r} (expected 'cpu' or 'cuda')")
