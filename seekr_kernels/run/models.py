"""Models and tokenizers of a run: a local Hugging Face directory (no downloads) or a tiny
Llama built from ``model.arch`` with the built-in character tokenizer, PEFT LoRA adapters
(``model.lora``), and the plain (merged or base) weights of a LoRA model for saving.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import string

import torch

from ..seekr.config import ConfigError
from .data import CharTokenizer, load_tokenizer

#: The character set of the built-in tokenizer when ``model.alphabet`` is not given.
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


#: The tiny Llama built when no model path is given.
#: The tiny Llama built when no model path is given.
TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                 tie_word_embeddings=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass


def build_tokenizer(mcfg):
    """The run's tokenizer: a local HF tokenizer, or the built-in char tokenizer."""
    if mcfg.tokenizer:
        return load_tokenizer(mcfg.tokenizer)
    if mcfg.path:
        return load_tokenizer(mcfg.path)
    return CharTokenizer(mcfg.alphabet or DEFAULT_ALPHABET)


def build_model(mcfg, tokenizer, seed: int = 0):
    """A causal LM from a local HF directory, or a tiny Llama from ``mcfg.arch``.

    A directory holding a PEFT adapter (``adapter_config.json``: a LoRA run's checkpoint
    or ``final`` folder saved as ``adapter``) loads its base model and the adapter. With
    ``mcfg.lora`` set, LoRA adapters are added (:func:`apply_lora`).
    """
    dtype = getattr(torch, mcfg.dtype)
    if mcfg.path and os.path.isfile(os.path.join(mcfg.path, "adapter_config.json")):
        return _load_adapter_dir(mcfg, tokenizer, seed)
    model = _build_base(mcfg, tokenizer, seed, dtype)
    if getattr(mcfg, "lora", None) is not None:
        model = apply_lora(model, mcfg.lora, seed)
    return model


def _load_adapter_dir(mcfg, tokenizer, seed):
    """Base model named by the adapter's config, then the adapter (trainable when the
    config asks for LoRA, else for inference)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"model.path: {mcfg.path} holds a LoRA adapter; loading it needs the peft package "
                          "(pip install peft)") from None
    with open(os.path.join(mcfg.path, "adapter_config.json"), encoding="utf-8") as f:
        base_path = json.load(f).get("base_model_name_or_path")
    if not base_path or not os.path.isdir(base_path):
        raise FileNotFoundError(f"{mcfg.path}/adapter_config.json: base_model_name_or_path {base_path!r} is not "
                                "a local directory")
    import dataclasses
    base = _build_base(dataclasses.replace(mcfg, path=base_path, lora=None), tokenizer, seed,
                       getattr(torch, mcfg.dtype))
    return PeftModel.from_pretrained(base, mcfg.path, is_trainable=getattr(mcfg, "lora", None) is not None)


def apply_lora(model, lcfg, seed: int = 0):
    """Wrap ``model`` with PEFT LoRA adapters from a ``model.lora`` config (base frozen;
    the adapters' random init is seeded by ``seed``)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora: needs the peft package: pip install peft (or 'seekr-kernels[lora]')") from None
    pc = peft.LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                         target_modules=lcfg.target_modules, task_type="CAUSAL_LM")
    with fork_rng():
        torch.manual_seed(seed + 1)
        try:
            return peft.get_peft_model(model, pc)
        except ValueError as e:   # target modules not found
            raise ConfigError(f"model.lora.target_modules: {e}") from None


def plain_state_dict(model, merge: bool) -> dict:
    """The base model's state dict of a PEFT LoRA model, under the base model's own names:
    the adapters merged into the weights (``merge=True``: W + scale * B @ A per adapted
    layer) or left out (the untouched base weights). The model is not modified."""
    from peft.tuners.lora import LoraLayer
    base = model.get_base_model()
    sd = {}
    for n, t in base.state_dict().items():
        if ".lora_" in n:
            continue
        sd[n.replace(".base_layer.", ".")] = t.detach().cpu()
    if merge:
        with torch.no_grad():
            for n, m in base.named_modules():
                if isinstance(m, LoraLayer) and f"{n}.weight" in sd:
                    w = sd[f"{n}.weight"]
                    delta = sum(m.get_delta_weight(a).detach().float().cpu() for a in m.active_adapters
                                if a in m.lora_A)
                    sd[f"{n}.weight"] = (w.float() + delta).to(w.dtype)
    return sd


