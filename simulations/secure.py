"""The ServerApp's secure-aggregation wrapper (``secure-aggregation = true``): the run config's ``secagg-*`` keys as
:class:`~strategies.secagg_protocol.SecAggParams` around the run's strategy (:mod:`strategies.secure_aggregation`).
With user-level DP the DP wrapper goes around this one and moves the noise into the nodes' masks."""

from __future__ import annotations

from typing import Any

from fedlora.run_config import ConfigError, RunConfig
from strategies.secagg_protocol import SecAggParams
from strategies.secure_aggregation import SecureAggregation


def secure_wrapper(strategy: Any, cfg: RunConfig) -> SecureAggregation:
    """``SecureAggregation(strategy, params from cfg, timeout=round-timeout)``.

    Raises:
        ConfigError: naming the ``secagg-*`` key of a value the protocol refuses.
    """
    try:
        params = SecAggParams(num_shares=cfg.secagg_num_shares, threshold=cfg.secagg_threshold,
                              clipping_range=cfg.secagg_clipping_range,
                              quantization_range=cfg.secagg_quantization_range, max_weight=cfg.secagg_max_weight)
    except ValueError as err:
        field = str(err).split("=", 1)[0]
        raise ConfigError("secagg-" + field.replace("_", "-"), str(err)) from err
    timeout = cfg.round_timeout if cfg.round_timeout != float("inf") else None
    return SecureAggregation(strategy, params, timeout=timeout)
