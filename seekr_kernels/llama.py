"""Drop-in patching of Llama-family attention in Hugging Face transformers (>= 4.48).

One call, no edits to the user's model code::

    model = sk.patch_llama(model)
    with sk.distill_attention(model, heads, queries, teacher, attention_mask) as d:
        out = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
    loss = out.loss + beta * d.loss()

    with sk.capture_attention(model, heads, queries, attention_mask) as c:
        model(input_ids=ids, attention_mask=attention_mask)
    c.rows                                   # {layer: [B, S, Q, L]}

How it hooks in
---------------
transformers picks the attention function by ``config._attn_implementation`` from its
``AttentionInterface`` registry and the attention-mask builder from a separate
``AttentionMaskInterface`` registry under the same name. :func:`patch_llama` registers
``"seekr_sdpa"`` (and ``"seekr_flash_attention_2"``) in *both* registries -- an attention
name without a mask builder gets no mask at all, i.e. padding would be silently ignored --
and switches the model to it. The registered function computes the attention output
with transformers' own SDPA (or flash-attn) function, unchanged, and then hands the
layer's post-RoPE ``query [B, H, L, D]``, ``key``/``value [B, Hkv, L, D]`` (not repeated
for GQA) and the output to the model's one active :class:`AttentionObserver`, if that
observer asked for this layer. Distillation and capture are two such observers; other
code (task sensitivity in :mod:`seekr_kernels.seekr.importance`) plugs in its own
through :func:`observe_attention`.

flash-attn: with ``attention="flash_attention_2"`` (or ``"auto"`` on a model already using
flash attention, with the flash-attn package installed) the output comes from
transformers' flash-attention function and the mask from its flash mask builder; the
observers are unchanged. That path is written but has not been run in this project's CI
(flash-attn is not installable on its CPU machines).

Gradient checkpointing
----------------------
With non-reentrant checkpointing (transformers' default since 4.35's
``gradient_checkpointing_kwargs`` / 5.x) a checkpointed layer runs twice: in the
forward pass, and again inside backward to rebuild the activations it dropped. Observers
run only in the first (normal) forward pass; the recomputation inside backward skips
them, so no loss or captured row is ever counted twice. For that to be consistent the
tensors an observer saves for backward are stored normally (they bypass the checkpoint's
saved-tensor hooks: the distilled layers keep their q and k alive, which is small), and
an observer must return an ``attn_output`` equal in value to the one it received.
Reentrant checkpointing (``use_reentrant=True``) runs the first forward pass with
gradients disabled, so an observer that needs gradients (distillation, sensitivity)
could not get any: that combination is refused with an error.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from typing import Dict, Iterable, Optional

import torch

SDPA_NAME = "seekr_sdpa"
FLASH_NAME = "seekr_flash_attention_2"
_BASE = {SDPA_NAME: "sdpa", FLASH_NAME: "flash_attention_2"}
_STATE_ATTR = "_seekr_llama"

__all__ = [
    "patch_llama", "unpatch_llama", "is_patched", "AttentionObserver", "observe_attention",
    "distill_attention", "capture_attention", "DistillAttention", "CaptureAttention",
    "LayerInfo", "padded_rows", "PADDED_ROWS",
]


# ----------------------------------------------------------------------------- registry

def _attention_functions():
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as e:  # pragma: no cover - transformers < 4.48
        raise ImportError("seekr_kernels.llama needs transformers >= 4.48 (AttentionInterface)") from e
    return ALL_ATTENTION_FUNCTIONS


def _mask_functions():
    """transformers' AttentionMaskInterface, or None before it existed (< 4.53)."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    A forward executed then is a checkpointed layer being recomputed (the only way
    transformers runs a layer inside backward).
    """
    return torch._C._current_graph_task_id() != -1


def _store_tensor(t):
    return t


@contextlib.contextmanager
def _plain_saved_tensors():
    """Save tensors for backward normally, bypassing any enclosing saved-tensor hooks.

    Inner hooks take precedence over outer ones, so inside a checkpointed layer this keeps
    an observer's saved tensors out of the checkpoint's bookkeeping: the recomputation
    (which skips observers) then saves exactly what the checkpoint expects.
    """
    with torch.autograd.graph.saved_tensors_hooks(_store_tensor, _store_tensor):
        yield


def _seekr_attention(base_name, module, query, key, value, attention_mask, *args, **kwargs):
    base = _attention_functions()[base_name]
    out, weights = base(module, query, key, value, attention_mask, *args, **kwargs)
    state = getattr(module, _STATE_ATTR, None)
    if state is None:  # config names us but patch_llama was not used on this model
        return out, weights
    rows_mask = state.rows_mask_for(query, key)
    if rows_mask is not None:   # inside padded_rows(..., mode="official"): every layer, also when recomputed
        out = _published_padded_rows(out, value, rows_mask)
    obs = state.observer
    layer = getattr(module, "layer_idx", None)
    if obs is None or not obs.wants(layer) or _in_backward():
        return out, weights
    L = query.shape[2]
    if key.shape[2] != L:
        raise ValueError(f"layer {layer}: keys cover {key.shape[2]} positions but queries {L} (a KV cache "
                         "holding earlier tokens?); attention contexts need one full forward pass of the "
                         "batch, use_cache=False")
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and L > sliding_window:
        raise ValueError(f"layer {layer}: sliding-window attention (window {sliding_window}) on a "
                         f"sequence of {L} tokens is not supported by the seekr kernels, which "
                         "compute full causal attention; use sequences of at most "
                         f"{sliding_window} tokens")
    padding_mask = state.padding_mask_for(query)
    # The fused ops accumulate in fp32 themselves; autocast would push the torch backend's
    # matmuls back to bf16/fp16.
    with _plain_saved_tensors(), torch.autocast(query.device.type, enabled=False):
        new_out = obs.on_attention(layer, module, query, key, value, out, padding_mask)
    if new_out is None:
        new_out = out
    elif not isinstance(new_out, torch.Tensor) or new_out.shape != out.shape:
        raise TypeError(f"{type(obs).__name__}.on_attention must return attn_output (a tensor of "
                        f"shape {tuple(out.shape)}) or None")
    return new_out, weights


def _published_padded_rows(out, value, mask):
    """``out`` [B, L, H, D] with the rows of queries that see no real key (no real token at
    or before them: the left padding) replaced by what transformers 4.31's eager attention
    gives them, the published code's sensitivity and forgettability passes.

    4.31 adds ``finfo.min`` to every padded key column (``_expand_mask``) and to every
    future key (``_make_causal_mask``); the sum of the two overflows to ``-inf``. In such a
    row every score is then ``s + finfo.min``, which rounds to ``finfo.min`` (|s| is far
    below the ulp there), at the padded keys ``j <= i`` and the real keys ``j > i``, and
    ``-inf`` at the padded keys after i: the softmax is uniform over ``{j <= i} + {real
    j}``, and the output the mean of those values (GQA: of the head's kv head). Rows with
    a real key before them are left as they are (4.31 gives them the masked softmax too).
    """
    B, L, H, D = out.shape
    empty = mask.long().cumsum(-1) == 0                                  # [B, L]
    if not bool(empty.any()):
        return out
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    v = value.to(acc)                                                    # [B, Hkv, L, D]
    m = mask.to(acc)
    # in such a row the keys j <= i are all padding: the two sets are disjoint
    total = v.cumsum(2) + (v * m[:, None, :, None]).sum(2, keepdim=True)
    count = torch.arange(1, L + 1, device=v.device, dtype=acc)[None, :] + m.sum(-1, keepdim=True)   # [B, L]
    mean = (total / count[:, None, :, None]).repeat_interleave(H // value.shape[1], dim=1)
    return torch.where(empty[:, :, None, None], mean.transpose(1, 2).to(out.dtype), out)


_registered = False
_register_lock = threading.Lock()


def _register():
    global _registered
    with _register_lock:
        if _registered:
            return
        attn = _attention_functions()
        masks = _mask_functions()
        for name, base in _BASE.items():
            fn = functools.partial(_seekr_attention, base)
            functools.update_wrapper(fn, _seekr_attention)
            if hasattr(attn, "register"):
                attn.register(name, fn)
            else:   # transformers < 4.50: a plain dict
                attn[name] = fn
            if masks is not None and base in masks:
                # Same mask builder as the base implementation: a name registered only as an
                # attention function would get no mask at all.
                masks.register(name, masks[base])
        _registered = True


# ----------------------------------------------------------------------------- patching

class LayerInfo:
    """What observers learn about the patched model when a context is entered."""

    def __init__(self, num_layers, num_heads, num_kv_heads, head_dim):
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def __repr__(self):
        return (f"LayerInfo(num_layers={self.num_layers}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim})")


class _PatchState:
    """Shared by every attention module of one patched model."""

    def __init__(self, name, previous, layers, info):
        self.name = name
        self.previous = previous          # [(config, previous _attn_implementation)]
        self.layers = layers              # {layer_idx: attention module}
        self.info = info
        self.observer: Optional[AttentionObserver] = None
        self.padding_mask: Optional[torch.Tensor] = None
        self._mask_cache: Dict[torch.device, torch.Tensor] = {}
        self.rows_mask: Optional[torch.Tensor] = None       # padded_rows(..., "official")
        self._rows_cache: Dict[torch.device, torch.Tensor] = {}
        self.lock = threading.Lock()

    # A copy (copy.deepcopy, pickle: teacher copies, TRL reference models, EMA) is a
    # patched model at rest: no lock to copy (a lock cannot be pickled) and no context
    # of the original carried over. The registry entries are process-wide, so a model
    # unpickled in a fresh process registers them again.
    _TRANSIENT = ("lock", "observer", "padding_mask", "_mask_cache", "rows_mask", "_rows_cache")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.observer = None
        self.padding_mask = None
        self._mask_cache = {}
        self.rows_mask = None
        self._rows_cache = {}
        self.lock = threading.Lock()
        _register()

    def padding_mask_for(self, query):
        m = self.padding_mask
        if m is None:
            return None
        B, L = query.shape[0], query.shape[2]
        if tuple(m.shape) != (B, L):
            raise ValueError(f"attention_mask: the context got shape {list(m.shape)} but the model "
                             f"runs a batch of [B, L] = [{B}, {L}]")
        cached = self._mask_cache.get(query.device)
        if cached is None:
            cached = self._mask_cache[query.device] = m.to(query.device)
        return cached

    def rows_mask_for(self, query, key):
        """The [B, L] mask of an official :func:`padded_rows` context on the query's device,
        or None outside one."""
        m = self.rows_mask
        if m is None:
            return None
        B, L = query.shape[0], query.shape[2]
        if tuple(m.shape) != (B, L) or key.shape[2] != L:
            raise ValueError(f"attention_mask: padded_rows got shape {list(m.shape)} but the model runs a batch "
                             f"of [B, L] = [{B}, {L}] with {key.shape[2]} keys (padded_rows needs one full "
                             "forward pass of that batch, use_cache=False)")
        cached = self._rows_cache.get(query.device)
        if cached is None:
            cached = self._rows_cache[query.device] = m.to(query.device).bool()
        return cached


def _pretrained_models(model):
    from transformers import PreTrainedModel
    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _attention_modules(model):
    found = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            if idx in found and found[idx] is not m:
                raise ValueError(f"model: two attention modules claim layer_idx={idx}")
            found[idx] = m
    return found


def _flash_attn_installed():
    return importlib.util.find_spec("flash_attn") is not None


def _state_of(model, required=True) -> Optional[_PatchState]:
    for m in model.modules():
        st = getattr(m, _STATE_ATTR, None)
        if isinstance(st, _PatchState):
            return st
    if required:
        raise ValueError("model: not patched; call seekr_kernels.patch_llama(model) first")
    return None


def is_patched(model) -> bool:
    """Whether :func:`patch_llama` was applied to ``model`` (or a model it wraps)."""
    return _state_of(model, required=False) is not None


def _set_implementation(models, modules, name):
    for pm in models:
        setter = getattr(pm, "set_attn_implementation", None)
        if setter is not None and pm.config._attn_implementation != name:
            try:
                setter(name)
            except (ValueError, ImportError, KeyError):
                if name in _BASE:   # our own names must be accepted: a real problem
                    raise
    # Some versions only warn when a model class cannot switch dynamically; older ones have
    # no setter. The attention modules read their config at every call, so set it there.
    for m in list(models) + list(modules):
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) != name:
            cfg._attn_implementation = name


def patch_llama(model, attention: str = "auto"):
    """Route a Llama-family model's attention through seekr-kernels. Returns ``model``.

    Works on LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and other models whose
    attention modules call transformers' ``AttentionInterface`` (transformers >= 4.48),
    also when wrapped (e.g. a PEFT model). Outside a :func:`distill_attention` /
    :func:`capture_attention` / :func:`observe_attention` context the patched model
    computes exactly what transformers' ``sdpa`` (or ``flash_attention_2``) does.

    Args:
        model: the model (an ``nn.Module`` holding one ``PreTrainedModel``).
        attention: which implementation computes the attention output: ``"sdpa"``,
            ``"flash_attention_2"`` (needs the flash-attn package and CUDA tensors), or
            ``"auto"``: flash_attention_2 if the model already uses flash attention and
            flash-attn is installed, sdpa otherwise.

    Calling it again on a patched model is a no-op. :func:`unpatch_llama` restores the
    previous ``attn_implementation``.
    """
    if attention not in ("auto", "sdpa", "flash_attention_2"):
        raise ValueError(f"attention: must be 'auto', 'sdpa' or 'flash_attention_2', got {attention!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        return model
    models = _pretrained_models(model)
    if not models:
        raise TypeError("model: holds no transformers PreTrainedModel")
    modules = _attention_modules(model)
    if not modules:
        raise TypeError("model: found no attention modules (modules with layer_idx, q_proj, k_proj); "
                        "is this a Llama-family model?")
    n_layers = max(modules) + 1
    if sorted(modules) != list(range(n_layers)):
        raise ValueError(f"model: attention layer indices {sorted(modules)} are not 0..{n_layers - 1}")
    previous_impl = models[0].config._attn_implementation
    if attention == "auto":
        use_flash = (previous_impl or "").startswith("flash_attention") and _flash_attn_installed()
        attention = "flash_attention_2" if use_flash else "sdpa"
    if attention == "flash_attention_2" and not _flash_attn_installed():
        raise ImportError("attention='flash_attention_2' needs the flash-attn package")
    name = FLASH_NAME if attention == "flash_attention_2" else SDPA_NAME
    _register()

    m0 = modules[0]
    cfg = m0.config
    H = int(cfg.num_attention_heads)
    Hkv = int(getattr(cfg, "num_key_value_heads", None) or H)
    D = int(getattr(m0, "head_dim", cfg.hidden_size // H))
    configs, seen = [], set()
    for m in list(models) + list(modules.values()):
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen:
            seen.add(id(c))
            configs.append((c, c._attn_implementation))
    state = _PatchState(name, configs, modules, LayerInfo(n_layers, H, Hkv, D))
    _set_implementation(models, modules.values(), name)
    for m in modules.values():
        setattr(m, _STATE_ATTR, state)
    return model


def unpatch_llama(model):
    """Undo :func:`patch_llama`: restore the previous attention implementation. Returns ``model``."""
    state = _state_of(model, required=False)
    if state is None:
        return model
    if state.observer is not None or state.rows_mask is not None:
        raise RuntimeError("model: cannot unpatch while an attention context is active")
    for m in state.layers.values():
        if getattr(m, _STATE_ATTR, None) is state:
            delattr(m, _STATE_ATTR)
    models = _pretrained_models(model)
    for pm in models:
        prev = dict((id(c), p) for c, p in state.previous).get(id(pm.config))
        setter = getattr(pm, "set_attn_implementation", None)
        if setter is not None and prev is not None and pm.config._attn_implementation != prev:
            try:
                setter(prev)
            except (ValueError, ImportError, KeyError):
                pass
    for c, prev in state.previous:
        if c._attn_implementation != prev:
            c._attn_implementation = prev
    return model


# ----------------------------------------------------------------------------- observers

class AttentionObserver:
    """Sees the attention of selected layers of a patched model, inside a context.

    Subclass and override :meth:`on_attention`; attach with :func:`observe_attention`.
    ``layers`` (an iterable of layer indices, or None for every layer) says which layers
    call the observer; others run untouched. Set ``needs_grad = True`` when the observer
    builds a graph that backward must reach (it is then refused under reentrant gradient
    checkpointing, which cannot give it gradients).

    During a checkpointed layer's recomputation inside backward the observer is *not*
    called: everything happens in the normal forward pass, once per layer.
    """

    needs_grad: bool = False

    def __init__(self, layers: Optional[Iterable[int]] = None):
        self.layers = None if layers is None else frozenset(int(l) for l in layers)

    def wants(self, layer_idx) -> bool:
        return self.layers is None or layer_idx in self.layers

    def bind(self, info: LayerInfo, attention_mask: Optional[torch.Tensor]) -> None:
        """Called once when the context is entered, before any forward pass: validate here.

        The default checks that ``layers`` lie in ``[0, info.num_layers)``.
        """
        if self.layers is not None:
            bad = sorted(l for l in self.layers if not 0 <= l < info.num_layers)
            if bad:
                raise ValueError(f"layers: {bad} out of range for a model with {info.num_layers} layers")

    def on_attention(self, layer_idx: int, module: torch.nn.Module, query: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor, attn_output: torch.Tensor,
                     padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Called in the forward pass of every selected layer.

        Args:
            layer_idx: the layer's index (``module.layer_idx``).
            module: the attention module (``module.scaling`` is the softmax scale).
            query: ``[B, H, L, D]`` post-RoPE queries.
            key, value: ``[B, Hkv, L, D]`` post-RoPE keys and the values, *not* repeated
                for GQA (query head h reads kv head ``h // (H // Hkv)``).
            attn_output: ``[B, L, H, D]`` the attention output as transformers' attention
                functions return it (sequence before heads), before ``o_proj``.
            padding_mask: the ``[B, L]`` 0/1 key padding mask given to the context (on
                the query's device), or None.

        Returns the attention output to use downstream, or None for unchanged. It must be
        equal in value to ``attn_output``; it may be ``attn_output`` wrapped in an
        ``autograd.Function`` whose backward reads the output gradient (how task
        sensitivity gets dL/dO per head). Runs with autocast disabled (tensors keep the
        dtype the model produced) and with saved tensors stored outside any checkpoint.
        """
        return attn_output


class observe_attention:
    """Context manager attaching an :class:`AttentionObserver` to a patched model.

    ``with observe_attention(model, observer, attention_mask) as obs: model(...)``.
    At most one context (observer, distillation or capture) is active on a model at a
    time; entering a second is a RuntimeError. Leaving the context -- normally or by an
    exception -- detaches the observer. Backward passes may run after the context is
    left (what the observer built in forward stays in the graph).
    """

    def __init__(self, model, observer: AttentionObserver, attention_mask=None):
        if not isinstance(observer, AttentionObserver):
            raise TypeError(f"observer: expected an AttentionObserver, got {type(observer).__name__}")
        self.model = model
        self.observer = observer
        self.attention_mask = attention_mask
        self._state = None

    def __enter__(self):
        state = _state_of(self.model)
        mask = self.attention_mask
        if mask is not None:
            _check_padding_mask(mask)
        if self.observer.needs_grad and torch.is_grad_enabled():
            _refuse_reentrant_checkpointing(self.model, type(self.observer).__name__)
        self.observer.bind(state.info, mask)
        with state.lock:
            if state.observer is not None:
                raise RuntimeError("model: another seekr attention context is already active on it "
                                   f"({type(state.observer).__name__}); nested or concurrent contexts "
                                   "on one model are not supported")
            state.observer = self.observer
            state.padding_mask = mask
            state._mask_cache = {}
        self._state = state
        return self.observer

    def __exit__(self, exc_type, exc, tb):
        state, self._state = self._state, None
        if state is not None:
            with state.lock:
                if state.observer is self.observer:
                    state.observer = None
                    state.padding_mask = None
                    state._mask_cache = {}
        return False


def _check_padding_mask(mask):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"attention_mask: expected bool or integer 0/1, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"attention_mask: expected shape [B, L], got {list(mask.shape)}")
    if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask: values must be 0 or 1")


#: What a query row that sees no key (left padding) gets: ``zero`` (what transformers'
#: SDPA and flash attention give it) or ``official`` (transformers 4.31's eager attention,
#: the published code's statistics passes).
PADDED_ROWS = ("zero", "official")


class padded_rows:
    """Context manager: the attention output of query rows that see no real key.

    ``with padded_rows(model, attention_mask, "official"): model(..., attention_mask=attention_mask)``

    Such rows exist only where a sample is left padded: no loss reads them and no real
    row attends to them, but they are the hidden states at the padding positions, whose
    keys and values the next layers compute. transformers' SDPA (and flash attention)
    give them 0 (``mode="zero"``, what the context leaves). The published code ran its
    sensitivity and forgettability passes through transformers 4.31's eager attention,
    whose mask makes such a row attend uniformly to the keys at or before it and to every
    real key; ``mode="official"`` gives every layer that output (see
    :func:`_published_padded_rows`), so the values at padding positions of the layers
    after the first, and with them the published padded sensitivity, are the published
    ones. Real rows are never changed. It may be combined with one attention context
    (observer, distillation, capture); one :func:`padded_rows` at a time per model.

    Args:
        model: a model prepared with :func:`patch_llama`.
        attention_mask: the ``[B, L]`` 0/1 padding mask of the batch the model runs.
        mode: ``"official"`` or ``"zero"`` (a no-op).
    """

    def __init__(self, model, attention_mask, mode: str = "official"):
        if mode not in PADDED_ROWS:
            raise ValueError(f"mode: must be one of {list(PADDED_ROWS)}, got {mode!r}")
        self.model, self.attention_mask, self.mode = model, attention_mask, mode
        self._state = None

    def __enter__(self):
        if self.mode == "zero":
            return self
        state = _state_of(self.model)
        if self.attention_mask is None:
            raise ValueError("attention_mask: padded_rows needs the [B, L] padding mask")
        _check_padding_mask(self.attention_mask)
        with state.lock:
            if state.rows_mask is not None:
                raise RuntimeError("model: a padded_rows context is already active on it")
            state.rows_mask = self.attention_mask
            state._rows_cache = {}
        self._state = state
        return self

    def __exit__(self, exc_type, exc, tb):
        state, self._state = self._state, None
        if state is not None:
            with state.lock:
                state.rows_mask = None
                state._rows_cache = {}
        return False


def _refuse_reentrant_checkpointing(model, who):
    for m in model.modules():
        if not (getattr(m, "gradient_checkpointing", False) is True and m.training):
            continue
        fn = getattr(m, "_gradient_checkpointing_func", None)
        kw = getattr(fn, "keywords", None)
        if kw is None:
            continue   # not a partial(checkpoint, ...): cannot tell, let it run
        if kw.get("use_reentrant", True) is not False:
            raise ValueError(
                f"{who}: gradient checkpointing with use_reentrant=True runs the forward pass without "
                "gradients, so the attention losses could not be backpropagated; enable it with "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")


class _ObserverContext(AttentionObserver):
    """An observer that is its own context manager (``with ... as d``)."""

    def __init__(self, model, layers, attention_mask):
        super().__init__(layers)
        self._ctx = observe_attention(model, self, attention_mask)

    def __enter__(self):
        self._reset()
        return self._ctx.__enter__()

    def __exit__(self, exc_type, exc, tb):
        return self._ctx.__exit__(exc_type, exc, tb)

    def _reset(self):
        pass


def _check_layer_dict(name, d, info):
    if not isinstance(d, dict):
        raise TypeError(f"{name}: expected a dict {{layer index: tensor}}, got {type(d).__name__}")
    out = {}
    for l, v in d.items():
        if isinstance(l, bool) or not isinstance(l, int):
            try:
                li = int(l)
            except (TypeError, ValueError):
                raise TypeError(f"{name}: keys must be layer indices (int), got {l!r}") from None
            if li != l:
                raise TypeError(f"{name}: keys must be layer indices (int), got {l!r}")
            l = li
        if not 0 <= l < info.num_layers:
            raise ValueError(f"{name}: layer {l} out of range for a model with {info.num_layers} layers")
        out[l] = v
    return out


def _check_heads(l, h, info, B):
    name = f"heads[{l}]"
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(h).__name__}")
    if h.dtype.is_floating_point or h.dtype.is_complex or h.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {h.dtype}")
    if h.dim() not in (1, 2):
        raise ValueError(f"{name}: expected shape [S] or [B, S], got {list(h.shape)}")
    if h.dim() == 2 and B is not None and h.shape[0] != B:
        raise ValueError(f"{name}: shape {list(h.shape)}: first dim must be the batch size {B}")
    if h.numel() and bool(((h < -1) | (h >= info.num_heads)).any()):
        raise ValueError(f"{name}: values must lie in [-1, {info.num_heads}) (-1 = empty slot)")
    return h


def _check_queries(queries, B, L):
    if queries is None:
        return None
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"queries: expected an integer torch.Tensor or None, got {type(queries).__name__}")
    if queries.dtype.is_floating_point or queries.dtype.is_complex or queries.dtype == torch.bool:
        raise TypeError(f"queries: expected an integer dtype, got {queries.dtype}")
    if queries.dim() != 2:
        raise ValueError(f"queries: expected shape [B, Q], got {list(queries.shape)}")
    if B is not None and queries.shape[0] != B:
        raise ValueError(f"queries: shape {list(queries.shape)}: first dim must be the batch size {B}")
    if L is not None and queries.numel() and bool(((queries < 0) | (queries >= L)).any()):
        raise ValueError(f"queries: positions must lie in [0, {L})")
    return queries


