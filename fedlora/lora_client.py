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
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedlora.lora_math import A_SUFFIX, DELTA_A
from fedlora.lora_state import (
    DEFAULT_ADAPTER,
    LoraRuntime,
    LoraStateError,
    activate,
    attach_runtime,
    check_peft_state,
    copy_into,
    get_adapter,
    is_lora_key,
    layer_prefix,
    lora_layers,
    lora_scaling,
    peft_rank,
    reset_head,
    restart,
    runtime_of,
    set_base,
    split_delta_state,
)
from fedlora.models import matches_target
from fedlora.nested.model import set_submodule
from fedlora.tensors import to_numpy

if TYPE_CHECKING:
    from fedlora.experiment import ExperimentSpec

__all__ = ["VARIANTS", "LoraAdapter", "LoraStateError"]

VARIANTS = ("fedit", "ffa", "flora-lora", "flexlora")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _base_with_trained_heads(model: nn.Module, adapter_name: str) -> nn.Module:
    """A deep copy of the transformers model under the ``PeftModel`` with every ``modules_to_save`` module set
    to adapter ``adapter_name``'s trained copy (LoRA layers removed, target weights as they are).

    Does not rely on what ``unload()`` does with ``modules_to_save``: peft < 0.22 copied the trained weights
    onto the original module, peft ≥ 0.22 returns the original (pretrained) module untouched.
    """
    from peft.utils import ModulesToSaveWrapper

    live = copy.deepcopy(model)
    heads = {
        name: copy.deepcopy(module.modules_to_save[adapter_name])
        for name, module in live.get_base_model().named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
    }
    base = live.unload()
    for name, head in heads.items():
        set_submodule(base, name, head)
    return base


# ------------------------------------------------------------------------------------------ adapter
class LoraAdapter:
    """peft LoRA baseline adapter (see the module docstring); ``variant`` names the strategy."""

    def __init__(self, variant: str) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
        self.variant = variant

    # -------------------------------------------------------------- AdapterKind
    def wrap(self, model: nn.Module, spec: ExperimentSpec, outer: object = None) -> nn.Module:
        """``get_peft_model`` with rank ``spec.r``, ``lora_alpha = spec.lora_alpha or spec.r``, dropout 0,
        the spec's target modules and ``modules_to_save``; records the pristine target weights. LoRA has no
        outer factors: ``outer`` must be None."""
        from peft import LoraConfig, get_peft_model

        if outer is not None:
            raise ValueError(f"strategy {spec.strategy!r} trains peft LoRA, which takes no outer factors")

        targets = list(spec.resolved_targets(model))
        mts = list(spec.resolved_modules_to_save(model))
        fan_in_fan_out = any(_is_conv1d(m) for n, m in model.named_modules() if matches_target(n, targets))
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
        layers = lora_layers(peft_model)
        if not layers:
            raise ValueError(f"target_modules={targets!r}: no layer of the model matched")
        rt = LoraRuntime(
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
        attach_runtime(peft_model, rt)
        info = get_adapter(peft_model, rt, int(spec.r), alpha, False)
        rt.head0 = {k: p.detach().clone() for k, p in info.params.items() if not is_lora_key(k)}
        activate(peft_model, rt, info, freeze_a=False)
        return peft_model

    def initial_global_state(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Rank-r peft state: A seeded (``spec.model_seed``, uniform ±1/√k), B = 0, the pretrained head.

        Deterministic however the process used the model before (the model is reset to this state).
        """
        rt = runtime_of(model)
        info = get_adapter(model, rt, rt.default_rank, rt.default_alpha, False)
        set_base(rt, None)
        restart(rt, info, rt.init_seed)
        reset_head(rt, info)
        activate(model, rt, info, freeze_a=False)
        return {k: to_numpy(p) for k, p in info.params.items()}

    def load_download(self, model: nn.Module, state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
        """Put the model in the round's start state (see the module docstring); raises
        :class:`LoraStateError` naming the key for a download that does not fit."""
        rt = runtime_of(model)
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
            info = get_adapter(model, rt, rank, alpha, use_rslora)
            delta, head = split_delta_state(rt, info, state)
            set_base(rt, delta)
            restart(rt, info, int(config.get("seed", 0)))
            copy_into(info.params, head)
        else:
            rank = rank or peft_rank(state)
            info = get_adapter(model, rt, rank, alpha, use_rslora)
            checked = check_peft_state(info, state)
            set_base(rt, None)
            copy_into(info.params, checked)
        freeze_a = self.variant == "ffa" or bool(config.get("freeze-a", False))
        activate(model, rt, info, freeze_a=freeze_a)

    def upload(self, model: nn.Module) -> dict[str, np.ndarray]:
        """The active adapter's peft state (rank rᵢ); FFA-LoRA leaves out the frozen A."""
        rt = runtime_of(model)
        assert rt.active is not None
        out = {k: to_numpy(p) for k, p in rt.active.params.items()}
        if self.variant == "ffa":
            out = {k: v for k, v in out.items() if not k.endswith(A_SUFFIX)}
        return out

    def load_for_eval(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """The global model: peft form → rank-r adapter with the spec's alpha; delta form → W + ΔW
        merged into the base weights and a zero LoRA pair."""
        rt = runtime_of(model)
        if any(k.endswith(DELTA_A) for k in state):
            info = get_adapter(model, rt, rt.default_rank, rt.default_alpha, False)
            delta, head = split_delta_state(rt, info, state)
            set_base(rt, delta)
            with torch.no_grad():
                for key, p in info.params.items():
                    if is_lora_key(key):
                        p.zero_()
            copy_into(info.params, head)
        else:
            info = get_adapter(model, rt, peft_rank(state), rt.default_alpha, False)
            checked = check_peft_state(info, state)
            set_base(rt, None)
            copy_into(info.params, checked)
        activate(model, rt, info, freeze_a=False)

    def fingerprint(self, model: nn.Module, exact: bool = True) -> str | None:
        """None: peft baselines have no shared outer factors to check."""
        return None

    def export(self, model: nn.Module, path: str) -> str:
        """Write a peft adapter (``save_pretrained``) for the original base model; returns ``path``.

        ``PeftModel.from_pretrained(original_base, path)`` reproduces the current model (the state
        ``load_for_eval`` put it in): a peft form as is; merged delta factors (plus any non-zero LoRA
        pair on top, stacked with its scaling folded in) as rank-ρ LoRA pairs with scaling 1.
        """
        from peft import LoraConfig, get_peft_model

        rt = runtime_of(model)
        info = rt.active
        assert info is not None
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in rt.layers.items():
            A = layer.lora_A[info.name].weight.detach().double().cpu()
            B = layer.lora_B[info.name].weight.detach().double().cpu()
            factors[name] = (B, A)
        base = _base_with_trained_heads(model, info.name)
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
            s = lora_scaling(info.rank, info.alpha, info.use_rslora)
            stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for name, (B, A) in factors.items():
                dB, dA = (torch.from_numpy(x) for x in rt.base_delta[layer_prefix(name)])
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
            for name, layer in lora_layers(out).items():
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
