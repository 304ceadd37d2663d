"""Exact server-side aggregation for nested low-rank adapters (docs/design.md §1–2).

- :mod:`fedlora.aggregation.validation`: :class:`AggregationError` (names the client and key),
  :func:`normalize_weights`, :func:`validate_state` and the screening every rule runs first;
- :mod:`fedlora.aggregation.weighted`: the weighted mean of whole arrays and the output key order;
- :mod:`fedlora.aggregation.exact`: the rules :func:`exact_mean` (Fed-SB), :func:`stack_inner` (FLoRA on
  nested ``nora`` updates), :func:`hetero_mean` (heterogeneous ranks) and :func:`apply_increment`.

Each rule returns the r×r increment keyed ``L.R`` (plus the mean of every ``modules_to_save`` key); the
aggregated model's ΔW equals the weighted mean of the clients' ΔW exactly.
"""

from fedlora.aggregation.exact import apply_increment, exact_mean, hetero_mean, stack_inner
from fedlora.aggregation.validation import (
    WEIGHTINGS,
    AggregationError,
    State,
    StateDict,
    normalize_weights,
    validate_state,
)

__all__ = [
    "AggregationError",
    "State",
    "StateDict",
    "apply_increment",
    "exact_mean",
    "hetero_mean",
    "normalize_weights",
    "WEIGHTINGS",
    "stack_inner",
    "validate_state",
]
