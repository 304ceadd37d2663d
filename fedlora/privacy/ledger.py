"""The node's privacy ledger: its DP-SGD accountant state on node-local disk, durable across Flower runs.

A Flower run's ``Context.state`` dies with the run, and ``resume=true`` starts a new run: an accountant kept
there restarts at ε = 0 and spends the whole budget again. The ledger is the one source of truth of a
node's DP-SGD spending instead: one JSON file per :class:`LedgerKey` under the node's state directory
(:func:`state_dir`: node config ``state-dir``, else ``$FEDLORA_STATE_DIR``, else ``~/.fedlora/ledger``).

Ledger key (:class:`LedgerKey`): the federation's run name (the run config's ``run-name``, or its default
name), the dataset and the node's identity (``partition:<i>`` or ``data:<path>``,
``fedlora.identity.node_identity``). What is spent is privacy of a node's data under one named study, so
the key names the study, the data and the node; SuperNodes simulated on one machine have distinct
identities and hence distinct files. Model, strategy and DP settings are NOT in the key: a run that
re-uses a run name with another model still spends the same budget, and a run that re-uses it with other
DP settings is refused (:class:`LedgerSettings`, the settings σ was calibrated for), never recalibrated.

Invariants:

- the node trusts only this file: no number from the server enters it (the target ε, δ, C, σ of the run
  config are checked against the ones stored at the first round and a difference refuses to train);
- spending is recorded BEFORE training (:func:`reserve_round`): a crash after the write over-counts by
  one round, never under-counts, and an update is released only after its steps are on disk;
- a missing file is a fresh ledger (ε = 0); an unreadable, corrupt, foreign or mismatched file raises
  :class:`LedgerError` (the node refuses to train), never a fresh start;
- writes are atomic and durable: a temporary file in the same directory, fsync, ``os.replace``, fsync of
  the directory: a reader sees the previous complete ledger or the new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from fedlora.durable import replace_durably
from fedlora.privacy.accounting import AccountantState, local_steps
from fedlora.privacy.config import DPConfig

#: node config key of the state directory (``flower-supernode --node-config "state-dir=/var/lib/fedlora"``)
NODE_CONFIG_KEY = "state-dir"
#: environment variable overriding the default state directory (tests, CI)
STATE_DIR_ENV = "FEDLORA_STATE_DIR"
DEFAULT_STATE_DIR = "~/.fedlora/ledger"
LEDGER_FORMAT = "fedlora.privacy-ledger/1"


class LedgerError(RuntimeError):
    """The ledger cannot be trusted or written: the node refuses to train (nothing was trained or sent)."""


def state_dir(node_state_dir: str | None = None) -> Path:
    """The node's state directory: node config ``state-dir`` if set, else ``$FEDLORA_STATE_DIR``, else
    ``~/.fedlora/ledger`` (``~`` expanded)."""
    chosen = node_state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return Path(os.path.expanduser(str(chosen)))


@dataclass(frozen=True)
class LedgerKey:
    """What one ledger file accounts for: the run name, the dataset and the node's identity."""

    run_name: str
    dataset: str
    node: str

    def __post_init__(self) -> None:
        for name in ("run_name", "dataset", "node"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"LedgerKey.{name}={getattr(self, name)!r}: must be a non-empty string")

    def filename(self) -> str:
        """``<readable part>-<sha256 prefix of the whole key>.json``: distinct keys, distinct files."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.run_name}-{self.node}")[:80]
        return f"{readable}-{digest}.json"


@dataclass(frozen=True)
class LedgerSettings:
    """The settings a ledger's σ was calibrated for; a later round with other settings is refused.

    ``target_epsilon``/``target_delta``/``noise_multiplier`` are None for "unlimited" / "1/(10·N)" /
    "calibrated"; ``batch_size`` fixes q = B/N together with the node's data."""

    accountant: str
    target_epsilon: float | None
    target_delta: float | None
    max_grad_norm: float
    noise_multiplier: float | None
    batch_size: int

    @classmethod
    def of(cls, dp: DPConfig, batch_size: int) -> LedgerSettings:
        return cls(accountant=dp.accountant,
                   target_epsilon=float(dp.target_epsilon) if math.isfinite(dp.target_epsilon) else None,
                   target_delta=dp.target_delta, max_grad_norm=float(dp.max_grad_norm),
                   noise_multiplier=dp.noise_multiplier, batch_size=int(batch_size))

    def differences(self, stored: LedgerSettings) -> list[str]:
        """``"<field>: ledger <stored>, now <this>"`` for every field that differs."""
        return [f"{k}: ledger {v!r}, now {getattr(self, k)!r}" for k, v in asdict(stored).items()
                if v != getattr(self, k)]


