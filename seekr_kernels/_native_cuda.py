"""Python glue of the CUDA C++ backend (``seekr_kernels._C_cuda``, built from csrc/*.cu).

The extension does not link libtorch: this module validates the tensors, makes them
contiguous, allocates the outputs and hands raw ``data_ptr()`` integers, dims, dtype codes
and the current CUDA stream to the kernels (brief: "native-code convention"). The module
surface is the one the ops expect from a fused backend:

* ``attention_kl_fwd(a, teacher, tmass) -> (rows, lse, T)``
* ``attention_kl_bwd(a, teacher, lse, T, grad_rows) -> (dq, dk)``
* ``attention_probs(a, out_dtype) -> [B, S, Q, L]``

where ``a`` is the :class:`~seekr_kernels._checks.AttnArgs` of an already validated call.
Each native call synchronises the stream once before returning, to read back the kernels'
index-range error flag (bad heads/queries/mask values raise ValueError even with
``check_values=False``).

Status: the CUDA kernels are compiled (nvcc, sm_80 and sm_90) and their source is tested on
CPU under an emulation (tests/cuda_emu, tests/test_native_cuda.py); they have not yet been
run on a GPU. The `gpu` tests in tests/test_native_cuda.py are the check to run when a GPU
is available (SEEKR_TEST_GPU=1).
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from ._checks import AttnArgs
from ._native import dtype_code  # one dtype table for both extensions



def _module():
    """The compiled extension, or a RuntimeError saying how to get it."""
    try:
        return importlib.import_module("seekr_kernels._C_cuda")
    except ImportError as e:
        raise RuntimeError(
            "the CUDA extension seekr_kernels._C_cuda is not built (install with nvcc on PATH, "
            f"or SEEKR_BUILD_CUDA=1 to make a missing nvcc an error): {e}") from e


def _code(name, dtype):
    return dtype_code(name, dtype, "cuda")


def _require_cuda(a: AttnArgs, **extra):
    """Every tensor on the same CUDA device as q; ValueError naming the first that is not."""
    dev = a.q.device
    if dev.type != "cuda":
        raise ValueError(f"q: the cuda backend needs CUDA tensors, got a tensor on {dev} "
                         "(use backend='cpu' or 'torch' for CPU tensors)")
    named = [("k", a.k), ("heads", a.heads), ("queries", a.queries), ("attention_mask", a.key_mask)]
    named += [(n, t) for n, t in extra.items() if t is not None]
    for name, t in named:
        if t.device != dev:
            raise ValueError(f"{name}: is on {t.device}, q is on {dev} (the cuda backend needs "
                             "every tensor on q's device)")
    return dev


@contextlib.contextmanager
def _on_device(dev):
    """Make q's device current for the runtime and yield torch's current stream there (int)."""
    with torch.cuda.device(dev):
        yield torch.cuda.current_stream(dev).cuda_stream


def _check_shape(name, t, shape):
    """The kernels index these tensors with a's dims: a mismatch would read out of bounds."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _acc_dtype(a: AttnArgs):
    return torch.float64 if a.q.dtype == torch.float64 else torch.float32


def _index_args(a: AttnArgs):
    return [t.to(torch.int32).contiguous() for t in (a.heads, a.queries, a.key_mask)]


def _dims(a: AttnArgs):
    return (a.B, a.H, a.Hkv, a.L, a.D, a.S, a.Q)


