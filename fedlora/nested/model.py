"""Model-level API of nested adapters: apply, read and load states, fingerprint, ΔW.

State conventions (docs/architecture.md): for a nested layer named ``L``, a client uploads
``L.R`` (rᵢ×rᵢ, ``sb``) or ``L.P`` (rᵢ×q) and ``L.Q`` (q×rᵢ) (``nora``); the global state the server
sends is ``L.R0`` (r×r). ``modules_to_save`` parameters travel in full as ``<module>.<param>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedlora.models import matches_target
from fedlora.nested.config import NestedLoraConfig
from fedlora.nested.layer import NestedLinear, is_adaptable, linear_weight
from fedlora.outer import OuterFactors, get_cache
from fedlora.outer_bundle import OuterBundle, check_fits
from fedlora.tensors import array_problem, to_numpy
from fedlora.training import trainable_parameters

CONFIG_ATTR = "fedlora_config"


class InnerStateError(ValueError):
    """A state that does not fit the model; ``key`` names the offending layer/parameter."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------- helpers
def get_config(model: nn.Module) -> NestedLoraConfig:
    """The :class:`NestedLoraConfig` a model was adapted with (ValueError if none)."""
    cfg = getattr(model, CONFIG_ATTR, None)
    if not isinstance(cfg, NestedLoraConfig):
        raise ValueError("model has no nested adapters: call fedlora.apply_nested(model, config) first")
    return cfg


def nested_layers(model: nn.Module) -> dict[str, NestedLinear]:
    """Nested layers by module name, in a stable (sorted) order."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NestedLinear)}
    return dict(sorted(layers.items()))


def saved_modules(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """``modules_to_save`` modules by name (outermost match only), sorted."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and matches_target(name, patterns) and not any(name.startswith(p + ".") for p in found):
            found[name] = module
    return dict(sorted(found.items()))


def _saved_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    cfg = get_config(model)
    params: dict[str, nn.Parameter] = {}
    for mname, module in saved_modules(model, cfg.modules_to_save).items():
        for pname, p in module.named_parameters():
            params[f"{mname}.{pname}"] = p
    return params


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------- apply
def apply_nested(model: nn.Module, config: NestedLoraConfig, outer: OuterBundle | None = None) -> nn.Module:
    """Replace every targeted ``nn.Linear`` / ``Conv1D`` by a :class:`NestedLinear`, in place.

    Outer factors: ``outer`` (the server's :class:`~fedlora.outer_bundle.OuterBundle`, used bit for bit after
    :func:`~fedlora.outer_bundle.check_fits` has checked that it fits this model's base weights — nothing is
    changed if it does not), else the truncated SVD of each pretrained weight (float64, canonical signs,
    cached). All parameters are frozen except the inner parts and ``modules_to_save``. With
    ``init="principal"`` each base weight becomes the residual W − B diag(S) A (computed from the layer's
    factors as stored, so every node holding the same bundle gets the same residual up to its own weights)
    and R0 = diag(S)/s. The model's outputs are unchanged at initialisation for both inits. Returns ``model``.
    """
    if not isinstance(config, NestedLoraConfig):
        raise TypeError("config must be a NestedLoraConfig")
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("apply_nested was already applied to this model")
    if config.target_modules is None:
        raise ValueError("NestedLoraConfig.target_modules=None: name the modules to adapt")
    targets = [
        (n, m) for n, m in model.named_modules()
        if n and matches_target(n, config.target_modules) and is_adaptable(m)
    ]
    if not targets:
        raise ValueError(
            f"NestedLoraConfig.target_modules={config.target_modules!r}: no nn.Linear/Conv1D module matches"
        )
    missing = [p for p in config.modules_to_save if not saved_modules(model, [p])]
    if missing:
        raise ValueError(f"NestedLoraConfig.modules_to_save: no module matches {missing}")
    for name, base in targets:
        d, k = linear_weight(base).shape
        if config.r > min(d, k):
            raise ValueError(f"NestedLoraConfig.r={config.r} exceeds min(d, k)={min(d, k)} of layer {name}")
    if outer is not None:
        check_fits({name: linear_weight(base) for name, base in targets}, outer, config.r)
    cache = get_cache(config.cache_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in targets:
        w = linear_weight(base)
        f = outer.factors[name] if outer is not None else cache.get_or_compute(
            w, config.r, config.svd_method, config.svd_niter, config.svd_oversample, config.seed
        )
        layer = NestedLinear(
            base, f.Vh, f.U, f.S, mode=config.mode, scaling=config.scaling, rank=config.rank,
            inner_rank=min(config.q, config.rank), dropout=config.dropout,
            seed=_layer_seed(config.seed, name), principal=config.init == "principal",
        )
        if config.init == "principal":
            with torch.no_grad():
                B, S, A = (t.detach().to("cpu", torch.float64) for t in (layer.B, layer.S, layer.A))
                resid = (w.detach().to("cpu", torch.float64) - (B * S) @ A).to(device=w.device, dtype=w.dtype)
                base.weight.copy_(resid if isinstance(base, nn.Linear) else resid.T)
                layer.R0.copy_(torch.diag(layer.S / config.scaling).to(layer.R0.dtype))
        set_submodule(model, name, layer)
    setattr(model, CONFIG_ATTR, config)
    for p in _saved_parameters(model).values():
        p.requires_grad_(True)
    return model


def _layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:4], "little")


def reset_inner(
    model: nn.Module, rank: int | None = None, inner_rank: int | None = None, seed: int = 0
) -> None:
    """Restart every layer's trainable part (T = 0) at rank ``rank`` (default: the config's rᵢ).

    A model of rank rᵢ < r trains only the top-left rᵢ×rᵢ block while applying its full r×r R0.
    """
    cfg = get_config(model)
    rank = cfg.rank if rank is None else rank
    inner_rank = min(cfg.q if inner_rank is None else inner_rank, rank)
    for name, layer in nested_layers(model).items():
        layer.reset_inner(rank, inner_rank, _layer_seed(seed, name))


