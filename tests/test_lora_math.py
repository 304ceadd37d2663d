"""peft LoRA baseline math (fedlora/lora_math.py): which rules are exact, and the shared validation.

Each client's dense update is ΔWᵢ = s·Bᵢ·Aᵢ (float64); an aggregate is compared with Σ pᵢΔWᵢ.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fedlora.aggregation import AggregationError
from fedlora.lora_math import (
    dense_delta,
    fedit_mean,
    ffa_mean,
    flexlora_aggregate,
    flexlora_truncation_errors,
    flora_lora_stack,
)

PREFIXES = {
    "base_model.model.enc.0.attn.query": (96, 64),  # d × k
    "base_model.model.enc.1.mlp.down": (48, 80),
}
R = 16
S = 32.0 / R
RAW = [3.0, 1.0, 7.0, 2.0, 5.0]
P = np.asarray(RAW) / sum(RAW)
HET_RANKS = [16, 8, 4, 16, 8]
MODULES = {
    "base_model.model.classifier.modules_to_save.weight": (3, 8),
    "base_model.model.classifier.modules_to_save.bias": (3,),
}
TOL = 1e-10
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def lora_states(seed: int = 0, ranks: list[int] | None = None, shared_a: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    ranks = ranks or [R] * len(RAW)
    frozen = {pre: rng.standard_normal((R, k)) / np.sqrt(k) for pre, (_, k) in PREFIXES.items()}
    states = []
    for r_i in ranks:
        st: dict[str, np.ndarray] = {}
        for pre, (d, k) in PREFIXES.items():
            st[pre + A_KEY] = frozen[pre].copy() if shared_a else rng.standard_normal((r_i, k)) / np.sqrt(k)
            st[pre + B_KEY] = rng.standard_normal((d, r_i))
        st.update({key: rng.standard_normal(shape) for key, shape in MODULES.items()})
        states.append(st)
    return states


def dense_mean(states: list[dict], prefix: str) -> np.ndarray:
    return sum(p * S * st[prefix + B_KEY] @ st[prefix + A_KEY] for p, st in zip(P, states))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x) == list(y)
        for k in x:
            if not isinstance(x[k], np.ndarray):
                assert x[k] == y[k]
                continue
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and x[k].tobytes() == y[k].tobytes()


def check_modules(out: dict, states: list[dict]) -> None:
    for key in MODULES:
        assert rel(out[key], sum(p * st[key] for p, st in zip(P, states))) <= TOL


def arrays_of(obj) -> list[np.ndarray]:
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in arrays_of(v)]
    return [a for v in obj for a in arrays_of(v)]


def assert_no_alias(out, states: list[dict]) -> None:
    for v in arrays_of(out):
        for w in arrays_of(states):
            assert not np.shares_memory(v, w)


# ------------------------------------------------------------------------------------------- exactness
def test_fedit_is_not_exact() -> None:
    states = lora_states(1)
    before = copy.deepcopy(states)
    out = fedit_mean(states, RAW)
    assert_same(states, before)
    assert_no_alias(out, states)
    assert list(out) == list(states[0])
    for pre in PREFIXES:
        np.testing.assert_allclose(out[pre + A_KEY], sum(p * st[pre + A_KEY] for p, st in zip(P, states)))
        err = rel(S * out[pre + B_KEY] @ out[pre + A_KEY], dense_mean(states, pre))
        assert err > 1e-2, err
    check_modules(out, states)


def test_ffa_is_exact_with_shared_frozen_a() -> None:
    states = lora_states(2, shared_a=True)
    before = copy.deepcopy(states)
    out = ffa_mean(states, RAW)
    assert_same(states, before)
    assert_no_alias(out, states)
    for pre in PREFIXES:
        assert out[pre + A_KEY].tobytes() == states[0][pre + A_KEY].tobytes()
        assert rel(S * out[pre + B_KEY] @ out[pre + A_KEY], dense_mean(states, pre)) <= TOL
    check_modules(out, states)


@pytest.mark.parametrize("client", [0, 2])
def test_ffa_rejects_non_identical_a(client) -> None:
    states = lora_states(3, shared_a=True)
    key = "base_model.model.enc.1.mlp.down" + A_KEY
    a = states[client][key].copy()
    a[5, 7] = np.nextafter(a[5, 7], np.inf)  # one ulp
    states[client][key] = a
    before = copy.deepcopy(states)
    with pytest.raises(AggregationError) as ei:
        ffa_mean(states, RAW)
    assert ei.value.client == client and ei.value.key == key
    assert f"client {client}" in str(ei.value) and "bit-identical" in str(ei.value)
    assert_same(states, before)
    # a different dtype with equal values is not bit-identical either
    states = lora_states(3, shared_a=True)
    states[client][key] = states[client][key].astype(np.float32)
    with pytest.raises(AggregationError) as ei:
        ffa_mean(states, RAW)
    assert ei.value.client == client


def test_flora_lora_stack_is_exact_with_heterogeneous_ranks() -> None:
    states = lora_states(4, HET_RANKS)
    before = copy.deepcopy(states)
    out = flora_lora_stack(states, RAW)
    assert_same(states, before)
    assert_no_alias(out, states)
    for pre, (d, k) in PREFIXES.items():
        B_stack, A_stack = out[pre]
        assert B_stack.shape == (d, sum(HET_RANKS)) and A_stack.shape == (sum(HET_RANKS), k)
        assert rel(S * dense_delta(B_stack, A_stack), dense_mean(states, pre)) <= TOL
        np.testing.assert_array_equal(A_stack[:R], states[0][pre + A_KEY])
    check_modules(out, states)
    assert [k for k, v in out.items() if not isinstance(v, tuple)] == list(MODULES)


def test_dense_delta() -> None:
    rng = np.random.default_rng(5)
    B, A = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    out = dense_delta(B, A)
    assert out.dtype == np.float32 and out.shape == (6, 4)
    np.testing.assert_allclose(out, B.astype(np.float64) @ A.astype(np.float64), rtol=1e-6)
    assert dense_delta(B.astype(np.float64), A).dtype == np.float64
    for bad in [(B, A.T), (B.ravel(), A), (B, np.full_like(A, np.nan)), (B.astype(int), A)]:
        with pytest.raises(AggregationError):
            dense_delta(*bad)


def test_flexlora_global_exact_and_truncation_lossy() -> None:
    states = lora_states(6, HET_RANKS)
    before = copy.deepcopy(states)
    dense, clients = flexlora_aggregate(states, RAW, HET_RANKS)
    assert_same(states, before)
    assert_no_alias((dense, clients), states)
    errors = flexlora_truncation_errors(dense, clients)
    for pre, (d, k) in PREFIXES.items():
        want = dense_mean(states, pre)
        assert dense[pre].shape == (d, k)
        assert rel(S * dense[pre], want) <= TOL
        sv = np.linalg.svd(dense[pre], compute_uv=False)
        for i, r_i in enumerate(HET_RANKS):
            B_i, A_i = clients[i][pre]
            assert B_i.shape == (d, r_i) and A_i.shape == (r_i, k)
            # rank of the sum is min(Σrⱼ = 52, d, k) > rᵢ: truncation loses the tail (Eckart–Young)
            tail = float(np.sqrt(np.sum(sv[r_i:] ** 2)) / np.linalg.norm(sv))
            assert errors[i][pre] > 1e-2
            assert abs(errors[i][pre] - tail) <= 1e-10
            assert rel(S * B_i @ A_i, want) == pytest.approx(tail, abs=1e-10)
            # √S split into both factors
            np.testing.assert_allclose(B_i.T @ B_i, np.diag(sv[:r_i]), atol=1e-9)
            np.testing.assert_allclose(A_i @ A_i.T, np.diag(sv[:r_i]), atol=1e-9)
    check_modules(dense, states)
    print(
        "FlexLoRA truncation errors (rank 16/8/4):",
        {r: round(errors[i][next(iter(PREFIXES))], 3) for i, r in enumerate(HET_RANKS)},
    )


def test_flexlora_full_rank_target_is_exact_and_deterministic() -> None:
    states = lora_states(7, HET_RANKS)
    targets = [64, 52, 4, 16, 8]  # 52 = Σ ranks; 64 > rank of every sum → zero-padded factors
    dense, clients = flexlora_aggregate(states, RAW, targets)
    errors = flexlora_truncation_errors(dense, clients)
    for pre, (d, k) in PREFIXES.items():
        assert errors[0][pre] <= TOL and errors[1][pre] <= TOL
        assert errors[2][pre] > errors[4][pre] > errors[3][pre] > 1e-3
        B0, A0 = clients[0][pre]
        assert B0.shape == (d, 64) and A0.shape == (64, k)
        true_rank = min(sum(HET_RANKS), d, k)
        assert not B0[:, true_rank:].any() and not A0[true_rank:].any()
    dense2, clients2 = flexlora_aggregate(states, RAW, targets)
    for pre in PREFIXES:
        for c1, c2 in zip(clients, clients2):
            assert c1[pre][0].tobytes() == c2[pre][0].tobytes() and c1[pre][1].tobytes() == c2[pre][1].tobytes()
        # canonical signs: the largest-|·| entry of each column of B is positive
        B0 = clients[0][pre][0][:, :4]
        assert np.all(B0[np.argmax(np.abs(B0), axis=0), np.arange(4)] > 0)


def test_float32_inputs_return_float32() -> None:
    states = [{k: v.astype(np.float32) for k, v in st.items()} for st in lora_states(8, HET_RANKS)]
    out = flora_lora_stack(states, RAW)
    dense, clients = flexlora_aggregate(states, RAW, HET_RANKS)
    pre = next(iter(PREFIXES))
    assert out[pre][0].dtype == np.float32 and out[pre][1].dtype == np.float32
    assert dense[pre].dtype == np.float32 and clients[1][pre][0].dtype == np.float32
    assert (
        fedit_mean([{k: v.astype(np.float32) for k, v in st.items()} for st in lora_states(8)], RAW)[pre + B_KEY].dtype
        == np.float32
    )


# ------------------------------------------------------------------------------------------ validation
FUNCS = {
    "fedit": lambda st, w: fedit_mean(st, w),
    "ffa": lambda st, w: ffa_mean(st, w),
    "flora": lambda st, w: flora_lora_stack(st, w),
    "flex": lambda st, w: flexlora_aggregate(st, w, HET_RANKS),
}
PRE = "base_model.model.enc.1.mlp.down"
MOD = "base_model.model.classifier.modules_to_save.bias"


def _valid(name: str) -> list[dict]:
    if name in ("flora", "flex"):
        return lora_states(9, HET_RANKS)
    return lora_states(9, shared_a=name == "ffa")


def _corrupt(states: list[dict], c: int, case: str) -> str:
    """Corrupt client c in place; return the key the error must name."""
    st = states[c]
    if case == "nan":
        a = st[PRE + B_KEY].copy()
        a[3, 1] = np.nan
        st[PRE + B_KEY] = a
        return PRE + B_KEY
    if case == "inf":
        a = st[PRE + A_KEY].copy()
        a[0, 0] = np.inf
        st[PRE + A_KEY] = a
        return PRE + A_KEY
    if case == "nan-module":
        st[MOD] = np.array([0.0, np.nan, 1.0])
        return MOD
    if case == "rank-mismatch":  # B's rank differs from A's
        st[PRE + B_KEY] = np.zeros((48, st[PRE + A_KEY].shape[0] + 1))
        return PRE + B_KEY
    if case == "wrong-d":
        st[PRE + B_KEY] = np.zeros((47, st[PRE + B_KEY].shape[1]))
        return PRE + B_KEY
    if case == "wrong-k":
        st[PRE + A_KEY] = np.zeros((st[PRE + A_KEY].shape[0], 81))
        return PRE + A_KEY
    if case == "module-shape":
        st[MOD] = np.zeros(4)
        return MOD
    if case == "missing":
        del st[PRE + A_KEY]
        return PRE + A_KEY
    if case == "extra":
        st["base_model.model.pooler.weight"] = np.zeros((2, 2))
        return "base_model.model.pooler.weight"
    if case == "not-float":
        st[MOD] = np.zeros(3, dtype=np.int32)
        return MOD
    raise AssertionError(case)


LORA_CASES = [
    "nan",
    "inf",
    "nan-module",
    "rank-mismatch",
    "wrong-d",
    "wrong-k",
    "module-shape",
    "missing",
    "extra",
    "not-float",
]


@pytest.mark.parametrize("func", list(FUNCS))
@pytest.mark.parametrize("client", [0, 3])
@pytest.mark.parametrize("case", LORA_CASES)
def test_invalid_lora_state_names_client_and_key(func, client, case) -> None:
    states = _valid(func)
    key = _corrupt(states, client, case)
    before = copy.deepcopy(states)
    with pytest.raises(AggregationError) as ei:
        FUNCS[func](states, RAW)
    assert ei.value.client == client and ei.value.key == key, str(ei.value)
    assert f"client {client}" in str(ei.value) and repr(key) in str(ei.value)
    assert_same(states, before)


@pytest.mark.parametrize("func", list(FUNCS))
@pytest.mark.parametrize(
    ("weights", "client"), [([3.0, 1.0, 7.0, -2.0, 5.0], 3), ([0.0] * 5, None), ([3.0, np.nan, 7.0, 2.0, 5.0], 1)]
)
def test_invalid_lora_weights(func, weights, client) -> None:
    states = _valid(func)
    before = copy.deepcopy(states)
    with pytest.raises(AggregationError) as ei:
        FUNCS[func](states, weights)
    assert ei.value.client == client
    assert_same(states, before)


@pytest.mark.parametrize("func", ["fedit", "ffa"])
def test_equal_rank_baselines_reject_heterogeneous_ranks(func) -> None:
    with pytest.raises(AggregationError) as ei:
        FUNCS[func](lora_states(10, HET_RANKS), RAW)
    assert ei.value.client is not None and ei.value.key is not None and "rank" in str(ei.value)


def test_flexlora_rejects_bad_ranks() -> None:
    states = lora_states(11, HET_RANKS)
    for ranks, client in [([16, 8, 0, 16, 8], 2), ([16, 8, 4, 16, 2.5], 4), ([16, 8], None), (16, None)]:
        with pytest.raises(AggregationError) as ei:
            flexlora_aggregate(states, RAW, ranks)
        assert ei.value.client == client


def test_missing_partner_in_every_client() -> None:
    states = lora_states(12)
    for st in states:
        del st[PRE + B_KEY]
    for func in FUNCS.values():
        with pytest.raises(AggregationError) as ei:
            func(states, RAW)
        assert ei.value.key == PRE + B_KEY
