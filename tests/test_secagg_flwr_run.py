"""Secure aggregation end to end through the real CLI: `flwr run .` (local simulation SuperLink, isolated FLWR_HOME;
helpers of tests/test_flwr_run.py), 3 SuperNodes without a dropout, then 5 with one.

The dropout is a real protocol path, no test hook: with ``weighting='num-examples'`` and ``secagg-max-weight``
below the largest partition, that node completes setup and share-keys, trains, then refuses to mask (its weight
would not fit the quantisation): an error reply after it shared its keys. The other four are unmasked."""

from __future__ import annotations

import json

import pytest
from test_flwr_run import TINY, _env, _flwr_run, _runs, flwr_home  # noqa: F401 - flwr_home is a fixture

pytestmark = pytest.mark.slow


def _partition_sizes(n: int) -> list[int]:
    from flwr.app import Context, RecordDict

    from clients.node_data import node_client_data
    from fedlora.run_config import parse_run_config

    cfg = parse_run_config({"max-client-examples": 0, "num-partitions": n})
    return [node_client_data(cfg, Context(run_id=1, node_id=i, node_config={"partition-id": i, "num-partitions": n},
                                          state=RecordDict(), run_config={})).num_examples for i in range(n)]


def _last_row(results, name: str) -> dict:
    return json.loads((results / name / "metrics.jsonl").read_text().splitlines()[-1])


def test_flwr_run_with_secure_aggregation_and_a_dropout(flwr_home, tmp_path):  # noqa: F811
    env = _env(flwr_home)
    results = tmp_path / "results"
    tiny = TINY.replace("num-server-rounds=2", "num-server-rounds=1")
    base = f"{tiny} results-dir='{results}' secure-aggregation=true fraction-train=1.0"

    proc = _flwr_run(env, f"{base} run-name='sa3' min-available-nodes=3", num_supernodes=3)
    runs = _runs(env)
    assert runs and runs[-1]["status"] == "finished:completed", proc.stdout[-3000:] + proc.stderr[-3000:]
    row = _last_row(results, "sa3")
    assert row["secure-aggregation"] is True and row["clients-used"] == 3 and row["kept-previous"] is False
    assert row["secagg-dropped"] == {} and row["secagg-threshold"] == 2 and row["upload-bytes"] > 0

    sizes = _partition_sizes(5)
    biggest = max(range(5), key=sizes.__getitem__)
    max_weight = (sizes[biggest] + max(s for i, s in enumerate(sizes) if i != biggest)) / 2
    proc = _flwr_run(env, f"{base.replace('max-client-examples=32', 'max-client-examples=0')} run-name='sa5' "
                          "min-available-nodes=5 "
                          f"weighting='num-examples' secagg-max-weight={max_weight:.1f}", num_supernodes=5)
    runs = _runs(env)
    assert len(runs) == 2 and runs[-1]["status"] == "finished:completed", proc.stdout[-3000:] + proc.stderr[-3000:]
    row = _last_row(results, "sa5")
    assert row["clients-used"] == 4 and row["kept-previous"] is False and row["secagg-threshold"] == 3
    assert row["secagg-dropped"] == {str(1_000_000 + biggest): "collect"}
    assert [r["category"] for r in row["rejected"]] == ["error"] and "secagg-max-weight" in row["rejected"][0]["reason"]
