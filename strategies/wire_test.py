"""Packing, byte accounting and Flower serialisation (strategies.wire) through every strategy."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

# Flower's private API, used here on purpose: the test counts the wire bytes independently of
# strategies.wire (which imports the same function in one place).
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from strategies import STRATEGIES
from strategies import _testing as t
from strategies.wire import (
    LAYOUT_KEY,
    MAX_LAYOUT_BYTES,
    RESERVED_CONFIG_KEYS,
    WireFormatError,
    arrayrecord_to_state,
    finite_number,
    layout_entry_bytes,
    pack_state,
    parse_layout,
    payload_bytes,
    serialized_bytes,
    state_to_arrayrecord,
    unpack_state,
)

ALL = sorted(STRATEGIES)


def _nbytes(record) -> int:
    return sum(v.numpy().nbytes for v in record.values())


def _wire(record) -> int:
    return sum(len(o.deflate()) for o in get_all_nested_objects(record).values())


def _layout_cost(config: ConfigRecord) -> int:
    """What the layout entry adds to the message's own ConfigRecord on the wire (deflated with − without)."""
    without = ConfigRecord({k: v for k, v in config.items() if k != LAYOUT_KEY})
    return len(config.deflate()) - len(without.deflate())


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
    # every message: one Array per dtype (float64 here), its layout in the message's own ConfigRecord
    assert all(list(r.content["arrays"]) == ["<f8"] for r in replies + msgs)
    up_wire = [_wire(r.content["arrays"]) + _layout_cost(r.content["meta"]) for r in replies]
    down_wire = [_wire(m.content["arrays"]) + _layout_cost(m.content["config"]) for m in msgs]
    # the layout is counted in a ConfigRecord of its own: at most 2 header digits more than in the real one
    assert 0 <= metrics["upload-serialized-bytes"] - sum(up_wire) <= 2 * len(replies)
    assert 0 <= metrics["download-serialized-bytes"] - sum(down_wire) <= 2 * len(msgs)
    assert metrics["upload-overhead-bytes"] == metrics["upload-serialized-bytes"] - up > 0
    assert metrics["download-overhead-bytes"] == metrics["download-serialized-bytes"] - down > 0
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
        assert t.snapshot(t.arrays_of(Message(received, dst_node_id=1, message_type="train"))) == t.snapshot(
            t.arrays_of(mw)
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


# ------------------------------------------------------------------------------------------ packing
def _mixed_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "z.R": rng.standard_normal((4, 3)).astype(np.float32).T,  # not C-contiguous
        "a.bias": rng.standard_normal(5),  # float64 between two float32 keys
        "m.R": np.array([np.nan, -0.0, np.inf, 1e-45], dtype=np.float32),  # NaN payload, -0, subnormal
        "empty": np.zeros((0, 7), dtype=np.float32),
        "scalar": np.array(2.5, dtype=np.float16),
        "big-endian": np.arange(3, dtype=">f4"),
        "count": np.arange(4, dtype=np.int64).reshape(2, 2),
        "mask": np.array([True, False]),
    }


def test_pack_round_trip_is_bit_exact_and_deterministic():
    state = _mixed_state()
    packed = pack_state(state)
    assert list(packed.record) == ["<f4", "<f8", "<f2", ">f4", "<i8", "|b1"]  # one Array per dtype
    assert [tuple(a.shape) for a in packed.record.values()] == [(16,), (5,), (1,), (3,), (4,), (2,)]
    assert payload_bytes(packed.record) == sum(v.nbytes for v in state.values())
    back = unpack_state(packed.record, packed.layout)
    assert list(back) == list(state)  # key order kept across dtype groups
    assert t.snapshot(back) == t.snapshot({k: np.array(v, order="C") for k, v in state.items()})
    assert pack_state(state).layout == packed.layout  # deterministic bytes
    entries = json.loads(zlib.decompress(packed.layout))
    assert entries[0] == ["z.R", [3, 4], "<f4"] and entries[4] == ["scalar", [], "<f2"]
    # through Flower's serialisation too
    wired = _over_the_wire(packed.record)
    assert t.snapshot(unpack_state(wired, packed.layout)) == t.snapshot(back)


def test_empty_state_and_unpacked_records():
    empty = pack_state({})
    assert len(empty.record) == 0 and unpack_state(empty.record, empty.layout) == {}
    state = {"x": np.ones((2, 2), dtype=np.float32)}
    assert t.snapshot(unpack_state(state_to_arrayrecord(state), None)) == t.snapshot(state)  # third-party client


@pytest.mark.parametrize("value", [np.array(["a", "b"]), np.array([object()], dtype=object),
                                   np.zeros(2, dtype="datetime64[s]")])
def test_pack_refuses_non_numeric_dtypes(value):
    with pytest.raises(WireFormatError, match="key 'k': dtype .* cannot be packed"):
        pack_state({"k": value})


def _zlib(obj) -> bytes:
    return zlib.compress(json.dumps(obj).encode(), 9)


