"""Nested FLoRA: stacking of PᵢQᵢ merged into R0, ranks {r, r/2, r/4}, inner ranks min(q, rᵢ)."""

from __future__ import annotations

from strategies._testing import LAYERS, NODE_IDS, R, config_of, configure, make, node_of, run_nested_rounds


def test_flora_dense_update_is_exact_weighted_mean():
    errors = run_nested_rounds(
        "flora",
        lambda up, layer: up[f"{layer}.P"] @ up[f"{layer}.Q"],
        rounds=3,
        ranks=f"{R},{R // 2},{R // 4}",
        inner_rank=4,
    )
    for round_errors in errors:
        for key, err in round_errors.items():
            assert err <= 1e-10, (key, err)


def test_flora_tells_clients_to_restart_and_expects_p_q():

    s = make("flora", ranks=f"{R},{R // 2},{R // 4}", inner_rank=4)
    msgs = configure(s)
    for m in msgs:
        cfg = config_of(m)
        assert cfg["restart-inner"] is True and cfg["mode"] == "nora"
        r_i, q_i = cfg["rank"], cfg["inner-rank"]
        assert q_i == min(4, r_i)
        exp = s._tasks[node_of(m)].expected
        for layer in LAYERS:
            assert exp[f"{layer}.P"] == (r_i, q_i) and exp[f"{layer}.Q"] == (q_i, r_i)
            assert f"{layer}.R" not in exp
    assert len(msgs) == len(NODE_IDS)
