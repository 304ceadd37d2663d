"""Aggregation of the metrics clients report, pluggable like Flower's ``train_metrics_aggr_fn``.

A strategy's ``train_metrics_fn`` (constructor argument) turns one round's replies into entries of the
round record (``strategy.history[-1]``, written to ``metrics.jsonl``); its finite scalar values also go
into the ``MetricRecord`` that ``aggregate_train`` returns. Signature (:data:`TrainMetricsFn`)::

    fn(replies, used, weights) -> dict[str, Any]

``replies``: every reply Message of the round, error replies and rejected ones included; ``used``: the
accepted :class:`~strategies.screening.ClientUpdate` s in node-id order; ``weights``: their aggregation
weights pᵢ (sum 1; empty when nothing was accepted). The strategy's own bookkeeping (clients
sampled/used/rejected/missing, bytes, ranks, kept-previous, aggregation time) is not the function's job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord

from fedlora.privacy.metrics import DP_METRIC_KEYS
from fedlora.privacy.release_policy import BUDGET_REFUSAL
from strategies.screening import ClientUpdate, screen_evaluate_replies
from strategies.wire import METRICS_KEY, NUM_EXAMPLES, TRAIN_LOSS

TrainMetricsFn = Callable[[Sequence[Message], Sequence[ClientUpdate], np.ndarray], dict[str, Any]]


def default_train_metrics(
    replies: Sequence[Message], used: Sequence[ClientUpdate], weights: np.ndarray
) -> dict[str, Any]:
    """fedlora's round metrics from client replies.

    - ``num-examples``: Σ over the accepted updates;
    - ``train-loss``: Σ pᵢ·lossᵢ / Σ pᵢ over the accepted updates that report one (``None`` if none does);
    - ``dp-epsilon``, ``dp-delta``, … (:data:`fedlora.privacy.DP_METRIC_KEYS`): the maximum over the
      accepted updates that report them, and ``dp-per-client`` ``{node id: {key: value}}`` of those (a
      rejected reply's figures are not published: :func:`client_dp_metrics`);
    - ``dp-refused``: number of error replies refusing to train because the node's DP budget is spent
      (only when > 0).
    """
    losses = [(u.train_loss, p) for u, p in zip(used, weights) if u.train_loss is not None]
    out: dict[str, Any] = {
        NUM_EXAMPLES: float(sum(u.num_examples for u in used)),
        TRAIN_LOSS: float(sum(v * p for v, p in losses) / sum(p for _, p in losses)) if losses else None,
    }
    out.update(client_dp_metrics(replies, used))
    return out


def client_dp_metrics(replies: Iterable[Message], used: Sequence[ClientUpdate] = ()) -> dict[str, Any]:
    """Per-client ``dp-*`` metrics of a round's accepted updates ``used`` and their maximum over clients; counts
    the error replies of nodes that refused to train because their privacy budget is spent (``dp-refused``).

    Only accepted updates count: their metrics passed screening's schema (finite, in range:
    :data:`fedlora.privacy.metrics.REPLY_METRIC_BOUNDS`), so one client cannot publish NaN, 1e308 or a list as
    the round's ε; a rejected reply's figures are untrusted and stay out (the node's own ledger holds its spend)."""
    per_client: dict[str, dict[str, float]] = {}
    for update in used:
        values = {k: float(update.metrics[k]) for k in DP_METRIC_KEYS if k in update.metrics}
        if values:
            per_client[str(update.node_id)] = values
    refused = sum(BUDGET_REFUSAL in str(msg.error.reason) for msg in replies if msg.has_error())
    out: dict[str, Any] = {}
    if per_client:
        for key in DP_METRIC_KEYS:
            present = [v[key] for v in per_client.values() if key in v]
            if present:
                out[key] = max(present)
        out["dp-per-client"] = per_client
    if refused:
        out["dp-refused"] = refused
    return out


def weighted_evaluate_metrics(replies: Iterable[Message], metrics_key: str = METRICS_KEY,
                              max_num_examples: int | None = None, rnd: int | None = None,
                              claim_factor: float | None = None) -> MetricRecord | None:
    """``num-examples``-weighted mean of the metrics of the evaluate replies that pass
    :func:`~strategies.screening.screen_evaluate_replies` (dropped ones are logged with node and reason), plus
    the total ``num-examples``; ``None`` when no reply is usable."""
    good = screen_evaluate_replies(replies, metrics_key, max_num_examples, rnd, claim_factor)
    if not good:
        return None
    total = sum(n for _, n, _ in good)
    keys = sorted(good[0][2])
    out: dict[str, float] = {k: sum(n * m[k] for _, n, m in good) / total for k in keys}
    out[NUM_EXAMPLES] = float(total)
    return MetricRecord(out)
