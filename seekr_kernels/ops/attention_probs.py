"""Teacher capture: attention rows of selected heads and query rows, without [B, H, L, L].

For row r = (b, s, i), head h = heads[b, s], valid keys V = {j <= i, mask[b, j] = 1}:

    p_j = exp(z_j - lse),  z_j = scale * q[b, h, i] . k[b, h // G, j],  lse = log sum_{j in V} exp(z_j)

for j in V and p_j = 0 otherwise; rows of empty slots and of padded query positions are 0.
The fused backends make two passes over key blocks (lse, then write) and allocate only
the [B, S, Q, L] output.
"""
from __future__ import annotations

import torch

from .. import reference
from .._backend import resolve
from .._checks import check_attention_args, ensure_index_ranges

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention_probs(q, k, heads, queries=None, attention_mask=None, *, scale=None, out_dtype=None,
                    backend="auto", check_values=True):
    """Softmax attention rows of the selected heads and query rows, [B, S, Q, L].

    Args:
        q: [B, H, L, D] post-RoPE queries (fp32, fp16, bf16 or fp64; any strides).
        k: [B, Hkv, L, D] post-RoPE keys, H % Hkv == 0; head h reads kv head h // (H // Hkv).
        heads: integer [S] (same for every sample) or [B, S]; -1 marks an empty slot.
        queries: integer [B, Q] absolute query positions (repeats allowed), or None for all L.
        attention_mask: [B, L] 0/1 key padding mask (left or right padding), None = all ones.
            The causal mask (key j <= query i) is always applied.
        scale: softmax scale, default D ** -0.5.
        out_dtype: dtype of the result (fp16, bf16, fp32 or fp64); default q's dtype.
            Accumulation is fp32 (fp64 for fp64 q) whatever the output dtype.
        backend: 'auto' (triton on CUDA, the C++ extension on CPU, torch otherwise with a
            warning), 'triton', 'cpu', 'cuda' or 'torch'.
        check_values: scan inputs for NaN/inf, out-of-range indices and scores that could
            overflow (one host sync; see :func:`seekr_kernels.attention_kl`). Head and query
            ranges are re-checked by every backend even when off. fp64 input is refused by
            the triton backend (TypeError); 'auto' picks an fp64 backend.

    Returns:
        Contiguous [B, S, Q, L] tensor: each active row sums to 1 over its valid keys and
        is 0 on future and padded keys; rows of empty slots (head -1) and of padded query
        positions are all zeros.

    This is a capture op for the teacher side: it is not differentiable. It runs under
    ``torch.no_grad()`` and the result never requires grad, even when q or k do.
    """
    a = check_attention_args(q, k, heads, queries, attention_mask, scale, check_values)
    if out_dtype is None:
        out_dtype = q.dtype
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {list(_OUT_DTYPES)}, got {out_dtype!r}")
    b = resolve(backend, q.device, "attention_probs", supported=("triton", "cpu", "cuda", "torch"),
                dtype=q.dtype, head_dim=a.D)
    with torch.no_grad():
        if a.B * a.S * a.Q * a.L == 0:
            ensure_index_ranges(a)  # nothing is indexed, but the same input is refused everywhere
            return torch.zeros(a.B, a.S, a.Q, a.L, device=q.device, dtype=out_dtype)
        if b == "torch":
            ensure_index_ranges(a)
            return reference.attention_probs(a, out_dtype).contiguous()
        if b == "triton":
            from ..triton.attention_probs import attention_probs as impl
            return impl(a, out_dtype)
        from .. import _native
        return _native.module_for(b).attention_probs(a, out_dtype)
