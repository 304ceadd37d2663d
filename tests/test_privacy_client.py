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


# ---------------------------------------------------------------------- no private number in an error reply
def _reason_of(app, msg: Message, context: Context) -> str:
    """What the server receives when the ClientApp raises: the error reason as Flower's runtime writes it
    (flwr.supernode.runtime.run_clientapp: ``<class '…'>:<'text'>``); fails if the app does not raise."""
    with pytest.raises(Exception) as err:
        app(msg, context)
    return f"{type(err.value)}:<'{err.value}'>"


def _assert_fixed(reason: str, cause: str, *private: str) -> None:
    """``reason`` carries exactly the fixed text of ``cause`` and none of the ``private`` strings."""
    from clients.refusal import NodeRefused
    from fedlora.privacy.release_policy import REFUSALS

    assert reason == f"{NodeRefused}:<'{REFUSALS[cause]}'>", reason
    for text in private:
        assert text not in reason, (text, reason)


def _n_train(cfg, context: Context) -> int:
    from clients.node_data import node_client_data

    return len(node_client_data(cfg, context).train)


def test_delta_above_one_over_n_is_refused_without_naming_n(caplog):
    """A curious server sets dp-delta >= 1/N to learn N from the refusal: the reply names the cause only; the
    text with N stays in the node's own log."""
    from clients.client_app import make_client_app

    overrides = {**TINY, "dp-noise": SIGMA, "dp-delta": 0.05}
    cfg = parse_run_config(overrides)
    n = _n_train(cfg, _context())
    assert 0.05 >= 1 / n  # the attack's precondition: the node's own check fires
    with caplog.at_level("ERROR", logger="fedlora.client"):
        reason = _reason_of(make_client_app(overrides), _message(cfg), _context())
    _assert_fixed(reason, "dp-delta", str(n), f"{1 / n:.3g}", "N=")
    local = [r.getMessage() for r in caplog.records if r.name == "fedlora.client"]
    assert any(f"N={n}" in m for m in local), local  # the full text went to the node's log only


def test_corrupt_ledger_is_refused_without_path_or_figures(tmp_path):
    from clients.client_app import make_client_app

    overrides = {**TINY, **TWO_ROUNDS}
    cfg = parse_run_config(overrides)
    _train(cfg, _context(tmp_path))
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:-20])  # a torn file
    reason = _reason_of(make_client_app(overrides), _message(cfg), _context(tmp_path))
    _assert_fixed(reason, "ledger", str(tmp_path), path.name, "partition", "corrupt")


@pytest.mark.parametrize("release", [False, True])
def test_budget_refusal_names_the_cause_and_still_counts_as_dp_refused(release):
    """With or without dp-release-metrics the refusal leaves as the fixed text (no ε spent, no target, no
    step count), which the server still counts as ``dp-refused``."""
    from clients.client_app import make_client_app
    from strategies import _testing as t
    from strategies.client_metrics import client_dp_metrics

    overrides = {**TINY, **TWO_ROUNDS, "dp-release-metrics": release}
    cfg = parse_run_config(overrides)
    app = make_client_app(overrides)
    for _ in range(2):
        app(_message(cfg), _context())
    reason = _reason_of(app, _message(cfg), _context())
    _assert_fixed(reason, "budget", f"{cfg.dp_epsilon:g}", f"{EPS[1]:.4g}", f"{EPS[2]:.4g}", "spent")
    assert BUDGET_REFUSAL in reason
    with server_task_identity(run_id=1):
        refused = t.error_reply(t.configure(t.make("fedsb"))[0], reason=reason)
    assert client_dp_metrics([refused], []) == {"dp-refused": 1}


def test_secure_aggregation_protocol_violation_is_a_fixed_reason():
    from clients.client_app import make_client_app
    from strategies.secagg_protocol import SECAGG_KEY, Stage

    overrides = {**TINY, "secure-aggregation": True}
    content = RecordDict({SECAGG_KEY: ConfigRecord({"stage": Stage.SHARE_KEYS, "session": "s-1"})})
    with server_task_identity(run_id=1):
        msg = Message(content, dst_node_id=1000, message_type="query")
    _assert_fixed(_reason_of(make_client_app(overrides), msg, _context()), "secagg-protocol", "without a setup",
                  "s-1")


