"""Bounded client claims (strategies.screening): a giant declared ``num-examples``, a giant finite update and
an outlier against the round's median are rejected with their reason; evaluate replies are screened too; a
node the SuperLink reports unavailable counts as missing, not rejected; the per-node participation ledger
survives a checkpoint."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from strategies import STRATEGIES, load_strategy_state, save_strategy_state
from strategies import _testing as t
from strategies.client_metrics import weighted_evaluate_metrics
from strategies.screening import change_norm

ALL = sorted(STRATEGIES)


def _reference(name: str, msgs_used: slice, **kw) -> dict[str, np.ndarray]:
    """The global state after a round that aggregates only the replies ``msgs_used`` (seed 9)."""
    ref = t.make(name, **kw)
    msgs = t.configure(ref)
    ref.aggregate_train(1, t.good_replies(ref, msgs[msgs_used], seed=9))
    return ref.global_state


def _rejected(strategy) -> dict[int, str]:
    return {r["node"]: r["category"] for r in strategy.history[-1]["rejected"]}


@pytest.mark.parametrize("name", ALL)
def test_giant_claimed_num_examples_is_rejected_and_the_rest_aggregate(name, caplog):
    """A node claiming 10¹² examples would get pᵢ ≈ 1 under example weighting: rejected by the default cap."""
    s = t.make(name)
    msgs = t.configure(s)
    liar = t.reply(msgs[0], t.random_upload(s._tasks[t.node_of(msgs[0])].expected, np.random.default_rng(0)),
                 num_examples=1e12)
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        _, metrics = s.aggregate_train(1, [liar] + t.good_replies(s, msgs[1:], seed=9))
    assert _rejected(s) == {t.node_of(msgs[0]): "num-examples"}
    assert metrics["clients-used"] == len(t.NODE_IDS) - 1 and metrics["kept-previous"] == 0
    assert "max_num_examples=10000000" in s.history[-1]["rejected"][0]["reason"]
    assert any(f"node {t.node_of(msgs[0])}: reply rejected [num-examples]" in r.message for r in caplog.records)
    assert t.snapshot(s.global_state) == t.snapshot(_reference(name, slice(1, None)))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("value", [1e30, 1e300])
def test_giant_finite_update_is_rejected_by_default(name, value):
    s = t.make(name)
    msgs = t.configure(s)
    up = t.random_upload(s._tasks[t.node_of(msgs[0])].expected, np.random.default_rng(0))
    first = next(iter(up))
    up[first] = np.full_like(up[first], value)  # finite: passes the NaN/Inf check
    assert np.isfinite(up[first]).all()
    _, metrics = s.aggregate_train(1, [t.reply(msgs[0], up)] + t.good_replies(s, msgs[1:], seed=9))
    assert _rejected(s) == {t.node_of(msgs[0]): "norm"}
    assert "max_update_norm=10000" in s.history[-1]["rejected"][0]["reason"]
    assert t.snapshot(s.global_state) == t.snapshot(_reference(name, slice(1, None)))
    assert all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in s.global_state.values())


def test_outlier_against_the_round_median_only_with_norm_factor():
    def run(**kw):
        s = t.make("fedsb", **kw)
        msgs = t.configure(s)
        replies = t.good_replies(s, msgs, seed=9)
        up = {k: 20.0 * v for k, v in t.arrays_of(replies[2]).items()}  # ~20x the others' norm
        replies[2] = t.reply(msgs[2], up, num_examples=25)
        _, metrics = s.aggregate_train(1, replies)
        return s, metrics, t.node_of(msgs[2])

    s, metrics, outlier = run()  # off by default: 20x is within max_update_norm
    assert metrics["clients-used"] == len(t.NODE_IDS) and not _rejected(s)
    s, metrics, outlier = run(norm_factor=5.0)
    assert _rejected(s) == {outlier: "norm"} and metrics["clients-used"] == len(t.NODE_IDS) - 1
    assert "5 x the round's median norm" in s.history[-1]["rejected"][0]["reason"]


def test_change_norm_measures_the_update_from_the_download_without_overflow():
    download = {"h": np.array([1.0, 2.0]), "other": np.ones(3)}
    assert change_norm({"L.R": np.array([[3.0, 4.0]]), "h": np.array([1.0, 2.0])}, download) == 5.0
    assert change_norm({"h": np.array([4.0, 6.0])}, download) == 5.0  # Δ = upload − download
    assert change_norm({"x": np.full(4, 1e200)}, {}) == pytest.approx(2e200)  # no overflow to inf
    assert change_norm({"x": np.zeros(3)}, {}) == 0.0
    assert change_norm({"x": np.array([1e308]), "h": np.array([-1e308, 0.0])}, {"h": np.array([1e308, 0.0])}) \
        == math.inf  # the difference itself overflows: rejected by any bound


@pytest.mark.parametrize("code", [ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                                  ErrorCode.REPLY_MESSAGE_UNAVAILABLE])
def test_dead_node_is_counted_missing_not_rejected(code, caplog):
    s = t.make("fedsb")
    msgs = t.configure(s)
    gone = Message(Error(code=int(code), reason="Node unavailable"), reply_to=msgs[0])
    crashed = Message(Error(code=2, reason="ClientApp raised"), reply_to=msgs[1])
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        _, metrics = s.aggregate_train(1, [gone, crashed] + t.good_replies(s, msgs[2:], seed=9))
    rec = s.history[-1]
    assert rec["clients-missing"] == 1 and rec["unreachable"] == [t.node_of(msgs[0])]
    assert rec["clients-rejected"] == 1 and _rejected(s) == {t.node_of(msgs[1]): "error"}
    assert metrics["clients-used"] == len(t.NODE_IDS) - 2
    assert any(f"node {t.node_of(msgs[0])}: error reply code {int(code)} (node unavailable, counted missing)"
               in r.message for r in caplog.records)


def _eval_reply(msg: Message, metrics: dict | None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)}) if metrics is not None else RecordDict()
    return Message(content, reply_to=msg)


def test_bad_evaluate_replies_are_dropped_with_their_reason(caplog):
    s = t.make("fedsb")
    msgs = t.configure(s)[:1] * 9  # evaluate replies only need a message to answer
    good = [{"num-examples": 10, "loss": 0.5, "accuracy": 0.8}, {"num-examples": 30, "loss": 0.7, "accuracy": 0.6}]
    bad = {
        "error": None,
        "missing-record": "no-record",
        "bad-metrics": {"loss": 0.1, "accuracy": 1.0},
        "num-examples": {"num-examples": 1e12, "loss": 0.0, "accuracy": 1.0},
        "non-finite": {"num-examples": 10, "loss": float("nan"), "accuracy": 1.0},
        "huge-metric": {"num-examples": 10, "loss": 1e30, "accuracy": 1.0},
        "missing-metrics": {"num-examples": 10, "loss": 0.1},
    }
    replies = [_eval_reply(msgs[0], m) for m in good]
    for i, (kind, metrics) in enumerate(bad.items()):
        if kind == "error":
            replies.append(Message(Error(code=2, reason="boom"), reply_to=msgs[i]))
        else:
            replies.append(_eval_reply(msgs[i], None if metrics == "no-record" else metrics))
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        out = s.aggregate_evaluate(1, replies)
    assert dict(out) == pytest.approx({"loss": (10 * 0.5 + 30 * 0.7) / 40, "accuracy": (10 * 0.8 + 30 * 0.6) / 40,
                                       "num-examples": 40.0})
    logged = [r.message for r in caplog.records if "reply dropped" in r.message]
    for kind in bad:
        assert any(f"[{kind}]" in m for m in logged), (kind, logged)
    assert all(m.startswith("evaluate round 1: node ") for m in logged)
    assert weighted_evaluate_metrics(replies[2:-1], max_num_examples=10**7) is None  # nothing usable


def test_participation_ledger_counts_trained_and_used_rounds_and_survives_a_checkpoint(tmp_path):
    s = t.make("fedsb", min_train_nodes=2)
    msgs = t.configure(s)
    crashed = Message(Error(code=2, reason="boom"), reply_to=msgs[0])
    nan = t.bad_reply("nan", s, msgs[1], np.random.default_rng(1))
    s.aggregate_train(1, [crashed, nan] + t.good_replies(s, msgs[2:], seed=9))
    msgs = t.configure(s, server_round=2)
    s.aggregate_train(2, t.good_replies(s, msgs[:1], seed=3))  # 1 valid < min_train_nodes: kept, nobody used
    a, b, *rest = t.NODE_IDS
    assert s.node_rounds[str(a)] == {"trained": 1, "used": 0}  # round 2: trained, but the round kept the state
    assert s.node_rounds[str(b)] == {"trained": 1, "used": 0}  # trained (a rejected t.reply), never used
    for nid in rest:
        assert s.node_rounds[str(nid)] == {"trained": 1, "used": 1}
    save_strategy_state(s.state_dict(), tmp_path / "ckpt")
    back = t.make("fedsb")
    back.load_state_dict(load_strategy_state(tmp_path / "ckpt"))
    assert back.node_rounds == s.node_rounds and back.state_dict()["nodes"] == s.state_dict()["nodes"]
