"""What a reply claims (strategies.reply_claims): a client sending a list, NaN, 1e308 or a string as a DP metric
is rejected with the reason, the round goes on, and the published ε comes from the honest clients only; a client
claiming 9,999,999 examples against four honest 500s is rejected by the median rule, and the others aggregate
exactly. Both with and without secure aggregation."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fedlora.privacy.metrics import REPLY_METRIC_BOUNDS, MetricBound, metric_problems
from fedlora.privacy.release_policy import METRICS
from fedlora.run_config import ConfigError, parse_run_config
from strategies import _testing as t
from strategies import secure_aggregation_test as sa
from strategies.secagg_protocol import SecAggParams, weight_factor

#: a malicious client's dp-epsilon (a string cannot be put in a MetricRecord by Flower's API; a hand-made
#: record can carry one, so the schema must not rely on the API)
BAD_EPSILON = {"list": [1.0, 2.0], "nan": math.nan, "inf": math.inf, "huge": 1e308, "string": "0.1",
               "negative": -1.0}
HONEST_EPSILON = [0.5, 2.5, 1.0, 1.5]
LIAR, HONEST_CLAIM, LIE = t.NODE_IDS[0], 500, 9_999_999


def _set_metric(msg: Message, key: str, value) -> Message:
    """Put ``value`` into the reply's metrics, bypassing MetricRecord's type check (as a hand-made client can)."""
    msg.content["metrics"]._data[key] = value
    return msg


def _rejected(strategy) -> dict[int, tuple[str, str]]:
    return {r["node"]: (r["category"], r["reason"]) for r in strategy.history[-1]["rejected"]}


def _reference(name: str, msgs_used: slice, num_examples: int | None = None) -> dict[str, np.ndarray]:
    """The global state after a round that aggregates only the honest replies ``msgs_used`` (seed 9)."""
    ref = t.make(name)
    msgs = t.configure(ref)
    replies = t.good_replies(ref, msgs[msgs_used], seed=9)
    if num_examples is not None:
        replies = [t.reply(m, t.arrays_of(r), num_examples=num_examples) for m, r in zip(msgs[msgs_used], replies)]
    ref.aggregate_train(1, replies)
    return ref.global_state


# ------------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize("kind", sorted(BAD_EPSILON))
def test_a_bad_dp_metric_rejects_the_reply_and_the_round_goes_on(kind, caplog):
    s = t.make("fedsb")
    msgs = t.configure(s)
    bad = t.reply(msgs[0], t.random_upload(s._tasks[LIAR].expected, np.random.default_rng(0)))
    bad = _set_metric(bad, "dp-epsilon", BAD_EPSILON[kind])
    honest = [_set_metric(r, "dp-epsilon", eps) for r, eps in zip(t.good_replies(s, msgs[1:], seed=9),
                                                                  HONEST_EPSILON)]
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        _, metrics = s.aggregate_train(1, [bad] + honest)  # no TypeError / ValueError out of the round
    category, reason = _rejected(s)[LIAR]
    assert category == "bad-metrics" and "dp-epsilon" in reason
    assert any(f"node {LIAR}: reply rejected [bad-metrics]" in r.message for r in caplog.records)
    entry = s.history[-1]
    assert metrics["clients-used"] == 4 and metrics["kept-previous"] == 0
    assert entry["dp-epsilon"] == metrics["dp-epsilon"] == max(HONEST_EPSILON)  # from the honest clients only
    assert str(LIAR) not in entry["dp-per-client"]
    assert t.snapshot(s.global_state) == t.snapshot(_reference("fedsb", slice(1, None)))


@pytest.mark.parametrize("key, value", [("dp-delta", 1.0), ("dp-sample-rate", 1.5), ("dp-steps", 2.5),
                                        ("dp-steps", [3]), ("dp-clip-norm", 0.0), ("num-examples", math.nan),
                                        ("train-loss", 1e308)])
def test_every_listed_metric_is_checked(key, value):
    s = t.make("fedsb", weighting="uniform")
    msgs = t.configure(s)
    bad = _set_metric(t.good_replies(s, msgs[:1], seed=1)[0], key, value)
    _, metrics = s.aggregate_train(1, [bad] + t.good_replies(s, msgs[1:], seed=9))
    category, reason = _rejected(s)[LIAR]
    assert category == "bad-metrics" and reason.startswith(f"metrics out of their schema: {key}: ")
    assert metrics["clients-used"] == 4


def test_the_schema_covers_every_train_metric_a_node_sends():
    assert set(REPLY_METRIC_BOUNDS) == {m.key for m in METRICS if m.kind == "train"}
    assert metric_problems({"dp-epsilon": 3.0, "dp-steps": 12, "custom": [1, 2]}) == []  # unlisted: unchecked
    assert metric_problems({"dp-epsilon": True}) == ["dp-epsilon: must be a number, got bool"]
    assert MetricBound(0.0, 1.0, high_open=True).problem(1.0) == "must lie in [0, 1), got 1"
    assert metric_problems({"dp-epsilon": np.float32(0.5), "dp-steps": np.int64(3)}) == []


def test_a_bad_dp_metric_under_secure_aggregation_is_rejected_before_its_vector_joins_the_sum():
    wrapper, _, sim = sa._wrapped(nodes=5)

    def client(msg: Message) -> Message | None:
        reply = sim(msg)
        if reply is not None and msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            nid = t.node_of(msg)
            _set_metric(reply, "dp-epsilon", [1.0, 2.0] if nid == LIAR else HONEST_EPSILON[t.NODE_IDS.index(nid) - 1])
        return reply

    before, after, metrics = sa._round(wrapper, sa.RecordingGrid(t.NODE_IDS, client))
    assert _rejected(wrapper)[LIAR][0] == "bad-metrics"
    assert metrics["kept-previous"] == 0 and metrics["clients-used"] == 4
    assert metrics["dp-epsilon"] == max(HONEST_EPSILON)
    honest = {n: u for n, u in sim.uploads.items() if n != LIAR}
    want = sa._plain("fedsb", before, honest, np.full(4, 0.25))
    assert sa._max_err(after, want) <= wrapper.params.quantum() * (1 + 1e-6)


# ------------------------------------------------------------------------------------------ claims
def test_a_giant_claim_is_rejected_by_the_median_rule_and_the_others_aggregate_exactly():
    s = t.make("fedsb")  # weighting num-examples, the median rule on by default (k = 10)
    msgs = t.configure(s)
    liar = t.reply(msgs[0], t.random_upload(s._tasks[LIAR].expected, np.random.default_rng(0)), num_examples=LIE)
    honest = [t.reply(m, t.arrays_of(r), num_examples=HONEST_CLAIM)
              for m, r in zip(msgs[1:], t.good_replies(s, msgs[1:], seed=9))]
    _, metrics = s.aggregate_train(1, [liar] + honest)
    assert _rejected(s) == {LIAR: ("num-examples", f"declared num-examples={LIE} > 10 x the round's median claim "
                                                   f"({HONEST_CLAIM})")}
    assert metrics["clients-used"] == 4 and metrics["num-examples"] == 4 * HONEST_CLAIM
    assert t.snapshot(s.global_state) == t.snapshot(_reference("fedsb", slice(1, None), HONEST_CLAIM))


def test_without_the_median_rule_the_liar_takes_almost_all_the_weight():
    seen = {}

    def record(replies, used, weights):
        seen.update({u.node_id: float(w) for u, w in zip(used, weights)})
        return {}

    s = t.make("fedsb", num_examples_factor=None, train_metrics_fn=record)
    msgs = t.configure(s)
    liar = t.reply(msgs[0], t.random_upload(s._tasks[LIAR].expected, np.random.default_rng(0)), num_examples=LIE)
    s.aggregate_train(1, [liar] + [t.reply(m, t.random_upload(s._tasks[t.node_of(m)].expected,
                                                              np.random.default_rng(1)), num_examples=HONEST_CLAIM)
                                   for m in msgs[1:]])
    assert seen[LIAR] == pytest.approx(LIE / (LIE + 4 * HONEST_CLAIM)) and seen[LIAR] > 0.9997  # the attack


def test_the_median_rule_needs_weights_to_follow_claims():
    """Under uniform weighting a claim buys no weight: the rule is off (and so cannot let one client's claim
    decide whether another's update counts, which user-level DP's sensitivity assumes it cannot)."""
    s = t.make("fedsb", weighting="uniform")
    msgs = t.configure(s)
    replies = t.good_replies(s, msgs, seed=9)
    replies[0] = t.reply(msgs[0], t.arrays_of(replies[0]), num_examples=LIE)
    _, metrics = s.aggregate_train(1, replies)
    assert metrics["clients-used"] == 5 and not _rejected(s)


def test_a_giant_claim_under_secure_aggregation_is_rejected_before_its_vector_joins_the_sum(monkeypatch):
    for nid in t.NODE_IDS:
        monkeypatch.setitem(sa.EXAMPLES, nid, LIE if nid == LIAR else HONEST_CLAIM)
    wrapper, grid, sim = sa._wrapped(nodes=5, weighting="num-examples", params=SecAggParams(max_weight=1e7))
    before, after, metrics = sa._round(wrapper, grid)
    assert _rejected(wrapper) == {LIAR: ("num-examples", f"declared num-examples={LIE} > 10 x the round's median "
                                                         f"claim ({HONEST_CLAIM})")}
    assert metrics["kept-previous"] == 0 and metrics["clients-used"] == 4
    q = weight_factor("num-examples", HONEST_CLAIM, wrapper.params)
    assert q > 0 and wrapper.last_round.factors == {n: q for n in t.NODE_IDS if n != LIAR}
    want = sa._plain("fedsb", before, {n: u for n, u in sim.uploads.items() if n != LIAR}, np.full(4, 0.25))
    assert sa._max_err(after, want) <= metrics["secagg-error-bound"] * (1 + 1e-6)


def test_a_giant_evaluate_claim_is_dropped():
    s = t.make("fedsb")
    msg = t.configure(s)[0]
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "loss": loss})}), reply_to=msg)
               for n, loss in [(LIE, 9.0)] + [(HONEST_CLAIM, 1.0)] * 4]
    out = s.aggregate_evaluate(1, replies)
    assert dict(out) == {"loss": 1.0, "num-examples": 4.0 * HONEST_CLAIM}


def test_the_run_config_key_is_validated_at_start_naming_it():
    assert parse_run_config({}).max_num_examples_factor == 10.0  # on by default
    assert parse_run_config({"max-num-examples-factor": 0}).max_num_examples_factor == 0.0  # off
    for bad in (0.5, 1.0, -3.0):
        with pytest.raises(ConfigError, match="'max-num-examples-factor'.*must be > 1 \\(or 0: off\\)"):
            parse_run_config({"max-num-examples-factor": bad})
    with pytest.raises(ValueError, match="num_examples_factor"):
        t.make("fedsb", num_examples_factor=1.0)
