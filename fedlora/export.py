"""Export a nested model as a standard peft LoRA adapter or as a merged transformers checkpoint.

A nested layer's update ΔW = s·B·(R_eff − R_init)·A is a rank-r LoRA update with
``lora_B = B`` (d×r) and ``lora_A = (R_eff − R_init)·A`` (r×k), ``lora_alpha = alpha`` and ``r = r`` so
that peft's scaling alpha/r equals s. The adapter is written by peft itself (``save_pretrained``), so
``peft.PeftModel.from_pretrained(base, path)`` loads it with no fedlora code.

``principal`` init stores the residual W − U_r S_r V_rᵀ as the base weight and R0 = diag(S_r)/s. The
export subtracts R_init = diag(S_r)/s, so the adapter applies to the *original* pretrained weights
(the ones users load from the hub or disk); no modified base model needs to be shipped.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedlora.nested.layer import NestedLinear
from fedlora.nested.model import CONFIG_ATTR, get_config, nested_layers, set_submodule

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


def restore_base(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every nested layer replaced by its base layer holding the original
    pretrained weight (the residual plus U_r S_r V_rᵀ under ``principal`` init). ``modules_to_save``
    keep their trained values; ``requires_grad`` flags are reset to True."""
    restored = copy.deepcopy(model)
    for name, layer in nested_layers(restored).items():
        base = layer.base
        if layer.principal:
            with torch.no_grad():
                top = ((layer.B.double() * layer.S.double()) @ layer.A.double()).to(base.weight.dtype)
                base.weight.add_(top if isinstance(base, nn.Linear) else top.T)
        set_submodule(restored, name, base)
    if hasattr(restored, CONFIG_ATTR):
        delattr(restored, CONFIG_ATTR)
    for p in restored.parameters():
        p.requires_grad_(True)
    return restored


def _lora_factors(layer: NestedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r×k), lora_B (d×r)) with s·lora_B·lora_A = ΔW of the layer."""
    with torch.no_grad():
        inner = (layer.effective_inner() - layer.initial_inner()).double()
        lora_a = (inner @ layer.A.double()).to(layer.A.dtype)
        return lora_a.contiguous(), layer.B.detach().clone().contiguous()


def to_peft_model(model: nn.Module, adapter_name: str = "default") -> PeftModel:
    """A ``peft.PeftModel`` (LoRA) on the restored base model with the same outputs as ``model``."""
    from peft import LoraConfig, get_peft_model

    cfg = get_config(model)
    layers = nested_layers(model)
    base = restore_base(model)
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    lora_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.r,
        target_modules=list(layers),
        modules_to_save=list(cfg.modules_to_save) or None,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=True,
    )
    peft_model = get_peft_model(base, lora_cfg, adapter_name=adapter_name)
    inner = peft_model.base_model.model
    for name, layer in layers.items():
        lora_layer = inner.get_submodule(name)
        lora_a, lora_b = _lora_factors(layer)
        with torch.no_grad():
            lora_layer.lora_A[adapter_name].weight.copy_(lora_a)
            lora_layer.lora_B[adapter_name].weight.copy_(lora_b)
    return peft_model


def export_peft_adapter(model: nn.Module, path: str | os.PathLike) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft LoRA) to ``path``.

    Load with ``peft.PeftModel.from_pretrained(original_base_model, path)``; outputs match the nested
    model (fp32: max abs difference ≤ 1e-4). Returns the path."""
    peft_model = to_peft_model(model)
    os.makedirs(path, exist_ok=True)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def export_merged(model: nn.Module, path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Write a merged transformers checkpoint (W + ΔW in every adapted layer, safetensors) to ``path``."""
    merged = to_peft_model(model).merge_and_unload()
    os.makedirs(path, exist_ok=True)
    merged.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return str(path)
