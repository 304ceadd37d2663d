"""What a federated run trains, independent of Flower: model, adapter kind, data and loaders.

The ClientApp, the ServerApp's central evaluation and the centralised baselines all build their model
and data through :class:`ExperimentSpec`, so every process of a run computes the same outer factors
(same base weights, same config: identical fingerprints) and the same partitions.

An *adapter kind* says how a model takes the global state a server sends and what it uploads:
:class:`NestedAdapter` for the nested strategies (``fedsb``, ``hetero``: ``sb``; ``flora``: ``nora``);
the peft LoRA baselines live in :mod:`fedlora.lora_client`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from fedlora import data as fdata
from fedlora.models import default_modules_to_save, default_target_modules, load_model, load_tokenizer
from fedlora.nested import (
    NestedLoraConfig,
    apply_nested,
    get_config,
    global_state,
    inner_state,
    load_global_state,
    outer_fingerprint,
    reset_inner,
)
from fedlora.nested.model import nested_layers, saved_modules
from fedlora.outer_bundle import OuterBundle
from fedlora.precision import (
    PRECISION_ATTR,
    cast_frozen_base,
    check_dtype,
    enable_gradient_checkpointing,
    precision_for,
    resolve_device,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import PreTrainedTokenizerBase

#: strategy name -> (adapter family, nested mode or peft variant)
STRATEGY_ADAPTERS: dict[str, tuple[str, str]] = {
    "fedsb": ("nested", "sb"),
    "hetero": ("nested", "sb"),
    "flora": ("nested", "nora"),
    "fedit": ("lora", "fedit"),
    "ffa": ("lora", "ffa"),
    "flora-lora": ("lora", "flora-lora"),
    "flexlora": ("lora", "flexlora"),
}


class AdapterKind(Protocol):
    """How a model exchanges state with a strategy (client and server side)."""

    def wrap(self, model: nn.Module, spec: ExperimentSpec, outer: OuterBundle | None = None) -> nn.Module: ...
    def initial_global_state(self, model: nn.Module) -> dict[str, np.ndarray]: ...
    def load_download(self, model: nn.Module, state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None: ...
    def upload(self, model: nn.Module) -> dict[str, np.ndarray]: ...
    def load_for_eval(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None: ...
    def fingerprint(self, model: nn.Module, exact: bool = True) -> str | None: ...
    def export(self, model: nn.Module, path: str) -> str: ...


class NestedAdapter:
    """Nested adapters: the global state is ``L.R0`` (r×r) + ``modules_to_save``; a client restarts its
    trainable part at its rank rᵢ with T = 0 every round and uploads ``inner_state`` (the update)."""

    def wrap(self, model: nn.Module, spec: ExperimentSpec, outer: OuterBundle | None = None) -> nn.Module:
        apply_nested(model, spec.nested_config(model), outer=outer)
        # the pristine global state, kept because a cached model is reused by later runs in one process
        model.fedlora_initial_state = global_state(model)
        return model

    def initial_global_state(self, model: nn.Module) -> dict[str, np.ndarray]:
        """The global state of the freshly adapted pretrained model (however the model was used since)."""
        pristine = getattr(model, "fedlora_initial_state", None)
        if pristine is None:
            return global_state(model)
        return {k: v.copy() for k, v in pristine.items()}

    def load_download(self, model: nn.Module, state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
        load_global_state(model, state)
        rank = int(config.get("rank", 0)) or None
        inner = int(config.get("inner-rank", 0)) or None
        reset_inner(model, rank=rank, inner_rank=inner, seed=int(config.get("seed", 0)))

    def upload(self, model: nn.Module) -> dict[str, np.ndarray]:
        return inner_state(model)

    def load_for_eval(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        load_global_state(model, state)
        reset_inner(model)

    def fingerprint(self, model: nn.Module, exact: bool = True) -> str | None:
        """:func:`~fedlora.nested.outer_fingerprint` (computed once per model: the factors never change)."""
        key = f"fedlora_fingerprint_{'exact' if exact else 'structure'}"
        if getattr(model, key, None) is None:
            setattr(model, key, outer_fingerprint(model, exact))
        return getattr(model, key)

    def export(self, model: nn.Module, path: str) -> str:
        from fedlora.export import export_peft_adapter

        return export_peft_adapter(model, path)


def adapter_for(strategy: str) -> AdapterKind:
    """The adapter kind a strategy needs (ValueError naming ``strategy`` if unknown)."""
    if strategy not in STRATEGY_ADAPTERS:
        raise ValueError(f"strategy={strategy!r}: must be one of {sorted(STRATEGY_ADAPTERS)}")
    family, variant = STRATEGY_ADAPTERS[strategy]
    if family == "nested":
        return NestedAdapter()
    from fedlora.lora_client import LoraAdapter

    return LoraAdapter(variant)


@dataclass(frozen=True)
class ExperimentSpec:
    """Everything that determines the model and the data of a run (hashable: a per-process cache key).

    ``target_modules`` / ``modules_to_save`` ``None`` take the model family's defaults
    (:func:`fedlora.models.default_target_modules`, :func:`fedlora.models.default_modules_to_save`).
    ``device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``), ``dtype`` (of the frozen base), ``amp`` and
    ``gradient_checkpointing``: where and how the model computes (:mod:`fedlora.precision`); adapters,
    uploads and global states are float32 whatever ``dtype``.
    """

    strategy: str = "fedsb"
    model: str = "minilm"
    task: str = "seq-cls"
    dataset: str = "rotten_tomatoes"
    max_length: int = 64
    r: int = 16
    inner_rank: int = 4
    init: str = "zero"
    alpha: float | None = None
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    model_seed: int = 0
    svd_method: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    amp: bool = False
    gradient_checkpointing: bool = False

    @property
    def mode(self) -> str:
        return STRATEGY_ADAPTERS[self.strategy][1] if self.is_nested else "lora"

    @property
    def is_nested(self) -> bool:
        return STRATEGY_ADAPTERS[self.strategy][0] == "nested"

    def num_labels(self) -> int | None:
        if self.task != "seq-cls":
            return None
        return fdata.num_classes(fdata.load_dataset_by_name(self.dataset))

    def resolved_targets(self, model: nn.Module) -> list[str]:
        return list(self.target_modules) if self.target_modules else default_target_modules(model)

    def resolved_modules_to_save(self, model: nn.Module) -> list[str]:
        if self.modules_to_save is not None:
            return list(self.modules_to_save)
        return default_modules_to_save(model, self.task)

    def nested_config(self, model: nn.Module) -> NestedLoraConfig:
        """The :class:`NestedLoraConfig` of this spec for ``model`` (the base, before adapting)."""
        base = model
        return NestedLoraConfig(
            r=self.r, mode=self.mode, inner_rank=min(self.inner_rank, self.r), init=self.init, alpha=self.alpha,
            target_modules=self.resolved_targets(base), modules_to_save=self.resolved_modules_to_save(base),
            svd_method=self.svd_method,
        )


def quiet_libraries() -> None:
    """Silence per-load reports and progress bars of transformers / datasets (one line per round matters)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _base_model(spec: ExperimentSpec, dtype: torch.dtype = torch.float32) -> nn.Module:
    quiet_libraries()
    return load_model(spec.model, task=spec.task, num_labels=spec.num_labels(), seed=spec.model_seed, dtype=dtype)


