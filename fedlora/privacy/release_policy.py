"""The release policy: exactly which metrics a node's replies carry in each privacy mode (Flower-free).

Under DP a node releases only the privatised update and what is public. The differentially private part
of a train reply is its ``arrays`` (DP-SGD: noisy inner matrices; user-level DP: the clipped update, which
the server noises); the ``meta`` record (outer-factor ``fingerprint``, a function of the public model, and
the node's ``partition-id``, its identity in a simulation) is public. Every metric below is computed on
private data WITHOUT noise: under DP it leaves the node only with ``dp-release-metrics=true``, which is
outside the guarantee (and documented so).

:data:`METRICS` is the one list: the ClientApp filters every reply through :func:`released`, the README
table is :func:`policy_table` (a test checks the README against it), and the tests check every reply's
keys against :func:`allowed_metrics`.

Invariants:

- a metric the ClientApp produces but :data:`METRICS` does not list is an error (:func:`released` raises),
  so nothing new leaves a node without being added here;
- without DP every listed metric is released; under DP (DP-SGD, user-level or both) without
  ``dp-release-metrics`` the metrics record is empty;
- ``num-examples`` is never needed by the server under DP: weighting is uniform there
  (``fedlora.run_config``: ``weighting="auto"``; ``"num-examples"`` with DP is refused);
- under DP or secure aggregation an error reply's reason is one of :data:`REFUSALS`, fixed texts that name the
  cause and no number about the node's data (``clients/refusal.py`` maps every exception of the ClientApp; the
  full text goes to the node's own log only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedlora.privacy.metrics import DP_METRIC_KEYS

ReplyKind = Literal["train", "evaluate"]


@dataclass(frozen=True)
class Metric:
    """One metric a reply may carry: its reply ``kind``, ``key``, what it is, the ``task`` it exists for
    (``"any"``, ``"seq-cls"``, ``"causal-lm"``) and the ``mechanism`` it exists under (``""``: every mode,
    ``"dp-sgd"``, ``"user-dp"``)."""

    kind: ReplyKind
    key: str
    description: str
    task: str = "any"
    mechanism: str = ""


_DP_FIGURES = {
    "dp-epsilon": "ε spent so far, depends on N through q", "dp-delta": "δ, 1/(10·N) by default",
    "dp-noise-multiplier": "σ, calibrated at q = B/N", "dp-sample-rate": "q = B/N",
    "dp-steps": "DP-SGD steps so far, depend on N", "dp-clip-norm": "C, the run config's",
}
#: every metric a node can send, in README order (the one list; see the module docstring)
METRICS: tuple[Metric, ...] = (
    Metric("train", "num-examples", "N, the node's training examples"),
    Metric("train", "train-loss", "noiseless mean training loss"),
    Metric("train", "steps", "local steps, min(epochs·⌈N/B⌉, local-steps)"),
    Metric("train", "train-seconds", "wall time of local training"),
    Metric("train", "client-seconds", "wall time of the whole train message"),
    *(Metric("train", k, _DP_FIGURES[k], mechanism="dp-sgd") for k in DP_METRIC_KEYS),
    Metric("train", "update-norm", "L2 norm of the update before clipping", mechanism="user-dp"),
    Metric("train", "user-dp-clip", "C, the run config's clipping bound", mechanism="user-dp"),
    Metric("evaluate", "loss", "local validation loss"),
    Metric("evaluate", "accuracy", "local validation accuracy", task="seq-cls"),
    Metric("evaluate", "perplexity", "local validation perplexity", task="causal-lm"),
    Metric("evaluate", "num-examples", "the node's validation examples"),
)
#: the ``meta`` ConfigRecord keys of a train reply: public in every mode (``layout``: the upload's keys, shapes
#: and dtypes, see strategies/wire.py; ``outer-digest``: the digest of the server's outer factors the node
#: used, which the server sent it)
PUBLIC_META: tuple[str, ...] = ("fingerprint", "partition-id", "layout", "outer-digest")


#: what a node's error reason says when its DP budget cannot afford another round (``dp-refused`` in the round
#: record counts the error replies carrying it: strategies/client_metrics.py)
BUDGET_REFUSAL = "privacy budget exhausted"
#: the marker of a node that lacks the server's outer factors (strategies/outer_delivery.py ``OUTER_MISSING``:
#: the server looks for it in error reasons to send them again)
OUTER_FACTORS_MISSING = "[outer-factors-missing]"
#: the only error reasons a node's reply carries under DP or secure aggregation: cause → fixed, reviewed text.
#: None holds a number about the node's data (N, ε spent, δ = 1/(10·N), a norm, a weight) or anything else of
#: the node (a path, its identity); a cause may say which run-config key the node refuses (public).
REFUSALS: dict[str, str] = {
    "budget": f"{BUDGET_REFUSAL}: another round would exceed this node's privacy budget; refusing to train",
    "ledger": "this node's privacy ledger cannot be read, trusted or written; refusing to train",
    "dp-delta": "dp-delta is not below 1/N for this node's training data; refusing to train",
    "outer-missing": f"{OUTER_FACTORS_MISSING} this node does not hold the server's outer factors; the server "
                     "re-sends them",
    "outer-mismatch": "the server's outer factors or fingerprint do not fit this node's base model; refusing to train",
    "download": "malformed download; refusing it",
    "secagg-protocol": "a secure-aggregation request that breaks the protocol or this node's session; refusing it",
    "secagg-weight": "this node's num-examples weight is missing or above secagg-max-weight; refusing to mask its "
                     "update",
    "failed": "the node could not complete this request; the reason is in the node's own log",
}


@dataclass(frozen=True)
class ReleaseMode:
    """Which privacy mechanisms run and whether un-noised metrics are released anyway.

    dp_sgd: sample-level DP-SGD on the node; user_dp: user-level DP (the node clips its update);
    release_metrics: the run config's ``dp-release-metrics`` (outside the guarantee; ignored without DP).
    """

    dp_sgd: bool = False
    user_dp: bool = False
    release_metrics: bool = False

    @property
    def private(self) -> bool:
        """True iff any DP mechanism protects this node's data."""
        return self.dp_sgd or self.user_dp

    @property
    def name(self) -> str:
        """The mode's column title in the README table."""
        if not self.private:
            return "no DP"
        mech = " + ".join(m for m, on in (("DP-SGD", self.dp_sgd), ("user-level DP", self.user_dp)) if on)
        return f"{mech} + dp-release-metrics" if self.release_metrics else mech


