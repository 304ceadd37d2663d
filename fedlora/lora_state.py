"""The state side of the peft LoRA baselines: per-model runtime, adapters of each rank, strict state checks.

:class:`~fedlora.lora_client.LoraAdapter` keeps, for every model it wrapped, a :class:`LoraRuntime` outside the
module (so deep copies of the model stay clean): the target layers, the pristine pretrained target weights,
the pristine ``modules_to_save`` values and one peft adapter per (rank, alpha, rslora) in use. States are
``dict[str, np.ndarray]`` keyed as ``get_peft_model_state_dict`` keys them (adapter name stripped):
``<PEFT_PREFIX><layer>.lora_A.weight`` (rᵢ×k), ``….lora_B.weight`` (d×rᵢ), ``modules_to_save`` parameters,
or, in delta form (FLoRA), ``<PEFT_PREFIX><layer>.delta_B`` (d×ρ) and ``.delta_A`` (ρ×k) of the merged
update ΔW = delta_B·delta_A. Every check runs before anything is written and raises
:class:`LoraStateError` naming the key.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlora.lora_math import A_SUFFIX, B_SUFFIX, DELTA_A, DELTA_B
from fedlora.tensors import array_problem

PEFT_PREFIX = "base_model.model."
#: the adapter ``get_peft_model`` creates in :meth:`LoraAdapter.wrap` (rank r, the spec's alpha)
DEFAULT_ADAPTER = "default"


class LoraStateError(ValueError):
    """A state does not fit the model (missing/unexpected key, wrong shape, non-finite values)."""


# ------------------------------------------------------------------------------------------ runtime
@dataclass
class AdapterInfo:
    """One peft adapter of the model: its name, rank rᵢ, alpha, rslora flag and state key → parameter."""

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    params: dict[str, nn.Parameter]  # state key -> parameter of this adapter


@dataclass
class LoraRuntime:
    """Per-model mutable bookkeeping (kept outside the module so deep copies of the model stay clean)."""

    targets: list[str]
    modules_to_save: list[str]
    fan_in_fan_out: bool
    default_rank: int
    default_alpha: float
    init_seed: int
    layers: dict[str, nn.Module]  # module name (in the base model) -> peft LoraLayer
    pristine: dict[str, torch.Tensor]  # module name -> original base weight (clone)
    head0: dict[str, torch.Tensor]  # modules_to_save key -> original value (clone)
    adapters: dict[tuple[int, float, bool], AdapterInfo] = field(default_factory=dict)
    active: AdapterInfo | None = None
    #: delta factors (float64 numpy, per layer prefix) currently merged into the base weights; None = pristine
    base_delta: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, LoraRuntime] = weakref.WeakKeyDictionary()


def attach_runtime(model: nn.Module, rt: LoraRuntime) -> None:
    """Record ``rt`` as the runtime of ``model`` (held weakly: it goes when the model goes)."""
    _RUNTIMES[model] = rt


def runtime_of(model: nn.Module) -> LoraRuntime:
    """The runtime :meth:`LoraAdapter.wrap` attached to ``model`` (ValueError if none)."""
    rt = _RUNTIMES.get(model)
    if rt is None:
        raise ValueError("model was not wrapped by LoraAdapter.wrap (no peft LoRA runtime attached)")
    return rt


def layer_prefix(name: str) -> str:
    """The state-key prefix of the layer named ``name`` in the base model."""
    return PEFT_PREFIX + name


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """peft ``LoraLayer`` modules of ``peft_model`` by name in the base model, in model order."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {name: mod for name, mod in inner.named_modules() if isinstance(mod, LoraLayer)}


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """peft's scaling: alpha / rank, or alpha / √rank with rslora."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


# ------------------------------------------------------------------------------------------ adapters
def get_adapter(model: nn.Module, rt: LoraRuntime, rank: int, alpha: float, use_rslora: bool) -> AdapterInfo:
    """The adapter of (rank, alpha, rslora), added to the model on first use."""
    from peft import LoraConfig, get_peft_model_state_dict

    if isinstance(rank, bool) or int(rank) < 1:
        raise ValueError(f"rank={rank!r}: must be a positive integer")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"lora-alpha={alpha!r}: must be a positive number")
    key = (int(rank), float(alpha), bool(use_rslora))
    info = rt.adapters.get(key)
    if info is not None:
        return info
    if key == (rt.default_rank, rt.default_alpha, False) and not rt.adapters:
        name = DEFAULT_ADAPTER
    else:
        name = f"fedlora_{len(rt.adapters)}"
        cfg = LoraConfig(
            r=key[0],
            lora_alpha=key[1],
            use_rslora=key[2],
            target_modules=list(rt.layers),
            modules_to_save=rt.modules_to_save or None,
            lora_dropout=0.0,
            fan_in_fan_out=rt.fan_in_fan_out,
        )
        with torch.random.fork_rng(devices=[]):  # peft's init must not move the process RNG
            model.add_adapter(name, cfg)
    by_ptr: dict[tuple[int, tuple[int, ...]], nn.Parameter] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault((p.data_ptr(), tuple(p.shape)), p)
    params: dict[str, nn.Parameter] = {}
    for k, v in get_peft_model_state_dict(model, adapter_name=name).items():
        p = by_ptr.get((v.data_ptr(), tuple(v.shape)))
        if p is None:
            raise RuntimeError(f"peft state key {k!r} has no parameter in the model")
        params[k] = p
    for lname in rt.layers:
        for suffix in (A_SUFFIX, B_SUFFIX):
            if layer_prefix(lname) + suffix not in params:
                raise RuntimeError(f"peft state of adapter {name!r} lacks {layer_prefix(lname) + suffix!r}")
    info = AdapterInfo(name=name, rank=key[0], alpha=key[1], use_rslora=key[2], params=params)
    rt.adapters[key] = info
    return info

def activate(model: nn.Module, rt: LoraRuntime, info: AdapterInfo, *, freeze_a: bool) -> None:
    """Make ``info`` the only active adapter; only its A (unless frozen), B and head are trainable."""
    if rt.active is None or rt.active.name != info.name or model.active_adapter != info.name:
        model.set_adapter(info.name)
    for p in model.parameters():
        p.requires_grad_(False)
    for key, p in info.params.items():
        p.requires_grad_(not (freeze_a and key.endswith(A_SUFFIX)))
    rt.active = info

def set_base(rt: LoraRuntime, delta: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> None:
    """Base weight of every target layer ← pristine W (+ delta_B·delta_A, computed in float64)."""
    if delta is None and rt.base_delta is None:
        return
    with torch.no_grad():
        for name, layer in rt.layers.items():
            weight = layer.get_base_layer().weight
            w0 = rt.pristine[name]
            if delta is None:
                weight.copy_(w0)
                continue
            dB, dA = delta[layer_prefix(name)]
            dense = torch.from_numpy(dB) @ torch.from_numpy(dA)  # float64, d×k
            if rt.fan_in_fan_out:
                dense = dense.T
            weight.copy_((w0.double() + dense.to(w0.device)).to(weight.dtype))
    rt.base_delta = delta

def restart(rt: LoraRuntime, info: AdapterInfo, seed: int) -> None:
    """A ~ U(±1/√k) from ``seed`` (peft's kaiming-uniform bound), B = 0, layers in model order."""
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
    with torch.no_grad():
        for name in rt.layers:
            A = info.params[layer_prefix(name) + A_SUFFIX]
            B = info.params[layer_prefix(name) + B_SUFFIX]
            bound = 1.0 / math.sqrt(A.shape[1])
            values = torch.empty(A.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
            A.copy_(values.to(A.dtype))
            B.zero_()

def reset_head(rt: LoraRuntime, info: AdapterInfo) -> None:
    with torch.no_grad():
        for key, value in rt.head0.items():
            info.params[key].copy_(value)


# ------------------------------------------------------------------------------------------ state helpers
def is_lora_key(key: str) -> bool:
    """A ``lora_A`` / ``lora_B`` key (anything else in a peft state is a ``modules_to_save`` parameter)."""
    return key.endswith((A_SUFFIX, B_SUFFIX))


def peft_rank(state: Mapping[str, np.ndarray]) -> int:
    """The rank rᵢ of a peft-form state: rows of its first ``lora_A`` (LoraStateError if none)."""
    for key, arr in state.items():
        if key.endswith(A_SUFFIX):
            return int(np.shape(arr)[0])
    raise LoraStateError(f"state has no '<prefix>{A_SUFFIX}' key (got {sorted(state)[:4]}…)")


def _checked(key: str, arr: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``arr`` as an array, if it is a finite float array of ``shape`` (the model's); else LoraStateError."""
    arr = np.asarray(arr)
    problem = array_problem(arr, shape)
    if problem is not None:
        raise LoraStateError(f"key {key!r}: {problem}")
    return arr


def check_peft_state(info: AdapterInfo, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exactly the adapter's keys with its shapes (rank ``info.rank``)."""
    missing = sorted(set(info.params) - set(state))
    extra = sorted(set(state) - set(info.params))
    if missing or extra:
        raise LoraStateError(
            f"peft state for rank {info.rank}: missing keys {missing[:4]}, unexpected keys {extra[:4]}"
        )
    return {k: _checked(k, state[k], tuple(p.shape)) for k, p in info.params.items()}


def split_delta_state(
    rt: LoraRuntime, info: AdapterInfo, state: Mapping[str, np.ndarray]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Delta-form state → (prefix → float64 (delta_B, delta_A), head arrays); strict keys and shapes."""
    head_keys = {k for k in info.params if not is_lora_key(k)}
    want = set(head_keys)
    for name in rt.layers:
        want |= {layer_prefix(name) + DELTA_A, layer_prefix(name) + DELTA_B}
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        raise LoraStateError(f"delta state: missing keys {missing[:4]}, unexpected keys {extra[:4]}")
    delta: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, layer in rt.layers.items():
        prefix = layer_prefix(name)
        d, k = layer.out_features, layer.in_features
        dB, dA = np.asarray(state[prefix + DELTA_B]), np.asarray(state[prefix + DELTA_A])
        rho = dB.shape[1] if dB.ndim == 2 else -1
        _checked(prefix + DELTA_B, dB, (d, rho))
        _checked(prefix + DELTA_A, dA, (rho, k))
        delta[prefix] = (dB.astype(np.float64), dA.astype(np.float64))
    head = {k: _checked(k, state[k], tuple(info.params[k].shape)) for k in head_keys}
    return delta, head


def copy_into(params: Mapping[str, nn.Parameter], values: Mapping[str, np.ndarray]) -> None:
    """Write checked arrays into the parameters of the same keys (cast to each parameter's dtype/device)."""
    with torch.no_grad():
        for key, arr in values.items():
            p = params[key]
            p.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(device=p.device, dtype=p.dtype))
