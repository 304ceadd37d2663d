"""DP metrics with fixed keys, reported by clients (sample level) or the server (user level) every round, and the
schema the server checks every train reply's metrics against (:data:`REPLY_METRIC_BOUNDS`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The exact keys of :func:`dp_metrics`.
DP_METRIC_KEYS: tuple[str, ...] = (
    "dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-sample-rate", "dp-steps", "dp-clip-norm",
)
#: an ε, σ or C above this is no privacy at all and no sane run's figure: a reply reporting one is rejected
DP_FIGURE_LIMIT = 1e6
#: a duration (seconds) or loss above this is not one
PLAIN_LIMIT = 1e9
#: a step count above this is not one
STEPS_LIMIT = 1e12


def dp_metrics(
    *,
    epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    clip_norm: float,
) -> dict[str, float | int]:
    """Flower-MetricRecord-ready dict with keys exactly :data:`DP_METRIC_KEYS`.

    ``dp-epsilon``: ε spent so far (whole run) at ``dp-delta``; ``dp-steps``: total accounted steps
    (DP-SGD steps for sample level, rounds for user level); ``dp-sample-rate``: q; ``dp-clip-norm``: C.
    """
    return {
        "dp-epsilon": float(epsilon),
        "dp-delta": float(delta),
        "dp-noise-multiplier": float(noise_multiplier),
        "dp-sample-rate": float(sample_rate),
        "dp-steps": int(steps),
        "dp-clip-norm": float(clip_norm),
    }


@dataclass(frozen=True)
class MetricBound:
    """What one reply metric must be: a real number (not a bool, string or list), finite, in [``low``, ``high``]
    (``high_open``: below ``high``; ``low_open``: above ``low``) and, with ``integer``, a whole number."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` breaks this bound (a short fixed-form text), or None when it fits."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be a number, got {type(value).__name__}"
        number = float(value)
        if not math.isfinite(number):
            return f"must be finite, got {number!r}"
        if self.integer and not number.is_integer():
            return f"must be a whole number, got {number:.6g}"
        low_ok = number > self.low if self.low_open else number >= self.low
        high_ok = number < self.high if self.high_open else number <= self.high
        if not (low_ok and high_ok):
            interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            return f"must lie in {interval}, got {number:.6g}"
        return None


#: the schema of a train reply's metrics, per key: what the server accepts (strategies/screening.py rejects a
#: reply with any listed key out of its bound, category ``bad-metrics``); unlisted keys are never published
REPLY_METRIC_BOUNDS: dict[str, MetricBound] = {
    "num-examples": MetricBound(0.0, math.inf, high_open=True),  # caps: max-num-examples, the median rule
    "train-loss": MetricBound(0.0, PLAIN_LIMIT),
    "steps": MetricBound(0.0, STEPS_LIMIT, integer=True),
    "train-seconds": MetricBound(0.0, PLAIN_LIMIT),
    "client-seconds": MetricBound(0.0, PLAIN_LIMIT),
    "dp-epsilon": MetricBound(0.0, DP_FIGURE_LIMIT),
    "dp-delta": MetricBound(0.0, 1.0, high_open=True),
    "dp-noise-multiplier": MetricBound(0.0, DP_FIGURE_LIMIT),
    "dp-sample-rate": MetricBound(0.0, 1.0),
    "dp-steps": MetricBound(0.0, STEPS_LIMIT, integer=True),
    "dp-clip-norm": MetricBound(0.0, DP_FIGURE_LIMIT, low_open=True),
    "update-norm": MetricBound(0.0, math.inf, high_open=True),
    "user-dp-clip": MetricBound(0.0, DP_FIGURE_LIMIT, low_open=True),
}


def metric_problems(metrics: Mapping[str, Any], bounds: Mapping[str, MetricBound] = REPLY_METRIC_BOUNDS
                    ) -> list[str]:
    """``"key: why"`` for every metric of ``metrics`` that ``bounds`` lists and whose value breaks its bound, in
    key order (empty: every listed metric is fine; keys ``bounds`` does not list are not checked)."""
    return [f"{key}: {why}" for key in sorted(set(metrics) & set(bounds))
            if (why := bounds[key].problem(metrics[key])) is not None]
