"""The ClientApp's privacy through its handlers: the ledger survives a new Flower run (a fresh Context per
round, as after ``resume=true``), an untrusted ledger refuses to train, ``dp-noise`` alone runs DP-SGD, and
every reply carries exactly the metrics of the release policy (fedlora.privacy.release_policy) in every mode."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.client_app import evaluate_handler, release_mode, train_handler
from fedlora.experiment import adapter_for, build_model
from fedlora.privacy import epsilon_of
from fedlora.privacy.ledger import LedgerError, LedgerKey
from fedlora.privacy.release_policy import PUBLIC_META, allowed_metrics
from fedlora.run_config import parse_run_config
from simulations.inprocess import server_task_identity
from strategies.client_metrics import BUDGET_REFUSAL

TINY = {"max-client-examples": 40, "local-steps": 2, "num-partitions": 3, "partitioner": "iid", "batch-size": 8,
        "num-server-rounds": 5, "run-name": "study", "strategy": "fedsb"}
N_TRAIN, B, STEPS, SIGMA = 36, 8, 2, 1.0
DELTA = 1 / (10 * N_TRAIN)
EPS = [epsilon_of([(SIGMA, B / N_TRAIN, STEPS * r)], DELTA, "rdp") for r in (1, 2, 3)]
#: every node can afford exactly two rounds
TWO_ROUNDS = {"dp-noise": SIGMA, "dp-epsilon": (EPS[1] + EPS[2]) / 2, "dp-accountant": "rdp"}


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_STATE_DIR", str(tmp_path / "env-state"))


def _message(cfg, kind: str = "train") -> Message:
    model = build_model(cfg.spec())
    state = adapter_for(cfg.strategy).initial_global_state(model)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()}),
                          "config": ConfigRecord({"seed": 7})})
    with server_task_identity(run_id=1):
        return Message(content, dst_node_id=1000, message_type=kind)


def _context(state_dir=None, partition: int = 0) -> Context:
    """A fresh Context, as every new Flower run (and so every resume) gives a node."""
    node_config = {"partition-id": partition, "num-partitions": 3}
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    return Context(run_id=1, node_id=1000 + partition, node_config=node_config, state=RecordDict(), run_config={})


def _train(cfg, context: Context) -> dict:
    reply = train_handler(_message(cfg), context, cfg)
    return dict(reply.content.metric_records["metrics"])


def test_epsilon_survives_resume_and_refusal_comes_at_the_same_total(tmp_path):
    """Uninterrupted: one Context for every round. Resumed: a fresh Context every round (a new Flower run)."""
    cfg = parse_run_config({**TINY, **TWO_ROUNDS, "dp-release-metrics": True})
    kept = _context(tmp_path / "a")
    for rnd in range(2):
        a = _train(cfg, kept)
        b = _train(cfg, _context(tmp_path / "b"))
        assert a["dp-epsilon"] == b["dp-epsilon"] == pytest.approx(EPS[rnd], rel=1e-9)  # keeps rising
        assert a["dp-steps"] == b["dp-steps"] == STEPS * (rnd + 1)
    assert len(kept.state.config_records) == 0  # the ledger is the one source of truth
    for context in (kept, _context(tmp_path / "b")):
        with pytest.raises(Exception, match=BUDGET_REFUSAL):
            _train(cfg, context)
    # the ledger of each node lives under its own state dir and key; none in the environment's default
    assert len(list((tmp_path / "a").iterdir())) == len(list((tmp_path / "b").iterdir())) == 1
    assert not (tmp_path / "env-state").exists()


def test_refusal_without_release_names_only_the_public_target(tmp_path):
    cfg = parse_run_config({**TINY, **TWO_ROUNDS})
    for _ in range(2):
        assert _train(cfg, _context()) == {}  # under DP-SGD nothing but the update leaves the node
    with pytest.raises(RuntimeError) as err:
        _train(cfg, _context())
    text = str(err.value)
    assert text.startswith(BUDGET_REFUSAL) and f"{cfg.dp_epsilon:g}" in text
    assert f"{EPS[1]:.4g}" not in text and "spent" not in text  # ε spent depends on N: not released
    ledger_files = list((tmp_path / "env-state").iterdir())
    assert len(ledger_files) == 1 and "partition_0" in ledger_files[0].name


def test_corrupt_or_unwritable_ledger_refuses_to_train(tmp_path):
    cfg = parse_run_config({**TINY, **TWO_ROUNDS})
    _train(cfg, _context(tmp_path))
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:-20])  # a torn file
    with pytest.raises(LedgerError, match="corrupt.*refusing to train"):
        _train(cfg, _context(tmp_path))
    (tmp_path / "blocked").write_text("a file where the state dir should be")
    with pytest.raises(LedgerError, match="refusing to train"):
        _train(cfg, _context(tmp_path / "blocked" / "ledger"))


def test_simulated_nodes_of_one_machine_keep_separate_ledgers(tmp_path):
    cfg = parse_run_config({**TINY, "dp-noise": SIGMA})  # dp-noise alone: DP-SGD, ε accounted, no budget
    assert cfg.dp_enabled and cfg.aggregation_weighting == "uniform"
    for partition in (0, 1):
        _train(cfg, _context(tmp_path, partition))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names == sorted(
        LedgerKey("study", "rotten_tomatoes", f"partition:{i}").filename() for i in (0, 1))


MODES = [
    {},
    {"dp-noise": SIGMA},
    {"user-dp-clip": 0.5, "user-dp-noise": 0.8},
    {"dp-noise": SIGMA, "user-dp-clip": 0.5, "user-dp-noise": 0.8},
    {"dp-noise": SIGMA, "dp-release-metrics": True},
    {"user-dp-clip": 0.5, "user-dp-noise": 0.8, "dp-release-metrics": True},
    {"dp-noise": SIGMA, "user-dp-clip": 0.5, "user-dp-noise": 0.8, "dp-release-metrics": True},
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "+".join(k for k in m if k != "user-dp-noise") or "no-dp")
def test_reply_keys_are_exactly_the_release_policy(mode):
    cfg = parse_run_config({**TINY, **mode, "fraction-evaluate": 0.0})
    policy = release_mode(cfg)
    reply = train_handler(_message(cfg), _context(), cfg)
    assert set(reply.content.metric_records["metrics"]) == allowed_metrics("train", policy, cfg.task)
    assert set(reply.content.config_records["meta"]) == set(PUBLIC_META)
    assert set(reply.content.array_records["arrays"])  # the (privatised) update is always sent
    ev = evaluate_handler(_message(cfg, "evaluate"), _context(), cfg)
    assert set(ev.content.metric_records["metrics"]) == allowed_metrics("evaluate", policy, cfg.task)
    assert bool(allowed_metrics("train", policy, cfg.task)) == (not policy.private or policy.release_metrics)


@pytest.mark.slow
def test_dp_run_without_release_aggregates_updates_only(tmp_path):
    """A whole in-process DP-SGD run: replies carry no metrics, the server still aggregates them (uniform
    weights, no num-examples needed) and metrics.jsonl holds no per-client figure."""
    import json

    from simulations.inprocess import run_in_process

    run_dir = run_in_process({**TINY, "num-server-rounds": 1, "dp-epsilon": 50.0, "max-test-examples": 16,
                              "results-dir": str(tmp_path), "run-name": "private", "export-adapter": False,
                              "fraction-train": 1.0}, 2)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = rows[-1]
    assert last["round"] == 1 and last["clients-used"] == 2 and last["clients-rejected"] == 0
    assert last.get("train-loss") is None and "dp-per-client" not in last and last.get("dp-epsilon") is None
    assert len(list((tmp_path / "env-state").iterdir())) == 2  # one ledger per node