def merge_inner(model: nn.Module, seed: int = 0) -> None:
    """Fold every trainable part into R0 (R0 ← R0 + pad(T)) and restart it at zero."""
    for name, layer in nested_layers(model).items():
        layer.merge_trainable(_layer_seed(seed, name))


# ---------------------------------------------------------------------------- states
def inner_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Exactly what a client uploads: ``L.R`` (``sb``) or ``L.P``, ``L.Q`` (``nora``) per nested
    layer, plus every ``modules_to_save`` parameter. Arrays are copies in the model's dtype."""
    state: dict[str, np.ndarray] = {}
    for name, layer in nested_layers(model).items():
        if layer.mode == "sb":
            state[f"{name}.R"] = to_numpy(layer.R.weight)
        else:
            state[f"{name}.P"] = to_numpy(layer.P.weight)
            state[f"{name}.Q"] = to_numpy(layer.Q.weight)
    for key, p in _saved_parameters(model).items():
        state[key] = to_numpy(p)
    return state


def _inner_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    targets: dict[str, torch.Tensor] = {}
    for name, layer in nested_layers(model).items():
        if layer.mode == "sb":
            targets[f"{name}.R"] = layer.R.weight
        else:
            targets[f"{name}.P"] = layer.P.weight
            targets[f"{name}.Q"] = layer.Q.weight
    for key, p in _saved_parameters(model).items():
        targets[key] = p
    return targets


def _global_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    targets: dict[str, torch.Tensor] = {f"{n}.R0": layer.R0 for n, layer in nested_layers(model).items()}
    for key, p in _saved_parameters(model).items():
        targets[key] = p
    return targets


def _check_state(targets: Mapping[str, torch.Tensor], state: Mapping[str, np.ndarray], what: str) -> None:
    missing = sorted(set(targets) - set(state))
    extra = sorted(set(state) - set(targets))
    if missing:
        raise InnerStateError(f"{what}: missing key(s) {missing[:5]}", key=missing[0])
    if extra:
        raise InnerStateError(f"{what}: unexpected key(s) {extra[:5]}", key=extra[0])
    for key, target in targets.items():
        value = state[key]
        arr = to_numpy(value) if isinstance(value, torch.Tensor) else np.asarray(value)
        problem = array_problem(arr, tuple(target.shape))
        if problem is not None:
            raise InnerStateError(f"{what}: layer {key}: {problem}", key=key)


def _assign(targets: Mapping[str, torch.Tensor], state: Mapping[str, np.ndarray]) -> None:
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(torch.as_tensor(np.asarray(state[key])).to(target.dtype))


def load_inner_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Strictly load an :func:`inner_state`-shaped dict: keys, shapes, float dtype and finiteness are
    checked for every entry *before* anything is written, so a rejected state leaves the model
    unchanged. Raises :class:`InnerStateError` naming the layer."""
    targets = _inner_targets(model)
    _check_state(targets, state, "load_inner_state")
    _assign(targets, state)


def global_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The global state: ``L.R0`` (r×r) per nested layer and every ``modules_to_save`` parameter."""
    return {k: to_numpy(t) for k, t in _global_targets(model).items()}


def load_global_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Strictly load a :func:`global_state`-shaped dict into R0 and ``modules_to_save`` (same checks as
    :func:`load_inner_state`; nothing is written if any entry is rejected)."""
    targets = _global_targets(model)
    _check_state(targets, state, "load_global_state")
    _assign(targets, state)


# ---------------------------------------------------------------------------- inspection
def outer_fingerprint(model: nn.Module, exact: bool = True) -> str:
    """sha256 (hex) of r, mode, init, every layer's name and shapes and (``exact``) its outer factors'
    float32 bytes.

    Independent of the client's rank and of the model's float precision. Exact fingerprints agree between
    machines when they use the same factors (the server's, :mod:`fedlora.outer_bundle`), not when each
    computes its own SVD; ``exact=False`` (structure only) is for nodes that compute their own factors and
    compare them with the server's by a tolerance (:func:`fedlora.outer_bundle.check_sketch`)."""
    cfg = get_config(model)
    tag = "fedlora-outer-v1" if exact else "fedlora-outer-structure-v1"
    h = hashlib.sha256(f"{tag}|r={cfg.r}|mode={cfg.mode}|init={cfg.init}".encode())
    for name, layer in nested_layers(model).items():
        h.update(f"|{name}|{tuple(layer.B.shape)}|{tuple(layer.A.shape)}|".encode())
        for t in (layer.B, layer.A) if exact else ():
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def outer_bundle_of(model: nn.Module) -> OuterBundle:
    """The outer factors every nested layer computes with (its B, S, A buffers, on the CPU), as the bundle
    the server ships to nodes (:mod:`fedlora.outer_bundle`)."""
    get_config(model)
    return OuterBundle.from_factors({name: OuterFactors(U=layer.B, S=layer.S, Vh=layer.A)
                                     for name, layer in nested_layers(model).items()})


def delta_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense ΔW (d×k, ``nn.Linear`` layout, also for Conv1D) of every nested layer relative to the
    pretrained weight: s·B·(R_eff − R_init)·A with R_init = 0 (``zero``) or diag(S)/s (``principal``)."""
    with torch.no_grad():
        return {name: layer.delta_weight().detach().clone() for name, layer in nested_layers(model).items()}


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable values: r² (``sb``) or 2·r·q (``nora``) per adapted layer plus ``modules_to_save``."""
    return sum(p.numel() for p in trainable_parameters(model))
