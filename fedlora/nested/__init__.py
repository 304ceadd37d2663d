"""Nested low-rank adapters (peft-style layout: config / layer / model)."""

from fedlora.nested.config import NestedLoraConfig
from fedlora.nested.layer import NestedLinear
from fedlora.nested.model import (
    InnerStateError,
    apply_nested,
    delta_weights,
    get_config,
    global_state,
    inner_state,
    load_global_state,
    load_inner_state,
    merge_inner,
    nested_layers,
    outer_bundle_of,
    outer_fingerprint,
    reset_inner,
    trainable_parameter_count,
)

__all__ = [
    "InnerStateError",
    "NestedLinear",
    "NestedLoraConfig",
    "apply_nested",
    "delta_weights",
    "get_config",
    "global_state",
    "inner_state",
    "load_global_state",
    "load_inner_state",
    "merge_inner",
    "nested_layers",
    "outer_bundle_of",
    "outer_fingerprint",
    "reset_inner",
    "trainable_parameter_count",
]
