"""The node's privacy ledger (fedlora.privacy.ledger): durable, atomic, trusted only when intact, and a
budget that refuses at the same total whether or not the run was interrupted. Faults are injected."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from fedlora.privacy import AccountantState, BudgetExhausted, DPConfig, epsilon_of
from fedlora.privacy.ledger import (
    STATE_DIR_ENV,
    LedgerError,
    LedgerKey,
    LedgerSettings,
    PrivacyLedger,
    reserve_round,
    state_dir,
)

KEY = LedgerKey(run_name="study", dataset="rotten_tomatoes", node="partition:0")
N, B, STEPS, SIGMA = 36, 8, 2, 1.0
Q = B / N
DELTA = 1 / (10 * N)
EPS = [epsilon_of([(SIGMA, Q, STEPS * r)], DELTA, "rdp") for r in (1, 2, 3)]
#: each node can afford exactly two rounds
DP = DPConfig(target_epsilon=(EPS[1] + EPS[2]) / 2, noise_multiplier=SIGMA, accountant="rdp")
SETTINGS = LedgerSettings.of(DP, B)


def _reserve(ledger: PrivacyLedger, dp: DPConfig = DP):
    return reserve_round(ledger, dp, num_examples=N, batch_size=B, epochs=1, steps=STEPS, num_rounds=5)


def test_state_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    assert state_dir() == Path("~/.fedlora/ledger").expanduser()
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "env"))
    assert state_dir() == tmp_path / "env"
    assert state_dir(str(tmp_path / "node")) == tmp_path / "node"  # the node config wins


def test_keys_give_distinct_files_and_are_validated():
    names = {LedgerKey("study", "rotten_tomatoes", f"partition:{i}").filename() for i in range(50)}
    names.add(LedgerKey("study", "bbc", "partition:0").filename())
    names.add(LedgerKey("study2", "rotten_tomatoes", "partition:0").filename())
    assert len(names) == 52 and all("/" not in n for n in names)
    assert "/" not in LedgerKey("a/../b", "d", "data:/x/y.csv").filename()
    with pytest.raises(ValueError, match="LedgerKey.node"):
        LedgerKey("study", "rotten_tomatoes", "")


def test_round_trip_is_atomic_and_leaves_no_temporary_file(tmp_path):
    ledger = PrivacyLedger(tmp_path / "deep" / "dir", KEY)
    assert ledger.load(SETTINGS) is None  # no ledger yet: a fresh budget
    state = AccountantState(mechanism="rdp", history=[(SIGMA, Q, 4)], noise_multiplier=SIGMA, sample_rate=Q,
                            delta=DELTA, target_epsilon=3.0)
    ledger.save(state, SETTINGS)
    assert PrivacyLedger(tmp_path / "deep" / "dir", KEY).load(SETTINGS) == state
    assert sorted(p.name for p in ledger.directory.iterdir()) == [KEY.filename()]
    assert json.loads(ledger.path.read_text())["key"] == {"run_name": "study", "dataset": "rotten_tomatoes",
                                                          "node": "partition:0"}


def test_resumed_ledger_refuses_at_the_same_total_as_an_uninterrupted_one(tmp_path):
    """Uninterrupted: one ledger object for all rounds. Resumed: a new object (a new process) every round."""
    kept = PrivacyLedger(tmp_path / "a", KEY)
    histories: dict[str, list] = {"uninterrupted": [], "resumed": []}
    for rnd in range(2):
        for name, ledger in (("uninterrupted", kept), ("resumed", PrivacyLedger(tmp_path / "b", KEY))):
            before, reserved = _reserve(ledger)
            assert before.steps == STEPS * rnd and reserved.steps == STEPS * (rnd + 1)
            assert reserved.epsilon() == pytest.approx(EPS[rnd], rel=1e-12)  # ε keeps rising across "runs"
            histories[name].append(reserved.history)
    assert histories["uninterrupted"] == histories["resumed"]
    for ledger in (kept, PrivacyLedger(tmp_path / "b", KEY)):
        on_disk = ledger.path.read_bytes()
        with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
            _reserve(ledger)  # the third round would exceed the target in both
        assert ledger.path.read_bytes() == on_disk  # a refusal records nothing


def test_fixed_noise_without_a_target_accounts_but_never_refuses(tmp_path):
    ledger = PrivacyLedger(tmp_path, KEY)
    dp = DPConfig(noise_multiplier=SIGMA, accountant="rdp")  # dp-noise alone
    for _ in range(4):
        _, reserved = _reserve(ledger, dp)
    assert reserved.target_epsilon is None and reserved.epsilon() > EPS[2]


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"format": "other"}',
                                     b'{"format": "fedlora.privacy-ledger/1", "key": {}}'])
def test_corrupt_ledger_refuses_and_is_kept(tmp_path, content):
    ledger = PrivacyLedger(tmp_path, KEY)
    tmp_path.mkdir(exist_ok=True)
    ledger.path.write_bytes(content)
    with pytest.raises(LedgerError, match="corrupt.*refusing to train"):
        _reserve(ledger)
    assert ledger.path.read_bytes() == content  # never overwritten with a fresh budget


def test_bad_history_entry_and_foreign_file_are_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path, KEY)
    _reserve(ledger)
    doc = json.loads(ledger.path.read_text())
    doc["accountant"]["history"][0][0] = -1.0
    ledger.path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="corrupt.*noise_multiplier"):
        ledger.load(SETTINGS)
    other = PrivacyLedger(tmp_path, LedgerKey("study", "rotten_tomatoes", "partition:1"))
    _reserve(other)
    other.path.replace(ledger.path)  # another node's ledger under this node's name
    with pytest.raises(LedgerError, match="partition:1"):
        ledger.load(SETTINGS)


@pytest.mark.parametrize("change, field", [
    ({"target_epsilon": 100.0}, "target_epsilon"),  # a server raising the budget on resume
    ({"max_grad_norm": 2.0}, "max_grad_norm"),
    ({"noise_multiplier": None}, "noise_multiplier"),
    ({"accountant": "prv"}, "accountant"),
])
def test_other_dp_settings_on_resume_are_refused_naming_them(tmp_path, change, field):
    ledger = PrivacyLedger(tmp_path, KEY)
    _reserve(ledger)
    dp = DPConfig(**{**DP.to_dict(), **change})
    with pytest.raises(LedgerError, match=f"{field}: ledger"):
        _reserve(ledger, dp)


def test_unreadable_ledger_refuses(tmp_path, monkeypatch):
    ledger = PrivacyLedger(tmp_path, KEY)
    _reserve(ledger)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(LedgerError, match="cannot read it \\(Permission denied\\).*refusing to train"):
        _reserve(ledger)


@pytest.mark.parametrize("fail", ["mkdir", "open", "fsync", "replace"])
def test_failed_write_refuses_and_keeps_the_previous_ledger(tmp_path, monkeypatch, fail):
    """A crash/permission error at each step of the write: the previous ledger stays whole, no temp file."""
    ledger = PrivacyLedger(tmp_path / "state", KEY)
    _reserve(ledger)
    before = ledger.path.read_bytes()

    def boom(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    if fail == "mkdir":
        monkeypatch.setattr(Path, "mkdir", boom)
    else:
        target = Path if fail == "open" else os  # files are opened through pathlib (fedlora.durable)
        real = getattr(target, fail)
        calls = {"n": 0}

        def first_fails(*args, **kwargs):
            if fail == "open" and "w" not in (args[1] if len(args) > 1 else kwargs.get("mode", "r")):
                return real(*args, **kwargs)  # reading the ledger is not the write under test
            calls["n"] += 1
            return boom() if calls["n"] == 1 else real(*args, **kwargs)

        monkeypatch.setattr(target, fail, first_fails)
    with pytest.raises(LedgerError, match="cannot write it"):
        _reserve(ledger)
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert sorted(p.name for p in ledger.directory.iterdir()) == [KEY.filename()]
    assert PrivacyLedger(tmp_path / "state", KEY).load(SETTINGS).steps == STEPS


def test_state_dir_that_is_a_file_refuses(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LedgerError, match="Not a directory.*refusing to train"):
        _reserve(PrivacyLedger(tmp_path / "file" / "ledger", KEY))


def test_after_steps_merges_like_opacus():
    state = AccountantState(mechanism="rdp", history=[(SIGMA, Q, 2)], noise_multiplier=SIGMA, sample_rate=Q,
                            delta=DELTA)
    assert state.after_steps(3).history == [(SIGMA, Q, 5)]
    assert state.after_steps(1, noise_multiplier=2.0).history == [(SIGMA, Q, 2), (2.0, Q, 1)]
    assert state.after_steps(0).history == state.history and state.history == [(SIGMA, Q, 2)]
    acc = state.to_accountant()
    for _ in range(3):
        acc.step(noise_multiplier=SIGMA, sample_rate=Q)
    assert [tuple(e) for e in acc.history] == state.after_steps(3).history
    assert math.isclose(state.epsilon_after(3), state.after_steps(3).epsilon())