class _DeviceCache:
    """Moves a tensor (or TopK) to the device a layer runs on, once per device."""

    def __init__(self, x):
        self.x = x
        self._by_device = {}

    def get(self, device):
        if self.x is None:
            return None
        y = self._by_device.get(device)
        if y is None:
            y = self._by_device[device] = self.x if self.x.device == device else self.x.to(device)
        return y


# ----------------------------------------------------------------------------- distill

class DistillAttention(_ObserverContext):
    """Attention distillation context; see :func:`distill_attention`."""

    needs_grad = True

    def __init__(self, model, heads, queries, teacher, attention_mask=None, *, backend="auto",
                 check_values=True, log_eps=0.0):
        if not isinstance(heads, dict):
            raise TypeError(f"heads: expected a dict {{layer index: tensor}}, got {type(heads).__name__}")
        super().__init__(model, list(_int_keys(heads)), attention_mask)
        self._heads_in, self._teacher_in, self._queries_in = heads, teacher, queries
        self.backend = backend
        self.check_values = check_values
        self.log_eps = log_eps
        self.losses: Dict[int, torch.Tensor] = {}

    def _reset(self):
        self.losses = {}
        self._checked_batch = False

    def bind(self, info, attention_mask):
        from .ops.teachers import TopK
        heads = _check_layer_dict("heads", self._heads_in, info)
        teacher = _check_layer_dict("teacher", self._teacher_in, info)
        if not heads:
            raise ValueError("heads: no layer to distil (empty dict)")
        if set(teacher) != set(heads):
            missing = sorted(set(heads) - set(teacher))
            extra = sorted(set(teacher) - set(heads))
            raise ValueError(f"teacher: must have the same layers as heads (missing {missing}, "
                             f"without heads {extra})")
        B = L = None
        if attention_mask is not None:
            B, L = attention_mask.shape
        for l in sorted(heads):
            t = teacher[l]
            if isinstance(t, TopK):
                if t.kind != "probs":
                    raise ValueError(f"teacher[{l}]: a TopK teacher of attention must have kind 'probs'")
            elif not isinstance(t, torch.Tensor):
                raise TypeError(f"teacher[{l}]: expected a tensor [B, S, Q, L] or a TopK, got {type(t).__name__}")
            elif not t.dtype.is_floating_point:
                raise TypeError(f"teacher[{l}]: expected a floating dtype, got {t.dtype}")
            if len(t.shape) != 4:
                raise ValueError(f"teacher[{l}]: expected shape [B, S, Q, L], got {list(t.shape)}")
            tB, tS, tQ, tL = t.shape
            if B is None:
                B, L = tB, tL
            if (tB, tL) != (B, L):
                src = "attention_mask" if attention_mask is not None else "the other layers' teachers"
                raise ValueError(f"teacher[{l}]: shape {list(t.shape)} does not match [B, L] = [{B}, {L}] "
                                 f"of {src}")
            h = _check_heads(l, heads[l], info, B)
            if h.shape[-1] != tS:
                raise ValueError(f"heads[{l}]: {h.shape[-1]} head slots but teacher[{l}] has S={tS} "
                                 f"(shape {list(t.shape)})")
            heads[l] = h
        queries = _check_queries(self._queries_in, B, L)
        Q = L if queries is None else queries.shape[1]
        for l in sorted(heads):
            if teacher[l].shape[2] != Q:
                what = "all L rows (queries=None)" if queries is None else f"queries of shape {list(queries.shape)}"
                raise ValueError(f"teacher[{l}]: Q={teacher[l].shape[2]} rows but {what} give Q={Q}")
            if self.check_values and isinstance(teacher[l], torch.Tensor) and teacher[l].numel():
                t = teacher[l]
                if bool((~torch.isfinite(t)).any()):
                    raise ValueError(f"teacher[{l}]: contains NaN or infinite values")
                if bool((t < 0).any()):
                    raise ValueError(f"teacher[{l}]: contains negative probabilities")
            elif self.check_values:
                teacher[l].check()
        self._B, self._L = B, L
        self._heads = {l: _DeviceCache(h) for l, h in heads.items()}
        self._teacher = {l: _DeviceCache(t) for l, t in teacher.items()}
        self._queries = _DeviceCache(queries)
        super().bind(info, attention_mask)

    def on_attention(self, layer_idx, module, query, key, value, attn_output, padding_mask):
        from .ops.attention_kl import attention_kl
        B, L = query.shape[0], query.shape[2]
        if (B, L) != (self._B, self._L):
            raise ValueError(f"teacher: built for [B, L] = [{self._B}, {self._L}] but the model runs a "
                             f"batch of [{B}, {L}]")
        if layer_idx in self.losses:
            raise RuntimeError(f"distill_attention: layer {layer_idx} ran twice in one context; "
                               "open one context per forward pass")
        dev = query.device
        self.losses[layer_idx] = attention_kl(
            query, key, self._teacher[layer_idx].get(dev), self._heads[layer_idx].get(dev),
            self._queries.get(dev), padding_mask, scale=module.scaling, reduction="batchmean",
            backend=self.backend, check_values=False, log_eps=self.log_eps)
        return attn_output

    def loss(self) -> torch.Tensor:
        """Mean over the distilled layers of each layer's 'batchmean' KL (fp32 scalar)."""
        missing = sorted(self.layers - set(self.losses))
        if missing:
            raise RuntimeError(f"distill_attention: layers {missing} did not run through the patched "
                               "attention (run the model's forward inside the context)")
        vals = [self.losses[l] for l in sorted(self.layers)]
        dev = vals[0].device
        return torch.stack([v.to(dev) for v in vals]).mean()


