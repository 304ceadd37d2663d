"""Checkpoint state (state_dict / load_state_dict) and its files (strategies.persistence)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from strategies import STRATEGIES, build_strategy, load_strategy_state, save_strategy_state
from strategies import _testing as t

ALL = sorted(STRATEGIES)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name, tmp_path):
    kw = {"fraction_train": 0.6, "seed": 7}
    if name in t.HETERO:
        kw["ranks"] = "uniform"
    s1 = t.make(name, **kw)
    msgs = t.configure(s1)
    rng = np.random.default_rng(11)
    s1.aggregate_train(1, [t.bad_reply("nan", s1, msgs[0], rng)] + t.good_replies(s1, msgs[1:]))
    state = s1.state_dict()
    json.dumps({k: v for k, v in state.items() if k != "global_state"})  # JSON-serialisable
    save_strategy_state(state, tmp_path / "ckpt")
    loaded = load_strategy_state(tmp_path / "ckpt")

    s2 = t.make(name, with_initial=False, **kw)
    s2.load_state_dict(loaded)
    assert t.snapshot(s2.global_state) == t.snapshot(s1.global_state)
    assert s2.history == s1.history and s2.round == s1.round == 1
    assert s2.history[0]["rejected"][0]["category"] == "non-finite"
    assert s2.assigner.state_dict() == s1.assigner.state_dict()

    # resume: s1 continues at Flower round 2, s2 is a fresh start() (Flower round 1); same round 2
    nodes = t.NODE_IDS + [606, 707]
    m1 = t.configure(s1, nodes, server_round=2)
    m2 = t.configure(s2, nodes, server_round=1)
    assert [t.node_of(m) for m in m1] == [t.node_of(m) for m in m2]
    assert [t.config_of(m) for m in m1] == [t.config_of(m) for m in m2]
    assert t.config_of(m2[0])["server-round"] == 2
    for a, b in zip(m1, m2):
        assert t.snapshot({k: v.numpy() for k, v in a.content["arrays"].items()}) == t.snapshot(
            {k: v.numpy() for k, v in b.content["arrays"].items()}
        )
    s1.aggregate_train(2, t.good_replies(s1, m1, seed=3))
    s2.aggregate_train(1, t.good_replies(s2, m2, seed=3))
    assert t.snapshot(s1.global_state) == t.snapshot(s2.global_state)
    assert s2.round == 2 and len(s2.history) == 2


def test_load_state_dict_rejects_mismatch():
    s = t.make("fedsb")
    state = s.state_dict()
    with pytest.raises(ValueError, match="strategy"):
        t.make("hetero").load_state_dict(state)
    other = build_strategy("fedsb", rank=4, outer_fingerprint=t.FINGERPRINT)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)
    other = build_strategy("fedsb", rank=t.R, outer_fingerprint="e" * 64)
    with pytest.raises(ValueError, match="outer_fingerprint"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        t.make("fedsb").load_state_dict({**state, "format": "fedlora.strategy/0"})


def test_files_keep_dtypes_and_extra_keys(tmp_path):
    """float32 arrays stay float32 on disk; a wrapper's extra JSON key survives; no state → no npz."""
    s = t.make("fedsb", initial_state={k: v.astype(np.float32) for k, v in t.make("fedsb").global_state.items()})
    state = {**s.state_dict(), "user-dp": {"rng": {"state": 2**100}}}
    save_strategy_state(state, tmp_path / "a")
    back = load_strategy_state(tmp_path / "a")
    assert t.snapshot(back["global_state"]) == t.snapshot(s.global_state)
    assert {v.dtype for v in back["global_state"].values()} == {np.dtype(np.float32)}
    assert back["user-dp"] == {"rng": {"state": 2**100}}
    save_strategy_state(t.make("fedsb", with_initial=False).state_dict(), tmp_path / "b")
    assert not (tmp_path / "b" / "global_state.npz").exists()
    assert load_strategy_state(tmp_path / "b")["global_state"] is None
