"""Behaviour every strategy shares (NestedStrategyBase): screening, fallback, bytes, config, resume."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from strategies import STRATEGIES, build_strategy, load_strategy_state, save_strategy_state
from strategies._testing import (
    FINGERPRINT,
    HETERO,
    NESTED,
    NODE_IDS,
    NUM_EXAMPLES,
    FakeGrid,
    R,
    config_of,
    configure,
    error_reply,
    good_replies,
    make,
    nested_global,
    node_of,
    peft_global,
    random_upload,
    reply,
    snapshot,
)
from strategies.base import RESERVED_CONFIG_KEYS, derive_seed, state_to_arrayrecord

ALL = sorted(STRATEGIES)


# ----------------------------------------------------------------------------------------- screening
BAD_KINDS = ["nan", "shape", "missing-key", "fingerprint", "oversized", "error"]


def bad_reply(kind: str, strategy, msg: Message, rng) -> Message:
    up = random_upload(strategy._tasks[node_of(msg)].expected, rng)
    first = next(iter(up))
    if kind == "nan":
        up[first].flat[0] = np.nan
    elif kind == "inf":
        up[first].flat[-1] = np.inf
    elif kind == "shape":
        up[first] = np.zeros(tuple(n + 1 for n in up[first].shape))
    elif kind == "missing-key":
        del up[first]
    elif kind == "extra-key":
        up["rogue.weight"] = np.zeros(3)
    elif kind == "fingerprint":
        return reply(msg, up, fingerprint="0" * 64)
    elif kind == "no-meta":
        return reply(msg, up, fingerprint=None)
    elif kind == "oversized":
        up["junk"] = np.zeros(20_000)
    elif kind == "error":
        return error_reply(msg)
    elif kind == "no-arrays":
        return reply(msg, None)
    elif kind == "no-num-examples":
        return reply(msg, up, num_examples=None)
    elif kind == "zero-num-examples":
        return reply(msg, up, num_examples=0)
    elif kind == "int-dtype":
        up[first] = np.ones(up[first].shape, dtype=np.int64)
    else:
        raise AssertionError(kind)
    return reply(msg, up)


CATEGORY = {
    "nan": "non-finite",
    "inf": "non-finite",
    "shape": "shape",
    "missing-key": "keys",
    "extra-key": "keys",
    "fingerprint": "fingerprint",
    "no-meta": "missing-record",
    "oversized": "oversized",
    "error": "error",
    "no-arrays": "missing-record",
    "no-num-examples": "bad-metrics",
    "zero-num-examples": "bad-metrics",
    "int-dtype": "dtype",
}


def _limit(strategy) -> int:
    """max_update_bytes admitting every valid upload (payload + npy headers) but not 160 kB of junk."""
    biggest = max(
        sum(int(np.prod(s)) * 8 + 128 for s in t.expected.values()) for t in strategy._tasks.values()
    )
    return biggest + 4096


@pytest.mark.parametrize("name", ALL)
def test_bad_replies_dropped_logged_rest_aggregate(name, caplog):
    """NaN, wrong shape, missing key, wrong fingerprint, oversized, error reply: dropped and logged; the
    two good replies aggregate to exactly what they give alone."""
    nodes = list(range(11, 19))  # 6 bad + 2 good
    s = make(name, ranks=None) if name in HETERO else make(name)
    msgs = configure(s, nodes)
    s.max_update_bytes = _limit(s)
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
    assert rejected == {node_of(m): CATEGORY[k] for k, m in zip(BAD_KINDS, msgs[:6])}
    for k, m in zip(BAD_KINDS, msgs[:6]):
        logged = [
            r for r in caplog.records if r.name == "fedlora.strategy" and f"node {node_of(m)}:" in r.message
        ]
        assert logged, f"no log line for {k} reply of node {node_of(m)}"
        if k == "error":
            assert "code 2" in logged[0].message and "boom" in logged[0].message
    assert snapshot(s.global_state) == snapshot(ref.global_state)


@pytest.mark.parametrize("kind", sorted(CATEGORY))
def test_every_rejection_kind(kind, caplog):
    s = make("hetero")
    msgs = configure(s)
    s.max_update_bytes = _limit(s)
    rng = np.random.default_rng(1)
    replies = [bad_reply(kind, s, msgs[0], rng)] + good_replies(s, msgs[1:])
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        _, metrics = s.aggregate_train(1, replies)
    assert metrics["clients-used"] == len(msgs) - 1
    assert s.history[-1]["rejected"][0]["category"] == CATEGORY[kind]
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


# ----------------------------------------------------------------------------------------- bytes
def _nbytes(record) -> int:
    return sum(v.numpy().nbytes for v in record.values())


def _wire(record) -> int:
    return sum(len(o.deflate()) for o in get_all_nested_objects(record).values())


@pytest.mark.parametrize("name", ALL)
def test_bytes_accounted_equal_payload(name):
    s = make(name)
    msgs = configure(s)
    replies = good_replies(s, msgs)
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
        task = s._tasks[node_of(m)]
        assert _nbytes(r.content["arrays"]) == 8 * sum(int(np.prod(sh)) for sh in task.expected.values())


def test_nested_upload_is_r_squared():
    """fedsb uploads r² floats per layer (+ head); flora 2·rᵢ·qᵢ; hetero rᵢ²."""
    head = 3 * 16 + 3
    s = make("fedsb")
    msgs = configure(s)
    _, m = s.aggregate_train(1, good_replies(s, msgs))
    assert m["upload-bytes"] == len(NODE_IDS) * 8 * (2 * R * R + head)
    s = make("hetero")  # ranks cycle 8, 4, 2, 8, 4 over the sorted node ids
    msgs = configure(s)
    _, m = s.aggregate_train(1, good_replies(s, msgs))
    assert m["upload-bytes"] == 8 * sum(2 * r * r + head for r in (8, 4, 2, 8, 4))
    s = make("flora")  # q = 4 → qᵢ = 4, 4, 2, 4, 4
    msgs = configure(s)
    _, m = s.aggregate_train(1, good_replies(s, msgs))
    assert m["upload-bytes"] == 8 * sum(2 * (2 * r * min(4, r)) + head for r in (8, 4, 2, 8, 4))


# ----------------------------------------------------------------------------------------- configure
@pytest.mark.parametrize("name", ALL)
def test_configure_train_per_node_config(name):
    s = make(name, train_config={"batch-size": 4})
    msgs = configure(s, config={"lr": 0.05, "local-epochs": 3, "rank": 999})
    assert sorted(node_of(m) for m in msgs) == NODE_IDS
    seeds = set()
    for m in msgs:
        assert m.metadata.message_type == MessageType.TRAIN
        cfg = config_of(m)
        assert RESERVED_CONFIG_KEYS <= set(cfg)
        nid = node_of(m)
        task = s._tasks[nid]
        assert cfg["rank"] == task.rank == s.assigner.rank_of(nid)
        assert cfg["rank"] != 999  # the strategy's value wins over a user key
        assert cfg["global-rank"] == R
        assert cfg["inner-rank"] == task.inner_rank
        assert cfg["server-round"] == 1
        assert cfg["fingerprint"] == FINGERPRINT
        assert cfg["mode"] == s.mode and cfg["strategy"] == name
        assert cfg["restart-inner"] is (name in ("flora", "flora-lora"))
        assert cfg["lr"] == 0.05 and cfg["local-epochs"] == 3 and cfg["batch-size"] == 4
        assert cfg["seed"] == derive_seed(0, 1, nid)
        seeds.add(cfg["seed"])
    assert len(seeds) == len(msgs)
    if name in HETERO:
        assert sorted(config_of(m)["rank"] for m in msgs) == [2, 4, 4, 8, 8]
    if name == "flora":
        assert {config_of(m)["rank"]: config_of(m)["inner-rank"] for m in msgs} == {8: 4, 4: 4, 2: 2}


def test_seeds_differ_by_round_and_are_reproducible():
    a, b = make("fedsb"), make("fedsb")
    ma, mb = configure(a), configure(b)
    assert [config_of(m)["seed"] for m in ma] == [config_of(m)["seed"] for m in mb]
    a.aggregate_train(1, good_replies(a, ma))
    ma2 = configure(a, server_round=2)
    assert config_of(ma2[0])["server-round"] == 2
    assert config_of(ma2[0])["seed"] != config_of(ma[0])["seed"]


@pytest.mark.parametrize(
    ("fraction", "min_nodes", "expected"), [(1.0, 2, 5), (0.6, 2, 3), (0.2, 2, 2), (0.2, 4, 4)]
)
def test_sampling_respects_fraction_and_min(fraction, min_nodes, expected):
    s = make("fedsb", fraction_train=fraction, min_train_nodes=min_nodes)
    msgs = configure(s)
    assert len(msgs) == expected == len(s._tasks)
    assert len({node_of(m) for m in msgs}) == expected


def test_initial_state_from_first_configure_arrays():
    s = make("fedsb", with_initial=False)
    assert s.global_state is None
    init = nested_global(R)
    msgs = list(s.configure_train(1, state_to_arrayrecord(init), ConfigRecord(), FakeGrid(NODE_IDS)))
    assert snapshot(s.global_state) == snapshot(init)
    assert snapshot({k: v.numpy() for k, v in msgs[0].content["arrays"].items()}) == snapshot(init)


def test_uniform_weighting():
    s_u = make("fedsb", weighting="uniform")
    s_n = make("fedsb")
    m_u, m_n = configure(s_u), configure(s_n)
    g0 = s_u.global_state["enc.0.q.R0"].copy()
    rng = np.random.default_rng(0)
    ups = [random_upload(s_u._tasks[node_of(m)].expected, rng) for m in m_u]
    s_u.aggregate_train(1, [reply(m, u, num_examples=n) for m, u, n in zip(m_u, ups, NUM_EXAMPLES)])
    s_n.aggregate_train(1, [reply(m, u, num_examples=n) for m, u, n in zip(m_n, ups, NUM_EXAMPLES)])
    mean_u = np.mean([u["enc.0.q.R"] for u in ups], axis=0)
    np.testing.assert_allclose(s_u.global_state["enc.0.q.R0"], g0 + mean_u, rtol=1e-12, atol=1e-12)
    p = np.array(NUM_EXAMPLES, float) / sum(NUM_EXAMPLES)
    mean_n = sum(pi * u["enc.0.q.R"] for pi, u in zip(p, ups))
    np.testing.assert_allclose(s_n.global_state["enc.0.q.R0"], g0 + mean_n, rtol=1e-12, atol=1e-12)
    # uniform weighting accepts replies without num-examples
    s2 = make("fedsb", weighting="uniform")
    msgs = configure(s2)
    _, metrics = s2.aggregate_train(1, [reply(m, u, num_examples=None) for m, u in zip(msgs, ups)])
    assert metrics["clients-used"] == len(msgs)


def test_train_loss_metric_is_weighted_mean():
    s = make("fedsb")
    msgs = configure(s)
    rng = np.random.default_rng(0)
    losses = [1.0, 2.0, 3.0, 4.0, 5.0]
    replies = [
        reply(m, random_upload(s._tasks[node_of(m)].expected, rng), num_examples=n, train_loss=loss)
        for m, n, loss in zip(msgs, NUM_EXAMPLES, losses)
    ]
    _, metrics = s.aggregate_train(1, replies)
    want = sum(n * loss for n, loss in zip(NUM_EXAMPLES, losses)) / sum(NUM_EXAMPLES)
    assert metrics["train-loss"] == pytest.approx(want, rel=1e-12)
    assert metrics["aggregation-seconds"] >= 0.0
    assert metrics["clients-sampled"] == 5 and metrics["num-examples"] == sum(NUM_EXAMPLES)


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("fedsb", {"rank": 0}, "rank"),
        ("fedsb", {"rank": -4}, "rank"),
        ("flora", {"inner_rank": 9}, "inner_rank"),
        ("flora", {"inner_rank": 0}, "inner_rank"),
        ("fedsb", {"fraction_train": 0.0}, "fraction_train"),
        ("fedsb", {"fraction_train": 1.5}, "fraction_train"),
        ("fedsb", {"fraction_evaluate": -0.1}, "fraction_evaluate"),
        ("fedsb", {"weighting": "loss"}, "weighting"),
        ("fedsb", {"max_update_bytes": 0}, "max_update_bytes"),
        ("fedsb", {"min_train_nodes": 0}, "min_train_nodes"),
        ("fedsb", {"ranks": "8,4"}, "ranks"),
        ("fedit", {"ranks": "uniform"}, "ranks"),
        ("hetero", {"ranks": "16,8"}, "ranks"),
        ("hetero", {"ranks": "8,0"}, "ranks"),
        ("hetero", {"ranks": "eight"}, "ranks"),
        ("fedsb", {"outer_fingerprint": None}, "outer_fingerprint"),
        ("fedsb", {"train_config": {"rank": 3}}, "train_config"),
        ("fedit", {"lora_alpha": 0}, "lora_alpha"),
        ("fedsb", {"initial_state": {"x.R0": np.zeros((4, 4))}}, "initial_state"),
        ("fedit", {"initial_state": nested_global(R)}, "initial_state"),
    ],
)
def test_constructor_validation_names_the_key(name, kwargs, key):
    base = {"rank": R, "outer_fingerprint": FINGERPRINT}
    if name == "flora":
        base["inner_rank"] = 2
    base.update(kwargs)
    with pytest.raises(ValueError, match=key):
        build_strategy(name, **base)


def test_build_strategy_unknown_name():
    with pytest.raises(ValueError, match="strategy") as err:
        build_strategy("fedavg", rank=4)
    for allowed in STRATEGIES:
        assert allowed in str(err.value)


def test_lora_baselines_do_not_require_fingerprint():
    s = build_strategy("fedit", rank=R, initial_state=peft_global(R))
    msgs = configure(s)
    _, metrics = s.aggregate_train(
        1,
        [
            reply(m, u, fingerprint=None)
            for m, u in zip(
                msgs, (random_upload(s._tasks[node_of(m)].expected, np.random.default_rng(0)) for m in msgs)
            )
        ],
    )
    assert metrics["clients-used"] == len(msgs)
    assert config_of(msgs[0])["fingerprint"] == ""


# ----------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name, tmp_path):
    kw = {"fraction_train": 0.6, "seed": 7}
    if name in HETERO:
        kw["ranks"] = "uniform"
    s1 = make(name, **kw)
    msgs = configure(s1)
    rng = np.random.default_rng(11)
    s1.aggregate_train(1, [bad_reply("nan", s1, msgs[0], rng)] + good_replies(s1, msgs[1:]))
    state = s1.state_dict()
    json.dumps({k: v for k, v in state.items() if k != "global_state"})  # JSON-serialisable
    save_strategy_state(state, tmp_path / "ckpt")
    loaded = load_strategy_state(tmp_path / "ckpt")

    s2 = make(name, with_initial=False, **kw)
    s2.load_state_dict(loaded)
    assert snapshot(s2.global_state) == snapshot(s1.global_state)
    assert s2.history == s1.history and s2.round == s1.round == 1
    assert s2.history[0]["rejected"][0]["category"] == "non-finite"
    assert s2.assigner.state_dict() == s1.assigner.state_dict()

    # resume: s1 continues at Flower round 2, s2 is a fresh start() (Flower round 1); same round 2
    nodes = NODE_IDS + [606, 707]
    m1 = configure(s1, nodes, server_round=2)
    m2 = configure(s2, nodes, server_round=1)
    assert [node_of(m) for m in m1] == [node_of(m) for m in m2]
    assert [config_of(m) for m in m1] == [config_of(m) for m in m2]
    assert config_of(m2[0])["server-round"] == 2
    for a, b in zip(m1, m2):
        assert snapshot({k: v.numpy() for k, v in a.content["arrays"].items()}) == snapshot(
            {k: v.numpy() for k, v in b.content["arrays"].items()}
        )
    s1.aggregate_train(2, good_replies(s1, m1, seed=3))
    s2.aggregate_train(1, good_replies(s2, m2, seed=3))
    assert snapshot(s1.global_state) == snapshot(s2.global_state)
    assert s2.round == 2 and len(s2.history) == 2


def test_load_state_dict_rejects_mismatch():
    s = make("fedsb")
    state = s.state_dict()
    with pytest.raises(ValueError, match="strategy"):
        make("hetero").load_state_dict(state)
    other = build_strategy("fedsb", rank=4, outer_fingerprint=FINGERPRINT)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)
    other = build_strategy("fedsb", rank=R, outer_fingerprint="e" * 64)
    with pytest.raises(ValueError, match="outer_fingerprint"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------- Flower start()
@pytest.mark.parametrize("name", ["fedsb", "flora", "flexlora"])
def test_flower_start_runs_rounds(name):
    """Strategy.start with an in-process grid: three rounds, one node failing in round 2."""
    s = make(name, with_initial=False)
    rng = np.random.default_rng(0)
    calls = {"n": 0}

    def client(msg: Message) -> Message | None:
        nid = node_of(msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            cfg = config_of(msg)
            assert cfg["rank"] == s.assigner.rank_of(nid)
            return Message(
                RecordDict({"metrics": MetricRecord({"num-examples": 5, "eval-loss": 1.0})}), reply_to=msg
            )
        calls["n"] += 1
        cfg = config_of(msg)
        if cfg["server-round"] == 2 and nid == NODE_IDS[0]:
            return error_reply(msg)
        if cfg["server-round"] == 3 and nid == NODE_IDS[1]:
            return None  # timed out
        return reply(msg, random_upload(s._tasks[nid].expected, rng), num_examples=10 + nid % 7)

    init = nested_global(R) if name in NESTED else peft_global(R, zero_b=True)
    result = s.start(FakeGrid(NODE_IDS, client), state_to_arrayrecord(init), num_rounds=3, timeout=1)
    assert calls["n"] == 15
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert [h["clients-used"] for h in s.history] == [5, 4, 4]
    assert result.train_metrics_clientapp[2]["clients-rejected"] == 1
    assert result.train_metrics_clientapp[3]["clients-missing"] == 1
    assert snapshot({k: v.numpy() for k, v in result.arrays.items()}) == snapshot(s.global_state)
    assert result.evaluate_metrics_clientapp[3]["eval-loss"] == pytest.approx(1.0)
    assert s.round == 3


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_aggregation_failure_keeps_global(failure, monkeypatch, caplog):
    from fedlora.aggregation import AggregationError

    s = make("fedsb")
    before = snapshot(s.global_state)
    msgs = configure(s)

    def broken(updates, weights):
        if failure == "raises":
            raise AggregationError("synthetic failure", key="enc.0.q.R")
        return {k: np.full_like(v, np.nan) for k, v in s.global_state.items()}

    monkeypatch.setattr(s, "aggregate_updates", broken)
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        arrays, metrics = s.aggregate_train(1, good_replies(s, msgs))
    assert snapshot(s.global_state) == before
    assert snapshot({k: v.numpy() for k, v in arrays.items()}) == before
    assert metrics["kept-previous"] == 1 and metrics["clients-used"] == 5
    assert "aggregation failed" in s.history[-1]["kept-reason"]


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
    init = nested_global(R) if name in NESTED else peft_global(R, zero_b=True)
    direct, wired = make(name, initial_state=init), make(name, initial_state=init)
    m_direct, m_wired = configure(direct), configure(wired)
    replies_direct, replies_wired = [], []
    rng = np.random.default_rng(0)
    for md, mw, n in zip(m_direct, m_wired, NUM_EXAMPLES):
        received = _over_the_wire(mw.content)
        assert dict(received["config"]) == config_of(mw)
        assert snapshot({k: v.numpy() for k, v in received["arrays"].items()}) == snapshot(
            {k: v.numpy() for k, v in mw.content["arrays"].items()}
        )
        up = random_upload(wired._tasks[node_of(mw)].expected, rng)
        replies_direct.append(reply(md, up, num_examples=n))
        content = _over_the_wire(reply(mw, up, num_examples=n).content)
        replies_wired.append(Message(content, reply_to=mw))
    _, met_d = direct.aggregate_train(1, replies_direct)
    _, met_w = wired.aggregate_train(1, replies_wired)
    assert met_w["clients-used"] == 5
    assert snapshot(direct.global_state) == snapshot(wired.global_state)
    assert met_d["upload-serialized-bytes"] == met_w["upload-serialized-bytes"]