GOOD = {"a": np.ones((2, 3), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}
F4 = ArrayRecord({"<f4": Array(np.zeros(10, dtype=np.float32))})
#: malformed (record, layout) → the words the error must contain
MALFORMED = {
    "size-mismatch": (F4, _zlib([["a", [2, 3], "<f4"], ["b", [5], "<f4"]]), "describes 11 elements"),
    "unknown-dtype": (F4, _zlib([["a", [10], "<q9"]]), "unknown or non-numeric dtype '<q9'"),
    "object-dtype": (F4, _zlib([["a", [10], "|O"]]), "non-numeric dtype '|O'"),
    "bad-zlib": (F4, b"\x78\x9c garbage", "not zlib data"),
    "truncated": (F4, _zlib([["a", [10], "<f4"]])[:-6], "truncated"),
    "trailing": (F4, _zlib([["a", [10], "<f4"]]) + b"x", "bytes after its zlib data"),
    "not-bytes": (F4, "[]", "must be bytes"),
    "not-json": (F4, zlib.compress(b"[[\"a\", [10], "), "not JSON"),
    "not-list": (F4, _zlib({"a": [10]}), "must be a JSON list"),
    "bad-entry": (F4, _zlib([["a", [10]]]), "entry 0: need [key, [dims], dtype]"),
    "duplicate-key": (F4, _zlib([["a", [5], "<f4"], ["a", [5], "<f4"]]), "key 'a' appears twice"),
    "negative-dim": (F4, _zlib([["a", [-2, -5], "<f4"]]), "negative dimension"),
    "float-dim": (F4, _zlib([["a", [10.0], "<f4"]]), "not a list of integers"),
    "bool-dim": (F4, _zlib([["a", [True], "<f4"]]), "not a list of integers"),
    "overflow": (F4, _zlib([["a", [2**40, 2**40, 0], "<f4"]]), "overflows"),
    "too-many-dims": (F4, _zlib([["a", [1] * 33, "<f4"]]), "33 dimensions"),
    "missing-array": (F4, _zlib([["a", [10], "<f4"], ["i", [1], "<i8"]]), "not the layout's dtypes"),
    "extra-array": (ArrayRecord({"<f4": Array(np.zeros(10, dtype=np.float32)),
                                 "<f8": Array(np.zeros(1))}), _zlib([["a", [10], "<f4"]]), "not the layout's dtypes"),
    "dtype-mismatch": (ArrayRecord({"<f4": Array(np.zeros(10))}), _zlib([["a", [10], "<f4"]]), "is float64"),
    "not-flat": (ArrayRecord({"<f4": Array(np.zeros((2, 5), dtype=np.float32))}), _zlib([["a", [10], "<f4"]]),
                 "(2, 5)"),
    "lying-array": (ArrayRecord({"<f4": Array(dtype="float32", shape=(10,), stype="numpy.ndarray", data=b"xx")}),
                    _zlib([["a", [10], "<f4"]]), "cannot be decoded"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_packed_arrays_are_refused_naming_the_problem(case):
    record, layout, words = MALFORMED[case]
    with pytest.raises(WireFormatError) as err:
        unpack_state(record, layout)
    assert words in str(err.value)


def test_layout_decompression_is_bounded():
    bomb = zlib.compress(b"[" + b" " * (64 * MAX_LAYOUT_BYTES) + b"]", 9)  # 256 MiB of JSON whitespace
    assert len(bomb) < 300_000
    with pytest.raises(WireFormatError, match=f"more than {MAX_LAYOUT_BYTES} bytes"):
        parse_layout(bomb)
    with pytest.raises(WireFormatError, match="bytes >"):
        pack_state({f"key-{i:07d}-" + "x" * 80: np.zeros(0, dtype=np.float32) for i in range(50_000)})


def test_layout_is_a_reserved_config_key_and_counted_on_the_wire():
    assert LAYOUT_KEY in RESERVED_CONFIG_KEYS
    with pytest.raises(ValueError, match="set by the strategy per node"):
        t.make("fedsb", train_config={LAYOUT_KEY: b"user"})
    s = t.make("fedsb")
    msg = t.configure(s, config={LAYOUT_KEY: "flower"})[0]
    assert t.config_of(msg)[LAYOUT_KEY] == pack_state(s.global_state).layout
    packed = pack_state(GOOD)
    assert serialized_bytes(packed.record, packed.layout) == _wire(packed.record) + layout_entry_bytes(packed.layout)
    real = ConfigRecord({"fingerprint": "f" * 64, "partition-id": 3, LAYOUT_KEY: packed.layout})
    assert 0 <= layout_entry_bytes(packed.layout) - _layout_cost(real) <= 2
    assert layout_entry_bytes(packed.layout) > len(packed.layout) + len(LAYOUT_KEY)
    assert serialized_bytes(packed.record) == _wire(packed.record) and layout_entry_bytes(None) == 0


def test_packing_brings_the_overhead_of_minilm_r16_under_5_percent():
    """fedsb's upload at MiniLM r=16 without head: 12 keys of 16×16 float32 (query + value of 6 layers)."""
    rng = np.random.default_rng(0)
    state = {f"bert.encoder.layer.{i}.attention.self.{m}.R": rng.standard_normal((16, 16)).astype(np.float32)
             for i in range(6) for m in ("query", "value")}
    payload = 12 * 16 * 16 * 4
    packed = pack_state(state)
    assert payload_bytes(packed.record) == payload
    overhead = serialized_bytes(packed.record, packed.layout) - payload
    unpacked = serialized_bytes(state_to_arrayrecord(state)) - payload
    assert overhead <= 0.05 * payload < 0.4 * payload < unpacked


# ------------------------------------------------------------------------------------------ screening
def _corrupt(reply: Message, case: str) -> str:
    """Break ``reply``'s packed arrays (fedsb: float64, key ``"<f8"``) or its layout as ``case`` says; return the
    words the rejection reason must contain."""
    arrays, meta = reply.content["arrays"], reply.content["meta"]
    flat = arrays["<f8"].numpy()
    entries = json.loads(zlib.decompress(meta[LAYOUT_KEY]))
    if case == "size-mismatch":  # one number short
        arrays["<f8"] = Array(flat[:-1])
        return f"describes {flat.size} elements"
    if case == "dtype-mismatch":
        arrays["<f8"] = Array(flat.astype(np.float32))
        return "is float32"
    if case == "lying-array":  # metadata fits the layout, data is no npy
        arrays["<f8"] = Array(dtype="float64", shape=(flat.size,), stype="numpy.ndarray", data=b"\x93NUMPY junk")
        return "cannot be decoded"
    if case == "extra-array":
        arrays["<f4"] = Array(np.zeros(1, dtype=np.float32))
        return "not the layout's dtypes"
    if case == "duplicate-key":
        entries[1][0] = entries[0][0]
        words = f"key {entries[0][0]!r} appears twice"
    elif case == "negative-dim":
        entries[0][1] = [-entries[0][1][0], -entries[0][1][1]]
    elif case == "overflow":
        entries[0][1] = [2**40, 2**40, 0]
    elif case == "unknown-dtype":
        entries[0][2] = "<q9"
    meta[LAYOUT_KEY] = _zlib(entries) if case not in ("bad-zlib", "not-bytes") else MALFORMED[case][1]
    return words if case == "duplicate-key" else MALFORMED[case][2]


@pytest.mark.parametrize("case", ["size-mismatch", "unknown-dtype", "bad-zlib", "duplicate-key", "negative-dim",
                                  "overflow", "dtype-mismatch", "lying-array", "extra-array", "not-bytes"])
def test_malformed_packed_reply_is_rejected_and_the_round_goes_on(case, caplog):
    s = t.make("fedsb")
    msgs = t.configure(s)
    replies = t.good_replies(s, msgs)
    before = t.snapshot(s.global_state)
    bad = t.node_of(msgs[1])
    words = _corrupt(replies[1], case)
    with caplog.at_level("WARNING", logger="fedlora.strategy"):
        _, metrics = s.aggregate_train(1, replies)
    entry = s.history[-1]
    assert [r["node"] for r in entry["rejected"]] == [bad]
    assert entry["rejected"][0]["category"] == "layout"
    assert entry["rejected"][0]["reason"].startswith("packed arrays: ")
    assert words in entry["rejected"][0]["reason"]
    assert f"node {bad}: reply rejected [layout]" in caplog.text
    assert metrics["clients-used"] == 4 and metrics["kept-previous"] == 0
    assert t.snapshot(s.global_state) != before  # the other four were aggregated
    assert metrics["upload-serialized-bytes"] > metrics["upload-bytes"]  # a bad reply's bytes are still counted


def test_packed_reply_with_wrong_keys_or_shapes_is_rejected_before_decoding():
    s = t.make("fedsb")
    msgs = t.configure(s)
    replies = t.good_replies(s, msgs)
    expected = s._tasks[t.node_of(msgs[0])].expected
    first = next(iter(expected))
    wrong_shape = dict(t.random_upload(expected, np.random.default_rng(1)), **{first: np.zeros((1, 1))})
    replies[0] = t.reply(msgs[0], wrong_shape)
    extra = dict(t.random_upload(expected, np.random.default_rng(2)), rogue=np.zeros(3))
    replies[2] = t.reply(msgs[2], extra)
    replies[3] = t.reply(msgs[3], t.random_upload(expected, np.random.default_rng(3)), pack=False)  # unpacked
    s.aggregate_train(1, replies)
    got = {r["node"]: r["category"] for r in s.history[-1]["rejected"]}
    assert got == {t.node_of(msgs[0]): "shape", t.node_of(msgs[2]): "keys"}
    assert s.history[-1]["clients-used"] == 3  # the unpacked (third-party) reply is accepted
