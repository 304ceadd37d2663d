"""Client/server adapter of the peft LoRA baselines (FedIT, FFA-LoRA, FLoRA, FlexLoRA) on real peft models.

:class:`LoraAdapter` implements :class:`fedlora.experiment.AdapterKind` for ``variant`` in
``{"fedit", "ffa", "flora-lora", "flexlora"}``. The model is a ``peft.PeftModel`` built once per process
(:meth:`LoraAdapter.wrap`); states are ``dict[str, np.ndarray]`` keyed as ``get_peft_model_state_dict``
keys them (adapter name stripped), e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query
.lora_A.weight`` (rᵢ×k), ``...lora_B.weight`` (d×rᵢ) and ``base_model.model.classifier.weight`` for a
``modules_to_save`` module, which is what the strategies in ``strategies/`` expect: the server's initial
global state comes from :meth:`LoraAdapter.initial_global_state` on the same kind of model.

What a round does, per variant (``load_download`` → local training → ``upload``):

=============  ============================================  =========================================
variant        download (``load_download``)                  upload
=============  ============================================  =========================================
``fedit``      A, B (rank r) + head: all trainable           A, B + head
``ffa``        A (frozen, ``requires_grad=False``), B + head B + head
``flora-lora`` delta form ``<p>.delta_B`` (d×ρ),             fresh A, B (rank rᵢ) + head
               ``<p>.delta_A`` (ρ×k) + head: base weight ←
               pristine W + delta_B·delta_A; A restarted
               from config ``seed`` (uniform ±1/√k, peft's
               kaiming init), B = 0
``flexlora``   A, B truncated to rank rᵢ + head              A, B (rank rᵢ) + head
=============  ============================================  =========================================

Heterogeneous ranks and scalings: the config keys ``rank``, ``lora-alpha`` and ``use-rslora`` select a
peft adapter of that rank and scaling (alpha/rᵢ or alpha/√rᵢ); one adapter per distinct
(rank, alpha, rslora) is added to the model once and reused (``set_adapter``), so the LoRA modules of the
active adapter always have the node's rank. Every ``load_download`` fully resets the mutable state
(active adapter, A, B, head, merged base weights, ``requires_grad`` flags), so clients sharing a process
never see each other's state: the pristine pretrained target weights are kept in the process.

Evaluation (``load_for_eval``): a peft-form global state (FedIT, FFA-LoRA) is loaded into a rank-r
adapter with the spec's alpha; a delta-form global state (FLoRA, FlexLoRA: the exact aggregate
Σ pᵢsᵢBᵢAᵢ) is merged into the base weights with a zero LoRA pair. ``export`` writes a standard peft
adapter for the *original* base model: the peft form as it is, the delta form as a LoRA pair of rank ρ
per layer (``rank_pattern``) with ``lora_alpha = ρ`` (scaling 1), ``lora_B = delta_B``,
``lora_A = delta_A``. This module never imports flwr (nor ``strategies``).
"""

from __future__ import annotations

import copy
import math
import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlora.lora_math import A_SUFFIX, B_SUFFIX

VARIANTS = ("fedit", "ffa", "flora-lora", "flexlora")
DELTA_A = ".delta_A"
DELTA_B = ".delta_B"
PEFT_PREFIX = "base_model.model."
#: the adapter ``get_peft_model`` creates in :meth:`LoraAdapter.wrap` (rank r, the spec's alpha)
DEFAULT_ADAPTER = "default"


class LoraStateError(ValueError):
    """A state does not fit the model (missing/unexpected key, wrong shape, non-finite values)."""


# ------------------------------------------------------------------------------------------ runtime
@dataclass
class _AdapterInfo:
    name: str
    rank: int
    alpha: float
    use_rslora: bool
    params: dict[str, nn.Parameter]  # state key -> parameter of this adapter


@dataclass
class _Runtime:
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
    adapters: dict[tuple[int, float, bool], _AdapterInfo] = field(default_factory=dict)
    active: _AdapterInfo | None = None
    #: delta factors (float64 numpy, per layer prefix) currently merged into the base weights; None = pristine
    base_delta: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, _Runtime] = weakref.WeakKeyDictionary()


def _runtime(model: nn.Module) -> _Runtime:
    rt = _RUNTIMES.get(model)
    if rt is None:
        raise ValueError("model was not wrapped by LoraAdapter.wrap (no peft LoRA runtime attached)")
    return rt


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()  # bfloat16 has no numpy dtype; the wire format is float32 for half types
    return t.numpy().copy()


def _layer_prefix(name: str) -> str:
    return PEFT_PREFIX + name


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {name: mod for name, mod in inner.named_modules() if isinstance(mod, LoraLayer)}


def _scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)


