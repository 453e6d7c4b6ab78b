"""Which implementation runs an op: backend names, availability and the `auto` rule."""
from __future__ import annotations

import importlib
import os
import warnings

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


def resolve(backend: str, device, op: str, supported=("triton", "cpu", "cuda", "torch")) -> str:
    """Pick the implementation for an op on tensors living on `device`.

    auto: triton on CUDA, the C++ extension on CPU; when that is missing, torch with one
    warning per (op, device type). An explicit backend that is unavailable is an error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend not in supported:
            raise ValueError(f"backend: {op} has no {backend!r} implementation (has {list(supported)})")
        ok, why = available(backend, device)
        if not ok:
            raise RuntimeError(f"backend={backend!r} is unavailable for {op}: {why}")
        return backend
    preferred = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    for name in preferred:
        if name in supported and available(name, device)[0]:
            return name
    key = (op, device.type)
    if key not in _warned:
        _warned.add(key)
        why = "; ".join(available(n, device)[1] for n in preferred if n in supported) or "no fused kernel"
        warnings.warn(f"seekr_kernels: {op} falls back to the plain-PyTorch backend on {device.type} "
                      f"({why}); it materialises the selected rows", RuntimeWarning, stacklevel=3)
    return "torch"
