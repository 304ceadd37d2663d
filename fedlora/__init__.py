"""fedlora: federated fine-tuning with nested low-rank adapters and exact aggregation.

This package never imports flwr; Flower lives in ``strategies/``, ``clients/`` and ``simulations/``.
"""

from fedlora.export import export_merged, export_peft_adapter, restore_base, to_peft_model
from fedlora.nested import (
    InnerStateError,
    NestedLinear,
    NestedLoraConfig,
    apply_nested,
    delta_weights,
    get_config,
    global_state,
    inner_state,
    load_global_state,
    load_inner_state,
    merge_inner,
    nested_layers,
    outer_fingerprint,
    reset_inner,
    trainable_parameter_count,
)
from fedlora.outer import OuterFactorCache, truncated_svd

__version__ = "0.1.0"

__all__ = [
    "InnerStateError",
    "NestedLinear",
    "NestedLoraConfig",
    "OuterFactorCache",
    "apply_nested",
    "delta_weights",
    "export_merged",
    "export_peft_adapter",
    "get_config",
    "global_state",
    "inner_state",
    "load_global_state",
    "load_inner_state",
    "merge_inner",
    "nested_layers",
    "outer_fingerprint",
    "reset_inner",
    "restore_base",
    "to_peft_model",
    "trainable_parameter_count",
    "truncated_svd",
]
