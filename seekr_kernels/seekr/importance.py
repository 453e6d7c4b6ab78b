"""SEEKR head importance: task sensitivity x forgettability, accumulated over tasks.

Both statistics are defined on a head's ``[L, L]`` attention map ``A`` and both are
computed here without ever forming one.

Task sensitivity (:func:`measure_sensitivity`)
----------------------------------------------
Published definition (jinghan1he/SEEKR, ``attn_grad_hook``): per head, the mean of
``(dL/dA)^2`` over its ``[L, L]`` map, one sample at a time, averaged over the replay
samples. With ``O = A V`` the head's attention output (before ``o_proj``), ``dL/dA_ij =
dO_i . v_j`` (GQA: ``v`` of kv head ``h // G``), so

    full:   sum_{i,j} (dO_i . v_j)^2 = <dO^T dO, V^T V>_F                   O(L D^2)
    causal: sum_{j <= i} (dO_i . v_j)^2 = sum_i dO_i^T (sum_{j<=i} v_j v_j^T) dO_i

The causal sum is computed over row blocks of T tokens: keys of strictly earlier blocks
through a running ``P = sum_j v_j v_j^T`` (``sum_i dO_i^T P dO_i``), keys of the block
itself through its ``T x T`` lower triangle; O(L D^2 + L T D) time, O(D^2 + T^2 + T D)
memory per head. Padding: only a sample's ``n`` real tokens count (rows and columns), so each
sample is measured as if it ran alone, unpadded — exactly what the published code
computes for an unpadded sample. Normalisation per sample: ``full`` divides by ``n^2``
(every entry of the map, future ones included — their gradient ``dO_i . v_j`` is not 0
even though ``A_ij`` is), ``causal`` by ``n (n + 1) / 2`` (the entries a token can attend
to). ``scores`` averages the per-sample values over samples.

Default ``region="full"``: it is the published definition, so head selection reproduces
the paper's. ``causal`` is offered because gradients at future entries are gradients
with respect to weights that are structurally 0; it ranks heads by what they can change.
(The published code also counts the left padding its replay loader adds — every replay
sample is padded to the longest one — which makes a sample's value depend on the others';
that collation artefact is available as ``padding="padded"``: padding key columns count
with the values the model computed there, divided by the padded map size.)

Forgettability (:func:`measure_forgettability`)
-----------------------------------------------
Published definition (``get_replay_attn_diff``): per head, the mean of
``(A_before - A_after)^2`` over the replay samples, the query-budget rows and *all* L
key columns (``.mean`` over ``[Q, L]``: future and padded keys are 0 in both maps, they
add 0 to the sum but count in the denominator). Here, per sample with ``n`` real tokens
and ``Q`` active query rows (real positions):

    F_h(sample) = 1 / (Q * K) * sum_{rows} sum_j (p_before_j - p_after_j)^2

with ``K = n`` (``normalize="sample"``, the default: the sample's own ``[n, n]`` map, the
value the published code gives an unpadded sample) or ``K`` = the padded length of the
batch the sample ran in (``normalize="padded"``: what the published code does when the
whole replay set is collated to one length); then the mean over samples.
``normalize="official"`` also counts, as the published code does, query slots at padding
positions (with no query budget the published rows are all L rows of the padded batch)
in Q. The per-row sums come from
:func:`seekr_kernels.ops.attention_sqdiff.attention_sqdiff`, which streams both models'
q/k and never writes an attention row. Query rows are real tokens only; the published
code samples them with replacement for a sample shorter than the budget, the replay
memory here takes all of that sample's tokens instead by default (same mean in
expectation; ``ReplayMemory.choose_queries(..., mode="official")`` draws them as
published, repeated positions counting once per slot).

Host memory of forgettability at Llama-2-7B shapes
--------------------------------------------------
32 layers x 32 heads (Hkv = 32, D = 128), 50 replay samples, L = 1024, Q = 100, bf16.

* Published: pre-task rows of every head of every layer, kept on the host until the task
  is learned: 50 x 32 x 32 x 100 x 1024 x 2 B = 10.5 GB (and the post-task rows, the same
  again, are alive at the same time in ``get_replay_attn_diff``: 21 GB peak). All rows
  (Q = L): 107 GB each.
* Keeping the pre-task post-RoPE q/k instead: per sample and layer k is 1024 x 4096 x 2 B =
  8 MiB and the 100 query rows of q 0.8 MiB, x 32 layers x 50 samples = 14 GB: worse.
* Chosen here: keep the pre-task *weights* (the previous task's checkpoint on disk, which a
  continual run writes anyway, a copy on the device, or — what :class:`SeekrRecipe`
  does — the trainable parameters saved on the host by :class:`PreTaskWeights` and
  swapped into the model for its pre-task passes) and run both models side by side,
  one batch at a time. Between the two forward passes only that batch's pre-task k and
  q rows are held: 32 x 8.8 MiB = 282 MiB per sample, on the device by default (host: the
  ``[32, 32]`` fp64 accumulators, 8 KiB), or on the host with ``store="cpu"`` (282 MiB per
  sample of the batch: under 1 GB for batches of up to 3 samples). The fused kernel then
  needs no per-row storage at all. ``benchmarks/bench_importance.py`` measures it.

Importance (:class:`Importance`)
--------------------------------
Published update after each task: ``importance += (sens / sens.sum(1, keepdim=True)) *
forgettability`` (sensitivity normalised per layer), then :func:`select_heads`.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping, Optional

import torch

from ..utils import store
from .selection import select_heads

__all__ = [
    "measure_sensitivity", "SensitivityMeter", "sensitivity_loss", "attention_grad_sq_sums",
    "measure_forgettability", "ForgettabilityMeter", "Importance",
]

REGIONS = ("full", "causal")
PADDING = ("real", "padded")
NORMALIZE = ("sample", "padded", "official")


def _llama():
    from .. import llama
    return llama


# ============================================================================ sensitivity

def attention_grad_sq_sums(grad_out: torch.Tensor, value: torch.Tensor, attention_mask=None,
                           region: str = "full", block: int = 128, padding: str = "real"):
    """Per sample and head, ``sum (dL/dA_ij)^2`` over a region of the ``[L, L]`` map.

    Args:
        grad_out: ``[B, L, H, D]`` gradient of the attention output (transformers' layout,
            before ``o_proj``).
        value: ``[B, Hkv, L, D]`` value states (not repeated for GQA).
        attention_mask: ``[B, L]`` 0/1, or None; only real tokens count (rows and columns).
        region: ``"full"`` (every ``(i, j)``) or ``"causal"`` (``j <= i``).
        block: row block of the causal computation.
        padding: ``"real"`` (rows and columns of real tokens only, entries counted over the
            sample's n tokens) or ``"padded"`` (the published code: padding key columns
            count with the values the model computed there, and the entries are those of
            the whole padded ``L x L`` map; padding rows still add nothing, their output
            gradient is 0).

    Returns:
        ``(sums [B, H], entries [B])``, fp32 (fp64 for fp64 inputs): the sum of squares and
        the number of entries it covers per sample (``n^2`` or ``n (n + 1) / 2``; ``L^2``
        or ``L (L + 1) / 2`` with ``padding="padded"``).
    """
    if region not in REGIONS:
        raise ValueError(f"region: must be one of {REGIONS}, got {region!r}")
    if padding not in PADDING:
        raise ValueError(f"padding: must be one of {PADDING}, got {padding!r}")
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    B, L, H, D = grad_out.shape
    Hkv = value.shape[1]
    if tuple(value.shape) != (B, Hkv, L, D) or H % Hkv:
        raise ValueError(f"value: shape {list(value.shape)} does not match grad_out {list(grad_out.shape)}")
    G = H // Hkv
    dO = grad_out.to(acc).transpose(1, 2)                    # [B, H, L, D]
    v = value.to(acc)
    if attention_mask is not None:
        m = attention_mask.to(device=dO.device, dtype=acc)
        dO = dO * m[:, None, :, None]
        if padding == "real":
            v = v * m[:, None, :, None]
            n = m.sum(1)
        else:
            n = torch.full((B,), float(L), dtype=acc, device=dO.device)
    else:
        n = torch.full((B,), float(L), dtype=acc, device=dO.device)
    dO = dO.reshape(B, Hkv, G, L, D)
    if region == "full":
        vtv = v.transpose(-1, -2) @ v                        # [B, Hkv, D, D]
        gtg = dO.transpose(-1, -2) @ dO                      # [B, Hkv, G, D, D]
        sums = (gtg * vtv[:, :, None]).sum((-1, -2))
        entries = n * n
    else:
        T = max(1, min(int(block), L))
        prefix = v.new_zeros(B, Hkv, 1, D, D)                # sum of v_j v_j^T over earlier blocks
        sums = dO.new_zeros(B, Hkv, G)
        for t0 in range(0, L, T):
            ob = dO[:, :, :, t0:t0 + T]                      # [B, Hkv, G, T, D]
            vb = v[:, :, None, t0:t0 + T]                    # [B, Hkv, 1, T, D]
            # keys of earlier blocks: sum_i dO_i^T P dO_i
            sums += ((ob @ prefix) * ob).sum((-1, -2))
            # keys of this block: j <= i inside a T x T tile
            sums += (ob @ vb.transpose(-1, -2)).tril().square().sum((-1, -2))
            prefix = prefix + vb.transpose(-1, -2) @ vb
        entries = n * (n + 1) / 2
    return sums.reshape(B, H), entries


class _SensitivityTap(torch.autograd.Function):
    """Identity on the attention output whose backward reads dO for the meter."""

    @staticmethod
    def forward(ctx, out, anchor, meter, layer, value, mask):
        ctx.meter, ctx.layer, ctx.value, ctx.mask = meter, layer, value, mask
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.meter._accumulate(ctx.layer, grad, ctx.value, ctx.mask)
        ctx.value = ctx.mask = None
        return grad, None, None, None, None, None


class SensitivityMeter:
    """Task sensitivity of every head; built by :func:`measure_sensitivity`.

    Attributes:
        scores: ``[n_layers, n_heads]`` fp32 on the CPU: per layer, the mean over the
            samples whose backward reached it of the mean of ``(dL/dA)^2`` over the head's
            map (region-normalised per sample, see the module docstring). 0 for layers
            not measured.
        sums, counts: the fp64 running sums and per-layer sample counts behind it.
    """

    def __init__(self, model, region="full", layers=None, block=128, padding="real"):
        if region not in REGIONS:
            raise ValueError(f"region: must be one of {REGIONS}, got {region!r}")
        if padding not in PADDING:
            raise ValueError(f"padding: must be one of {PADDING}, got {padding!r}")
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
            raise ValueError(f"block: expected a positive int, got {block!r}")
        llama = _llama()
        meter = self

        class _Observer(llama.AttentionObserver):
            needs_grad = True

            def bind(self, info, attention_mask):
                super().bind(info, attention_mask)
                meter._bind(info)

            def on_attention(self, layer_idx, module, query, key, value, attn_output, padding_mask):
                return meter._on_attention(layer_idx, value, attn_output)

        self.model = model
        self.region = region
        self.padding = padding
        self.block = int(block)
        self._observer = _Observer(layers)
        self._ctx = llama.observe_attention(model, self._observer)
        self._hook = None
        self._mask = None
        self._anchor = torch.zeros((), requires_grad=True)
        self._sums = None
        self._counts = None
        self.n_layers = self.n_heads = None

    # ---------------------------------------------------------------- context
    def __enter__(self):
        self._ctx.__enter__()
        try:
            self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        except BaseException:
            self._ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._mask = None
        return self._ctx.__exit__(exc_type, exc, tb)

    def _pre_forward(self, module, args, kwargs):
        m = kwargs.get("attention_mask")
        if m is None and len(args) > 1:
            m = args[1]
        if m is not None:
            if not isinstance(m, torch.Tensor) or m.dim() != 2:
                raise ValueError("measure_sensitivity: attention_mask must be the [B, L] 0/1 padding mask "
                                 f"(got {type(m).__name__} of shape {list(getattr(m, 'shape', []))}); a "
                                 "custom 4-D mask does not say which tokens are real")
            if m.dtype.is_floating_point or m.dtype.is_complex:
                raise TypeError(f"attention_mask: expected bool or integer 0/1, got {m.dtype}")
        self._mask = m

    def _bind(self, info):
        if self._sums is None:
            self.n_layers, self.n_heads = info.num_layers, info.num_heads
            self._sums = {}
            self._counts = {}
        elif (self.n_layers, self.n_heads) != (info.num_layers, info.num_heads):
            raise ValueError("measure_sensitivity: re-entered on a model of a different shape")

    # ---------------------------------------------------------------- per layer
    def _on_attention(self, layer, value, attn_output):
        if not torch.is_grad_enabled():
            return attn_output
        mask = self._mask
        B, L = attn_output.shape[0], attn_output.shape[1]
        if mask is not None:
            if tuple(mask.shape) != (B, L):
                raise ValueError(f"attention_mask: shape {list(mask.shape)} does not match the batch "
                                 f"[B, L] = [{B}, {L}] of layer {layer}")
            mask = mask.to(attn_output.device)
        return _SensitivityTap.apply(attn_output, self._anchor, self, layer, value.detach(), mask)

    def _accumulate(self, layer, grad, value, mask):
        with torch.no_grad():
            sums, entries = attention_grad_sq_sums(grad, value, mask, self.region, self.block, self.padding)
            has = entries > 0
            per_sample = torch.where(has[:, None], sums / entries.clamp_min(1)[:, None], torch.zeros_like(sums))
            s = per_sample.sum(0).double()
            c = has.sum().double()
            if layer in self._sums:
                self._sums[layer] += s.to(self._sums[layer].device)
                self._counts[layer] += c.to(self._counts[layer].device)
            else:
                self._sums[layer] = s
                self._counts[layer] = c

    # ---------------------------------------------------------------- results
    @property
    def sums(self) -> torch.Tensor:
        out = torch.zeros(self.n_layers or 0, self.n_heads or 0, dtype=torch.float64)
        for l, s in (self._sums or {}).items():
            out[l] = s.cpu()
        return out

    @property
    def counts(self) -> torch.Tensor:
        out = torch.zeros(self.n_layers or 0, dtype=torch.float64)
        for l, c in (self._counts or {}).items():
            out[l] = c.cpu()
        return out

    @property
    def scores(self) -> torch.Tensor:
        c = self.counts
        return (self.sums / c.clamp_min(1)[:, None]).float()

    def reset(self):
        """Forget everything measured so far."""
        if self._sums is not None:
            self._sums, self._counts = {}, {}


def measure_sensitivity(model, region: str = "full", layers: Optional[Iterable[int]] = None,
                        block: int = 128, padding: str = "real") -> SensitivityMeter:
    """Measure SEEKR task sensitivity of every attention head, without ``[L, L]`` maps.

    ::

        model = sk.patch_llama(model)
        with sk.measure_sensitivity(model, region="full") as m:
            for batch in replay_batches:
                out = model(**batch)
                sensitivity_loss(out.logits, batch["labels"]).backward()
        m.scores                      # [n_layers, n_heads] fp32

    Every forward pass inside the context wraps each observed layer's attention output in
    an identity whose backward receives the output gradient ``dO`` and adds, per sample,
    the mean of ``(dL/dA)^2`` over the head's map (computed from ``dO`` and the values, see
    the module docstring). Backward may run after the context is left.

    Args:
        model: a model prepared with :func:`seekr_kernels.patch_llama`.
        region: ``"full"`` (default, the published definition: all ``n x n`` entries) or
            ``"causal"`` (the ``n (n + 1) / 2`` entries a token can attend to).
        layers: layer indices to measure (default all).
        block: row block of the causal computation.
        padding: ``"real"`` (default: each sample as if it ran alone, unpadded) or
            ``"padded"`` (the published code's collation artefact: padding key columns and
            the padded map size count; see :func:`attention_grad_sq_sums`).

    Padding is read from the ``attention_mask`` given to the model's forward (a ``[B, L]``
    0/1 mask; without one every token is real). Samples are independent, so one batch
    gives the same scores as its samples one at a time *provided the loss is a sum of
    per-sample losses*: the published code backpropagates each sample's own mean token
    loss; :func:`sensitivity_loss` is that sum. A batch-mean loss rescales each sample's
    gradient by its share of the batch and changes the scores.

    Gradients reach the meter even when no parameter requires grad (an internal leaf
    keeps the graph alive), so frozen models work. Parameter gradients produced by the
    backward passes are the caller's: keep them or zero them (``model.zero_grad()``);
    the meter neither reads nor clears them. Use ``model.eval()`` for a deterministic
    measurement (dropout changes dO).
    """
    return SensitivityMeter(model, region, layers, block, padding)


def sensitivity_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over samples of each sample's mean next-token cross-entropy (fp32).

    The published sensitivity backpropagates ``outputs.loss`` of one sample at a time
    (transformers' shifted mean CE over its answer tokens); the sum of those per-sample
    losses gives every sample of a batch exactly that gradient. Samples without a
    supervised token contribute 0.
    """
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                           ignore_index=ignore_index, reduction="none").view(lb.shape)
    n = (lb != ignore_index).sum(1)
    return (ce.sum(1) / n.clamp_min(1)).sum()


