"""The server on another numeric code path (``MKL_CBWR=AVX2``, see ``tests/test_deployment.py``) on the Deployment
Engine (TLS + SuperNode authentication, the deploy/ scripts, loopback), each process with its own outer-factor
cache: both nodes on the default path train with the server's factors and every round's aggregate equals the
explicit weighted mean of their ΔW; a third node holding another base model is refused before it trains, with a
reason naming the cause, and the rounds go on without it."""

from __future__ import annotations

import pytest
from conftest import save_other_minilm
from test_deployment import ODD, TINY, check_exact_rounds
from test_deployment import deployment as deployment  # the fixture: SuperLink + SuperNodes, stopped after

pytestmark = pytest.mark.slow
RUN = TINY.replace("num-server-rounds=2", "num-server-rounds=1") + " fraction-train=1.0 svd-method='full'"


def test_server_on_another_code_path_and_a_node_with_another_model(deployment, tmp_path):
    other = save_other_minilm(tmp_path / "other-minilm")
    dep = deployment
    audit, results = tmp_path / "audit", tmp_path / "results"
    node_args = [["--node", f"sn{i}", "--num-partitions", "3"] for i in range(3)]
    node_args[2] += ["--node-config", f'model-path="{other}"']
    dep.start(nodes=3, node_args=node_args,
              node_env=[{"FEDLORA_CACHE": str(tmp_path / f"cache-sn{i}")} for i in range(3)],
              superlink_env={"FEDLORA_CACHE": str(tmp_path / "cache-server"), "FEDLORA_AUDIT_DIR": str(audit), **ODD})
    dep.wait_online(3)
    proc = dep.submit(f"{RUN} results-dir='{results}' run-name='odd-server' min-available-nodes=3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and dep.runs()[-1]["status"] == "finished:completed", out[-4000:]
    rows = check_exact_rounds(results / "odd-server", audit / "odd-server", used=2, sent=3, rounds=1)
    for r in rows:  # the node with another model is refused before it trains, naming the cause
        (rejected,) = r["rejected"]
        assert "another base model or checkpoint" in rejected["reason"], rejected