#: the modes of the README table, in its column order
TABLE_MODES: tuple[ReleaseMode, ...] = (
    ReleaseMode(),
    ReleaseMode(dp_sgd=True),
    ReleaseMode(user_dp=True),
    ReleaseMode(dp_sgd=True, user_dp=True),
    ReleaseMode(dp_sgd=True, release_metrics=True),
    ReleaseMode(user_dp=True, release_metrics=True),
)


def allowed_metrics(kind: ReplyKind, mode: ReleaseMode, task: str) -> frozenset[str]:
    """The exact metric keys a ``kind`` reply of a ``task`` run carries in ``mode``."""
    if mode.private and not mode.release_metrics:
        return frozenset()
    on = {"": True, "dp-sgd": mode.dp_sgd, "user-dp": mode.user_dp}
    return frozenset(m.key for m in METRICS if m.kind == kind and m.task in ("any", task) and on[m.mechanism])


def released(kind: ReplyKind, metrics: Mapping[str, Any], mode: ReleaseMode, task: str) -> dict[str, Any]:
    """The part of ``metrics`` a ``kind`` reply may carry in ``mode`` (:func:`allowed_metrics`).

    Raises:
        ValueError: ``metrics`` has a key the policy does not list for ``kind`` replies (a metric nobody
            classified must not leave the node).
    """
    unknown = sorted(set(metrics) - {m.key for m in METRICS if m.kind == kind})
    if unknown:
        raise ValueError(f"release policy: {kind} metric(s) {unknown} are not in "
                         "fedlora.privacy.release_policy.METRICS")
    allowed = allowed_metrics(kind, mode, task)
    return {k: v for k, v in metrics.items() if k in allowed}


def policy_table() -> str:
    """The README's release table (markdown): one row per metric, one column per :data:`TABLE_MODES`."""
    lines = ["| reply: what | " + " | ".join(m.name for m in TABLE_MODES) + " |",
             "|" + "---|" * (len(TABLE_MODES) + 1),
             "| train: `arrays`, the update | " + " | ".join(
                 "privatised" if m.private else "✓" for m in TABLE_MODES) + " |",
             "| train: `meta` " + ", ".join(f"`{k}`" for k in PUBLIC_META) + ": public | "
             + " | ".join("✓" for _ in TABLE_MODES) + " |"]
    for metric in METRICS:
        task = "seq-cls" if metric.task == "any" else metric.task
        cells = ["✓" if metric.key in allowed_metrics(metric.kind, m, task) else "—" for m in TABLE_MODES]
        where = "" if metric.task == "any" else f" ({metric.task})"
        lines.append(f"| {metric.kind}: `{metric.key}`: {metric.description}{where} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
