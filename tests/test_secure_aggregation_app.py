"""Secure aggregation through the real ServerApp (``simulations.server_app.run_server``) and ClientApp
(``clients.client_app``), in process (the grid of ``simulations.inprocess``), 3 and 5 SuperNodes.

Every run records, outside the server, what each node uploaded before masking (the test's oracle: the
ClientApp's ``train_handler`` is wrapped) and everything the server received (the grid's replies). Checked:
the new global state equals the strategy's plain rule on those uploads within the quantisation bound (fedsb,
hetero, flora, the ``modules_to_save`` head included), the server got no float array from any node, a dropout
after share-keys is recovered, below the threshold or with a garbage share the round fails and nothing is
applied, and with user-level DP the noise comes from the nodes (the server adds none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from fedlora.aggregation import apply_increment, exact_mean, hetero_mean, stack_inner
from simulations.loop import RoundAggregatedNothing, TooFewReplies
from simulations.results import RunOutputs
from strategies._testing import arrays_of
from strategies.secagg_protocol import MODULUS, SECAGG_KEY, Stage

pytestmark = pytest.mark.slow
T, C_RANGE = 2**22, 8.0
QUANTUM = 2 * C_RANGE / T


def _overrides(tmp_path: Path, name: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"strategy": "fedsb", "rank": 4, "num-server-rounds": 1, "max-client-examples": 32, "max-test-examples": 32,
            "local-steps": 2, "num-partitions": n, "fraction-train": 1.0, "min-available-nodes": n,
            "results-dir": str(tmp_path), "run-name": name, "export-adapter": False, "central-eval": False,
            "secure-aggregation": True, **extra}


class Federation:
    """An in-process federation (as ``simulations.inprocess.run_in_process``) that records the nodes' plain
    uploads (client side) and every reply the server received, and can drop or corrupt one partition's reply at
    one protocol stage."""

    def __init__(self, monkeypatch, overrides: dict[str, Any], n: int, drop: dict[int, str] | None = None,
                 tamper: dict[int, Any] | None = None) -> None:
        from clients import client_app

        self.uploads: dict[int, dict[str, np.ndarray]] = {}
        self.downloads: dict[int, dict[str, np.ndarray]] = {}
        self.received: list[Any] = []
        real = client_app.train_handler

        def recording(msg, context, cfg):
            reply = real(msg, context, cfg)
            part = int(context.node_config["partition-id"])
            self.uploads[part], self.downloads[part] = arrays_of(reply), arrays_of(msg)
            return reply

        monkeypatch.setattr(client_app, "train_handler", recording)
        self.overrides, self.n = overrides, n
        self.app = client_app.make_client_app(overrides)
        self.drop, self.tamper = drop or {}, tamper or {}

    def run(self) -> Path:
        from flwr.supercore.task_identity import TaskIdentity

        from fedlora.run_config import parse_run_config
        from simulations.inprocess import node_contexts, server_task_identity
        from simulations.server_app import run_server
        from strategies.inprocess_grid import InProcessGrid

        contexts = node_contexts(self.n)

        def client_fn(msg: Message) -> Message | None:
            nid = int(msg.metadata.dst_node_id)
            part = int(contexts[nid].node_config["partition-id"])
            record = msg.content.config_records.get(SECAGG_KEY)
            stage = record.get("stage") if record is not None else None
            if stage is not None and self.drop.get(part) == stage:
                return None
            TaskIdentity.node_id = nid
            try:
                reply = self.app(msg, contexts[nid])
            except Exception as ex:  # noqa: BLE001 - as Flower reports a ClientApp exception
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(ex)), reply_to=msg)
            finally:
                TaskIdentity.node_id = 0
            if stage is not None and part in self.tamper:
                self.tamper[part](stage, reply)
            return reply

        received = self.received

        class RecordingGrid(InProcessGrid):
            def send_and_receive(self, messages, *, timeout=None):
                replies = list(super().send_and_receive(messages, timeout=timeout))
                received.extend(replies)
                return replies

        with server_task_identity(run_id=1):
            return run_server(RecordingGrid(contexts, client_fn), parse_run_config(self.overrides))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _global(run_dir: Path) -> dict[str, np.ndarray]:
    return RunOutputs(run_dir).read_checkpoint().state["global_state"]


def _oracle(strategy: str, before: dict, uploads: list[dict], rank: int) -> dict[str, np.ndarray]:
    w = np.full(len(uploads), 1.0 / len(uploads))
    rule = {"fedsb": exact_mean, "hetero": lambda s, p: hetero_mean(s, p, rank),
            "flora": lambda s, p: stack_inner(s, p, rank)}[strategy]
    return apply_increment({k: v.astype(np.float64) for k, v in before.items()}, rule(uploads, w))


def _check_server_received_only_masked(fed: Federation, survivors: int) -> None:
    """No reply the server received carries a float array; the masked vectors look uniform in [0, 2³²)
    (an unmasked quantised vector lies in [0, T])."""
    arrays = [a.numpy() for r in fed.received if not r.has_error() for rec in r.content.array_records.values()
              for a in rec.values()]
    assert len(arrays) == survivors and all(a.dtype == np.uint32 for a in arrays)
    for a in arrays:
        assert np.mean(a[1:] <= T) < 0.05 and a.max() > MODULUS // 2
    assert not any("arrays" in r.content.array_records for r in fed.received if not r.has_error())


@pytest.mark.parametrize("strategy, n, drop", [("fedsb", 3, None), ("fedsb", 3, 1), ("fedsb", 5, None),
                                               ("fedsb", 5, 2), ("hetero", 3, None), ("flora", 3, None)])
def test_secure_run_equals_plain_aggregation_within_the_quantisation_bound(tmp_path, monkeypatch, strategy, n, drop):
    extra = {"strategy": strategy}
    if strategy != "fedsb":
        extra.update({"ranks": "4,2,1", "inner-rank": 2})
    fed = Federation(monkeypatch, _overrides(tmp_path, f"{strategy}-{n}", n, **extra), n,
                     drop={drop: Stage.COLLECT} if drop is not None else None)
    run_dir = fed.run()
    row = _rows(run_dir)[-1]
    used = [p for p in range(n) if p != drop]
    assert row["kept-previous"] is False and row["clients-used"] == len(used) and row["secure-aggregation"] is True
    assert row["secagg-dropped"] == ({str(1_000_000 + drop): Stage.COLLECT} if drop is not None else {})
    _check_server_received_only_masked(fed, len(used))
    before = fed.downloads[used[0]]
    want = _oracle(strategy, before, [fed.uploads[p] for p in used], 4)
    got = _global(run_dir)
    assert set(got) == set(want) and any(not k.endswith(".R0") for k in got)  # the classifier head too
    for key in want:
        err = float(np.max(np.abs(got[key].astype(np.float64) - want[key])))
        assert err <= QUANTUM + 1e-6 * float(np.max(np.abs(want[key]))), key
    # ΔW = s·B·(R0 after − R0 before)·A with orthonormal B, A: its relative error is the r×r increment's
    inc = np.concatenate([(got[k] - before[k]).ravel() for k in want if k.endswith(".R0")])
    inc_want = np.concatenate([(want[k] - before[k]).ravel() for k in want if k.endswith(".R0")])
    assert np.linalg.norm(inc - inc_want) / np.linalg.norm(inc_want) < 1e-3


def test_below_the_threshold_the_round_keeps_the_global_state(tmp_path, monkeypatch):
    """3 nodes, t = 2: two drop after share-keys; the server does not unmask, the run stops with the reason and
    the checkpoint keeps round 0."""
    fed = Federation(monkeypatch, _overrides(tmp_path, "below", 3), 3, drop={0: Stage.COLLECT, 1: Stage.COLLECT})
    with pytest.raises(TooFewReplies, match="1 valid replies < min-train-nodes=2"):
        fed.run()
    assert RunOutputs(tmp_path / "below").read_checkpoint().round == 0
    stages = {r.content.config_records[SECAGG_KEY].get("stage") for r in fed.received
              if SECAGG_KEY in r.content.config_records}
    assert Stage.UNMASK not in {s for s in stages if s}  # no share was asked for


def test_a_garbage_share_fails_the_round_and_nothing_is_applied(tmp_path, monkeypatch):
    def garbage(stage, reply):
        if stage == Stage.UNMASK:
            record = reply.content.config_records[SECAGG_KEY]
            record["shares"] = [bytes(len(s)) for s in record["shares"]]

    fed = Federation(monkeypatch, _overrides(tmp_path, "garbage", 3), 3, tamper={1: garbage})
    with pytest.raises(RoundAggregatedNothing, match="secure aggregation failed: the shares of node"):
        fed.run()
    row = _rows(tmp_path / "garbage")[-1]
    assert row["round"] == 1 and row["kept-previous"] is True and "failed" in row
    assert RunOutputs(tmp_path / "garbage").read_checkpoint().round == 0


def test_user_level_dp_noise_is_added_by_the_nodes_inside_the_masks(tmp_path, monkeypatch):
    """σ = 1, C = 1, 3 nodes, t_min = 2: each node adds N(0, 1/2) per coordinate, so the mean moves by noise of std
    1/√6 ≈ 0.41 around the clipped uploads' mean; the server adds none and accounts ε."""
    fed = Federation(monkeypatch, _overrides(tmp_path, "dp", 3, **{"user-dp-clip": 1.0, "user-dp-noise": 1.0}), 3)
    run_dir = fed.run()
    row = _rows(run_dir)[-1]
    assert row["user-dp-epsilon"] > 0 and row["secagg-noise-std"] == pytest.approx(1 / np.sqrt(6))
    before = fed.downloads[0]
    want = _oracle("fedsb", before, [fed.uploads[p] for p in range(3)], 4)
    got = _global(run_dir)
    noise = np.concatenate([(got[k].astype(np.float64) - want[k]).ravel() for k in want])
    assert noise.size > 500 and abs(float(np.std(noise)) - 1 / np.sqrt(6)) < 0.1 / np.sqrt(6)
    for upload, p in ((fed.uploads[p], p) for p in range(3)):  # every node clipped its update to C
        delta = [upload[k] - fed.downloads[p][k] if k in fed.downloads[p] else upload[k] for k in upload]
        assert np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta)) <= 1.0 + 1e-5
