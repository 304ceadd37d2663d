"""Behaviour every strategy shares (NestedStrategyBase): per-node configs, sampling, seeds, weighting,
the global state taken from the ``arrays`` of every round (Flower's Strategy contract), ``start()``."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies import STRATEGIES, build_strategy
from strategies._testing import (
    FINGERPRINT,
    HETERO,
    NESTED,
    NODE_IDS,
    NUM_EXAMPLES,
    FakeGrid,
    R,
    arrays_of,
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
from strategies.sampling import derive_seed
from strategies.wire import RESERVED_CONFIG_KEYS, state_to_arrayrecord

ALL = sorted(STRATEGIES)


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
    assert snapshot(arrays_of(msgs[0])) == snapshot(init)


# ----------------------------------------------------------------------------------------- arrays contract
def test_arrays_changed_between_rounds_are_sent_and_aggregated_onto():
    """The caller's arrays of round 2 (not the strategy's own round-1 result) are what round 2's messages
    carry and what round 2's aggregate adds Σ pᵢRᵢ to."""
    s = make("fedsb")
    arrays, _ = s.aggregate_train(1, good_replies(s, configure(s)))
    changed = {k: v.numpy() + (1.0 if k.endswith(".R0") else -2.0) for k, v in arrays.items()}
    msgs = list(s.configure_train(2, state_to_arrayrecord(changed), ConfigRecord(), FakeGrid(NODE_IDS)))
    for m in msgs:
        assert snapshot(arrays_of(m)) == snapshot(changed)
    rng = np.random.default_rng(8)
    ups = [random_upload(s._tasks[node_of(m)].expected, rng) for m in msgs]
    new, _ = s.aggregate_train(2, [reply(m, u, num_examples=n) for m, u, n in zip(msgs, ups, NUM_EXAMPLES)])
    p = np.array(NUM_EXAMPLES, float) / sum(NUM_EXAMPLES)
    for key, value in new.items():
        upload_key = key[: -len("0")] if key.endswith(".R0") else key
        mean = sum(pi * u[upload_key] for pi, u in zip(p, ups))
        want = changed[key] + mean if key.endswith(".R0") else mean
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-12, atol=1e-12, err_msg=key)
    assert snapshot(s.global_state) == snapshot({k: v.numpy() for k, v in new.items()})


KEY = "enc.0.q.R0"
#: ways to spoil a nested global state → what the refusal says
SPOILERS = {
    "differ": lambda st: st.pop(KEY),
    "rogue.weight": lambda st: st.update({"rogue.weight": np.zeros(3)}),
    "shape": lambda st: st.update({"classifier.bias": np.zeros(4)}),
    "dtype": lambda st: st.update({KEY: st[KEY].astype(np.float32)}),
    "non-finite": lambda st: st[KEY].__setitem__((0, 0), np.nan),
}


@pytest.mark.parametrize("match", sorted(SPOILERS))
def test_arrays_that_are_not_the_global_state_are_refused(match):
    s = make("fedsb")
    state = {k: v.copy() for k, v in s.global_state.items()}
    SPOILERS[match](state)
    before = snapshot(s.global_state)
    with pytest.raises(ValueError, match=match):
        s.configure_train(1, state_to_arrayrecord(state), ConfigRecord(), FakeGrid(NODE_IDS))
    assert snapshot(s.global_state) == before


class ShiftArrays(Strategy):
    """A Flower-style wrapper strategy: delegates, and shifts every aggregated array by ``shift``; records
    the wrapped strategy's state after each aggregation and what it returned."""

    def __init__(self, strategy: Strategy, shift: float) -> None:
        self.strategy, self.shift = strategy, shift
        self.inner_after: list[dict[str, np.ndarray]] = []
        self.returned: list[dict[str, np.ndarray]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.inner_after.append({k: v.numpy() for k, v in arrays.items()})
        self.returned.append({k: v + self.shift for k, v in self.inner_after[-1].items()})
        return state_to_arrayrecord(self.returned[-1]), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


@pytest.mark.parametrize("name", ["fedsb", "flora"])
def test_flower_wrapper_that_changes_arrays_composes(name):
    """Flower's start() over a wrapper that shifts the aggregate: each round's messages carry the
    wrapper's arrays of the round before (not the wrapped strategy's own result)."""
    inner = make(name, with_initial=False, fraction_evaluate=0.0)
    rng = np.random.default_rng(0)
    grid = FakeGrid(NODE_IDS, lambda m: reply(m, random_upload(inner._tasks[node_of(m)].expected, rng),
                                              num_examples=10 + node_of(m) % 7))
    wrapper = ShiftArrays(inner, shift=0.25)
    result = wrapper.start(grid, state_to_arrayrecord(nested_global(R)), num_rounds=3, timeout=1)
    batches = [b for b in grid.sent if b]  # start() also sends the (empty) evaluate batches
    assert len(batches) == 3
    for rnd in (2, 3):
        shifted = wrapper.returned[rnd - 2]
        assert snapshot(shifted) != snapshot(wrapper.inner_after[rnd - 2])
        for m in batches[rnd - 1]:
            assert snapshot(arrays_of(m)) == snapshot(shifted)
    assert snapshot({k: v.numpy() for k, v in result.arrays.items()}) == snapshot(wrapper.returned[-1])
    assert inner.round == 3 and [h["clients-used"] for h in inner.history] == [5, 5, 5]


# ----------------------------------------------------------------------------------------- weighting, metrics
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


# ----------------------------------------------------------------------------------------- Flower start()
@pytest.mark.parametrize("name", ["fedsb", "flora", "flexlora", "flora-lora"])
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
