"""Heterogeneous-rank nested aggregation: node i trains the top-left rᵢ×rᵢ block of R.

Global state: ``L.R0`` (r×r) per layer + ``modules_to_save``. A node of rank rᵢ (from the
:class:`~fedlora.ranks.RankAssigner`, stable per node) still receives the full r×r R0 (design
condition 4, docs/design.md) and uploads ``L.R`` of shape (rᵢ, rᵢ). The server zero-pads each block to r×r and takes
the whole-matrix weighted mean (``hetero_mean``), which equals Σ pᵢΔWᵢ exactly (condition 3).
"""

from __future__ import annotations

import numpy as np

from fedlora.aggregation import apply_increment, hetero_mean
from strategies.fedsb import FedSB
from strategies.screening import ClientUpdate
from strategies.wire import State


class HeteroRank(FedSB):
    """Zero-padded exact mean of per-node rᵢ×rᵢ updates (``mode="sb"``); uploads as in :class:`FedSB`
    (``L.R`` of the node's rank rᵢ)."""

    name = "hetero"
    heterogeneous_ranks = True

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """R0 ← R0 + Σ pᵢ pad_r(Rᵢ); modules_to_save ← Σ pᵢ·mᵢ."""
        assert self.global_state is not None
        increment = hetero_mean([u.state for u in updates], weights, self.rank)
        return apply_increment(self.global_state, increment)