def attention_kl_fwd(a: AttnArgs, teacher, tmass):
    """Per-row KL, lse and teacher mass ([B, S, Q] each, fp32; fp64 for fp64 q).

    ``teacher``: dense rows [B, S, Q, L] of any float dtype, or None, in which case
    ``tmass`` [B, S, Q] is required and rows = tmass * lse.
    """
    dev = _require_cuda(a, teacher=teacher, tmass=tmass)
    acc = _acc_dtype(a)
    q_code = _code("q", a.q.dtype)
    rows = torch.zeros(a.B, a.S, a.Q, device=dev, dtype=acc)
    lse = torch.zeros_like(rows)
    T = torch.zeros_like(rows)
    if a.S == 0 or a.Q == 0:
        return rows, lse, T
    q, k = a.q.contiguous(), a.k.contiguous()
    heads, queries, mask = _index_args(a)
    if teacher is not None:
        _check_shape("teacher", teacher, (a.B, a.S, a.Q, a.L))
        t = teacher.contiguous()
        t_ptr, t_code, tm_ptr = t.data_ptr(), _code("teacher", t.dtype), 0
    else:
        if tmass is None:
            raise ValueError("tmass: required when teacher is None")
        _check_shape("tmass", tmass, (a.B, a.S, a.Q))
        tm = tmass.to(device=dev, dtype=acc).contiguous()
        t_ptr, t_code, tm_ptr = 0, 0, tm.data_ptr()
    with _on_device(dev) as stream:
        _module().attention_kl_fwd(q.data_ptr(), k.data_ptr(), t_ptr, t_code, tm_ptr,
                                   heads.data_ptr(), queries.data_ptr(), mask.data_ptr(),
                                   rows.data_ptr(), lse.data_ptr(), T.data_ptr(),
                                   *_dims(a), q_code, float(a.scale), stream)
    return rows, lse, T


def attention_kl_bwd(a: AttnArgs, teacher, lse, T, grad_rows):
    """Gradients of sum(grad_rows * rows) w.r.t. q and k, in q's and k's dtypes.

    The kernels write dq [B, H, L, D] and dk [B, Hkv, L, D] in full in fp32 (fp64 for fp64
    q); they are cast back here. Deterministic (no atomics). Needs a [B, S, Q, D] scratch for
    the per-row dq (passed to the extension as ``workspace``, an optional trailing argument
    beyond the convention's signature).
    """
    dev = _require_cuda(a, teacher=teacher, lse=lse, T=T, grad_rows=grad_rows)
    for name, t in (("lse", lse), ("T", T), ("grad_rows", grad_rows)):
        _check_shape(name, t, (a.B, a.S, a.Q))
    acc = _acc_dtype(a)
    q_code = _code("q", a.q.dtype)
    dq = torch.empty(a.B, a.H, a.L, a.D, device=dev, dtype=acc)
    dk = torch.empty(a.B, a.Hkv, a.L, a.D, device=dev, dtype=acc)
    q, k = a.q.contiguous(), a.k.contiguous()
    heads, queries, mask = _index_args(a)
    lse_c = lse.to(acc).contiguous()
    T_c = T.to(acc).contiguous()
    g = grad_rows.to(acc).contiguous()
    if teacher is not None:
        _check_shape("teacher", teacher, (a.B, a.S, a.Q, a.L))
        t = teacher.contiguous()
        t_ptr, t_code = t.data_ptr(), _code("teacher", t.dtype)
    else:
        t_ptr, t_code = 0, 0
    # Per-row dq scratch [B, S, Q, D], from torch's allocator so its memory is accounted for.
    ws = torch.empty(a.B, a.S, a.Q, a.D, device=dev, dtype=acc)
    with _on_device(dev) as stream:
        _module().attention_kl_bwd(q.data_ptr(), k.data_ptr(), t_ptr, t_code,
                                   heads.data_ptr(), queries.data_ptr(), mask.data_ptr(),
                                   lse_c.data_ptr(), T_c.data_ptr(), g.data_ptr(),
                                   dq.data_ptr(), dk.data_ptr(),
                                   *_dims(a), q_code, float(a.scale), stream, ws.data_ptr())
    return dq.to(a.q.dtype), dk.to(a.k.dtype)


def attention_probs(a: AttnArgs, out_dtype):
    """Softmax rows [B, S, Q, L] of dtype ``out_dtype`` (contiguous; zeros off the valid keys)."""
    dev = _require_cuda(a)
    q_code = _code("q", a.q.dtype)
    o_code = _code("out_dtype", out_dtype)
    out = torch.empty(a.B, a.S, a.Q, a.L, device=dev, dtype=out_dtype)
    if out.numel() == 0:
        return out
    q, k = a.q.contiguous(), a.k.contiguous()
    heads, queries, mask = _index_args(a)
    with _on_device(dev) as stream:
        _module().attention_probs(q.data_ptr(), k.data_ptr(), heads.data_ptr(), queries.data_ptr(),
                                  mask.data_ptr(), out.data_ptr(), o_code,
                                  *_dims(a), q_code, float(a.scale), stream)
    return out