class PrivacyLedger:
    """One node's ledger file for one :class:`LedgerKey` in ``directory``."""

    def __init__(self, directory: Path | str, key: LedgerKey) -> None:
        self.directory = Path(directory)
        self.key = key
        self.path = self.directory / key.filename()

    def _refuse(self, why: str) -> LedgerError:
        return LedgerError(f"privacy ledger {self.path}: {why}; refusing to train (the node never restarts its "
                           f"privacy budget from 0: fix or restore the file, or use a new run-name)")

    def load(self, settings: LedgerSettings) -> AccountantState | None:
        """The stored accountant state, or None if this key has no ledger yet.

        Raises:
            LedgerError: the file or its directory cannot be read, is not valid JSON, is not a ledger of
                this key, or was kept for other ``settings``.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self._refuse(f"cannot read it ({err.strerror or err})") from err
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format is not {LEDGER_FORMAT!r}")
            stored_settings = LedgerSettings(**doc["settings"])
            state = AccountantState.from_dict(doc["accountant"])
            key = LedgerKey(**doc["key"])
        except (ValueError, TypeError, KeyError) as err:
            raise self._refuse(f"corrupt ({type(err).__name__}: {err})") from err
        if key != self.key:
            raise self._refuse(f"it holds the ledger of {asdict(key)}, not of {asdict(self.key)}")
        diff = settings.differences(stored_settings)
        if diff:
            raise self._refuse("the run's DP settings differ from those the ledger was calibrated for ("
                               + "; ".join(diff) + ")")
        return state

    def save(self, state: AccountantState, settings: LedgerSettings) -> None:
        """Replace the ledger with ``state`` atomically and durably (see the module docstring).

        Raises:
            LedgerError: the directory cannot be created or written (the previous ledger is unchanged).
        """
        doc = {"format": LEDGER_FORMAT, "key": asdict(self.key), "settings": asdict(settings),
               "accountant": state.to_dict()}
        data = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False).encode()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            replace_durably(self.path, data, mode=0o600)
        except OSError as err:
            raise self._refuse(f"cannot write it ({err.strerror or err})") from err


def reserve_round(ledger: PrivacyLedger, dp: DPConfig, *, num_examples: int, batch_size: int, epochs: int,
                  steps: int | None, num_rounds: int) -> tuple[AccountantState, AccountantState]:
    """Load the ledger, plan σ (stored, fixed or calibrated once), check the budget and record this round's
    steps on disk BEFORE training.

    Returns ``(before, reserved)``: the state to train from and the state after this round's steps (now
    in the ledger). Raises :class:`~fedlora.privacy.BudgetExhausted` (ledger unchanged) if the round would
    exceed the target ε, :class:`LedgerError` if the ledger cannot be read, trusted or written.
    """
    from fedlora.privacy.dp_sgd import plan_noise

    settings = LedgerSettings.of(dp, batch_size)
    stored = ledger.load(settings)
    before = stored if stored is not None else AccountantState(mechanism=dp.accountant)
    n_steps = local_steps(num_examples, batch_size, epochs, steps)
    plan = plan_noise(dp, before, num_examples=num_examples, batch_size=batch_size, steps_per_round=n_steps,
                      num_rounds=num_rounds)
    plan.check_budget(n_steps)
    reserved = plan.after_steps(n_steps)
    ledger.save(reserved, settings)
    return plan, reserved

