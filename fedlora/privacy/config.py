"""Differential-privacy configurations: sample-level DP-SGD (:class:`DPConfig`) and user-level DP on the
r×r client updates (:class:`UserDPConfig`).

Both are plain dataclasses with serialisable state (``to_dict`` / ``from_dict``) and validation that
raises ``ValueError`` naming the offending field (``"DPConfig.max_grad_norm=0: must be > 0"``).

δ convention (DESIGN §3): δ must be < 1/N, N = the number of examples a client trains on (sample level)
or the client population (user level), since δ ≥ 1/N admits mechanisms that publish one record in the
clear. ``target_delta=None`` resolves to ``1 / (10 · N)`` (:data:`DEFAULT_DELTA_FACTOR`), which always
satisfies the rule. A δ ≥ 1/N is refused by ``check_delta(N)`` unless ``force_delta=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ghost")
#: ``target_delta=None`` resolves to ``1 / (DEFAULT_DELTA_FACTOR · N)``.
DEFAULT_DELTA_FACTOR = 10


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(float(x))


def default_delta(num_records: int) -> float:
    """δ = 1 / (10 · N) for N records (examples or users); always < 1/N."""
    if not isinstance(num_records, int) or isinstance(num_records, bool) or num_records < 1:
        raise ValueError(f"num_records={num_records!r}: must be an integer >= 1")
    return 1.0 / (DEFAULT_DELTA_FACTOR * num_records)


def _check_delta_against(owner: str, delta: float, num_records: int, force: bool) -> None:
    if not isinstance(num_records, int) or isinstance(num_records, bool) or num_records < 1:
        raise ValueError(f"{owner}: num_records={num_records!r} must be an integer >= 1")
    if delta >= 1.0 / num_records and not force:
        raise ValueError(
            f"{owner}.target_delta={delta!r}: must be < 1/N = {1.0 / num_records:.3g} for N={num_records} "
            f"records (set force_delta=True to allow it)"
        )


@dataclass
class DPConfig:
    """Sample-level DP-SGD on a client's inner parameters (opacus).

    Attributes:
        target_epsilon: total ε budget of the whole run (all rounds), > 0; ``math.inf`` disables DP
            unless a fixed ``noise_multiplier`` is given (then ε is accounted but never limits training).
        target_delta: δ ∈ (0, 1); ``None`` → ``1 / (10 · N)`` with N the client's training examples.
        max_grad_norm: per-sample clipping norm C > 0 (flat L2 over all trainable parameters).
        noise_multiplier: fixed σ ≥ 0 (noise std = σ·C on the summed clipped gradients); ``None`` →
            calibrated once for the whole run with :func:`fedlora.privacy.calibrate_noise`.
        accountant: ``"prv"`` (tight, opacus PRVAccountant) or ``"rdp"`` (opacus RDPAccountant).
        force_delta: allow δ ≥ 1/N (refused otherwise).
        grad_sample_mode: ``"hooks"`` (per-sample gradients via opacus hooks) or ``"ghost"`` (opacus ghost
            clipping: per-sample gradient norms only, two backward passes).
    """

    target_epsilon: float = math.inf
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: Literal["prv", "rdp"] = "prv"
    force_delta: bool = False
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"DPConfig.{name}={getattr(self, name)!r}: {why}")

        if not _is_number(self.target_epsilon) or self.target_epsilon <= 0:
            raise bad("target_epsilon", "must be a number > 0 (math.inf disables DP)")
        if self.target_delta is not None and not (_is_number(self.target_delta) and 0 < self.target_delta < 1):
            raise bad("target_delta", "must lie in (0, 1) or be None (1/(10·N))")
        if not _is_number(self.max_grad_norm) or not math.isfinite(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise bad("max_grad_norm", "must be a finite number > 0")
        if self.noise_multiplier is not None and not (
            _is_number(self.noise_multiplier) and math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise bad("noise_multiplier", "must be a finite number >= 0 or None (calibrated)")
        if self.accountant not in ACCOUNTANTS:
            raise bad("accountant", f"must be one of {list(ACCOUNTANTS)}")
        if not isinstance(self.force_delta, bool):
            raise bad("force_delta", "must be a bool")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise bad("grad_sample_mode", f"must be one of {list(GRAD_SAMPLE_MODES)}")

    @property
    def enabled(self) -> bool:
        """DP-SGD runs iff ε is finite or a fixed σ is given."""
        return math.isfinite(self.target_epsilon) or self.noise_multiplier is not None

    def resolve_delta(self, num_examples: int) -> float:
        """δ to use for ``num_examples`` training examples (no 1/N check; see :meth:`check_delta`)."""
        return default_delta(num_examples) if self.target_delta is None else float(self.target_delta)

    def check_delta(self, num_examples: int) -> float:
        """Resolve δ for N = ``num_examples`` and refuse δ ≥ 1/N unless ``force_delta``. Returns δ."""
        delta = self.resolve_delta(num_examples)
        _check_delta_against("DPConfig", delta, num_examples, self.force_delta)
        return delta

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able except ``inf``, which Python's json writes as ``Infinity``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPConfig:
        """Inverse of :meth:`to_dict`; also accepts kebab-case keys (``"target-epsilon"``) and an optional
        ``"dp-"`` prefix (Flower run-config style). Unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = key.removeprefix("dp-").replace("-", "_")
            if name not in names:
                raise ValueError(f"DPConfig: unknown key {key!r} (expected one of {sorted(names)})")
            kwargs[name] = value
        if isinstance(kwargs.get("target_epsilon"), str):
            kwargs["target_epsilon"] = float(kwargs["target_epsilon"])
        return cls(**kwargs)


@dataclass
class UserDPConfig:
    """User-level DP on client updates (Flower fixed-clipping style, accounted with opacus RDP).

    Attributes:
        clip_norm: C_u > 0, flat L2 bound on each client's whole update (all arrays together).
        noise_multiplier: σ_u ≥ 0; Gaussian noise of std σ_u·C_u/m is added to the mean of m sampled updates.
        target_delta: δ ∈ (0, 1); ``None`` → ``1 / (10 · population)``.
        force_delta: allow δ ≥ 1/population.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    target_delta: float | None = None
    force_delta: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"UserDPConfig.{name}={getattr(self, name)!r}: {why}")

        if not _is_number(self.clip_norm) or not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
            raise bad("clip_norm", "must be a finite number > 0")
        if not (_is_number(self.noise_multiplier) and math.isfinite(self.noise_multiplier)) or (
            self.noise_multiplier < 0
        ):
            raise bad("noise_multiplier", "must be a finite number >= 0")
        if self.target_delta is not None and not (_is_number(self.target_delta) and 0 < self.target_delta < 1):
            raise bad("target_delta", "must lie in (0, 1) or be None (1/(10·population))")
        if not isinstance(self.force_delta, bool):
            raise bad("force_delta", "must be a bool")

    def resolve_delta(self, population: int) -> float:
        """δ for a population of ``population`` clients (no 1/N check)."""
        return default_delta(population) if self.target_delta is None else float(self.target_delta)

    def check_delta(self, population: int) -> float:
        """Resolve δ and refuse δ ≥ 1/population unless ``force_delta``. Returns δ."""
        delta = self.resolve_delta(population)
        _check_delta_against("UserDPConfig", delta, population, self.force_delta)
        return delta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UserDPConfig:
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = key.removeprefix("user-dp-").replace("-", "_")
            if name not in names:
                raise ValueError(f"UserDPConfig: unknown key {key!r} (expected one of {sorted(names)})")
            kwargs[name] = value
        return cls(**kwargs)