def _build_base(mcfg, tokenizer, seed, dtype):
    if mcfg.path:
        from transformers import AutoModelForCausalLM
        if not os.path.isdir(mcfg.path):
            raise FileNotFoundError(f"model.path: {mcfg.path} is not a directory (models load from local "
                                    "Hugging Face directories only)")
        with quiet_transformers():
            try:
                return AutoModelForCausalLM.from_pretrained(mcfg.path, local_files_only=True, dtype=dtype,
                                                            attn_implementation=mcfg.attn_implementation)
            except TypeError:  # transformers < 4.56 spells it torch_dtype
                return AutoModelForCausalLM.from_pretrained(mcfg.path, local_files_only=True, torch_dtype=dtype,
                                                            attn_implementation=mcfg.attn_implementation)
    from transformers import LlamaConfig, LlamaForCausalLM
    arch = {**TINY_ARCH, **(mcfg.arch or {}), "vocab_size": tokenizer.vocab_size,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    cfg = LlamaConfig(**arch)
    cfg._attn_implementation = mcfg.attn_implementation
    with fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


@contextlib.contextmanager
def quiet_transformers():
    """No 'Writing model shards' progress bar inside our own progress output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def fork_rng():
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def save_model(model, tokenizer, d: str, state_dict=None, max_shard_size="5GB") -> None:
    """``save_pretrained`` of ``model`` into ``d`` (safetensors, sharded at
    ``max_shard_size``; a PEFT model writes its adapters) and the tokenizer next to it."""
    with quiet_transformers():
        if state_dict is None:
            model.save_pretrained(d)
        else:
            model.save_pretrained(d, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size)
    sort_adapter_config(d)
    tokenizer.save(d)


def prepare_model(model, device, *, patch: bool, gradient_checkpointing: bool, world: int = 1, fsdp: bool = False):
    """The model ready to train: on ``device``, Llama attention patched for SEEKR's fused
    ops (``patch``), non-reentrant activation checkpointing, no KV cache, and wrapped for
    ``world`` > 1 processes (FSDP2 per decoder layer with ``fsdp``, else DDP). Returns
    ``(model, train_model)``: the module itself and what the loop calls (the DDP wrapper,
    or the same module)."""
    m = model.to(device)
    if patch:
        from ..llama import patch_llama
        m = patch_llama(m)
    if gradient_checkpointing:
        # Non-reentrant: the attention losses need gradients in the first forward pass.
        kw = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):     # transformers >= 5.x name
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    m.config.use_cache = False
    if world <= 1:
        return m, m
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        return m, m
    from torch.nn.parallel import DistributedDataParallel as DDP
    return m, DDP(m, device_ids=[device.index] if device.type == "cuda" else None)


def model_state_dict(model, base, fsdp: bool) -> dict:
    """The full weights on the host, for a checkpoint: gathered from FSDP2 shards (the tied
    output embedding once, as an unsharded model saves it), else ``base``'s."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)     # its load path re-ties it
        return sd
    return {k: v.detach().cpu() for k, v in base.state_dict().items()}


#: adapter_config.json keys PEFT keeps as sets (written as lists in hash order)
_SET_KEYS = ("target_modules", "exclude_modules", "modules_to_save", "trainable_token_indices")


def sort_adapter_config(d: str) -> None:
    """Rewrite ``d/adapter_config.json`` (if any) with PEFT's set-valued lists sorted: PEFT
    writes ``target_modules`` from a set, in an order that ``PYTHONHASHSEED`` changes from
    process to process, so two saves of the same adapters differed byte for byte. Same
    layout as PEFT's (indent 2, sorted keys)."""
    from ..utils.store import atomic_write_bytes
    p = os.path.join(d, "adapter_config.json")
    if not os.path.isfile(p):
        return
    with open(p, encoding="utf-8") as f:
        raw = f.read()
    cfg = json.loads(raw)
    changed = False
    for k in _SET_KEYS:
        v = cfg.get(k)
        if isinstance(v, list) and all(isinstance(x, str) for x in v) and v != sorted(v):
            cfg[k] = sorted(v)
            changed = True
    if changed:
        atomic_write_bytes(p, json.dumps(cfg, indent=2, sort_keys=True).encode())
