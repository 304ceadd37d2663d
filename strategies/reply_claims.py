"""What a reply claims about itself, checked before anything of it is used (:mod:`strategies.screening` and the
secure-aggregation screening call these; both reject with :class:`ReplyRejected`).

- **Schema.** Every metric a train reply carries that :data:`fedlora.privacy.metrics.REPLY_METRIC_BOUNDS` lists
  (``num-examples``, ``train-loss``, the ``dp-*`` figures, ...) must be a real number, finite and in its range: a
  list, a string, NaN or 1e308 for ``dp-epsilon`` rejects the reply (``bad-metrics``) instead of reaching
  ``float()`` in the round loop or the published ε. Round metrics are computed from accepted replies only.
- **Claimed examples.** A declared ``num-examples`` above the absolute cap ``max_num_examples`` (``num-examples``),
  and, where weights follow claims (``weighting="num-examples"``, and federated evaluation), above k × the median
  claim of the round (:class:`ClaimBound`, ``num-examples``): with an honest majority among the round's replies
  the median is an honest count, so a liar's weight is at most k·median / (k·median + Σ honest claims) instead
  of ≈ 1 (k = 10: one 9,999,999 claim against four 500s would take 0.9998; capped at 5,000 it takes 0.71, and
  it is rejected). With two replies the median is their mean and the rule bounds nothing.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message

from fedlora.privacy.metrics import metric_problems
from strategies.wire import NUM_EXAMPLES, finite_number


class ReplyRejected(Exception):
    """A reply failed screening (``category`` is a short machine-readable tag, see :mod:`strategies.screening`)."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


@dataclass(frozen=True)
class ClaimBound:
    """The median rule of one round: a declared ``num-examples`` above ``factor`` × ``median`` is rejected."""

    factor: float
    median: float

    def problem(self, number: float | None) -> str | None:
        """Why ``number`` breaks the rule (the rejection's reason), or None."""
        if number is None or number <= self.factor * self.median:
            return None
        return (f"declared {NUM_EXAMPLES}={number:.10g} > {self.factor:g} x the round's median claim "
                f"({self.median:.10g})")

    def check(self, number: float | None) -> None:
        """Raise :class:`ReplyRejected` (``num-examples``) if ``number`` is above ``factor`` × ``median``."""
        why = self.problem(number)
        if why is not None:
            raise ReplyRejected("num-examples", why)


def median_claim(claims: Iterable[float], factor: float | None) -> ClaimBound | None:
    """The :class:`ClaimBound` of ``claims`` (the finite counts > 0 among them); None when ``factor`` is None or
    there is none."""
    counts = [c for c in claims if c > 0]
    return ClaimBound(float(factor), float(np.median(counts))) if factor is not None and counts else None


def claim_bound(replies: Iterable[Message], sampled: Container[int], metrics_key: str,
                factor: float | None) -> ClaimBound | None:
    """The median rule of a round of train replies: over the finite ``num-examples`` > 0 that the first non-error
    reply of each ``sampled`` node declares (:func:`median_claim`)."""
    claims: dict[int, float] = {}
    for msg in replies:
        nid = int(msg.metadata.src_node_id)
        if msg.has_error() or nid not in sampled or nid in claims:
            continue
        metrics = msg.content.metric_records.get(metrics_key)
        number = finite_number(metrics.get(NUM_EXAMPLES)) if metrics is not None else None
        if number is not None:
            claims[nid] = number
    return median_claim(claims.values(), factor)


def check_num_examples(value: Any, cap: int | None) -> None:
    """Raise :class:`ReplyRejected` (``num-examples``) if a declared count is above ``cap`` (None: no cap)."""
    number = finite_number(value)
    if cap is not None and number is not None and number > cap:
        raise ReplyRejected("num-examples", f"declared {NUM_EXAMPLES}={number:.4g} > max_num_examples={cap}")


def check_train_metrics(metrics: Mapping[str, Any], cap: int | None, claims: ClaimBound | None) -> float | None:
    """Check a train reply's metrics: the schema (:func:`fedlora.privacy.metrics.metric_problems`, else
    ``bad-metrics``), the ``num-examples`` cap and the round's median rule (``num-examples``). Returns the
    declared ``num-examples`` as a float (None when absent). Raises :class:`ReplyRejected`."""
    problems = metric_problems(metrics)
    if problems:
        raise ReplyRejected("bad-metrics", "metrics out of their schema: " + "; ".join(problems))
    number = finite_number(metrics.get(NUM_EXAMPLES))
    check_num_examples(number, cap)
    if claims is not None:
        claims.check(number)
    return number
