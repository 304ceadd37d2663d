"""The node's side of the outer-factor protocol (clients.node_outer) through the real ServerApp and ClientApp:
a node with another copy of the base model is refused before it trains, with a reason naming the cause, and
the round goes on with the others; nodes that compute their own factors (``outer-factors = "local"``) are
checked by a tolerance instead of bit equality; a node's store is used and repaired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_other_minilm
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clients.node_outer import (
    FingerprintMismatch,
    OuterFactorsMissing,
    check_fingerprint,
    received_bundle,
)
from fedlora.outer_bundle import OuterBundleStore, OuterMismatch
from simulations.inprocess import run_in_process, server_task_identity
from strategies.outer_delivery import OUTER_DIGEST, OUTER_MISSING, OUTER_RECORD
from strategies.outer_delivery_test import _bundle
from strategies.wire import state_to_arrayrecord

TINY = {"num-server-rounds": 2, "max-client-examples": 32, "max-test-examples": 32, "local-steps": 2,
        "num-partitions": 3, "fraction-train": 1.0, "min-train-nodes": 2, "export-adapter": False}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def other_minilm(tmp_path_factory) -> Path:
    return save_other_minilm(tmp_path_factory.mktemp("other-minilm"))


def test_node_with_another_base_model_is_refused_before_training(tmp_path, other_minilm):
    run = run_in_process({**TINY, "results-dir": str(tmp_path), "run-name": "other"}, 3,
                         node_configs={2: {"model-path": str(other_minilm)}})
    rows = _rows(run)[1:]
    assert [r["clients-used"] for r in rows] == [2, 2]
    for r in rows:
        (rejected,) = r["rejected"]
        assert rejected["category"] == "error"
        assert "another base model or checkpoint" in rejected["reason"] and "OuterMismatch" in rejected["reason"]
    assert rows[0]["outer-nodes"] == 3 and rows[1]["outer-nodes"] == 0  # it holds the factors, they don't fit


def test_nodes_computing_their_own_factors_are_checked_by_tolerance(tmp_path):
    run = run_in_process({**TINY, "results-dir": str(tmp_path), "run-name": "local", "outer-factors": "local"}, 3)
    rows = _rows(run)[1:]
    assert [r["clients-used"] for r in rows] == [3, 3]
    assert all(r["outer-bytes"] == 0 and r["outer-nodes"] == 0 for r in rows)
    server = json.loads((run / "config.json").read_text())
    assert server["outer-factors"] == "local" and server["fingerprint"]


def _msg(digest: str, record: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord({OUTER_DIGEST: digest})})
    if record is not None:
        content[OUTER_RECORD] = record
    with server_task_identity(run_id=1):
        return Message(content, dst_node_id=1, message_type="train")


def test_received_bundle_stores_reads_and_refuses(tmp_path):
    bundle = _bundle()
    store = OuterBundleStore(tmp_path)
    assert received_bundle(_msg(""), {}, store) is None  # the server announces none
    with pytest.raises(OuterFactorsMissing, match=f"\\{OUTER_MISSING[:-1]}"):
        received_bundle(_msg(bundle.digest), {OUTER_DIGEST: bundle.digest}, store)
    record = state_to_arrayrecord(bundle.to_state())
    assert received_bundle(_msg(bundle.digest, record), {OUTER_DIGEST: bundle.digest}, store) == bundle
    assert OuterBundleStore(tmp_path).get(bundle.digest) == bundle  # kept on disk
    assert received_bundle(_msg(bundle.digest), {OUTER_DIGEST: bundle.digest}, OuterBundleStore(tmp_path)) == bundle
    wrong = "0" * 64
    with pytest.raises(OuterMismatch, match="differs from the announced"):
        received_bundle(_msg(wrong, record), {OUTER_DIGEST: wrong}, OuterBundleStore(tmp_path / "x"))


def test_fingerprint_mismatch_refuses():
    check_fingerprint({"fingerprint": "a" * 64}, "a" * 64)
    check_fingerprint({}, "a" * 64)
    with pytest.raises(FingerprintMismatch, match="refusing to train"):
        check_fingerprint({"fingerprint": "a" * 64}, "b" * 64)
