"""DP metrics with fixed keys, reported by clients (sample level) or the server (user level) every round."""

from __future__ import annotations

#: The exact keys of :func:`dp_metrics`.
DP_METRIC_KEYS: tuple[str, ...] = (
    "dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-sample-rate", "dp-steps", "dp-clip-norm",
)


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