def _int_keys(d):
    for l in d:
        if isinstance(l, bool):
            raise TypeError(f"heads: keys must be layer indices (int), got {l!r}")
        try:
            yield int(l)
        except (TypeError, ValueError):
            raise TypeError(f"heads: keys must be layer indices (int), got {l!r}") from None


def distill_attention(model, heads, queries, teacher, attention_mask=None, *, backend="auto",
                      check_values=True, log_eps=0.0) -> DistillAttention:
    """Distil teacher attention into a patched model during one forward pass.

    ``with distill_attention(model, heads, queries, teacher, mask) as d: model(...)``,
    then ``d.loss()``: the mean over the distilled layers of
    ``attention_kl(q_l, k_l, teacher[l], heads[l], queries, mask, scale=module.scaling,
    reduction="batchmean")`` on each layer's post-RoPE q and k; ``d.losses`` holds the
    per-layer values. The loss is differentiable; call backward after the context.

    Args:
        model: a model prepared with :func:`patch_llama`.
        heads: ``{layer: [S] or [B, S] integer tensor}``, -1 = empty slot. Layers not
            named run untouched.
        queries: ``[B, Q]`` integer query positions shared by all layers, or None (all L).
        teacher: ``{layer: [B, S, Q, L] probabilities or TopK}`` with heads' layers.
        attention_mask: the ``[B, L]`` 0/1 padding mask passed to the model (left or
            right padding), or None for none. Given explicitly: the 4-D mask the model
            builds is not read back.
        backend: kernel backend for :func:`seekr_kernels.attention_kl`.
        check_values: check index ranges and teacher values once, on entry.
        log_eps: the published code's ``log(p + eps)`` instead of the exact log-softmax
            (see :func:`seekr_kernels.attention_kl`; runs on the torch backend).

    Shapes (layers in range, heads vs teacher S, teacher B/Q/L vs queries and mask) are
    checked on entry; the batch's [B, L] is checked at the first attention call, before
    any kernel runs.
    """
    return DistillAttention(model, heads, queries, teacher, attention_mask, backend=backend,
                            check_values=check_values, log_eps=log_eps)


