"""Checkpoint state (state_dict / load_state_dict) and its files (strategies.persistence)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from strategies import STRATEGIES, build_strategy, load_strategy_state, save_strategy_state
from strategies import _testing as t
from strategies.persistence import state_files, state_from_files, tree_files, tree_from_files

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
        assert t.snapshot(t.arrays_of(a)) == t.snapshot(t.arrays_of(b))
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
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["global_state.safetensors", "strategy.json"]
    save_strategy_state(t.make("fedsb", with_initial=False).state_dict(), tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["strategy.json"]
    assert load_strategy_state(tmp_path / "b")["global_state"] is None


def test_no_pickle_the_global_state_is_plain_safetensors(tmp_path):
    """Any safetensors reader gets the global state under its own keys; nothing on disk is a pickle."""
    from safetensors.numpy import load_file

    s = t.make("hetero", ranks="uniform")
    save_strategy_state(s.state_dict(), tmp_path)
    on_disk = load_file(str(tmp_path / "global_state.safetensors"))
    assert t.snapshot(on_disk) == t.snapshot(s.global_state)
    for path in tmp_path.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), path  # the pickle protocol 2+ opcode


def _nan_equal(a, b) -> bool:
    """Equality of decoded trees where NaN == NaN and arrays compare by dtype, shape and bytes."""
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_nan_equal, a, b))
    return type(a) is type(b) and a == b


def test_json_trees_and_arrays_come_back_exactly():
    """Floats to the last bit (NaN, ±inf, subnormals), huge ints, bools vs ints, nested arrays of every
    dtype/shape (0-d, empty, non-contiguous) inside the JSON part: all exact."""
    rng = np.random.default_rng(3)
    arr = rng.standard_normal((4, 3))
    tree = {
        "floats": [0.1, 1 / 3, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1.7976931348623157e308],
        "ints": [0, -1, 2**100, True, False], "none": None, "s": "é✓",
        "gen": np.random.default_rng(9).bit_generator.state,
        "arrays": {"f32": arr.astype(np.float32), "T": arr.T, "u32": np.arange(7, dtype=np.uint32),
                   "u8": np.arange(5, dtype=np.uint8), "b": np.array([True, False]), "scalar": np.array(2.5),
                   "empty": np.zeros((0, 3))},
    }
    files = tree_files(tree, "x")
    assert sorted(files) == ["x.json", "x.safetensors"]
    back = tree_from_files(files, "x")
    assert _nan_equal(tree, back)
    assert not _nan_equal(tree, {**back, "ints": [0, -1, 2**100, 1, 0]})  # bools stay bools (the check can fail)
    g = np.random.default_rng()
    g.bit_generator.state = back["gen"]
    assert g.random() == np.random.default_rng(9).random()


@pytest.mark.parametrize("bad, where", [
    ({"h": [(1, 2)]}, "/h[0]"),                 # tuple: JSON would give a list
    ({"ranks": {101: 4}}, "/ranks"),           # int key: JSON would give "101"
    ({"x": np.float64(1.0)}, "/x"),             # numpy scalar
    ({"x": {"$array": "a0"}}, "/x"),            # the reserved array-reference key
    ({"x": {1, 2}}, "/x"),
])
def test_values_json_would_change_are_refused_naming_the_path(bad, where):
    with pytest.raises(TypeError, match=re.escape(f"state {where}:")):
        tree_files(bad, "x")


def test_state_files_detect_a_global_state_that_does_not_match_its_key_list():
    files = state_files(t.make("fedsb").state_dict())
    wrong = state_files({**t.make("fedsb").state_dict(), "global_state": {"z": np.zeros(1)}})
    with pytest.raises(ValueError, match="global_state.safetensors holds"):
        state_from_files({**files, "global_state.safetensors": wrong["global_state.safetensors"]})
