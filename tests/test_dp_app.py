"""Differential privacy through the app: sample-level DP-SGD on clients with accounting across rounds,
budget refusal, and user-level DP on the server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.simulation import run_simulation
from opacus.accountants import PRVAccountant, RDPAccountant

from clients.client_app import make_client_app
from simulations.server_app import make_server_app

pytestmark = pytest.mark.slow

TINY = {"max-client-examples": 40, "max-test-examples": 32, "local-steps": 2, "num-partitions": 3, "partitioner": "iid",
        "round-timeout": 180.0, "export-adapter": False, "batch-size": 8, "fraction-train": 1.0,
        "dp-release-metrics": True}  # per-client DP figures in metrics.jsonl (outside the guarantee)
N_TRAIN = 36  # 40 examples, 10% validation
DELTA = 1.0 / (10 * N_TRAIN)  # the default δ = 1/(10·N)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    """Each test's nodes keep their privacy ledgers in its own directory (Ray's actors inherit the env)."""
    monkeypatch.setenv("FEDLORA_STATE_DIR", str(tmp_path / "ledgers"))


def _simulate(overrides):
    run_simulation(server_app=make_server_app(overrides), client_app=make_client_app(overrides), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    path = Path(overrides["results-dir"]) / overrides["run-name"] / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def _independent_epsilon(mechanism, sigma, q, steps, delta):
    acc = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp"])
def test_sample_level_epsilon_matches_opacus_and_stays_in_budget(tmp_path, accountant):
    target = 3.0
    rows = _simulate({**TINY, "num-server-rounds": 2, "dp-epsilon": target, "dp-accountant": accountant,
                      "results-dir": str(tmp_path), "run-name": "dp"})
    assert [r["round"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    for key in ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-sample-rate", "dp-steps", "dp-clip-norm"):
        assert last[key] is not None, key
    per_client = last["dp-per-client"]
    assert len(per_client) == 3 and last["clients-used"] == 3
    for m in per_client.values():
        assert m["dp-steps"] == 4 and m["dp-sample-rate"] == pytest.approx(8 / N_TRAIN)
        assert m["dp-delta"] == pytest.approx(DELTA)
        eps = _independent_epsilon(accountant, m["dp-noise-multiplier"], m["dp-sample-rate"], int(m["dp-steps"]),
                                   m["dp-delta"])
        assert m["dp-epsilon"] == pytest.approx(eps, rel=1e-9)
        assert m["dp-epsilon"] <= target
    assert last["dp-epsilon"] == max(m["dp-epsilon"] for m in per_client.values())
    assert rows[1]["dp-epsilon"] < last["dp-epsilon"]  # accounted across rounds, not reset
    # the noiseless loss leaves nodes only with dp-release-metrics=true (here), outside the guarantee; without
    # it no metric leaves a node (tests/test_privacy_client.py, tests/test_privacy_release.py)
    assert all(r.get("train-loss") is not None for r in rows[1:])
    assert len(list((tmp_path / "ledgers").iterdir())) == 3  # one ledger per node, on the node's disk


def test_budget_refusal_and_user_level_dp(tmp_path):
    sigma = 1.0
    q = 8 / N_TRAIN
    eps1 = _independent_epsilon("rdp", sigma, q, 2, DELTA)
    eps2 = _independent_epsilon("rdp", sigma, q, 4, DELTA)
    target = (eps1 + eps2) / 2  # every client can afford exactly one round
    rows = _simulate({**TINY, "num-server-rounds": 3, "dp-epsilon": target, "dp-noise": sigma, "dp-accountant": "rdp",
                      "fraction-train": 0.67, "min-train-nodes": 1, "min-available-nodes": 3,
                      "strategy": "fedsb", "weighting": "uniform", "user-dp-clip": 0.5, "user-dp-noise": 0.8,
                      "allow-empty-rounds": True,  # every sampled node may have spent its budget
                      "results-dir": str(tmp_path), "run-name": "budget"})
    rounds = rows[1:]
    refused = sum(r.get("dp-refused", 0) for r in rounds)
    assert refused >= 1  # 2 of 3 clients per round over 3 rounds: someone comes back with an empty budget
    for r in rounds:
        assert r["clients-used"] + r.get("dp-refused", 0) == 2
        assert r["clients-rejected"] == r.get("dp-refused", 0)  # the refusal is an error reply, logged, dropped
        for m in r.get("dp-per-client", {}).values():
            assert m["dp-epsilon"] == pytest.approx(eps1, rel=1e-9)
            assert m["dp-epsilon"] <= target
    # user-level DP: one Gaussian mechanism per round that aggregated, q = clients sampled / population,
    # δ = 1/(10·population) by default (issue item 5)
    acc = RDPAccountant()
    for r in rounds:
        if r["clients-used"] > 0:
            acc.step(noise_multiplier=0.8, sample_rate=r["clients-sampled"] / 3)
        assert r["user-dp-epsilon"] == pytest.approx(acc.get_epsilon(1 / 30), rel=1e-9)
    assert rounds[-1]["user-dp-epsilon"] > rounds[0]["user-dp-epsilon"] > 0