@functools.lru_cache(maxsize=4)
def build_model(spec: ExperimentSpec, outer: OuterBundle | None = None) -> nn.Module:
    """The adapted model of ``spec``, built once per process and reused (every round fully resets its
    trainable state from the download, so reuse across clients of one process is safe). ``outer``: the
    server's outer factors (nested adapters only; checked against this model's base weights, see
    :func:`fedlora.outer_bundle.check_fits`); ``None`` computes them locally.

    Precision (:mod:`fedlora.precision`): nested adapters are applied to the float32 base (outer factors from
    the float32 weights upcast to float64: the fingerprint does not depend on ``dtype``), then the frozen base
    is cast to ``dtype`` while the nested layers' tensors and ``modules_to_save`` stay float32; the peft
    baselines load the base in ``dtype`` and keep peft's float32 adapters (``autocast_adapter_dtype``).
    Then gradient checkpointing, the device, and the model's :class:`~fedlora.precision.Precision`.
    Raises ValueError naming ``device`` / ``dtype`` / ``gradient-checkpointing`` when they cannot work here."""
    device = resolve_device(spec.device)
    dtype = check_dtype(spec.dtype, device)
    base = _base_model(spec, torch.float32 if spec.is_nested else dtype)
    model = adapter_for(spec.strategy).wrap(base, spec, outer)
    return place_model(model, device, dtype, amp=spec.amp, gradient_checkpointing=spec.gradient_checkpointing)


def place_model(model: nn.Module, device: torch.device, dtype: torch.dtype, *, amp: bool = False,
                gradient_checkpointing: bool = False) -> nn.Module:
    """Put an adapted model where and in the precision it computes, in place (returns ``model``).

    A nested model (adapted in any precision) gets its frozen base parameters cast to ``dtype`` while every
    nested layer's own tensors and the ``modules_to_save`` stay in their (float32) dtype, behind float32
    boundary hooks; any other model (peft) is taken as loaded in ``dtype`` already. Then gradient
    checkpointing (non-reentrant) if asked, the move to ``device`` and the model's
    :class:`~fedlora.precision.Precision` (``amp``: autocast; loss scaling for float16 compute on CUDA)."""
    if isinstance(getattr(model, "fedlora_config", None), NestedLoraConfig):
        trainable = [p for layer in nested_layers(model).values() for n, p in layer.named_parameters()
                     if not n.startswith("base.")]
        cast_frozen_base(model, dtype, keep=saved_modules(model, get_config(model).modules_to_save).values(),
                         keep_parameters=trainable)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    setattr(model, PRECISION_ATTR, precision_for(device, dtype, amp))
    return model


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model`` (alias, path or hub id), loaded once per process."""
    return load_tokenizer(model)


def make_loader(spec: ExperimentSpec, ds: Dataset, *, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Tokenised DataLoader of a ``text``/``label`` dataset for the spec's task."""
    tok = tokenizer_for(spec.model)
    if spec.task == "seq-cls":
        return fdata.make_classification_loader(ds, tok, max_length=spec.max_length, batch_size=batch_size,
                                                shuffle=shuffle, seed=seed)
    return fdata.make_lm_loader(ds, tok, block_size=spec.max_length, batch_size=batch_size, shuffle=shuffle,
                                seed=seed)


def set_torch_threads(n: int) -> None:
    """Bound intra-op threads (n ≤ 0 leaves torch's default)."""
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
