"""FedSB: exact weighted mean of r×r updates."""

from __future__ import annotations

from strategies._testing import LAYERS, NODE_IDS, R, configure, make, run_nested_rounds
from strategies.fedsb import FedSB


def test_fedsb_dense_update_is_exact_weighted_mean():
    errors = run_nested_rounds("fedsb", lambda up, layer: up[f"{layer}.R"], rounds=3)
    for round_errors in errors:
        for key, err in round_errors.items():
            assert err <= 1e-10, (key, err)


def test_fedsb_expects_full_rank_uploads():

    s = make("fedsb")
    assert isinstance(s, FedSB)
    configure(s)
    for nid in NODE_IDS:
        exp = s._tasks[nid].expected
        assert {k: v for k, v in exp.items() if k.endswith(".R")} == {
            f"{layer}.R": (R, R) for layer in LAYERS
        }
        assert exp["classifier.weight"] == (3, 16)