# ============================================================================ forgettability

class ForgettabilityMeter:
    """Accumulates SEEKR forgettability per head over batches of replay samples.

    Use :meth:`update` with the pre-task and post-task models on each batch (or
    :func:`measure_forgettability` for the whole loop); ``scores`` is ``[n_layers,
    n_heads]`` fp32: per head the mean over samples of the per-sample mean of
    ``(A_before - A_after)^2`` over its query rows and keys (see the module docstring).

    Args:
        normalize: ``"sample"`` (default; keys = the sample's real tokens), ``"padded"``
            (keys = the batch's padded length) or ``"official"`` (the published code's
            single collated batch: keys = the batch's padded length and rows = every query
            slot of the sample, including slots at padding positions — with no
            ``queries`` all L rows of the padded batch — and repeated positions counted
            once per slot).
        store: where the pre-task q/k of a batch wait for the post-task pass: None (where
            they were computed, usually the GPU) or a device such as ``"cpu"``.
        backend: backend of :func:`~seekr_kernels.ops.attention_sqdiff.attention_sqdiff`.
    """

    def __init__(self, normalize: str = "sample", store=None, backend: str = "auto"):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize: must be one of {NORMALIZE}, got {normalize!r}")
        self.normalize = normalize
        self.store = None if store is None else torch.device(store)
        self.backend = backend
        self.n_layers = self.n_heads = None
        self._sums = None          # fp64 [n_layers, n_heads], CPU
        self._counts = None        # fp64 [n_layers]
        self.peak_stored_bytes = 0

    @property
    def scores(self) -> torch.Tensor:
        if self._sums is None:
            return torch.zeros(0, 0)
        return (self._sums / self._counts.clamp_min(1)[:, None]).float()

    def _init(self, info):
        if self._sums is None:
            self.n_layers, self.n_heads = info.num_layers, info.num_heads
            self._sums = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)
            self._counts = torch.zeros(self.n_layers, dtype=torch.float64)
        elif (self.n_layers, self.n_heads) != (info.num_layers, info.num_heads):
            raise ValueError("model_after: its shape differs from the models measured before")

    def add_rows(self, layer: int, rows: torch.Tensor, row_active: torch.Tensor, n_keys: torch.Tensor,
                 n_rows: Optional[torch.Tensor] = None):
        """Add one layer's per-row squared differences.

        rows ``[B, H, Q]`` (0 on inactive rows), row_active ``[B, Q]`` bool, n_keys ``[B]``:
        the key count K each sample's rows are averaged over; n_rows ``[B]``: the row count
        (default: the active rows).
        """
        q = row_active.sum(1).to(torch.float64) if n_rows is None else n_rows.to(torch.float64)
        has = (q > 0) & (n_keys > 0)
        denom = (q * n_keys.to(torch.float64)).clamp_min(1)
        per = rows.to(torch.float64).sum(2) / denom[:, None]      # [B, H]
        per = torch.where(has[:, None], per, torch.zeros_like(per))
        self._sums[layer] += per.sum(0).cpu()
        self._counts[layer] += float(has.sum())

    @torch.no_grad()
    def update(self, model_before, model_after, batch: Mapping, layers: Optional[Iterable[int]] = None):
        """Run both models on one batch and add its samples.

        ``batch`` holds the model inputs (``input_ids``, ``attention_mask`` [B, L], and
        e.g. ``position_ids``) plus optionally ``queries`` ``[B, Q]`` (absolute query
        positions; default all positions) and ``query_mask`` ``[B, Q]`` (False marks a
        padding slot of ``queries``). ``labels`` is ignored. Both models must be patched
        with :func:`seekr_kernels.patch_llama`; they run under ``torch.no_grad()`` in the
        mode they are in (use ``eval()``).
        """
        llama = _llama()
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch: expected a mapping of model inputs, got {type(batch).__name__}")
        inputs = {k: v for k, v in batch.items() if k not in ("queries", "query_mask", "labels")}
        mask = inputs.get("attention_mask")
        queries = batch.get("queries")
        qmask = batch.get("query_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError("batch['attention_mask']: expected the [B, L] 0/1 padding mask")
        meter = self
        stash = {}

        class _Record(llama.AttentionObserver):
            def bind(self, info, attention_mask):
                super().bind(info, attention_mask)
                meter._init(info)

            def on_attention(self, layer_idx, module, query, key, value, attn_output, padding_mask):
                q = query.detach()
                if queries is not None:
                    idx = queries.to(q.device, torch.long)
                    _check_queries(idx, q.shape[0], q.shape[2])
                    q = q.gather(2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
                k = key.detach()
                if meter.store is not None:
                    q, k = q.to(meter.store), k.to(meter.store)
                stash[layer_idx] = (q, k, float(module.scaling))
                size = sum(t.numel() * t.element_size() for qk in stash.values() for t in qk[:2])
                meter.peak_stored_bytes = max(meter.peak_stored_bytes, size)
                return attn_output

        class _Compare(llama.AttentionObserver):
            def bind(self, info, attention_mask):
                super().bind(info, attention_mask)
                meter._init(info)

            def on_attention(self, layer_idx, module, query, key, value, attn_output, padding_mask):
                from ..ops.attention_sqdiff import attention_sqdiff
                if layer_idx not in stash:
                    raise RuntimeError(f"model_before: layer {layer_idx} did not run through the patched "
                                       "attention (are both models patched with patch_llama?)")
                q_rows, k_a, scale_a = stash.pop(layer_idx)
                if not math.isclose(scale_a, float(module.scaling), rel_tol=1e-6):
                    raise ValueError(f"layer {layer_idx}: softmax scales differ between the models "
                                     f"({scale_a} vs {module.scaling})")
                dev, dt = query.device, query.dtype
                B, H, L, D = query.shape
                if queries is None:
                    q_a, qpos = q_rows.to(dev, dt), None
                else:
                    qpos = queries.to(dev, torch.long)
                    # Scatter the kept rows back to their positions: the op reads q by position.
                    q_a = query.new_zeros(B, H, L, D)
                    q_a.scatter_(2, qpos[:, None, :, None].expand(-1, H, -1, D), q_rows.to(dev, dt))
                k_a = k_a.to(dev, dt)
                rows = attention_sqdiff(q_a, k_a, query.detach(), key.detach(), torch.arange(H, device=dev),
                                        qpos, padding_mask, scale=module.scaling, backend=meter.backend,
                                        check_values=False)
                km = torch.ones(B, L, dtype=torch.bool, device=dev) if padding_mask is None \
                    else padding_mask.to(dev).bool()
                pos = torch.arange(L, device=dev).expand(B, L) if qpos is None else qpos
                active = km.gather(1, pos)
                if qmask is not None:
                    active = active & qmask.to(dev).bool()
                    rows = rows * active[:, None, :]
                n_keys = km.sum(1) if meter.normalize == "sample" else torch.full((B,), L, device=dev)
                n_rows = None
                if meter.normalize == "official":
                    # every query slot counts, padding positions and repeats included
                    n_rows = torch.full((B,), pos.shape[1], device=dev) if qmask is None \
                        else qmask.to(dev).sum(1)
                    n_rows = n_rows.cpu()
                meter.add_rows(layer_idx, rows, active.cpu(), n_keys.cpu(), n_rows)
                return attn_output

        if queries is not None:
            if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
                raise ValueError("batch['queries']: expected a [B, Q] integer tensor")
            if queries.dtype.is_floating_point or queries.dtype == torch.bool:
                raise TypeError(f"batch['queries']: expected an integer dtype, got {queries.dtype}")
        if qmask is not None and (queries is None or tuple(qmask.shape) != tuple(queries.shape)):
            raise ValueError("batch['query_mask']: needs batch['queries'] and the same [B, Q] shape")
        layers = None if layers is None else list(layers)
        with llama.observe_attention(model_before, _Record(layers), mask):
            model_before(**inputs)
        try:
            with llama.observe_attention(model_after, _Compare(layers), mask):
                model_after(**inputs)
            if stash:
                raise RuntimeError(f"model_after: layers {sorted(stash)} did not run through the patched "
                                   "attention")
        finally:
            stash.clear()
        return self


def _check_queries(idx, B, L):
    if idx.shape[0] != B:
        raise ValueError(f"batch['queries']: first dim {idx.shape[0]} is not the batch size {B}")
    if idx.numel() and bool(((idx < 0) | (idx >= L)).any()):
        raise ValueError(f"batch['queries']: positions must lie in [0, {L})")


def measure_forgettability(model_before, model_after, batches: Iterable[Mapping], *, normalize: str = "sample",
                           store=None, backend: str = "auto", layers=None) -> torch.Tensor:
    """SEEKR forgettability of every head, ``[n_layers, n_heads]`` fp32.

    Runs ``model_before`` (the model before the task) and ``model_after`` (after it) on
    each batch and streams, per layer, ``sum_j (p_before_j - p_after_j)^2`` of every head
    at the batch's query rows with the fused
    :func:`~seekr_kernels.ops.attention_sqdiff.attention_sqdiff`; no attention row is
    stored. See :class:`ForgettabilityMeter` for ``batch`` keys and options and the
    module docstring for the definition and the memory arithmetic.

    Both models must be patched with :func:`seekr_kernels.patch_llama`. ``model_before``
    can be the previous task's checkpoint loaded from disk (host memory stays small), a
    ``copy.deepcopy`` of the model taken before training, or — without any copy of the
    model — :meth:`seekr_kernels.PreTaskWeights.module`: the same model running the
    trainable parameters saved before the task (what :class:`seekr_kernels.SeekrRecipe`
    does).
    """
    meter = ForgettabilityMeter(normalize=normalize, store=store, backend=backend)
    for b in batches:
        meter.update(model_before, model_after, b, layers=layers)
    return meter.scores


# ============================================================================ importance

_FORMAT = 1
_KIND = "seekr-importance"
#: The versioned reader's table: the file formats :meth:`Importance.load` reads (the
#: safetensors metadata holds it as a string).
_READS = {str(_FORMAT): "scores (float64), sensitivity and forgettability per task; sha256 = store.digest_tensors"}


class Importance:
    """Head importance accumulated over tasks: ``sum_t normalize(sens_t) * forget_t``.

    ``scores`` is the running ``[n_layers, n_heads]`` table (fp64 inside, fp32 out);
    ``history`` keeps each task's (sensitivity, forgettability) so a run can be audited
    or re-weighted. Saved with :meth:`save` / :meth:`load` (one safetensors file written
    atomically, format version + checksum in its metadata) or through
    :meth:`state_dict` / :meth:`load_state_dict` inside a larger checkpoint.
    """

    def __init__(self, n_layers: int, n_heads: int):
        for name, v in (("n_layers", n_layers), ("n_heads", n_heads)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.n_layers, self.n_heads = int(n_layers), int(n_heads)
        self._scores = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)
        self.history: list = []     # [(sensitivity fp32, forgettability fp32)]

    @property
    def scores(self) -> torch.Tensor:
        return self._scores.float()

    @property
    def num_tasks(self) -> int:
        return len(self.history)

    def _table(self, name, t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_complex or t.dtype == torch.bool:
            # a complex table would lose its imaginary part in the fp64 cast below
            raise TypeError(f"{name}: expected a real (floating or integer) tensor, got {t.dtype}")
        if tuple(t.shape) != (self.n_layers, self.n_heads):
            raise ValueError(f"{name}: expected shape [{self.n_layers}, {self.n_heads}], got {list(t.shape)}")
        t = t.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
        if bool((t < 0).any()):
            raise ValueError(f"{name}: contains negative values")
        return t

    def update(self, sensitivity: torch.Tensor, forgettability: torch.Tensor,
               normalize_sensitivity: bool = True) -> torch.Tensor:
        """Add one task; returns its contribution (fp32).

        ``normalize_sensitivity`` divides each layer's sensitivities by their sum first, as
        the published code does (a layer summing to 0 contributes 0).
        """
        s = self._table("sensitivity", sensitivity)
        f = self._table("forgettability", forgettability)
        if normalize_sensitivity:
            tot = s.sum(1, keepdim=True)
            s = torch.where(tot > 0, s / tot.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s))
        contrib = s * f
        self._scores += contrib
        self.history.append((sensitivity.detach().float().cpu().clone(), forgettability.detach().float().cpu().clone()))
        return contrib.float()

    def select(self, layer_budget: int, head_budget: int, ties: str = "stable"):
        """:func:`select_heads` on the current scores."""
        return select_heads(self._scores, layer_budget, head_budget, ties)

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        T = len(self.history)
        sens = torch.stack([h[0] for h in self.history]) if T else torch.zeros(0, self.n_layers, self.n_heads)
        forg = torch.stack([h[1] for h in self.history]) if T else torch.zeros(0, self.n_layers, self.n_heads)
        return {"format": _FORMAT, "scores": self._scores.clone(), "sensitivity": sens, "forgettability": forg}

    def load_state_dict(self, sd: Mapping):
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict: expected a mapping, got {type(sd).__name__}")
        if sd.get("format") != _FORMAT:
            raise ValueError(f"state_dict: format {sd.get('format')!r} is not {_FORMAT}")
        scores = sd.get("scores")
        sens, forg = sd.get("sensitivity"), sd.get("forgettability")
        shape = (self.n_layers, self.n_heads)
        for name, t, want in (("scores", scores, shape), ("sensitivity", sens, None), ("forgettability", forg, None)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"state_dict['{name}']: missing or not a tensor")
            if want is not None and tuple(t.shape) != want:
                raise ValueError(f"state_dict['{name}']: shape {list(t.shape)}, expected {list(want)}")
            if want is None and (t.dim() != 3 or tuple(t.shape[1:]) != shape):
                raise ValueError(f"state_dict['{name}']: shape {list(t.shape)}, expected [tasks, {shape[0]}, {shape[1]}]")
        if sens.shape[0] != forg.shape[0]:
            raise ValueError("state_dict: sensitivity and forgettability hold different numbers of tasks")
        self._scores = scores.detach().to("cpu", torch.float64).clone()
        self.history = [(sens[i].float().clone(), forg[i].float().clone()) for i in range(sens.shape[0])]
        return self

    def save(self, path: str) -> int:
        """Write to ``path`` (one ``.safetensors`` file) atomically; returns its size in bytes.

        The metadata holds the format version, the shape and the sha256 of the tensors
        (:func:`~seekr_kernels.utils.store.digest_tensors`).
        """
        from safetensors.torch import save
        tensors = {k: v.contiguous() for k, v in self.state_dict().items() if isinstance(v, torch.Tensor)}
        payload = save(tensors, metadata={"format": str(_FORMAT), "kind": _KIND,
                                          "n_layers": str(self.n_layers), "n_heads": str(self.n_heads),
                                          "sha256": store.digest_tensors(tensors)})
        store.atomic_write_bytes(path, payload)
        return len(payload)

    @classmethod
    def load(cls, path: str) -> "Importance":
        """Read a file written by :meth:`save`; refuses a corrupt, truncated or foreign file."""
        from safetensors import safe_open
        try:
            tensors = {}
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types on a damaged header
            raise ValueError(f"{path}: cannot read the importance file ({e})") from None
        store.check_format(meta, path, "seekr importance file", kind=_KIND, versions=_READS)
        if store.digest_tensors(tensors) != meta.get("sha256"):
            raise ValueError(f"{path}: checksum mismatch (corrupt importance file)")
        obj = cls(int(meta["n_layers"]), int(meta["n_heads"]))
        return obj.load_state_dict({"format": _FORMAT, **tensors})
