"""Packed arrays (:mod:`strategies.wire`) through the real ClientApp and ServerApp code: the ClientApp unpacks
its download and packs its reply (one Array, the layout in ``meta``), a malformed packed download fails the
client with an error naming the problem, and in an in-process federation a malformed packed reply is
rejected by the server's screening (``layout``) while the other clients' updates are aggregated."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict

from strategies.wire import LAYOUT_KEY, WireFormatError, pack_state, unpack_state

TINY = {"max-client-examples": 16, "max-test-examples": 16, "local-steps": 1, "num-partitions": 3,
        "batch-size": 8, "strategy": "fedsb", "rank": 4}


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_STATE_DIR", str(tmp_path / "env-state"))


def _message(cfg, layout: bytes | None = None, arrays=None) -> Message:
    """A train instruction as the strategy sends it: the packed initial global state, its layout in config."""
    from fedlora.experiment import adapter_for, build_model
    from simulations.inprocess import server_task_identity

    state = adapter_for(cfg.strategy).initial_global_state(build_model(cfg.spec()))
    packed = pack_state(state)
    content = RecordDict({"arrays": arrays if arrays is not None else packed.record,
                          "config": ConfigRecord({"seed": 7, LAYOUT_KEY: layout or packed.layout})})
    with server_task_identity(run_id=1):
        return Message(content, dst_node_id=1000, message_type="train")


def _context() -> Context:
    return Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def test_client_unpacks_its_download_and_packs_its_reply():
    from clients.client_app import train_handler
    from fedlora.run_config import parse_run_config

    cfg = parse_run_config(TINY)
    reply = train_handler(_message(cfg), _context(), cfg)
    arrays, meta = reply.content["arrays"], reply.content["meta"]
    assert list(arrays) == ["<f4"]  # one Array for the whole float32 upload
    upload = unpack_state(arrays, meta[LAYOUT_KEY])
    inner = {k: v.shape for k, v in upload.items() if k.endswith(".R")}
    assert inner and set(inner.values()) == {(4, 4)}
    assert arrays["<f4"].numpy().nbytes == sum(v.nbytes for v in upload.values())
    assert [k for k, _, _ in map(tuple, json.loads(zlib.decompress(meta[LAYOUT_KEY])))] == list(upload)


@pytest.mark.parametrize(("layout", "arrays", "words"), [
    (zlib.compress(b"[[\"x\", [3], \"<f4\"]]")[:-4], None, "malformed download: layout is truncated"),
    (zlib.compress(b"[[\"x\", [3], \"<f4\"]]"), None, "describes 3 elements"),
    (None, {"<f4": Array(np.zeros(3, dtype=np.float32)), "<f8": Array(np.zeros(1))}, "not the layout's dtypes"),
])
def test_client_refuses_a_malformed_download(layout, arrays, words):
    from flwr.app import ArrayRecord

    from clients.client_app import train_handler
    from fedlora.run_config import parse_run_config

    cfg = parse_run_config(TINY)
    msg = _message(cfg, layout, ArrayRecord(arrays) if arrays is not None else None)
    with pytest.raises(WireFormatError, match="malformed download") as err:
        train_handler(msg, _context(), cfg)
    assert words in str(err.value)


def _corrupt(reply: Message, rnd: int) -> None:
    """Round 1: a truncated layout; round 2: one number missing from the packed array."""
    if rnd == 1:
        reply.content["meta"][LAYOUT_KEY] = reply.content["meta"][LAYOUT_KEY][:-3]
    else:
        flat = reply.content["arrays"]["<f4"].numpy()
        reply.content["arrays"]["<f4"] = Array(flat[:-1])


@pytest.mark.slow
def test_malformed_packed_reply_is_rejected_and_the_others_aggregated(tmp_path: Path):
    from clients.client_app import make_client_app
    from fedlora.run_config import parse_run_config
    from simulations.inprocess import node_contexts, server_task_identity
    from simulations.results import RunOutputs
    from simulations.server_app import run_server
    from strategies.inprocess_grid import InProcessGrid

    overrides = {**TINY, "num-server-rounds": 2, "fraction-train": 1.0, "min-train-nodes": 2,
                 "central-eval": False, "results-dir": str(tmp_path), "run-name": "packed", "export-adapter": False}
    app, contexts = make_client_app(overrides), node_contexts(3)
    faulty = min(contexts) + 1

    def client_fn(msg: Message) -> Message:
        from flwr.supercore.task_identity import TaskIdentity

        node = int(msg.metadata.dst_node_id)
        TaskIdentity.node_id = node
        try:
            reply = app(msg, contexts[node])
        finally:
            TaskIdentity.node_id = 0
        if node == faulty and msg.metadata.message_type == "train":
            _corrupt(reply, int(msg.content["config"]["server-round"]))
        return reply

    with server_task_identity(run_id=1):
        run_dir = run_server(InProcessGrid(contexts, client_fn), parse_run_config(overrides))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    trained = [r for r in rows if r.get("round", 0) >= 1]
    assert [r["round"] for r in trained] == [1, 2]
    reasons = ["layout is truncated", "describes"]
    for row, words in zip(trained, reasons):
        assert row["clients-used"] == 2 and row["kept-previous"] == 0, row
        assert len(row["rejected"]) == 1 and row["rejected"][0]["category"] == "layout"
        assert words in row["rejected"][0]["reason"]
        assert row["upload-serialized-bytes"] > row["upload-bytes"] > 0
    state, _ = RunOutputs(run_dir).load_checkpoint()
    assert all(np.all(np.isfinite(v)) for v in state["global_state"].values())
