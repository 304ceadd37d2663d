"""Fed-SB on nested adapters: clients upload R (r×r), the server averages exactly.

Global state: ``L.R0`` (r×r) per layer + ``modules_to_save`` keys. Each node trains R on top of the
received R0 and uploads ``L.R`` (r×r) + ``modules_to_save``; the new global state is
``apply_increment(global, exact_mean(uploads, p))``: R0 ← R0 + Σ pᵢRᵢ (exact, docs/design.md §2).
Every node trains the full rank r (use ``hetero`` for per-node ranks).
"""

from __future__ import annotations

import numpy as np

from fedlora.aggregation import apply_increment, exact_mean
from strategies.nested_base import NestedInnerStrategy, nested_layer_names
from strategies.screening import ClientUpdate
from strategies.wire import Shape, State


class FedSB(NestedInnerStrategy):
    """Fed-SB: exact weighted mean of full-rank r×r updates (``mode="sb"``)."""

    name = "fedsb"
    mode = "sb"
    heterogeneous_ranks = False

    def expected_upload(self, rank: int, inner_rank: int) -> dict[str, Shape]:
        """``L.R`` (r×r) per layer + ``modules_to_save`` shapes."""
        assert self.global_state is not None
        out: dict[str, Shape] = {
            f"{layer}.R": (rank, rank) for layer in nested_layer_names(self.global_state)
        }
        out.update(self.modules_to_save_shapes())
        return out

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """R0 ← R0 + Σ pᵢRᵢ; modules_to_save ← Σ pᵢ·mᵢ."""
        assert self.global_state is not None
        increment = exact_mean([u.state for u in updates], weights)
        return apply_increment(self.global_state, increment)
