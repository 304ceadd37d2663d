"""Byte accounting and Flower serialisation (strategies.wire) through every strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message

# Flower's private API, used here on purpose: the test counts the wire bytes independently of
# strategies.wire (which imports the same function in one place).
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from strategies import STRATEGIES
from strategies import _testing as t
from strategies.wire import arrayrecord_to_state, finite_number, state_to_arrayrecord

ALL = sorted(STRATEGIES)


def _nbytes(record) -> int:
    return sum(v.numpy().nbytes for v in record.values())


def _wire(record) -> int:
    return sum(len(o.deflate()) for o in get_all_nested_objects(record).values())


@pytest.mark.parametrize("name", ALL)
def test_bytes_accounted_equal_payload(name):
    s = t.make(name)
    msgs = t.configure(s)
    replies = t.good_replies(s, msgs)
    _, metrics = s.aggregate_train(1, replies)
    up = sum(_nbytes(r.content["arrays"]) for r in replies)
    down = sum(_nbytes(m.content["arrays"]) for m in msgs)
    assert metrics["upload-bytes"] == up
    assert metrics["download-bytes"] == down
    up_wire = sum(_wire(r.content["arrays"]) for r in replies)
    down_wire = sum(_wire(m.content["arrays"]) for m in msgs)
    assert metrics["upload-serialized-bytes"] == up_wire
    assert metrics["upload-overhead-bytes"] == up_wire - up > 0
    assert metrics["download-overhead-bytes"] == down_wire - down > 0
    # upload per node matches exactly the floats its rank implies
    for m, r in zip(msgs, replies):
        task = s._tasks[t.node_of(m)]
        assert _nbytes(r.content["arrays"]) == 8 * sum(int(np.prod(sh)) for sh in task.expected.values())


def test_nested_upload_is_r_squared():
    """fedsb uploads r² floats per layer (+ head); flora 2·rᵢ·qᵢ; hetero rᵢ²."""
    head = 3 * 16 + 3
    s = t.make("fedsb")
    msgs = t.configure(s)
    _, m = s.aggregate_train(1, t.good_replies(s, msgs))
    assert m["upload-bytes"] == len(t.NODE_IDS) * 8 * (2 * t.R * t.R + head)
    s = t.make("hetero")  # ranks cycle 8, 4, 2, 8, 4 over the sorted node ids
    msgs = t.configure(s)
    _, m = s.aggregate_train(1, t.good_replies(s, msgs))
    assert m["upload-bytes"] == 8 * sum(2 * r * r + head for r in (8, 4, 2, 8, 4))
    s = t.make("flora")  # q = 4 → qᵢ = 4, 4, 2, 4, 4
    msgs = t.configure(s)
    _, m = s.aggregate_train(1, t.good_replies(s, msgs))
    assert m["upload-bytes"] == 8 * sum(2 * (2 * r * min(4, r)) + head for r in (8, 4, 2, 8, 4))


def _over_the_wire(record):
    """Deflate every inflatable object and inflate them again, as Flower 1.41 transmits records."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    assert sum(len(c) for c in contents.values()) > 0
    return inflate_object_from_contents(record.object_id, contents)


@pytest.mark.parametrize("name", ALL)
def test_messages_survive_flower_serialisation(name):
    """Instructions and replies deflated/inflated as on the wire (incl. zero-size delta arrays) give the
    same configs, arrays and aggregate as the in-memory path."""
    init = t.nested_global(t.R) if name in t.NESTED else t.peft_global(t.R, zero_b=True)
    direct, wired = t.make(name, initial_state=init), t.make(name, initial_state=init)
    m_direct, m_wired = t.configure(direct), t.configure(wired)
    replies_direct, replies_wired = [], []
    rng = np.random.default_rng(0)
    for md, mw, n in zip(m_direct, m_wired, t.NUM_EXAMPLES):
        received = _over_the_wire(mw.content)
        assert dict(received["config"]) == t.config_of(mw)
        assert t.snapshot({k: v.numpy() for k, v in received["arrays"].items()}) == t.snapshot(
            {k: v.numpy() for k, v in mw.content["arrays"].items()}
        )
        up = t.random_upload(wired._tasks[t.node_of(mw)].expected, rng)
        replies_direct.append(t.reply(md, up, num_examples=n))
        content = _over_the_wire(t.reply(mw, up, num_examples=n).content)
        replies_wired.append(Message(content, reply_to=mw))
    _, met_d = direct.aggregate_train(1, replies_direct)
    _, met_w = wired.aggregate_train(1, replies_wired)
    assert met_w["clients-used"] == 5
    assert t.snapshot(direct.global_state) == t.snapshot(wired.global_state)
    assert met_d["upload-serialized-bytes"] == met_w["upload-serialized-bytes"]


def test_state_arrayrecord_round_trip_is_bit_exact():
    state = {"a.R0": np.arange(6, dtype=np.float32).reshape(2, 3).T, "b": np.array([np.pi], dtype=np.float64)}
    back = arrayrecord_to_state(state_to_arrayrecord(state))
    assert list(back) == list(state)
    assert t.snapshot(back) == t.snapshot({k: np.ascontiguousarray(v) for k, v in state.items()})


@pytest.mark.parametrize(("value", "want"), [(3, 3.0), (2.5, 2.5), (np.float32(1.5), 1.5), (True, None),
                                             ("7", None), (float("nan"), None), (float("inf"), None), (None, None)])
def test_finite_number(value, want):
    assert finite_number(value) == want
