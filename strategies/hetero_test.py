"""HeteroRank: zero-padded exact mean of rᵢ×rᵢ updates, ranks {r, r/2, r/4}."""

from __future__ import annotations

import numpy as np
import pytest

from strategies._testing import (
    LAYERS,
    NODE_IDS,
    R,
    arrays_of,
    configure,
    good_replies,
    make,
    pad,
    run_nested_rounds,
)


def test_hetero_dense_update_is_exact_weighted_mean():
    errors = run_nested_rounds(
        "hetero", lambda up, layer: up[f"{layer}.R"], rounds=3, ranks=f"{R},{R // 2},{R // 4}"
    )
    for round_errors in errors:
        for key, err in round_errors.items():
            assert err <= 1e-10, (key, err)


def test_hetero_expected_shape_follows_assigned_rank_and_is_stable():

    s = make("hetero", ranks=f"{R},{R // 2},{R // 4}")
    msgs = configure(s)
    first = {nid: s._tasks[nid].rank for nid in NODE_IDS}
    assert sorted(first.values()) == [2, 4, 4, 8, 8]
    for nid in NODE_IDS:
        r_i = first[nid]
        for layer in LAYERS:
            assert s._tasks[nid].expected[f"{layer}.R"] == (r_i, r_i)
    s.aggregate_train(1, good_replies(s, msgs))
    configure(s, server_round=2)
    assert {nid: s._tasks[nid].rank for nid in NODE_IDS} == first
    # every node downloads the full r×r global state (design condition 4)
    for m in msgs:
        assert arrays_of(m)[f"{next(iter(LAYERS))}.R0"].shape == (R, R)


def test_per_entry_renormalised_mean_would_fail_the_check():
    """Sanity of the check itself: the wrong (per-entry renormalised) rule is far from Σ pᵢΔWᵢ."""
    rng = np.random.default_rng(0)
    ranks = [8, 4, 2, 8, 4]
    p = np.array([10, 40, 25, 7, 90], float)
    p /= p.sum()
    Rs = [rng.standard_normal((r, r)) for r in ranks]
    exact = sum(pi * pad(Ri, R) for pi, Ri in zip(p, Rs))
    cover = sum(pi * pad(np.ones((r, r)), R) for pi, r in zip(p, ranks))
    wrong = exact / cover
    assert np.linalg.norm(wrong - exact) / np.linalg.norm(exact) > 1e-2
    with pytest.raises(AssertionError):
        assert np.linalg.norm(wrong - exact) / np.linalg.norm(exact) <= 1e-10