# ------------------------------------------------------------------------------------------ adapter
class LoraAdapter:
    """peft LoRA baseline adapter (see the module docstring); ``variant`` names the strategy."""

    def __init__(self, variant: str) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
        self.variant = variant

    # -------------------------------------------------------------- AdapterKind
    def wrap(self, model: nn.Module, spec: Any) -> nn.Module:
        """``get_peft_model`` with rank ``spec.r``, ``lora_alpha = spec.lora_alpha or spec.r``, dropout 0,
        the spec's target modules and ``modules_to_save``; records the pristine target weights."""
        from peft import LoraConfig, get_peft_model

        targets = list(spec.resolved_targets(model))
        mts = list(spec.resolved_modules_to_save(model))
        fan_in_fan_out = any(_is_conv1d(m) for n, m in model.named_modules() if _matches(n, targets))
        alpha = float(spec.lora_alpha or spec.r)
        cfg = LoraConfig(
            r=int(spec.r),
            lora_alpha=alpha,
            target_modules=targets,
            modules_to_save=mts or None,
            lora_dropout=0.0,
            fan_in_fan_out=fan_in_fan_out,
        )
        seed = int(getattr(spec, "model_seed", 0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, cfg, adapter_name=DEFAULT_ADAPTER)
        layers = _lora_layers(peft_model)
        if not layers:
            raise ValueError(f"target_modules={targets!r}: no layer of the model matched")
        rt = _Runtime(
            targets=targets,
            modules_to_save=mts,
            fan_in_fan_out=fan_in_fan_out,
            default_rank=int(spec.r),
            default_alpha=alpha,
            init_seed=seed,
            layers=layers,
            pristine={n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()},
            head0={},
        )
        _RUNTIMES[peft_model] = rt
        info = self._adapter(peft_model, rt, int(spec.r), alpha, False)
        rt.head0 = {k: p.detach().clone() for k, p in info.params.items() if not _is_lora_key(k)}
        self._activate(peft_model, rt, info, freeze_a=False)
        return peft_model

    def initial_global_state(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Rank-r peft state: A seeded (``spec.model_seed``, uniform ±1/√k), B = 0, the pretrained head.

        Deterministic however the process used the model before (the model is reset to this state).
        """
        rt = _runtime(model)
        info = self._adapter(model, rt, rt.default_rank, rt.default_alpha, False)
        self._set_base(rt, None)
        self._restart(rt, info, rt.init_seed)
        self._reset_head(rt, info)
        self._activate(model, rt, info, freeze_a=False)
        return {k: _to_numpy(p) for k, p in info.params.items()}

    def load_download(self, model: nn.Module, state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
        """Put the model in the round's start state (see the module docstring); raises
        :class:`LoraStateError` naming the key for a download that does not fit."""
        rt = _runtime(model)
        want_format = "delta" if self.variant == "flora-lora" else "peft"
        got_format = config.get("lora-format")
        if got_format not in (None, "", want_format):
            raise ValueError(f"config lora-format={got_format!r}: variant {self.variant!r} expects {want_format!r}")
        alpha_cfg = config.get("lora-alpha")
        alpha = float(alpha_cfg) if alpha_cfg not in (None, 0, 0.0) else rt.default_alpha
        use_rslora = bool(config.get("use-rslora", False))
        rank = int(config.get("rank") or 0)
        if self.variant == "flora-lora":
            rank = rank or rt.default_rank
            info = self._adapter(model, rt, rank, alpha, use_rslora)
            delta, head = _split_delta_state(rt, info, state)
            self._set_base(rt, delta)
            self._restart(rt, info, int(config.get("seed", 0)))
            _copy_into(info.params, head)
        else:
            rank = rank or _peft_rank(state)
            info = self._adapter(model, rt, rank, alpha, use_rslora)
            checked = _check_peft_state(info, state)
            self._set_base(rt, None)
            _copy_into(info.params, checked)
        freeze_a = self.variant == "ffa" or bool(config.get("freeze-a", False))
        self._activate(model, rt, info, freeze_a=freeze_a)

    def upload(self, model: nn.Module) -> dict[str, np.ndarray]:
        """The active adapter's peft state (rank rᵢ); FFA-LoRA leaves out the frozen A."""
        rt = _runtime(model)
        assert rt.active is not None
        out = {k: _to_numpy(p) for k, p in rt.active.params.items()}
        if self.variant == "ffa":
            out = {k: v for k, v in out.items() if not k.endswith(A_SUFFIX)}
        return out

    def load_for_eval(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """The global model: peft form → rank-r adapter with the spec's alpha; delta form → W + ΔW
        merged into the base weights and a zero LoRA pair."""
        rt = _runtime(model)
        if any(k.endswith(DELTA_A) for k in state):
            info = self._adapter(model, rt, rt.default_rank, rt.default_alpha, False)
            delta, head = _split_delta_state(rt, info, state)
            self._set_base(rt, delta)
            with torch.no_grad():
                for key, p in info.params.items():
                    if _is_lora_key(key):
                        p.zero_()
            _copy_into(info.params, head)
        else:
            info = self._adapter(model, rt, _peft_rank(state), rt.default_alpha, False)
            checked = _check_peft_state(info, state)
            self._set_base(rt, None)
            _copy_into(info.params, checked)
        self._activate(model, rt, info, freeze_a=False)

    def fingerprint(self, model: nn.Module) -> str | None:
        """None: peft baselines have no shared outer factors to check."""
        return None

    def export(self, model: nn.Module, path: str) -> str:
        """Write a peft adapter (``save_pretrained``) for the original base model; returns ``path``.

        ``PeftModel.from_pretrained(original_base, path)`` reproduces the current model (the state
        ``load_for_eval`` put it in): a peft form as is; merged delta factors (plus any non-zero LoRA
        pair on top, stacked with its scaling folded in) as rank-ρ LoRA pairs with scaling 1.
        """
        from peft import LoraConfig, get_peft_model

        rt = _runtime(model)
        info = rt.active
        assert info is not None
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in rt.layers.items():
            A = layer.lora_A[info.name].weight.detach().double().cpu()
            B = layer.lora_B[info.name].weight.detach().double().cpu()
            factors[name] = (B, A)
        base = copy.deepcopy(model).unload()
        with torch.no_grad():
            for name, w0 in rt.pristine.items():
                base.get_submodule(name).weight.copy_(w0)
        if rt.base_delta is None:
            cfg = LoraConfig(
                r=info.rank,
                lora_alpha=info.alpha,
                use_rslora=info.use_rslora,
                target_modules=list(rt.layers),
                modules_to_save=rt.modules_to_save or None,
                lora_dropout=0.0,
                fan_in_fan_out=rt.fan_in_fan_out,
            )
        else:
            s = _scaling(info.rank, info.alpha, info.use_rslora)
            stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for name, (B, A) in factors.items():
                dB, dA = (torch.from_numpy(x) for x in rt.base_delta[_layer_prefix(name)])
                parts_b, parts_a = [dB], [dA]
                if torch.count_nonzero(B) and torch.count_nonzero(A):
                    parts_b.append(s * B)
                    parts_a.append(A)
                Bs, As = torch.cat(parts_b, dim=1), torch.cat(parts_a, dim=0)
                if Bs.shape[1] == 0:  # ΔW = 0: a rank-1 zero pair (peft needs r ≥ 1)
                    Bs, As = torch.zeros(Bs.shape[0], 1, dtype=Bs.dtype), torch.zeros(1, As.shape[1], dtype=As.dtype)
                stacked[name] = (Bs, As)
            factors = stacked
            ranks = {re.escape(n): int(B.shape[1]) for n, (B, _) in factors.items()}
            top = max(ranks.values())
            cfg = LoraConfig(
                r=top,
                lora_alpha=float(top),
                rank_pattern=ranks,
                alpha_pattern={k: float(v) for k, v in ranks.items()},
                target_modules=list(rt.layers),
                modules_to_save=rt.modules_to_save or None,
                lora_dropout=0.0,
                fan_in_fan_out=rt.fan_in_fan_out,
            )
        out = get_peft_model(base, cfg, adapter_name=DEFAULT_ADAPTER)
        with torch.no_grad():
            for name, layer in _lora_layers(out).items():
                B, A = factors[name]
                a_w, b_w = layer.lora_A[DEFAULT_ADAPTER].weight, layer.lora_B[DEFAULT_ADAPTER].weight
                if tuple(a_w.shape) != tuple(A.shape) or tuple(b_w.shape) != tuple(B.shape):
                    raise RuntimeError(f"export: layer {name!r}: peft built A {tuple(a_w.shape)}, "
                                       f"B {tuple(b_w.shape)} for factors A {tuple(A.shape)}, B {tuple(B.shape)}")
                a_w.copy_(A.to(a_w.dtype))
                b_w.copy_(B.to(b_w.dtype))
        os.makedirs(path, exist_ok=True)
        out.save_pretrained(str(path), safe_serialization=True)
        return str(path)

    # -------------------------------------------------------------- internals
    @staticmethod
    def _adapter(model: nn.Module, rt: _Runtime, rank: int, alpha: float, use_rslora: bool) -> _AdapterInfo:
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
                if _layer_prefix(lname) + suffix not in params:
                    raise RuntimeError(f"peft state of adapter {name!r} lacks {_layer_prefix(lname) + suffix!r}")
        info = _AdapterInfo(name=name, rank=key[0], alpha=key[1], use_rslora=key[2], params=params)
        rt.adapters[key] = info
        return info

    @staticmethod
    def _activate(model: nn.Module, rt: _Runtime, info: _AdapterInfo, *, freeze_a: bool) -> None:
        """Make ``info`` the only active adapter; only its A (unless frozen), B and head are trainable."""
        if rt.active is None or rt.active.name != info.name or model.active_adapter != info.name:
            model.set_adapter(info.name)
        for p in model.parameters():
            p.requires_grad_(False)
        for key, p in info.params.items():
            p.requires_grad_(not (freeze_a and key.endswith(A_SUFFIX)))
        rt.active = info

    @staticmethod
    def _set_base(rt: _Runtime, delta: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> None:
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
                dB, dA = delta[_layer_prefix(name)]
                dense = torch.from_numpy(dB) @ torch.from_numpy(dA)  # float64, d×k
                if rt.fan_in_fan_out:
                    dense = dense.T
                weight.copy_((w0.double() + dense.to(w0.device)).to(weight.dtype))
        rt.base_delta = delta

    @staticmethod
    def _restart(rt: _Runtime, info: _AdapterInfo, seed: int) -> None:
        """A ~ U(±1/√k) from ``seed`` (peft's kaiming-uniform bound), B = 0, layers in model order."""
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        with torch.no_grad():
            for name in rt.layers:
                A = info.params[_layer_prefix(name) + A_SUFFIX]
                B = info.params[_layer_prefix(name) + B_SUFFIX]
                bound = 1.0 / math.sqrt(A.shape[1])
                values = torch.empty(A.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
                A.copy_(values.to(A.dtype))
                B.zero_()

    @staticmethod
    def _reset_head(rt: _Runtime, info: _AdapterInfo) -> None:
        with torch.no_grad():
            for key, value in rt.head0.items():
                info.params[key].copy_(value)


# ------------------------------------------------------------------------------------------ state helpers
def _is_lora_key(key: str) -> bool:
    return key.endswith((A_SUFFIX, B_SUFFIX))


def _peft_rank(state: Mapping[str, np.ndarray]) -> int:
    for key, arr in state.items():
        if key.endswith(A_SUFFIX):
            return int(np.shape(arr)[0])
    raise LoraStateError(f"state has no '<prefix>{A_SUFFIX}' key (got {sorted(state)[:4]}…)")


def _check_array(key: str, arr: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise LoraStateError(f"key {key!r}: dtype {arr.dtype}, expected floating point")
    if tuple(arr.shape) != tuple(shape):
        raise LoraStateError(f"key {key!r}: shape {tuple(arr.shape)}, the model expects {tuple(shape)}")
    if not np.all(np.isfinite(arr)):
        raise LoraStateError(f"key {key!r}: non-finite values")
    return arr


def _check_peft_state(info: _AdapterInfo, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exactly the adapter's keys with its shapes (rank ``info.rank``)."""
    missing = sorted(set(info.params) - set(state))
    extra = sorted(set(state) - set(info.params))
    if missing or extra:
        raise LoraStateError(
            f"peft state for rank {info.rank}: missing keys {missing[:4]}, unexpected keys {extra[:4]}"
        )
    return {k: _check_array(k, state[k], tuple(p.shape)) for k, p in info.params.items()}


def _split_delta_state(
    rt: _Runtime, info: _AdapterInfo, state: Mapping[str, np.ndarray]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Delta-form state → (prefix → float64 (delta_B, delta_A), head arrays); strict keys and shapes."""
    head_keys = {k for k in info.params if not _is_lora_key(k)}
    want = set(head_keys)
    for name in rt.layers:
        want |= {_layer_prefix(name) + DELTA_A, _layer_prefix(name) + DELTA_B}
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        raise LoraStateError(f"delta state: missing keys {missing[:4]}, unexpected keys {extra[:4]}")
    delta: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, layer in rt.layers.items():
        prefix = _layer_prefix(name)
        d, k = layer.out_features, layer.in_features
        dB, dA = np.asarray(state[prefix + DELTA_B]), np.asarray(state[prefix + DELTA_A])
        rho = dB.shape[1] if dB.ndim == 2 else -1
        _check_array(prefix + DELTA_B, dB, (d, rho))
        _check_array(prefix + DELTA_A, dA, (rho, k))
        delta[prefix] = (dB.astype(np.float64), dA.astype(np.float64))
    head = {k: _check_array(k, state[k], tuple(info.params[k].shape)) for k in head_keys}
    return delta, head


def _copy_into(params: Mapping[str, nn.Parameter], values: Mapping[str, np.ndarray]) -> None:
    with torch.no_grad():
        for key, arr in values.items():
            p = params[key]
            p.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(device=p.device, dtype=p.dtype))
