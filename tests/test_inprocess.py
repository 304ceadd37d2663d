"""The in-process federation (``simulations.inprocess``) used by the benchmarks: its Grid behaves as
Flower's (message ids, reply attribution), and a whole job run through it computes exactly what the
Flower simulation engine (Ray backend) computes for the same run config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from simulations.inprocess import FIRST_NODE_ID, node_contexts, server_task_identity
from strategies.inprocess_grid import InProcessGrid


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_grid_assigns_message_ids_and_drops_missing_replies():
    seen: list[Message] = []

    def client_fn(msg: Message) -> Message | None:
        seen.append(msg)
        if msg.metadata.dst_node_id == 2:
            return None  # node 2 times out
        return Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=msg)

    grid = InProcessGrid([1, 2, 3], client_fn)
    assert list(grid.get_node_ids()) == [1, 2, 3]
    with server_task_identity(run_id=7):
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in (1, 2, 3)]
        replies = list(grid.send_and_receive(msgs))
    ids = [m.metadata.message_id for m in seen]
    assert len(set(ids)) == 3 and all(ids)
    assert [r.metadata.reply_to_message_id for r in replies] == [ids[0], ids[2]]
    with pytest.raises(NotImplementedError):
        grid.push_messages(msgs)
    with pytest.raises(RuntimeError, match="client_fn"):
        InProcessGrid([1]).send_and_receive(msgs)


def test_task_identity_is_restored():
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    with server_task_identity(run_id=5):
        assert TaskIdentity.run_id == 5 and TaskIdentity.node_id == 0
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before


def test_node_contexts_match_simulation_node_config():
    ctx = node_contexts(3)
    assert sorted(ctx) == [FIRST_NODE_ID, FIRST_NODE_ID + 1, FIRST_NODE_ID + 2]
    assert [dict(c.node_config) for c in ctx.values()] == [
        {"partition-id": i, "num-partitions": 3} for i in range(3)]
    with pytest.raises(ValueError, match="num_supernodes"):
        from simulations.inprocess import run_in_process

        run_in_process({}, 0)


def _overrides(tmp_path: Path, name: str) -> dict:
    return {"strategy": "hetero", "ranks": "16,8,4", "num-server-rounds": 2, "max-client-examples": 32,
            "max-test-examples": 32, "local-steps": 2, "num-partitions": 3, "fraction-train": 1.0,
            "results-dir": str(tmp_path), "run-name": name, "export-adapter": False}


@pytest.mark.slow
def test_in_process_job_equals_flower_simulation(tmp_path: Path):
    """Same run config through run_in_process and through flwr's run_simulation (Ray): the same accuracy
    every round, the same bytes, and a bit-identical final global state (the checkpoint)."""
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from simulations.inprocess import run_in_process
    from simulations.results import RunOutputs
    from simulations.server_app import make_server_app

    local = run_in_process(_overrides(tmp_path, "local"), 3)
    ray_cfg = _overrides(tmp_path, "ray")
    run_simulation(server_app=make_server_app(ray_cfg), client_app=make_client_app(ray_cfg), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    a, b = _rows(local), _rows(tmp_path / "ray")
    assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        assert ra["accuracy"] == rb["accuracy"]
        for key in ("upload-bytes", "download-bytes", "clients-used", "ranks"):
            assert ra.get(key) == rb.get(key), key
    assert a[1]["clients-used"] == 3 and sorted(a[1]["ranks"].values()) == [4, 8, 16]
    sa, _ = RunOutputs(local).load_checkpoint()
    sb, _ = RunOutputs(tmp_path / "ray").load_checkpoint()
    ga, gb = sa["global_state"], sb["global_state"]
    assert ga.keys() == gb.keys() and ga
    for key in ga:
        np.testing.assert_array_equal(ga[key], gb[key], err_msg=key)


@pytest.mark.slow
def test_central_eval_false_skips_every_evaluation(tmp_path: Path):
    from simulations.inprocess import run_in_process

    run_dir = run_in_process({**_overrides(tmp_path, "noeval"), "strategy": "fedsb", "ranks": "",
                              "num-server-rounds": 1, "central-eval": False}, 2)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r.get("accuracy") is None for r in rows)
    assert rows[1]["upload-bytes"] > 0
