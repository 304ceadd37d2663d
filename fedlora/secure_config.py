"""Run-config checks of secure aggregation (``secure-aggregation``, ``secagg-*``; the protocol is in
``strategies/secure_aggregation.py``), called by :func:`fedlora.run_config.parse_run_config`.

- only the exact nested strategies (fedsb, hetero, flora) aggregate sums of r×r matrices the protocol can mask;
- ``secagg-num-shares``: 0 (every sampled node shares with every other) or an odd k ≥ 3 (SecAgg+ ring
  neighbourhoods, as Flower builds them);
- with user-level DP and a fixed σ (``user-dp-noise``) the clipping range c must hold a clipped update plus six
  standard deviations of the per-node noise, c ≥ C + 6·σC/√t_min with t_min ≥ max(2, min-train-nodes), so the
  quantiser practically never clips the noise (a calibrated σ is checked when the ServerApp calibrates it).
"""

from __future__ import annotations

import math
from typing import Any

#: the strategies whose updates secure aggregation sums
SECURE_STRATEGIES = ("fedsb", "hetero", "flora")


def noise_headroom(clip: float, sigma: float, min_train_nodes: int) -> float:
    """The smallest clipping range for user-level DP noise inside the mask: C + 6·σC/√max(2, min-train-nodes)."""
    return clip + 6.0 * sigma * clip / math.sqrt(max(2, min_train_nodes))


def secure_aggregation_checks(cfg: Any) -> None:
    """Raise :class:`fedlora.run_config.ConfigError` naming the key of a setting secure aggregation cannot run."""
    from fedlora.run_config import ConfigError

    k = cfg.secagg_num_shares
    if k != 0 and (k < 3 or k % 2 == 0):
        raise ConfigError("secagg-num-shares", f"{k!r} must be 0 (every sampled node) or an odd integer >= 3")
    if not cfg.secure_aggregation:
        return
    if cfg.strategy not in SECURE_STRATEGIES:
        raise ConfigError("secure-aggregation", f"sums r×r updates: strategy must be one of {list(SECURE_STRATEGIES)}, "
                                                f"not {cfg.strategy!r}")
    if cfg.user_dp_enabled and cfg.user_dp_noise > 0:
        need = noise_headroom(cfg.user_dp_clip, cfg.user_dp_noise, cfg.min_train_nodes)
        if cfg.secagg_clipping_range < need:
            raise ConfigError("secagg-clipping-range", f"{cfg.secagg_clipping_range!r} < C + 6·σC/√t_min = {need:.4g} "
                                                       "(user-dp-clip, user-dp-noise): the quantiser would clip noise")
