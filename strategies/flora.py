"""Nested FLoRA: clients train P (rᵢ×qᵢ), Q (qᵢ×rᵢ) on a frozen R0; the server stacks exactly.

Global state: ``L.R0`` (r×r) per layer + ``modules_to_save``. Each round a node of rank rᵢ receives
the full R0, re-initialises P = 0 and Q random (config ``restart-inner=True``, seeded by ``seed``),
trains, and uploads ``L.P`` (rᵢ×qᵢ) and ``L.Q`` (qᵢ×rᵢ) with qᵢ = min(q, rᵢ) (config ``inner-rank``).
The server forms R0 ← R0 + [p₁P̃₁ … pₙP̃ₙ][Q̃₁; …; Q̃ₙ] = R0 + Σ pᵢ pad_r(PᵢQᵢ) (``stack_inner``), exact.
Upload is 2rᵢqᵢ floats per layer, download r².
"""

from __future__ import annotations

import numpy as np

from fedlora.aggregation import apply_increment, stack_inner
from strategies.nested_base import NestedInnerStrategy, nested_layer_names
from strategies.screening import ClientUpdate
from strategies.wire import Shape, State


class FLoRA(NestedInnerStrategy):
    """FLoRA stacking of nested inner factors, merged into R0 every round (``mode="nora"``)."""

    name = "flora"
    mode = "nora"
    heterogeneous_ranks = True
    uses_inner_rank = True
    restart_inner = True

    def expected_upload(self, rank: int, inner_rank: int) -> dict[str, Shape]:
        """``L.P`` (rᵢ×qᵢ), ``L.Q`` (qᵢ×rᵢ) per layer + ``modules_to_save`` shapes."""
        assert self.global_state is not None
        out: dict[str, Shape] = {}
        for layer in nested_layer_names(self.global_state):
            out[f"{layer}.P"] = (rank, inner_rank)
            out[f"{layer}.Q"] = (inner_rank, rank)
        out.update(self.modules_to_save_shapes())
        return out

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """R0 ← R0 + Σ pᵢ pad_r(PᵢQᵢ); modules_to_save ← Σ pᵢ·mᵢ."""
        assert self.global_state is not None
        increment = stack_inner([u.state for u in updates], weights, self.rank)
        return apply_increment(self.global_state, increment)
