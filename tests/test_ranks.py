"""RankAssigner: specs, stability per node, distributions, serialisable state."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedlora.ranks import RankAssigner


def test_constant_and_default():
    assert RankAssigner(None, max_rank=16).assign([5, 9]) == {5: 16, 9: 16}
    assert RankAssigner(8, max_rank=16).assign([5]) == {5: 8}
    assert RankAssigner("4", max_rank=16).rank_of(3) == 4
    assert not RankAssigner("8", max_rank=16).heterogeneous


def test_cycle_is_balanced_and_stable_across_rounds():
    a = RankAssigner("16,8,4", max_rank=16)
    first = a.assign([50, 10, 40, 20, 30, 60])
    assert first == {10: 16, 20: 8, 30: 4, 40: 16, 50: 8, 60: 4}  # sorted node order
    assert a.assign([60, 10]) == {60: 4, 10: 16}  # stable
    later = a.assign([70, 5])  # new nodes continue the cycle; old ones keep theirs
    assert later == {5: 16, 70: 8}
    assert a.heterogeneous
    assert RankAssigner([16, 8], max_rank=16).assign([1, 2]) == {1: 16, 2: 8}


def test_uniform_depends_only_on_node_and_seed():
    a = RankAssigner("uniform", max_rank=16, seed=3)
    b = RankAssigner("uniform", max_rank=16, seed=3)
    nodes = list(range(1000, 3000, 7))
    ra = a.assign(nodes)
    rb = {n: b.rank_of(n) for n in reversed(nodes)}  # other order, one at a time
    assert ra == rb
    counts = Counter(ra.values())
    assert set(counts) == {16, 8, 4}
    assert min(counts.values()) > len(nodes) / 3 * 0.7
    other = RankAssigner("uniform", max_rank=16, seed=4).assign(nodes)
    assert other != ra


def test_heavy_tail_most_small_few_large():
    a = RankAssigner("heavy-tail:4,8,16,32", max_rank=32, seed=0)
    ranks = a.assign(range(1, 4001))
    counts = Counter(ranks.values())
    assert 0.80 < counts[4] / 4000 < 0.90  # default fraction 0.85 at the smallest rank
    assert counts[32] > 0 and counts[4] > 10 * counts[32]
    strong = Counter(
        RankAssigner("heavy-tail:4,8,16,32", max_rank=32, heavy_tail_fraction=0.95)
        .assign(range(1, 4001))
        .values()
    )
    assert strong[4] > counts[4]


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("32", "ranks"),
        ("0", "ranks"),
        ("8,x", "ranks"),
        ("uniform:4,64", "ranks"),
        ([], "ranks"),
        (True, "ranks"),
    ],
)
def test_invalid_specs_name_ranks(spec, key):
    with pytest.raises(ValueError, match=key):
        RankAssigner(spec, max_rank=16)


def test_invalid_max_rank_and_fraction():
    with pytest.raises(ValueError, match="max_rank"):
        RankAssigner(None, max_rank=0)
    with pytest.raises(ValueError, match="heavy_tail_fraction"):
        RankAssigner("heavy-tail", max_rank=8, heavy_tail_fraction=1.0)


@pytest.mark.parametrize("spec", ["16,8,4", "uniform", "heavy-tail", [16, 4], 8])
def test_state_round_trip_through_json(spec):
    a = RankAssigner(spec, max_rank=16, seed=5)
    a.assign([3, 1, 2])
    state = json.loads(json.dumps(a.state_dict()))
    b = RankAssigner.from_state_dict(state)
    assert b.assign([3, 1, 2]) == a.assign([3, 1, 2])
    assert b.assign([9, 10]) == a.assign([9, 10])  # continues identically (cycle counter restored)
    different = RankAssigner("2,1", max_rank=16)
    with pytest.raises(ValueError, match="ranks"):
        different.load_state_dict(state)
    with pytest.raises(ValueError, match="max_rank"):
        RankAssigner(spec, max_rank=32).load_state_dict(state)
