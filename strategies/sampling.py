"""Which nodes a round asks, and what each node's ConfigRecord holds.

Sampling is reproducible: the pool is Flower's connected nodes sorted by id, the sample drawn with the
strategy's own generator (seeded by the run seed, saved in its checkpoint). Every node's config is the
``config`` Flower passes, then the strategy's train config, then the strategy's per-node reserved keys
(:data:`~strategies.wire.RESERVED_CONFIG_KEYS`, which nothing before may set), then strategy extras.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from strategies.wire import RESERVED_CONFIG_KEYS


def derive_seed(run_seed: int, server_round: int, node_id: int) -> int:
    """Deterministic per-(run seed, round, node) seed in [0, 2³¹)."""
    seq = np.random.SeedSequence([int(run_seed), int(server_round), int(node_id) & (2**64 - 1)])
    return int(seq.generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def sample_node_ids(
    grid: Grid, rng: np.random.Generator, fraction: float, min_nodes: int, min_available: int
) -> tuple[list[int], list[int]]:
    """(sampled node ids, all connected node ids), both ascending: max(⌊fraction·N⌋, min_nodes) nodes (at
    most N) drawn without replacement after Flower's ``sample_nodes`` waited for ``min_available`` nodes."""
    sample_size = max(int(len(list(grid.get_node_ids())) * fraction), min_nodes)
    _, all_nodes = sample_nodes(grid, min_available, sample_size)
    pool = sorted(int(n) for n in all_nodes)
    picked = rng.choice(len(pool), size=min(sample_size, len(pool)), replace=False)
    return sorted(pool[i] for i in picked), pool


def node_config(
    base: Mapping[str, Any] | None,
    train_config: Mapping[str, Any],
    reserved: Mapping[str, Any],
    extra: Mapping[str, Any],
) -> ConfigRecord:
    """``base`` without reserved keys, updated with ``train_config``, ``reserved`` and ``extra`` in turn."""
    cfg: dict[str, Any] = {k: v for k, v in (base or {}).items() if k not in RESERVED_CONFIG_KEYS}
    cfg.update(train_config)
    cfg.update(reserved)
    cfg.update(extra)
    return ConfigRecord(cfg)
