"""User-level differential privacy as a wrapper strategy (in the style of Flower's
``DifferentialPrivacyServerSideFixedClipping``), for the exact nested strategies (fedsb, hetero, flora).

Clients clip their whole update to L2 norm C (``clients/dp.py``). With uniform weights over the m clients
whose updates were aggregated, one client moves the new global state by at most C/m, so
:class:`UserLevelDP` adds N(0, (σ·C/m)²) to every coordinate of the *change* of the global state
(new − sent) and accounts one Gaussian mechanism per aggregated round with opacus RDP at sampling rate
q = (clients sampled) / population (:mod:`fedlora.privacy.user_level`). Rounds that keep the previous global
state release nothing: no noise, no accounting.

The server trusts no client to clip: the wrapped strategy's screening rejects (category ``clip``, logged)
every update whose norm ‖Δᵢ‖ exceeds C (up to :func:`strategies.screening.clip_tolerance`), and the round
goes on with the rest. δ must be < 1/population. With a target ε (``user-dp-epsilon``) either σ is
calibrated at start for the planned rounds and sampling rate (:meth:`UserLevelDP.calibrated`, opacus
``get_noise_multiplier`` with the RDP accountant), or, with σ given, :meth:`UserLevelDP.configure_train`
raises :class:`UserBudgetExhausted` before sending a round whose release would push ε past the target.

Distributed DP: wrapped around :class:`~strategies.secure_aggregation.SecureAggregation` (``strategy`` has
``distribute_noise``), the wrapper hands it σ and C; the nodes then add their share of the noise inside their
masks (the server never sees an un-noised sum) and this wrapper adds none, only accounts (at σ: the survivors'
noise has variance ≥ σ²C² on the sum, see that module).

Why not Flower's own wrappers: they clip and noise reply arrays of identical shapes (not true with
heterogeneous ranks, where node i uploads rᵢ×rᵢ), and their accountant accepts only plain FedAvg.

The noise generator is seeded from OS entropy (``np.random.SeedSequence()``): nothing a client knows (the
run seed, its config) lets it regenerate the noise. Its state and the accountant's go into the strategy
checkpoint (``state_dict()["user-dp"]``), so a resumed run draws exactly the noise the uninterrupted run
would have drawn.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.nested_base import NestedInnerStrategy
from strategies.wire import State, state_to_arrayrecord

LOGGER = logging.getLogger("fedlora.strategy")
#: key of the wrapper's state in the strategy checkpoint
STATE_KEY = "user-dp"


class UserBudgetExhausted(RuntimeError):
    """The next round's release would push user-level ε past the target: the run stops before it (nothing
    was sent; the checkpoint keeps the last released round)."""


def _privacy() -> ModuleType:
    """``fedlora.privacy``, imported on first use: it loads opacus (1–2 s), which ``import strategies``
    should not cost every process (clients, tools) that never wraps a strategy."""
    return importlib.import_module("fedlora.privacy")


class UserLevelDP(Strategy):
    """Gaussian noise on the change of the wrapped strategy's global state + RDP accounting.

    Args:
        strategy: the wrapped strategy: a nested one (fedsb, hetero, flora) with ``weighting="uniform"``.
        noise_multiplier: σ ≥ 0.
        clip_norm: C > 0, the L2 bound the clients clip their updates to.
        delta: δ in (0, 1) at which ``user-dp-epsilon`` is reported.
        population: number of clients that could be sampled (q = sampled / population), ≥ 1; δ < 1/population.
        target_epsilon: ε budget of the run (> 0), or ``None``: ε is reported but never stops the run.

    Every round adds ``user-dp-epsilon`` to the round's metrics (the MetricRecord and the wrapped
    strategy's ``history[-1]``), and, when noise was added, ``user-dp-noise-std`` (σC/m) and
    ``user-dp-sample-rate`` (sampled / population).
    """

    def __init__(
        self, strategy: NestedInnerStrategy, noise_multiplier: float, clip_norm: float, delta: float, population: int,
        target_epsilon: float | None = None,
    ) -> None:
        if not isinstance(getattr(strategy, "strategy", strategy), NestedInnerStrategy):  # or SecureAggregation's
            raise ValueError(f"strategy={type(strategy).__name__}: user-level DP wraps fedsb, hetero or flora")
        if strategy.weighting != "uniform":
            raise ValueError(
                f"weighting={strategy.weighting!r}: user-level DP needs weighting='uniform' (sensitivity C/m)"
            )
        if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm={clip_norm!r}: must be a finite number > 0")
        if strategy.norm_factor is not None:
            raise ValueError(f"norm_factor={strategy.norm_factor!r}: must be None under user-level DP (a median-"
                             "relative bound lets one client's update decide whether another's counts)")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta={delta!r}: must be in (0, 1)")
        if isinstance(population, bool) or not isinstance(population, int) or population < 1:
            raise ValueError(f"population={population!r}: must be an integer >= 1")
        if delta >= 1.0 / population:
            raise ValueError(f"delta={delta!r}: must be < 1/population = {1.0 / population:.3g} (population "
                             f"{population}): a larger δ admits publishing one client's update in the clear")
        if target_epsilon is not None and not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0
                                                and math.isfinite(target_epsilon)):
            raise ValueError(f"target_epsilon={target_epsilon!r}: must be a finite number > 0 or None")
        self.strategy = strategy
        self.accountant = _privacy().UserLevelAccountant(noise_multiplier)  # validates σ
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.population = int(population)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        strategy.clip_norm = self.clip_norm  # screening rejects every update above C
        if hasattr(strategy, "distribute_noise"):  # SecureAggregation: the nodes add the noise inside their masks
            strategy.distribute_noise(self.noise_multiplier, self.clip_norm)
        self._rng = np.random.default_rng(np.random.SeedSequence())  # OS entropy, never the run seed
        self._sent: State | None = None

    @classmethod
    def calibrated(cls, strategy: NestedInnerStrategy, target_epsilon: float, clip_norm: float, delta: float,
                   population: int, num_rounds: int) -> UserLevelDP:
        """A wrapper whose σ is calibrated once so that ``num_rounds`` releases at the planned sampling rate
        q = max(⌊population·fraction_train⌋, min_train_nodes) / population (capped at 1) give ε ≤
        ``target_epsilon`` at δ (opacus ``get_noise_multiplier``, RDP accountant, within 0.01 below)."""
        if isinstance(population, bool) or not isinstance(population, int) or population < 1:
            raise ValueError(f"population={population!r}: must be an integer >= 1")
        planned = min(population, max(int(population * strategy.fraction_train), strategy.min_train_nodes))
        sigma = _privacy().calibrate_noise(target_epsilon, delta, planned / population, num_rounds, "rdp")
        LOGGER.info("user-level DP: sigma %.6g calibrated for epsilon %g at delta %.3g over %d rounds, q = %d/%d",
                    sigma, target_epsilon, delta, num_rounds, planned, population)
        return cls(strategy, sigma, clip_norm, delta, population, target_epsilon)

    def __repr__(self) -> str:
        return f"UserLevelDP({self.strategy!r}, noise_multiplier={self.noise_multiplier}, clip_norm={self.clip_norm})"

    # ---------------------------------------------------------------- the wrapped strategy's round state
    @property
    def round(self) -> int:
        """The wrapped strategy's last aggregated round."""
        return self.strategy.round

    @property
    def history(self) -> list[dict[str, Any]]:
        """The wrapped strategy's round records (with the ``user-dp-*`` entries added)."""
        return self.strategy.history

    @property
    def min_train_nodes(self) -> int:
        """The wrapped strategy's ``min_train_nodes``."""
        return self.strategy.min_train_nodes

    @property
    def global_state(self) -> State | None:
        """The wrapped strategy's global state (noised after every aggregated round)."""
        return self.strategy.global_state

    def global_arrayrecord(self) -> ArrayRecord:
        """The wrapped strategy's global state as an ArrayRecord."""
        return self.strategy.global_arrayrecord()

    def epsilon(self) -> float:
        """User-level ε spent so far at δ (0 before the first release)."""
        return float(self.accountant.epsilon(self.delta)) if self.accountant.rounds else 0.0

    # ---------------------------------------------------------------- Flower API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; remember the global state sent (the wrapped strategy adopts ``arrays``).

        Raises:
            UserBudgetExhausted: with a target ε, if releasing this round (at q = sampled / population) would
                push ε past it; raised before any message is sent.
        """
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.target_epsilon is not None and messages:
            q = min(1.0, len(messages) / self.population)
            after = self.accountant.state.epsilon_after(1, self.delta, self.noise_multiplier, q)
            if after > self.target_epsilon:
                raise UserBudgetExhausted(
                    f"user-level DP budget: round {self.strategy.round + 1} would raise epsilon from "
                    f"{self.epsilon():.4g} to {after:.4g} > user-dp-epsilon={self.target_epsilon:g} (delta "
                    f"{self.delta:.3g}, sigma {self.noise_multiplier:.4g}, q {q:.3g}); stopping before it: the "
                    f"checkpoint keeps round {self.strategy.round}")
        self._sent = self.strategy.global_state
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate, then noise the change of the global state, write it back and account the release."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        record = self.strategy.history[-1]
        used = 0 if record.get("kept-previous") else int(record.get("clients-used") or 0)
        sampled = max(used, int(record.get("clients-sampled") or 0))
        population = max(self.population, sampled)
        after = self.strategy.global_state
        dp: dict[str, float] = {"user-dp-epsilon": self.epsilon()}
        if used > 0 and after is not None and self._sent is not None and after is not self._sent:
            if not getattr(self.strategy, "noise_in_mask", False):  # else the nodes noised inside their masks
                before = self._sent
                change = {k: after[k].astype(np.float64) - before[k].astype(np.float64) for k in after}
                noisy = _privacy().add_gaussian_noise(change, self.noise_multiplier, self.clip_norm, used, self._rng)
                new = {k: (before[k].astype(np.float64) + noisy[k]).astype(after[k].dtype) for k in after}
                self.strategy.global_state = new
                arrays = state_to_arrayrecord(new)
            self.accountant.step(sampled, population)
            dp = {
                "user-dp-epsilon": self.epsilon(),
                "user-dp-noise-std": self.noise_multiplier * self.clip_norm / used,
                "user-dp-sample-rate": sampled / population,
            }
            LOGGER.info("round %d: user-level DP noise std %.4g added, epsilon %.4g", record.get("round", 0),
                        dp["user-dp-noise-std"], dp["user-dp-epsilon"])
        self._sent = None
        record.update(dp)
        return arrays, MetricRecord({**(dict(metrics) if metrics is not None else {}), **dp})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the DP settings, then the wrapped strategy's summary."""
        LOGGER.info("user-level DP: noise_multiplier=%s clip_norm=%s delta=%s population=%d target_epsilon=%s",
                    self.noise_multiplier, self.clip_norm, self.delta, self.population, self.target_epsilon)
        self.strategy.summary()

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's checkpoint state plus ``"user-dp"``: the accountant and the noise
        generator state (JSON-serialisable)."""
        state = self.strategy.state_dict()
        state[STATE_KEY] = {
            "accountant": self.accountant.to_config(),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the wrapped strategy's part too).

        Raises:
            ValueError: the checkpoint has no user-level DP state (resuming without it would restart the
                privacy accounting at zero).
        """
        own = state.get(STATE_KEY)
        if not isinstance(own, Mapping):
            raise ValueError(f"checkpoint has no {STATE_KEY!r} state: it was not written by a user-level DP run")
        self.strategy.load_state_dict({k: v for k, v in state.items() if k != STATE_KEY})
        self.accountant = _privacy().UserLevelAccountant.from_config(own["accountant"], self.noise_multiplier)
        self._rng.bit_generator.state = copy.deepcopy(own["rng"])
        self._sent = None
