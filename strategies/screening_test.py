"""Reply screening (strategies.screening) through every strategy: bad replies are dropped and logged with
node and reason, the rest aggregate; too few valid replies keep the global state bit-identical."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from strategies import STRATEGIES
from strategies._testing import (
    HETERO,
    NODE_IDS,
    REJECTION_CATEGORY,
    admitting_limit,
    bad_reply,
    configure,
    good_replies,
    make,
    node_of,
    random_upload,
    reply,
    snapshot,
)

ALL = sorted(STRATEGIES)
BAD_KINDS = ["nan", "shape", "missing-key", "fingerprint", "oversized", "error"]


@pytest.mark.parametrize("name", ALL)
def test_bad_replies_dropped_logged_rest_aggregate(name, caplog):
    """NaN, wrong shape, missing key, wrong fingerprint, oversized, error reply: dropped and logged; the
    two good replies aggregate to exactly what they give alone."""
    nodes = list(range(11, 19))  # 6 bad + 2 good
    s = make(name, ranks=None) if name in HETERO else make(name)
    msgs = configure(s, nodes)
    s.max_update_bytes = admitting_limit(s)
    rng = np.random.default_rng(5)
    bad = [bad_reply(kind, s, m, rng) for kind, m in zip(BAD_KINDS, msgs[:6])]
    good = good_replies(s, msgs[6:], seed=9)

    ref = make(name, ranks=None) if name in HETERO else make(name)
    configure(ref, nodes)
    ref.max_update_bytes = s.max_update_bytes
    ref.aggregate_train(1, good)

    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        arrays, metrics = s.aggregate_train(1, bad + good)
    assert arrays is not None and metrics is not None
    assert metrics["clients-used"] == 2 and metrics["clients-rejected"] == 6
    assert metrics["kept-previous"] == 0
    rejected = {r["node"]: r["category"] for r in s.history[-1]["rejected"]}
    assert rejected == {node_of(m): REJECTION_CATEGORY[k] for k, m in zip(BAD_KINDS, msgs[:6])}
    for k, m in zip(BAD_KINDS, msgs[:6]):
        logged = [
            r for r in caplog.records if r.name == "fedlora.strategy" and f"node {node_of(m)}:" in r.message
        ]
        assert logged, f"no log line for {k} reply of node {node_of(m)}"
        if k == "error":
            assert "code 2" in logged[0].message and "boom" in logged[0].message
    assert snapshot(s.global_state) == snapshot(ref.global_state)


@pytest.mark.parametrize("kind", sorted(REJECTION_CATEGORY))
def test_every_rejection_kind(kind, caplog):
    s = make("hetero")
    msgs = configure(s)
    s.max_update_bytes = admitting_limit(s)
    rng = np.random.default_rng(1)
    replies = [bad_reply(kind, s, msgs[0], rng)] + good_replies(s, msgs[1:])
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        _, metrics = s.aggregate_train(1, replies)
    assert metrics["clients-used"] == len(msgs) - 1
    assert s.history[-1]["rejected"][0]["category"] == REJECTION_CATEGORY[kind]
    assert any(f"node {node_of(msgs[0])}:" in r.message for r in caplog.records)


def test_unexpected_node_and_duplicate_rejected(caplog):
    s = make("fedsb")
    msgs = configure(s)
    replies = good_replies(s, msgs)
    stranger = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=999, message_type=MessageType.TRAIN
    )
    extra = reply(stranger, random_upload(s._tasks[NODE_IDS[0]].expected, np.random.default_rng(0)))
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        _, metrics = s.aggregate_train(1, replies + [replies[0], extra])
    cats = sorted(r["category"] for r in s.history[-1]["rejected"])
    assert cats == ["duplicate", "unexpected-node"]
    assert metrics["clients-used"] == len(NODE_IDS)


@pytest.mark.parametrize("name", ALL)
def test_no_valid_reply_keeps_global_bit_identical(name, caplog):
    s = make(name)
    before = snapshot(s.global_state)
    msgs = configure(s)
    rng = np.random.default_rng(3)
    replies = [
        bad_reply(k, s, m, rng) for k, m in zip(["nan", "error", "shape", "fingerprint", "missing-key"], msgs)
    ]
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        arrays, metrics = s.aggregate_train(1, replies)
    assert snapshot(s.global_state) == before
    assert snapshot({k: v.numpy() for k, v in arrays.items()}) == before
    assert metrics["kept-previous"] == 1 and metrics["clients-used"] == 0
    assert s.history[-1]["kept-previous"] is True
    assert any("keeping the previous global state" in r.message for r in caplog.records)
    # and with no replies at all (all timed out)
    configure(s)
    arrays, metrics = s.aggregate_train(2, [])
    assert snapshot(s.global_state) == before and metrics["clients-missing"] == len(NODE_IDS)


@pytest.mark.parametrize("name", ALL)
def test_fewer_than_min_train_nodes_keeps_global(name):
    s = make(name, min_train_nodes=3)
    before = snapshot(s.global_state)
    msgs = configure(s)
    rng = np.random.default_rng(4)
    replies = good_replies(s, msgs[:2]) + [bad_reply("nan", s, m, rng) for m in msgs[2:]]
    _, metrics = s.aggregate_train(1, replies)
    assert snapshot(s.global_state) == before
    assert metrics["kept-previous"] == 1 and metrics["clients-used"] == 2
    assert "min_train_nodes=3" in s.history[-1]["kept-reason"]
    # the same two replies are enough with min_train_nodes=2: the global state changes
    s2 = make(name, min_train_nodes=2)
    msgs2 = configure(s2)
    s2.aggregate_train(1, good_replies(s2, msgs2[:2]))
    assert snapshot(s2.global_state) != before


def test_accepted_updates_are_in_node_order_whatever_the_arrival_order():
    """Floating-point sums must not depend on the order replies arrive in: reversed replies give a
    bit-identical global state and the same used-nodes list."""
    a, b = make("hetero"), make("hetero")
    ma, mb = configure(a), configure(b)
    a.aggregate_train(1, good_replies(a, ma))
    b.aggregate_train(1, list(reversed(good_replies(b, mb))))
    assert a.history[-1]["used-nodes"] == b.history[-1]["used-nodes"] == sorted(NODE_IDS)
    assert snapshot(a.global_state) == snapshot(b.global_state)
