"""Which implementation runs an op: backend names, availability and the `auto` rule."""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cpu", "cuda", "torch")

_warned = set()


def _import(name):
    try:
        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a broken build (undefined symbol, ...)
        return None, e


def native_cpu():
    """The C++ extension `seekr_kernels._C`, or None."""
    return _import("seekr_kernels._C")[0]


def native_cuda():
    """The CUDA extension `seekr_kernels._C_cuda`, or None."""
    return _import("seekr_kernels._C_cuda")[0]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if _import("triton")[0] is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def available(backend: str, device) -> tuple[bool, str]:
    if backend == "torch":
        return True, ""
    if backend == "triton":
        if _import("triton")[0] is None:
            return False, "triton is not installed"
        if not triton_available(device):
            return False, ("triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                           f"got a tensor on {device}")
        return True, ""
    if backend == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend needs CPU tensors, got {device}"
        mod, err = _import("seekr_kernels._C")
        return (mod is not None), f"the C++ extension seekr_kernels._C is not built ({err})"
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend needs CUDA tensors, got {device}"
        mod, err = _import("seekr_kernels._C_cuda")
        return (mod is not None), f"the CUDA extension seekr_kernels._C_cuda is not built ({err})"
    raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")


#: Largest head dim the native kernels take (csrc/cpu_dispatch.cpp and attention_cuda.cu
#: check_dims: per-row q tiles live in fixed-size scratch).
NATIVE_MAX_HEAD_DIM = 4096


def supports(backend: str, dtype=None, head_dim=None, arg="q") -> tuple[bool, str, type]:
    """Whether `backend` computes inputs of this dtype / head dim: (ok, why, exception type).

    fp64 and Triton: the Triton kernels are written for fp32 accumulation (fp32 tiles,
    tuned for bf16/fp16/fp32 input) and are refused fp64 input — every Triton kernel
    alike, as logits_kl always did — rather than returning an fp64 tensor computed in fp32.
    fp64 is the verification dtype (gradcheck); the cpu, cuda and torch backends compute
    it in fp64, and `auto` picks one of them.
    """
    if backend == "triton" and dtype == torch.float64:
        return False, (f"{arg}: dtype torch.float64 is not supported by the triton backend (its "
                       "kernels accumulate in fp32); use backend='auto', 'cpu', 'cuda' or 'torch' "
                       "for fp64"), TypeError
    if backend in ("cpu", "cuda") and head_dim is not None and head_dim > NATIVE_MAX_HEAD_DIM:
        return False, (f"{arg}: head dim D={head_dim} exceeds the {backend} backend's maximum "
                       f"{NATIVE_MAX_HEAD_DIM}; use backend='auto' or 'torch'"), ValueError
    return True, "", None


def resolve(backend: str, device, op: str, supported=("triton", "cpu", "cuda", "torch"), *,
            dtype=None, head_dim=None, arg="q") -> str:
    """Pick the implementation for an op on tensors living on `device`.

    auto: triton on CUDA (the CUDA extension for fp64), the C++ extension on CPU; when the
    preferred one is missing or cannot take this dtype / head dim (:func:`supports`),
    torch with one warning per (op, device type, reason). An explicit backend that is
    unavailable is a RuntimeError; one that cannot take the input a TypeError (dtype) or
    ValueError (head dim) naming `arg`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend not in supported:
            raise ValueError(f"backend: {op} has no {backend!r} implementation (has {list(supported)})")
        ok, why = available(backend, device)
        if not ok:
            raise RuntimeError(f"backend={backend!r} is unavailable for {op}: {why}")
        ok, why, exc = supports(backend, dtype, head_dim, arg)
        if not ok:
            raise exc(why)
        return backend
    preferred = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    reasons = []
    for name in preferred:
        if name not in supported:
            continue
        ok, why = available(name, device)
        if ok:
            ok, why, _ = supports(name, dtype, head_dim, arg)
        if ok:
            return name
        reasons.append(why)
    why = "; ".join(reasons) or "no fused kernel"
    key = (op, device.type, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"seekr_kernels: {op} falls back to the plain-PyTorch backend on {device.type} "
                      f"({why}); it materialises the selected rows", RuntimeWarning, stacklevel=3)
    return "torch"
