"""Exactness and validation of the nested-adapter aggregators (fedlora/aggregation.py, docs/design.md §1–2).

Every exactness test builds the explicit dense updates ΔWᵢ = s·B·(…)·A in float64 from orthonormal
outer factors of random non-square layers and compares s·B·aggregate·A with Σ pᵢΔWᵢ.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import numpy as np
import pytest

from fedlora.aggregation import (
    AggregationError,
    apply_increment,
    exact_mean,
    hetero_mean,
    normalize_weights,
    stack_inner,
    validate_state,
)

LAYERS = {"enc.0.attn.query": (96, 64), "enc.1.mlp.down": (48, 80)}  # d × k, non-square
R = 16
ALPHA = 32.0
S = ALPHA / R
RAW = [3.0, 1.0, 7.0, 2.0, 5.0]
P = np.asarray(RAW) / sum(RAW)
HET_RANKS = [16, 8, 4, 16, 8]  # r, r/2, r/4
INNER_RANKS = [4, 3, 2, 2, 1]
MODULES = {"classifier.weight": (3, 8), "classifier.bias": (3,)}
TOL = 1e-10


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def outer() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """layer → (B d×r, A r×k), orthonormal, from a float64 SVD of a random W."""
    rng = np.random.default_rng(1234)
    out = {}
    for layer, (d, k) in LAYERS.items():
        U, _, Vt = np.linalg.svd(rng.standard_normal((d, k)), full_matrices=False)
        out[layer] = (U[:, :R].copy(), Vt[:R].copy())
    return out


def modules(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(shape) for k, shape in MODULES.items()}


def sb_states(seed: int = 0, ranks: list[int] | None = None) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ranks = ranks or [R] * len(RAW)
    return [{**{f"{L}.R": rng.standard_normal((r_i, r_i)) for L in LAYERS}, **modules(rng)} for r_i in ranks]


def nora_states(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    states = []
    for r_i, q_i in zip(HET_RANKS, INNER_RANKS):
        st: dict[str, np.ndarray] = {}
        for L in LAYERS:
            st[f"{L}.P"] = rng.standard_normal((r_i, q_i))
            st[f"{L}.Q"] = rng.standard_normal((q_i, r_i))
        st.update(modules(rng))
        states.append(st)
    return states


def snapshot(states):
    return copy.deepcopy(states)


def assert_same(a, b) -> None:
    """Deep bit-exact comparison of (lists of) state dicts, dtype included."""
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    assert list(a.keys()) == list(b.keys())
    for k in a:
        if not isinstance(a[k], np.ndarray):
            assert a[k] == b[k], k
            continue
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def assert_no_alias(out: dict, states: list[dict]) -> None:
    for v in out.values():
        for st in states:
            for w in st.values():
                assert not np.shares_memory(v, w)


def check_modules(out: dict, states: list[dict]) -> None:
    for key in MODULES:
        want = sum(p * st[key] for p, st in zip(P, states))
        assert rel(out[key], want) <= TOL


# ------------------------------------------------------------------------------------------- exactness
def test_outer_factors_orthonormal(outer) -> None:
    for B, A in outer.values():
        assert np.allclose(B.T @ B, np.eye(R), atol=1e-12)
        assert np.allclose(A @ A.T, np.eye(R), atol=1e-12)


def test_normalize_weights() -> None:
    p = normalize_weights(RAW)
    assert p.dtype == np.float64 and p.shape == (5,)
    assert abs(p.sum() - 1.0) < 1e-15
    np.testing.assert_allclose(p, P, rtol=1e-15)
    np.testing.assert_allclose(normalize_weights([1e308, 1e308, 0.0]), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(normalize_weights(np.array([2, 6])), [0.25, 0.75])


def test_exact_mean_full_rank_matches_dense_mean(outer) -> None:
    states = sb_states(1)
    before = snapshot(states)
    out = exact_mean(states, RAW)
    assert_same(states, before)
    assert_no_alias(out, states)
    assert list(out) == list(states[0])
    for L, (B, A) in outer.items():
        want = sum(p * S * B @ st[f"{L}.R"] @ A for p, st in zip(P, states))
        got = S * B @ out[f"{L}.R"] @ A
        assert out[f"{L}.R"].dtype == np.float64
        assert rel(got, want) <= TOL
    check_modules(out, states)


def test_exact_mean_keeps_dtype_float32() -> None:
    states64 = sb_states(2)
    states32 = [{k: v.astype(np.float32) for k, v in st.items()} for st in states64]
    out32 = exact_mean(states32, RAW)
    out64 = exact_mean([{k: v.astype(np.float64) for k, v in st.items()} for st in states32], RAW)
    for k in out32:
        assert out32[k].dtype == np.float32
        np.testing.assert_allclose(out32[k], out64[k].astype(np.float32), rtol=0, atol=0)


def test_zero_weight_client_is_ignored() -> None:
    states = sb_states(3)
    out = exact_mean(states, [1.0, 0.0, 1.0, 0.0, 0.0])
    for k in out:
        np.testing.assert_allclose(out[k], 0.5 * (states[0][k] + states[2][k]), rtol=1e-14, atol=1e-15)


def per_entry_renormalised(states: list[dict], ranks: list[int], key: str) -> np.ndarray:
    """HetLoRA-style wrong rule: each entry averaged only over the clients whose block covers it."""
    num = np.zeros((R, R))
    den = np.zeros((R, R))
    for p, st, r_i in zip(P, states, ranks):
        num[:r_i, :r_i] += p * st[key]
        den[:r_i, :r_i] += p
    return num / den


def test_hetero_mean_matches_dense_mean_and_per_entry_does_not(outer) -> None:
    states = sb_states(4, HET_RANKS)
    before = snapshot(states)
    out = hetero_mean(states, RAW, R)
    assert_same(states, before)
    assert_no_alias(out, states)
    for L, (B, A) in outer.items():
        # each client's own ΔWᵢ uses the first rᵢ outer directions (no padding involved)
        want = sum(p * S * B[:, :r] @ st[f"{L}.R"] @ A[:r] for p, st, r in zip(P, states, HET_RANKS))
        assert out[f"{L}.R"].shape == (R, R)
        assert rel(S * B @ out[f"{L}.R"] @ A, want) <= TOL
        wrong = per_entry_renormalised(states, HET_RANKS, f"{L}.R")
        assert rel(S * B @ wrong @ A, want) > 1e-2
    check_modules(out, states)


def test_hetero_mean_rank_consistency() -> None:
    states = sb_states(5, HET_RANKS)
    states[2]["enc.1.mlp.down.R"] = np.ones((8, 8))  # client 2 is rank 4 on its other layer
    with pytest.raises(AggregationError) as ei:
        hetero_mean(states, RAW, R)
    assert ei.value.client == 2 and ei.value.key == "enc.1.mlp.down.R"
    hetero_mean(states, RAW, R, check_rank_consistency=False)  # allowed when asked


@pytest.mark.parametrize("r_arg", [R, None])
def test_stack_inner_matches_dense_mean(outer, r_arg) -> None:
    states = nora_states(6)
    before = snapshot(states)
    out = stack_inner(states, RAW, r_arg, return_factors=True)
    assert_same(states, before)
    assert_no_alias(out, states)
    q_total = sum(INNER_RANKS)
    for L, (B, A) in outer.items():
        want = sum(p * S * B[:, :r] @ st[f"{L}.P"] @ st[f"{L}.Q"] @ A[:r] for p, st, r in zip(P, states, HET_RANKS))
        inc = out[f"{L}.R"]
        assert inc.shape == (R, R)
        assert rel(S * B @ inc @ A, want) <= TOL
        assert out[f"{L}.P_stack"].shape == (R, q_total)
        assert out[f"{L}.Q_stack"].shape == (q_total, R)
        np.testing.assert_allclose(out[f"{L}.P_stack"] @ out[f"{L}.Q_stack"], inc, rtol=0, atol=1e-14)
        # HetLoRA-style averaging of padded P and Q separately is not the mean of the products
        Pbar = np.zeros((R, max(INNER_RANKS)))
        Qbar = np.zeros((max(INNER_RANKS), R))
        for p, st, r, q in zip(P, states, HET_RANKS, INNER_RANKS):
            Pbar[:r, :q] += p * st[f"{L}.P"]
            Qbar[:q, :r] += p * st[f"{L}.Q"]
        assert rel(S * B @ Pbar @ Qbar @ A, want) > 1e-2
    check_modules(out, states)
    assert not any(k.endswith("_stack") for k in stack_inner(states, RAW, r_arg))


def test_stack_inner_default_r_is_max_rank_per_layer() -> None:
    states = nora_states(7)
    small = [
        {k: v[:4, :] if k.endswith(".P") else v[:, :4] if k.endswith(".Q") else v for k, v in st.items()}
        for st in states
    ]  # every client rank ≤ 4
    out = stack_inner(small, RAW)
    assert out["enc.0.attn.query.R"].shape == (4, 4)
    assert stack_inner(small, RAW, R)["enc.0.attn.query.R"].shape == (R, R)


def test_stack_inner_rank_consistency() -> None:
    states = nora_states(13)
    q = INNER_RANKS[1]
    states[1]["enc.1.mlp.down.P"] = np.ones((4, q))  # client 1 is rank 8 on its other layer
    states[1]["enc.1.mlp.down.Q"] = np.ones((q, 4))
    with pytest.raises(AggregationError) as ei:
        stack_inner(states, RAW, R)
    assert ei.value.client == 1 and ei.value.key == "enc.1.mlp.down.P"
    out = stack_inner(states, RAW, R, check_rank_consistency=False)
    want = np.zeros((R, R))
    for p, st in zip(P, states):
        pq = st["enc.1.mlp.down.P"] @ st["enc.1.mlp.down.Q"]
        want[: pq.shape[0], : pq.shape[1]] += p * pq
    np.testing.assert_allclose(out["enc.1.mlp.down.R"], want, rtol=1e-13, atol=1e-14)


def test_full_round_apply_increment(outer) -> None:
    """Global R0 + stacked increment reproduces W + s·B·R0·A + Σ pᵢΔWᵢ."""
    rng = np.random.default_rng(8)
    glob = {**{f"{L}.R0": rng.standard_normal((R, R)) for L in LAYERS}, **modules(rng)}
    glob_before = snapshot(glob)
    states = nora_states(9)
    inc = stack_inner(states, RAW, R, return_factors=True)  # *_stack keys are ignored by apply_increment
    inc_before = snapshot(inc)
    new = apply_increment(glob, inc)
    assert_same(glob, glob_before)
    assert_same(inc, inc_before)
    assert_no_alias(new, [glob, inc])
    assert list(new) == list(glob)
    for L, (B, A) in outer.items():
        want = S * B @ glob[f"{L}.R0"] @ A + sum(
            p * S * B[:, :r] @ st[f"{L}.P"] @ st[f"{L}.Q"] @ A[:r] for p, st, r in zip(P, states, HET_RANKS)
        )
        assert rel(S * B @ new[f"{L}.R0"] @ A, want) <= TOL
    for key in MODULES:
        assert new[key].tobytes() == inc[key].tobytes()


def test_apply_increment_dtype_and_errors() -> None:
    glob = {"L.R0": np.zeros((4, 4), np.float32), "head.weight": np.zeros((2, 3), np.float32)}
    inc = {"L.R": np.ones((4, 4)), "head.weight": np.full((2, 3), 2.0)}
    new = apply_increment(glob, inc)
    assert new["L.R0"].dtype == np.float32 and np.all(new["L.R0"] == 1.0)
    assert new["head.weight"].dtype == np.float32 and np.all(new["head.weight"] == 2.0)
    cases = [
        ({"L.R": np.ones((4, 4))}, "head.weight"),  # strict: module not updated
        ({**inc, "M.R": np.ones((4, 4))}, "M.R"),  # no M.R0 target
        ({**inc, "extra.bias": np.ones(2)}, "extra.bias"),  # unknown module key
        ({**inc, "L.R": np.ones((3, 3))}, "L.R"),  # shape mismatch
        ({**inc, "L.R": np.full((4, 4), np.nan)}, "L.R"),  # NaN
        ({**inc, "L.R0": np.ones((4, 4))}, "L.R0"),  # R0-keyed increment refused
    ]
    for bad, key in cases:
        before = snapshot(bad)
        with pytest.raises(AggregationError) as ei:
            apply_increment(glob, bad)
        assert ei.value.key == key, (key, str(ei.value))
        assert repr(key) in str(ei.value)
        assert_same(bad, before)
    assert np.all(apply_increment(glob, {"L.R": np.ones((4, 4))}, strict=False)["head.weight"] == 0.0)


# ------------------------------------------------------------------------------------------ validation
def _set(client: int, key: str, fn: Callable[[np.ndarray], np.ndarray]):
    def corrupt(states):
        states[client][key] = fn(states[client][key].copy())
        return states

    return corrupt


def _nan(a: np.ndarray) -> np.ndarray:
    a.flat[a.size // 2] = np.nan
    return a


def _inf(a: np.ndarray) -> np.ndarray:
    a.flat[0] = -np.inf
    return a


def _delete(client: int, key: str):
    def corrupt(states):
        del states[client][key]
        return states

    return corrupt


def _add(client: int, key: str, value: np.ndarray):
    def corrupt(states):
        states[client][key] = value
        return states

    return corrupt


def _call(mode: str, states, weights=RAW):
    if mode == "exact":
        return exact_mean(states, weights)
    if mode == "hetero":
        return hetero_mean(states, weights, R)
    return stack_inner(states, weights, R)


def _valid(mode: str):
    return {
        "exact": lambda: sb_states(10),
        "hetero": lambda: sb_states(10, HET_RANKS),
        "stack": lambda: nora_states(10),
    }[mode]()


def _corruptions(mode: str, c: int):
    """(name, corrupt(states) -> states, expected key) for client c."""
    layer = "enc.1.mlp.down"
    main = f"{layer}.P" if mode == "stack" else f"{layer}.R"
    other = f"{layer}.Q" if mode == "stack" else main
    out = [
        ("nan-layer", _set(c, main, _nan), main),
        ("inf-layer", _set(c, other, _inf), other),
        ("nan-module", _set(c, "classifier.bias", _nan), "classifier.bias"),
        ("inf-module", _set(c, "classifier.weight", _inf), "classifier.weight"),
        ("shape-module", _set(c, "classifier.weight", lambda a: np.zeros((3, 9))), "classifier.weight"),
        ("missing-layer", _delete(c, main), main),
        ("missing-module", _delete(c, "classifier.bias"), "classifier.bias"),
        ("extra-key", _add(c, "pooler.dense.weight", np.zeros((2, 2))), "pooler.dense.weight"),
        ("int-dtype", _set(c, "classifier.bias", lambda a: a.astype(np.int64)), "classifier.bias"),
        ("not-ndarray", _set(c, "classifier.bias", lambda a: a.tolist()), "classifier.bias"),
    ]
    if mode == "exact":
        out.append(("shape-layer", _set(c, main, lambda a: np.zeros((R, R - 1))), main))
    if mode == "hetero":
        out.append(("non-square", _set(c, main, lambda a: np.zeros((4, 5))), main))

        def too_big(states):  # every layer, so the client's rank stays consistent
            for L in LAYERS:
                states[c][f"{L}.R"] = np.zeros((R + 4, R + 4))
            return states

        out.append(("rank>r", too_big, "enc.0.attn.query.R"))
    if mode == "stack":
        out.append(("pq-mismatch", _set(c, other, lambda a: np.zeros((a.shape[0], a.shape[1] + 1))), other))
        out.append(("P-1d", _set(c, main, lambda a: a.ravel()), main))

        def bigger(states):  # every layer, so the client's rank stays consistent
            for L in LAYERS:
                q = states[c][f"{L}.P"].shape[1]
                states[c][f"{L}.P"] = np.ones((R + 4, q))
                states[c][f"{L}.Q"] = np.ones((q, R + 4))
            return states

        out.append(("rank>r", bigger, "enc.0.attn.query.P"))
        out.append(("no-partner", _add(c, "enc.9.Q", np.zeros((1, 4))), "enc.9.Q"))
    return out


CASES = [
    (mode, c, name, fn, key)
    for mode in ("exact", "hetero", "stack")
    for c in (0, 3)
    for name, fn, key in _corruptions(mode, c)
]


@pytest.mark.parametrize(
    ("mode", "client", "name", "corrupt", "key"), CASES, ids=[f"{m}-c{c}-{n}" for m, c, n, _, _ in CASES]
)
def test_invalid_state_names_client_and_key(mode, client, name, corrupt, key) -> None:
    states = corrupt(_valid(mode))
    before = snapshot(states)
    with pytest.raises(AggregationError) as ei:
        _call(mode, states)
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.client == client, str(err)
    assert err.key == key, str(err)
    assert f"client {client}" in str(err) and repr(key) in str(err)
    assert_same(states, before)


@pytest.mark.parametrize("mode", ["exact", "hetero", "stack"])
@pytest.mark.parametrize(
    ("weights", "client"),
    [
        ([3.0, 1.0, -7.0, 2.0, 5.0], 2),
        ([3.0, 1.0, 7.0, np.nan, 5.0], 3),
        ([np.inf, 1.0, 7.0, 2.0, 5.0], 0),
        ([0.0, 0.0, 0.0, 0.0, 0.0], None),
    ],
)
def test_invalid_weights(mode, weights, client) -> None:
    states = _valid(mode)
    before = snapshot(states)
    with pytest.raises(AggregationError) as ei:
        _call(mode, states, weights)
    assert ei.value.client == client
    if client is None:
        assert "sum" in str(ei.value)
    else:
        assert f"client {client}" in str(ei.value)
    assert_same(states, before)


@pytest.mark.parametrize("mode", ["exact", "hetero", "stack"])
def test_structural_errors(mode) -> None:
    states = _valid(mode)
    with pytest.raises(AggregationError, match="4 weights"):
        _call(mode, states, RAW[:4])
    with pytest.raises(AggregationError, match="sequence"):
        _call(mode, states[0])
    with pytest.raises(AggregationError, match="no client"):
        _call(mode, [], [])
    with pytest.raises(AggregationError) as ei:
        _call(mode, [*states[:2], [1, 2], *states[3:]])
    assert ei.value.client == 2


def test_bad_global_rank() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(AggregationError, match="positive integer"):
            hetero_mean(sb_states(11), RAW, bad)
        with pytest.raises(AggregationError, match="positive integer"):
            stack_inner(nora_states(11), RAW, bad)


def test_output_key_collision() -> None:
    states = nora_states(12)
    for st in states:
        st["enc.0.attn.query.R"] = np.zeros((2, 2))
    with pytest.raises(AggregationError) as ei:
        stack_inner(states, RAW)
    assert ei.value.key == "enc.0.attn.query.R"


def test_validate_state() -> None:
    spec = {"L.R": (None, None), "L.R0": (R, R), "head.bias": (3,)}
    good = {"L.R": np.zeros((4, 4)), "L.R0": np.zeros((R, R)), "head.bias": np.zeros(3, np.float32)}
    before = snapshot(good)
    validate_state(good, spec, client=7)
    assert_same(good, before)
    bad_cases = [
        ({k: v for k, v in good.items() if k != "L.R0"}, "L.R0"),
        ({**good, "x.weight": np.zeros(1)}, "x.weight"),
        ({**good, "L.R0": np.zeros((R, R + 1))}, "L.R0"),
        ({**good, "L.R": np.zeros(4)}, "L.R"),
        ({**good, "head.bias": np.zeros(3, np.int32)}, "head.bias"),
        ({**good, "head.bias": np.array([0.0, np.nan, 0.0])}, "head.bias"),
        ({**good, "head.bias": np.array([0.0, np.inf, 0.0])}, "head.bias"),
        ({**good, "head.bias": [0.0, 0.0, 0.0]}, "head.bias"),
    ]
    for bad, key in bad_cases:
        with pytest.raises(AggregationError) as ei:
            validate_state(bad, spec, client=7)
        assert ei.value.client == 7 and ei.value.key == key, str(ei.value)
        assert "client 7" in str(ei.value) and repr(key) in str(ei.value)
    with pytest.raises(AggregationError):
        validate_state([good], spec)


def test_error_pickles() -> None:
    err = AggregationError("boom", client=3, key="L.P")
    assert str(err) == "client 3, key 'L.P': boom"
    back = pickle.loads(pickle.dumps(err))
    assert (back.client, back.key, str(back)) == (3, "L.P", str(err))
    assert str(AggregationError("plain")) == "plain"


def test_in_key_order_keeps_client_zero_order_and_builds_each_group_once() -> None:
    from fedlora.aggregation.weighted import in_key_order

    keys = ["a.P", "head.w", "a.Q", "b.P", "b.Q", "head.b"]
    calls: list[str] = []

    def build(layer: str) -> dict[str, str]:
        calls.append(layer)
        return {f"{layer}.R": f"R({layer})"}

    out = in_key_order(keys, {"head.w": "w", "head.b": "b"}, lambda k: k[:-2], build)
    assert list(out) == ["a.R", "head.w", "b.R", "head.b"] and calls == ["a", "b"]
    assert out["a.R"] == "R(a)" and out["head.b"] == "b"
