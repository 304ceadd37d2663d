"""Privacy accounting with opacus accountants, serialisable across Flower rounds.

Noise calibration (docs/design.md §3): σ is computed ONCE for the whole run, from the most local DP-SGD steps a
client can take over all rounds (it may be sampled in every round):

    q           = B / N                                 Poisson sampling rate (B: batch size, N: examples)
    steps/round = epochs · ⌈N / B⌉, capped at max_steps (:func:`local_steps`)
    total_steps = steps/round · num_rounds               (:func:`total_steps`)
    σ           = opacus.accountants.utils.get_noise_multiplier(ε, δ, q, steps=total_steps, accountant)

Opacus' binary search returns the σ whose ε after ``total_steps`` is within ``epsilon_tolerance`` *below*
the target, so a client that trains every round ends the run at ε ≤ target, and one more round beyond
the plan exceeds it (:meth:`AccountantState.would_exceed` refuses it before training).

:class:`AccountantState` holds opacus' accountant ``history`` — a list of ``(σ, q, steps)`` — plus the
run's plan (σ, q, δ, target ε), as a JSON-able dict; restoring it into a fresh opacus accountant gives
exactly the ε opacus would report had it run all rounds in one process (consecutive identical (σ, q)
entries merge as opacus merges them).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora.privacy.config import ACCOUNTANTS, DEFAULT_ACCOUNTANT

#: Key of the serialised accountant state in a Flower ConfigRecord / Context.state.
STATE_KEY = "dp-accountant-state"


class BudgetExhausted(RuntimeError):
    """Training would push ε past the target: the client refuses to train (nothing was changed)."""

    def __init__(
        self, *, epsilon_spent: float, epsilon_after: float, target_epsilon: float, delta: float, steps: int
    ) -> None:
        self.epsilon_spent = float(epsilon_spent)
        self.epsilon_after = float(epsilon_after)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.steps = int(steps)
        super().__init__(
            f"privacy budget exhausted: ε spent = {self.epsilon_spent:.4g}; {self.steps} more DP-SGD steps would "
            f"reach ε = {self.epsilon_after:.4g} > target ε = {self.target_epsilon:.4g} (δ = {self.delta:.3g}); "
            f"refusing to train"
        )


# ------------------------------------------------------------------------------------ planning
def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """q = B / N, capped at 1 (each example joins each batch independently with probability q)."""
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples={num_examples!r}: must be an integer >= 1")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    return min(1.0, batch_size / num_examples)


def local_steps(num_examples: int, batch_size: int, epochs: int = 1, max_steps: int | None = None) -> int:
    """DP-SGD steps one client takes per round: ``epochs · ⌈N / B⌉`` (an epoch = N examples in expectation
    at q = B/N), capped at ``max_steps`` when given (same semantics as ``fedlora.training.run_steps``)."""
    poisson_sample_rate(num_examples, batch_size)  # validates
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: must be an integer >= 1")
    steps = epochs * math.ceil(num_examples / batch_size)
    if max_steps is not None:
        if not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps={max_steps!r}: must be an integer >= 0")
        steps = min(steps, max_steps)
    return steps


def total_steps(steps_per_round: int, num_rounds: int) -> int:
    """The most DP-SGD steps a client can take in the run: ``steps_per_round · num_rounds``."""
    if not isinstance(steps_per_round, int) or steps_per_round < 0:
        raise ValueError(f"steps_per_round={steps_per_round!r}: must be an integer >= 0")
    if not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds!r}: must be an integer >= 1")
    return steps_per_round * num_rounds


def calibrate_noise(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
    epsilon_tolerance: float = 0.01,
) -> float:
    """σ such that ``total_steps`` Poisson-subsampled Gaussian steps at rate q give ε ≤ ``target_epsilon``
    (within ``epsilon_tolerance`` below it) at δ, via ``opacus.accountants.utils.get_noise_multiplier``.

    Call it once per run with ``total_steps = local_steps(...) · num_rounds``. ``target_epsilon=inf``
    returns 0.0 (no noise). Raises ``ValueError`` naming the bad argument, or opacus' ValueError when the
    budget needs σ > 1e6.
    """
    if not isinstance(target_epsilon, (int, float)) or math.isnan(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon={target_epsilon!r}: must be > 0")
    if not (isinstance(target_delta, (int, float)) and 0 < target_delta < 1):
        raise ValueError(f"target_delta={target_delta!r}: must lie in (0, 1)")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate={sample_rate!r}: must lie in (0, 1]")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: must be an integer >= 1")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r}: must be one of {list(ACCOUNTANTS)}")
    if math.isinf(target_epsilon):
        return 0.0
    return float(
        get_noise_multiplier(
            target_epsilon=float(target_epsilon),
            target_delta=float(target_delta),
            sample_rate=float(sample_rate),
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    )


def epsilon_of(history: list[tuple[float, float, int]], delta: float, mechanism: str = DEFAULT_ACCOUNTANT) -> float:
    """ε of an opacus history ``[(σ, q, steps), ...]`` at δ, computed by a fresh opacus accountant.

    0.0 for an empty history; ``inf`` if any step ran with σ = 0 (no noise: no DP guarantee)."""
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta={delta!r}: must lie in (0, 1)")
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not entries:
        return 0.0
    if any(s == 0.0 for s, _, _ in entries):
        return math.inf
    return _cached_epsilon(entries, float(delta), mechanism)


@functools.lru_cache(maxsize=256)
def _cached_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, mechanism: str) -> float:
    """opacus ε of a history (a pure function of its arguments; PRV takes ~0.5 s, hence the cache)."""
    acc = create_accountant(mechanism)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


# ------------------------------------------------------------------------------------ state
def _check_entry(entry: Any) -> tuple[float, float, int]:
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise ValueError(f"AccountantState.history entry {entry!r}: must be (noise_multiplier, sample_rate, steps)")
    sigma, q, n = entry
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"AccountantState.history entry {entry!r}: noise_multiplier must be finite and >= 0")
    if not (isinstance(q, (int, float)) and 0 < q <= 1):
        raise ValueError(f"AccountantState.history entry {entry!r}: sample_rate must lie in (0, 1]")
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1) and not (
        isinstance(n, float) and n.is_integer() and n >= 1
    ):
        raise ValueError(f"AccountantState.history entry {entry!r}: steps must be an integer >= 1")
    return float(sigma), float(q), int(n)


@dataclass
class AccountantState:
    """Serialisable privacy-accountant state of one client (or of the server, for user-level DP).

    Attributes:
        mechanism: ``"prv"`` or ``"rdp"`` (the opacus accountant that computes ε).
        history: opacus accountant history, ``[(σ, q, steps), ...]`` in order; consecutive entries with the
            same (σ, q) are merged, as opacus does.
        noise_multiplier: the run's planned σ (calibrated once), or None before the first round.
        sample_rate: the planned q = B/N, or None.
        delta: the δ ε is reported at, or None.
        target_epsilon: the run's ε budget (None = unlimited).

    Invariant: ``epsilon(δ)`` equals what an opacus accountant that had taken all these steps reports.
    """

    mechanism: str = DEFAULT_ACCOUNTANT
    history: list[tuple[float, float, int]] = field(default_factory=list)
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.mechanism not in ACCOUNTANTS:
            raise ValueError(f"AccountantState.mechanism={self.mechanism!r}: must be one of {list(ACCOUNTANTS)}")
        self.history = [_check_entry(e) for e in self.history]
        if self.target_epsilon is not None and math.isinf(self.target_epsilon):
            self.target_epsilon = None

    # -------------------------------------------------------------- opacus bridge
    def to_opacus(self) -> dict[str, Any]:
        """An opacus accountant ``state_dict`` (``{"history", "mechanism"}``) for ``load_state_dict``."""
        return {"history": [tuple(e) for e in self.history], "mechanism": self.mechanism}

    def to_accountant(self) -> IAccountant:
        """A fresh opacus accountant restored from this state."""
        acc = create_accountant(self.mechanism)
        acc.load_state_dict(self.to_opacus())
        return acc

    def with_history(self, accountant: IAccountant) -> AccountantState:
        """A copy of this state (same plan) with the history of ``accountant`` (same mechanism)."""
        if accountant.mechanism() != self.mechanism:
            raise ValueError(
                f"accountant mechanism {accountant.mechanism()!r} differs from the state's {self.mechanism!r}"
            )
        return replace(self, history=[tuple(e) for e in accountant.history])

    # -------------------------------------------------------------- queries
    @property
    def steps(self) -> int:
        """Total steps accounted so far."""
        return sum(n for _, _, n in self.history)

    def _delta(self, delta: float | None) -> float:
        d = self.delta if delta is None else delta
        if d is None:
            raise ValueError("delta: not given and the state has no planned delta")
        return float(d)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at δ (default: the planned δ)."""
        return epsilon_of(self.history, self._delta(delta), self.mechanism)

    def epsilon_after(
        self,
        extra_steps: int,
        delta: float | None = None,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
    ) -> float:
        """ε after ``extra_steps`` hypothetical further steps at (σ, q) (default: the planned σ, q)."""
        return self.after_steps(extra_steps, noise_multiplier, sample_rate).epsilon(delta)

    def after_steps(self, extra_steps: int, noise_multiplier: float | None = None,
                    sample_rate: float | None = None) -> AccountantState:
        """A copy of this state (same plan) that has also taken ``extra_steps`` steps at (σ, q) (default: the
        planned σ, q), merged with the last history entry exactly as opacus' ``accountant.step()`` merges.

        Invariant: its history equals the one an opacus accountant restored from this state holds after
        ``extra_steps`` calls of ``step(noise_multiplier=σ, sample_rate=q)``."""
        if not isinstance(extra_steps, int) or isinstance(extra_steps, bool) or extra_steps < 0:
            raise ValueError(f"extra_steps={extra_steps!r}: must be an integer >= 0")
        if extra_steps == 0:
            return replace(self, history=list(self.history))
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        q = self.sample_rate if sample_rate is None else sample_rate
        if sigma is None or q is None:
            raise ValueError("noise_multiplier/sample_rate: not given and the state has no plan")
        history = list(self.history)
        if history and history[-1][0] == sigma and history[-1][1] == q:
            s, r, n = history.pop()
            history.append((s, r, n + extra_steps))
        else:
            history.append((float(sigma), float(q), extra_steps))
        return replace(self, history=history)

    def _target(self, target_epsilon: float | None) -> float | None:
        """The ε budget to check against: ``target_epsilon``, else the planned one; None = unlimited."""
        target = self.target_epsilon if target_epsilon is None else target_epsilon
        return None if target is None or math.isinf(target) else float(target)

    def would_exceed(self, extra_steps: int, target_epsilon: float | None = None, delta: float | None = None,
                     noise_multiplier: float | None = None, sample_rate: float | None = None) -> bool:
        """True iff ``extra_steps`` more steps at (σ, q) would give ε > target (default: the planned target;
        no target = never)."""
        target = self._target(target_epsilon)
        return target is not None and self.epsilon_after(extra_steps, delta, noise_multiplier, sample_rate) > target

    def check_budget(self, extra_steps: int, target_epsilon: float | None = None, delta: float | None = None,
                     noise_multiplier: float | None = None, sample_rate: float | None = None) -> float:
        """Raise :class:`BudgetExhausted` if ``extra_steps`` more steps would exceed the target; else return
        the ε those steps would reach."""
        target = self._target(target_epsilon)
        after = self.epsilon_after(extra_steps, delta, noise_multiplier, sample_rate)
        if target is not None and after > target:
            raise BudgetExhausted(
                epsilon_spent=self.epsilon(delta), epsilon_after=after, target_epsilon=target,
                delta=self._delta(delta), steps=extra_steps,
            )
        return after

    # -------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: floats, ints, None and lists only."""
        return {
            "mechanism": self.mechanism,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AccountantState:
        """Inverse of :meth:`to_dict` (validates every history entry)."""
        known = {"mechanism", "history", "noise_multiplier", "sample_rate", "delta", "target_epsilon"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AccountantState: unknown key(s) {unknown}")
        return cls(**{k: (list(v) if k == "history" else v) for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, s: str | bytes) -> AccountantState:
        return cls.from_dict(json.loads(s))

    def to_config(self, key: str = STATE_KEY) -> dict[str, str]:
        """``{key: JSON string}``: a valid Flower ``ConfigRecord`` payload (str values only)."""
        return {key: self.to_json()}

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], key: str = STATE_KEY, *, mechanism: str = DEFAULT_ACCOUNTANT
    ) -> AccountantState:
        """Restore from a ConfigRecord-like mapping written by :meth:`to_config`; a fresh empty state with
        ``mechanism`` if ``key`` is absent (first round). A stored state of another mechanism is refused."""
        if key not in config:
            return cls(mechanism=mechanism)
        state = cls.from_json(config[key])
        if state.mechanism != mechanism:
            raise ValueError(
                f"AccountantState.mechanism={state.mechanism!r}: the stored state was kept with another accountant "
                f"than the configured {mechanism!r}"
            )
        return state
