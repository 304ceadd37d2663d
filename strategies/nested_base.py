"""The nested-adapter family's base: the global state is ``L.R0`` (r×r) per adapted layer ``L`` plus the
``modules_to_save`` arrays (full values), every array floating point and finite (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.base import NestedStrategyBase
from strategies.wire import Shape, State, check_float_state

#: keys of client uploads, never of a nested global state
CLIENT_UPDATE_SUFFIXES = (".R", ".P", ".Q")


def nested_layer_names(state: Mapping[str, np.ndarray]) -> list[str]:
    """Layer names ``L`` of the ``L.R0`` keys of a nested global state (in key order)."""
    return [k[: -len(".R0")] for k in state if k.endswith(".R0")]


class NestedInnerStrategy(NestedStrategyBase):
    """Common base of the nested strategies (FedSB, HeteroRank, FLoRA)."""

    def init_global_state(self, state: State) -> State:
        """Require ≥ 1 ``L.R0`` of shape (r, r), float arrays, finite values, no client-update keys."""
        if not nested_layer_names(state):
            raise ValueError("initial_state: no 'L.R0' keys (expected a nested global state)")
        check_float_state(state)
        for key, arr in state.items():
            if key.endswith(".R0") and arr.shape != (self.rank, self.rank):
                raise ValueError(
                    f"initial_state: key {key!r} has shape {arr.shape}, expected ({self.rank}, {self.rank})"
                )
            if key.endswith(CLIENT_UPDATE_SUFFIXES):
                raise ValueError(f"initial_state: key {key!r} is a client-update key, not global state")
        return state

    def modules_to_save_shapes(self) -> dict[str, Shape]:
        """Shapes of the ``modules_to_save`` keys (everything but ``L.R0``)."""
        assert self.global_state is not None
        return {k: tuple(v.shape) for k, v in self.global_state.items() if not k.endswith(".R0")}