# ----------------------------------------------------------------------------- capture

def _attention_probs(q, k, heads, queries, mask, scale, out_dtype, backend):
    from .ops.attention_probs import attention_probs
    return attention_probs(q, k, heads, queries, mask, scale=scale, out_dtype=out_dtype,
                           backend=backend, check_values=False)


class CaptureAttention(_ObserverContext):
    """Attention-row capture context; see :func:`capture_attention`."""

    def __init__(self, model, heads, queries=None, attention_mask=None, *, topk=None,
                 dtype=torch.float32, device=None, backend="auto"):
        if not isinstance(heads, dict):
            raise TypeError(f"heads: expected a dict {{layer index: tensor}}, got {type(heads).__name__}")
        super().__init__(model, list(_int_keys(heads)), attention_mask)
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk: expected a positive int or None, got {topk!r}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"dtype: expected a float dtype, got {dtype}")
        self._heads_in, self._queries_in = heads, queries
        self.topk, self.dtype, self.backend = topk, dtype, backend
        self.device = None if device is None else torch.device(device)
        self.rows: Dict[int, object] = {}

    def _reset(self):
        self.rows = {}

    def bind(self, info, attention_mask):
        heads = _check_layer_dict("heads", self._heads_in, info)
        if not heads:
            raise ValueError("heads: no layer to capture (empty dict)")
        B = L = None
        if attention_mask is not None:
            B, L = attention_mask.shape
        elif self._queries_in is not None and isinstance(self._queries_in, torch.Tensor) \
                and self._queries_in.dim() == 2:
            B = self._queries_in.shape[0]
        heads = {l: _check_heads(l, h, info, B) for l, h in heads.items()}
        queries = _check_queries(self._queries_in, B, L)
        self._heads = {l: _DeviceCache(h) for l, h in heads.items()}
        self._queries = _DeviceCache(queries)
        super().bind(info, attention_mask)

    def on_attention(self, layer_idx, module, query, key, value, attn_output, padding_mask):
        from .ops.teachers import TopK
        if layer_idx in self.rows:
            raise RuntimeError(f"capture_attention: layer {layer_idx} ran twice in one context; "
                               "open one context per forward pass")
        dev = query.device
        heads = self._heads[layer_idx].get(dev)
        if heads.dim() == 2 and heads.shape[0] != query.shape[0]:
            raise ValueError(f"heads[{layer_idx}]: shape {list(heads.shape)} does not match the batch size "
                             f"{query.shape[0]}")
        queries = self._queries.get(dev)
        if queries is not None:
            _check_queries(queries, query.shape[0], query.shape[2])
        with torch.no_grad():
            rows = _attention_probs(query.detach(), key.detach(), heads, queries, padding_mask,
                                    module.scaling, self.dtype, self.backend)
            if self.topk is not None:
                rows = TopK.from_dense(rows, min(self.topk, rows.shape[-1]), kind="probs")
            if self.device is not None:
                rows = rows.to(self.device)
        self.rows[layer_idx] = rows
        return attn_output


