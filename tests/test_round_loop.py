"""fedlora's round loop (``simulations.loop.run_rounds``) against Flower's ``Strategy.start``, in process
with synthetic clients: the same global state, the arrays ``aggregate_train`` returns carried into the next
round, bit-identical continuation from a checkpoint, and the round records."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord

from simulations.inprocess import server_task_identity
from simulations.loop import TooFewReplies, run_rounds
from strategies import UserLevelDP, load_strategy_state, save_strategy_state
from strategies import _testing as t
from strategies.wire import state_to_arrayrecord


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    with server_task_identity(run_id=1):
        yield


def _grid(strategy, silent: set[int] = frozenset()) -> t.FakeGrid:
    """Synthetic clients: uploads drawn from the node's per-round config seed; ``silent`` nodes never answer."""
    inner = getattr(strategy, "strategy", strategy)

    def client(msg):
        if t.node_of(msg) in silent:
            return None
        nid, rng = t.node_of(msg), np.random.default_rng(t.config_of(msg)["seed"])
        task = inner._tasks[nid]
        upload = t.random_upload(task.expected, rng)
        if inner.clip_norm is not None:  # user-level DP: an honest client clips (the server rejects it otherwise)
            upload = t.clipped_upload(upload, task.download, inner.clip_norm)
        return t.reply(msg, upload, num_examples=5 + nid % 11)

    return t.FakeGrid(t.NODE_IDS, client)


def _state(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.parametrize("name", ["fedsb", "hetero", "flora"])
def test_run_rounds_equals_flower_start(name):
    flower = t.make(name, with_initial=False, fraction_train=0.6, fraction_evaluate=0.0)
    result = flower.start(_grid(flower), state_to_arrayrecord(t.nested_global(t.R)), num_rounds=3, timeout=1)
    ours = t.make(name, fraction_train=0.6, fraction_evaluate=0.0)
    records = []
    final = run_rounds(_grid(ours), ours, num_rounds=3, timeout=1, on_round_end=lambda r, rec: records.append(rec))
    assert t.snapshot(_state(final)) == t.snapshot(_state(result.arrays)) == t.snapshot(ours.global_state)
    assert [r["round"] for r in records] == [1, 2, 3]
    for rec, (rnd, metrics) in zip(records, sorted(result.train_metrics_clientapp.items())):
        assert rec["round"] == rnd and rec["clients-used"] == metrics["clients-used"] == 3
        assert rec["used-nodes"] == flower.history[rnd - 1]["used-nodes"] and rec["round-seconds"] >= 0


class Shift:
    """A wrapper changing the arrays ``aggregate_train`` returns, without telling the wrapped strategy."""

    def __init__(self, strategy, shift: float) -> None:
        self.strategy, self.shift, self.returned = strategy, shift, []

    def __getattr__(self, name):  # round, history, min_train_nodes, configure_*, aggregate_evaluate, …
        return getattr(self.strategy, name)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.returned.append({k: v + self.shift for k, v in _state(arrays).items()})
        return state_to_arrayrecord(self.returned[-1]), MetricRecord(dict(metrics))


def test_arrays_returned_by_aggregate_train_start_the_next_round():
    inner = t.make("fedsb", fraction_evaluate=0.0)
    wrapper = Shift(inner, 0.5)
    grid = _grid(inner)
    final = run_rounds(grid, wrapper, num_rounds=3, timeout=1)
    batches = [b for b in grid.sent if b]
    for rnd in (2, 3):
        for m in batches[rnd - 1]:
            assert t.snapshot(t.arrays_of(m)) == t.snapshot(wrapper.returned[rnd - 2])
    assert t.snapshot(_state(final)) == t.snapshot(wrapper.returned[-1])


@pytest.mark.parametrize("dp", [False, True])
def test_resume_after_a_checkpoint_is_bit_identical(dp, tmp_path):
    def build():
        s = t.make("hetero", weighting="uniform", fraction_evaluate=0.0)
        return UserLevelDP(s, 0.7, 0.5, 1e-5, len(t.NODE_IDS)) if dp else s

    full = build()  # checkpointed after round 1, then runs on uninterrupted
    run_rounds(_grid(full), full, num_rounds=1, timeout=1)
    save_strategy_state(full.state_dict(), tmp_path)
    run_rounds(_grid(full), full, num_rounds=3, timeout=1)
    resumed = build()  # a new process: fresh strategy (and fresh OS-entropy noise), restored
    resumed.load_state_dict(load_strategy_state(tmp_path))
    records = []
    run_rounds(_grid(resumed), resumed, num_rounds=3, timeout=1, on_round_end=lambda r, rec: records.append(rec))
    assert [r["round"] for r in records] == [2, 3]
    assert t.snapshot(resumed.global_state) == t.snapshot(full.global_state)
    if dp:
        assert records[-1]["user-dp-epsilon"] == full.history[-1]["user-dp-epsilon"] > 0


def test_nodes_gone_stop_the_run_before_the_round_is_recorded():
    s = t.make("fedsb", min_train_nodes=3, fraction_evaluate=0.0)
    records = []
    with pytest.raises(TooFewReplies, match="round 2: 2 valid replies < min-train-nodes=3"):
        grid = _grid(s)
        run_rounds(grid, s, num_rounds=1, timeout=1, on_round_end=lambda r, rec: records.append(rec))
        run_rounds(_grid(s, silent=set(t.NODE_IDS[:3])), s, num_rounds=2, timeout=1,
                   on_round_end=lambda r, rec: records.append(rec))
    assert [r["round"] for r in records] == [1]
