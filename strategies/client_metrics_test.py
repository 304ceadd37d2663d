"""Round metrics from client replies (strategies.client_metrics): the default aggregation (train loss,
counts, sample-level DP metrics) and a strategy's pluggable ``train_metrics_fn``."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from strategies._testing import NODE_IDS, NUM_EXAMPLES, bad_reply, configure, error_reply, good_replies, make, node_of
from strategies.client_metrics import BUDGET_REFUSAL, client_dp_metrics, weighted_evaluate_metrics


def _with_dp(msg: Message, epsilon: float, steps: int) -> Message:
    metrics = msg.content["metrics"]
    metrics["dp-epsilon"], metrics["dp-steps"], metrics["dp-delta"] = epsilon, steps, 1e-3
    return msg


def test_default_metrics_carry_dp_per_client_max_and_refusals():
    s = make("fedsb")
    msgs = configure(s)
    rng = np.random.default_rng(2)
    replies = [_with_dp(r, eps, steps) for r, eps, steps in zip(good_replies(s, msgs[:3]), (0.5, 2.5, 1.0), (4, 2, 6))]
    rejected = _with_dp(bad_reply("nan", s, msgs[3], rng), 3.5, 1)  # rejected: its untrusted figures stay out
    refused = error_reply(msgs[4], reason=f"ClientApp raised BudgetExhausted: {BUDGET_REFUSAL}: ε spent = 3")
    _, metrics = s.aggregate_train(1, replies + [rejected, refused])
    entry = s.history[-1]
    assert entry["clients-used"] == 3 and entry["clients-rejected"] == 2
    assert set(entry["dp-per-client"]) == {str(node_of(m)) for m in msgs[:3]}
    assert entry["dp-per-client"][str(node_of(msgs[1]))] == {"dp-epsilon": 2.5, "dp-steps": 2.0, "dp-delta": 1e-3}
    assert entry["dp-epsilon"] == metrics["dp-epsilon"] == 2.5 and entry["dp-steps"] == metrics["dp-steps"] == 6
    assert entry["dp-refused"] == metrics["dp-refused"] == 1
    assert "dp-per-client" not in metrics and "rejected" not in metrics  # not scalars: history only
    assert entry["num-examples"] == sum(NUM_EXAMPLES[:3])


def test_no_dp_metrics_without_dp_clients():
    s = make("fedsb")
    msgs = configure(s)
    s.aggregate_train(1, good_replies(s, msgs))
    assert not any(k.startswith("dp-") for k in s.history[-1])
    assert client_dp_metrics([], []) == {}


def test_train_metrics_fn_is_pluggable():
    """A custom function sees every reply, the accepted updates in node order and their weights; its
    entries land in the history and (scalars) in the MetricRecord; it cannot override the bookkeeping."""
    seen = {}

    def fn(replies, used, weights):
        seen.update(replies=len(replies), nodes=[u.node_id for u in used], weights=np.asarray(weights))
        return {"max-examples": max(u.num_examples for u in used), "nodes": [u.node_id for u in used],
                "clients-used": -1}

    s = make("fedsb", train_metrics_fn=fn)
    msgs = configure(s)
    replies = good_replies(s, msgs[:4]) + [error_reply(msgs[4])]
    _, metrics = s.aggregate_train(1, list(reversed(replies)))
    assert seen["replies"] == 5 and seen["nodes"] == sorted(NODE_IDS[:4])
    np.testing.assert_allclose(seen["weights"], np.array(NUM_EXAMPLES[:4]) / sum(NUM_EXAMPLES[:4]))
    assert metrics["max-examples"] == max(NUM_EXAMPLES[:4]) and "nodes" not in metrics
    assert s.history[-1]["nodes"] == sorted(NODE_IDS[:4])
    assert metrics["clients-used"] == 4 and s.history[-1]["clients-used"] == 4
    assert "train-loss" not in metrics and "train-loss" not in s.history[-1]  # the default's entries are gone


def test_weighted_evaluate_metrics():
    def ev(n, loss, extra=None):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "eval-loss": loss, **(extra or {})})}),
                       reply_to=msg)

    s = make("fedsb")
    msg = configure(s)[0]
    out = weighted_evaluate_metrics([ev(10, 1.0, {"acc": 0.5}), ev(30, 2.0), ev(0, 9.0), error_reply(msg)])
    assert out["eval-loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40) and out["num-examples"] == 40
    assert "acc" not in out  # only the metrics every valid reply reports
    assert weighted_evaluate_metrics([error_reply(msg)]) is None
