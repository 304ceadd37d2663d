"""The causal-LM task through the app: SmolLM2-135M (offline GGUF -> safetensors cache) on dialogues,
nested adapters on q_proj/v_proj, held-out perplexity as the central metric."""

from __future__ import annotations

import json
import math

import pytest
from flwr.simulation import run_simulation

from clients.client_app import make_client_app
from simulations.server_app import make_server_app

pytestmark = pytest.mark.slow


def test_causal_lm_simulation_reports_perplexity(tmp_path):
    overrides = {
        "task": "causal-lm", "model": "smollm2", "dataset": "dialogues", "partitioner": "iid",
        "num-server-rounds": 1, "max-client-examples": 8, "max-test-examples": 8, "local-steps": 2,
        "batch-size": 2, "max-length": 32, "eval-batch-size": 4, "num-partitions": 2, "rank": 8, "inner-rank": 2,
        "results-dir": str(tmp_path), "run-name": "lm", "round-timeout": 300.0, "export-adapter": True,
    }
    run_simulation(server_app=make_server_app(overrides), client_app=make_client_app(overrides), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    rows = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert r["accuracy"] is None and math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
    assert rows[1]["clients-used"] == 2 and rows[1]["clients-rejected"] == 0
    # 30 layers x {q_proj, v_proj} x 8 x 8 float32 values per client, no head for a causal LM
    assert rows[1]["upload-bytes"] == 2 * 60 * 8 * 8 * 4
    assert (tmp_path / "lm" / "adapter" / "adapter_config.json").exists()