def capture_attention(model, heads, queries=None, attention_mask=None, *, topk=None,
                      dtype=torch.float32, device=None, backend="auto") -> CaptureAttention:
    """Record the attention rows of selected heads and queries during one forward pass.

    ``with capture_attention(model, heads, queries, mask) as c: model(...)``, then
    ``c.rows[layer]``: ``[B, S, Q, L]`` probabilities (softmax over the keys each query
    sees -- causal and not padded -- 0 elsewhere, 0 for empty slots and padded queries),
    or a :class:`seekr_kernels.TopK` of them when ``topk`` is given. Never builds an
    ``[L, L]`` matrix. No gradient flows through captured rows.

    Args:
        model: a model prepared with :func:`patch_llama`.
        heads: ``{layer: [S] or [B, S] integer tensor}``, -1 = empty slot.
        queries: ``[B, Q]`` integer query positions, or None for all L rows.
        attention_mask: the ``[B, L]`` 0/1 padding mask passed to the model, or None.
        topk: keep only the k largest entries of each row (``TopK.from_dense``).
        dtype: dtype of the captured probabilities.
        device: where to store the rows (e.g. ``"cpu"`` to keep teachers in host memory).
        backend: kernel backend for the probabilities.
    """
    return CaptureAttention(model, heads, queries, attention_mask, topk=topk, dtype=dtype,
                            device=device, backend=backend)