def test_without_dp_or_secure_aggregation_the_exception_passes_unchanged():
    from clients.client_app import make_client_app
    from clients.refusal import NodeRefused

    cfg = parse_run_config(TINY)
    msg = _message(cfg)
    msg.content.config_records["config"]["layout"] = b"garbage"  # a malformed download
    with pytest.raises(Exception, match="malformed download") as err:
        make_client_app(TINY)(msg, _context())
    assert not isinstance(err.value, NodeRefused)  # the detail helps debugging where nothing is private


def test_every_refusal_is_a_fixed_text_and_every_cause_maps():
    """The reviewed list: no digit but the 1 of '1/N', the markers the server looks for, and the exceptions a
    node raises under DP or secure aggregation each mapped to their cause (anything else: 'failed')."""
    import re

    from clients.node_outer import FingerprintMismatch, OuterFactorsMissing
    from clients.refusal import NodeRefused, Refusal, cause_of
    from fedlora.outer_bundle import OuterMismatch
    from fedlora.privacy.accounting import BudgetExhausted
    from fedlora.privacy.config import DeltaRefused
    from fedlora.privacy.release_policy import REFUSALS
    from strategies.outer_delivery import OUTER_MISSING
    from strategies.secagg_node import ProtocolViolation
    from strategies.secagg_protocol import SecAggError
    from strategies.wire import WireFormatError

    for text in REFUSALS.values():
        assert not re.search(r"\d", text.replace("1/N", "")), text
    assert BUDGET_REFUSAL in REFUSALS["budget"] and OUTER_MISSING in REFUSALS["outer-missing"]
    budget = BudgetExhausted.__new__(BudgetExhausted)
    cases = {budget: "budget", LedgerError("x"): "ledger", DeltaRefused("N=7"): "dp-delta",
             OuterFactorsMissing("x"): "outer-missing", FingerprintMismatch("x"): "outer-mismatch",
             OuterMismatch("rank", "x"): "outer-mismatch", WireFormatError("x"): "download",
             ProtocolViolation("x"): "secagg-protocol", SecAggError("x"): "secagg-protocol",
             Refusal("secagg-weight", "num-examples=7"): "secagg-weight", ValueError("N=7"): "failed",
             ZeroDivisionError(): "failed"}
    assert [cause_of(e) for e in cases] == list(cases.values())
    assert str(NodeRefused("failed")) == REFUSALS["failed"]
    with pytest.raises(ValueError, match="not in"):
        Refusal("made-up", "x")


@pytest.mark.slow
def test_published_metrics_never_carry_a_nodes_n(tmp_path):
    """The δ attack end to end: every node refuses, and what the server publishes (metrics.jsonl) names the cause
    only, never a node's N or 1/N."""
    import json

    from flwr.common.constant import ErrorCode

    from clients.refusal import NodeRefused
    from fedlora.privacy.release_policy import REFUSALS
    from simulations.inprocess import node_contexts, run_in_process

    overrides = {**TINY, "num-server-rounds": 1, "dp-noise": SIGMA, "dp-delta": 0.05, "max-test-examples": 16,
                 "results-dir": str(tmp_path), "run-name": "curious", "export-adapter": False, "fraction-train": 1.0,
                 "allow-empty-rounds": True}
    cfg = parse_run_config(overrides)
    assert all(0.05 >= 1 / _n_train(cfg, c) for c in node_contexts(2).values())  # every node's check fires
    run_dir = run_in_process(overrides, 2)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["clients-used"] == 0 and [r["category"] for r in last["rejected"]] == ["error", "error"]
    code = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
    want = f"error reply (code {code}): {NodeRefused}:<'{REFUSALS['dp-delta']}'>"
    assert [r["reason"] for r in last["rejected"]] == [want, want]  # the published reason: the cause, no number
