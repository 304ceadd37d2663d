"""Differential-privacy configurations: sample-level DP-SGD (:class:`DPConfig`) and user-level DP on the
r×r client updates (:class:`UserDPConfig`).

Both are plain dataclasses with serialisable state (``to_dict`` / ``from_dict``) and validation that
raises ``ValueError`` naming the offending field (``"DPConfig.max_grad_norm=0: must be > 0"``).

δ convention (docs/design.md §3): δ must be < 1/N, N = the number of examples a client trains on (sample level)
or the client population (user level), since δ ≥ 1/N admits mechanisms that publish one record in the
clear. ``target_delta=None`` resolves to ``1 / (10 · N)`` (:data:`DEFAULT_DELTA_FACTOR`), which always
satisfies the rule. A δ ≥ 1/N is refused by ``check_delta(N)`` (:class:`DeltaRefused`, a ``ValueError`` whose
text names N: it stays on the node, clients/refusal.py) unless ``force_delta=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal, TypeVar

#: opacus accountants that compute ε: ``"prv"`` (PRVAccountant, tight) and ``"rdp"`` (RDPAccountant)
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
#: the accountant used when none is named: by :class:`DPConfig`, :class:`~fedlora.privacy.AccountantState`,
#: the accounting functions and the run config's ``dp-accountant``
DEFAULT_ACCOUNTANT: Literal["prv", "rdp"] = "rdp"
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ghost")
#: ``target_delta=None`` resolves to ``1 / (DEFAULT_DELTA_FACTOR · N)``.
DEFAULT_DELTA_FACTOR = 10

_C = TypeVar("_C", bound="_DeltaRule")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(float(x))


def _is_finite_at_least(x: Any, low: float, strict: bool) -> bool:
    """``x`` is a finite number > ``low`` (``strict``) or ≥ ``low``."""
    return _is_number(x) and math.isfinite(x) and (x > low if strict else x >= low)


def _check_records(num_records: Any, what: str) -> None:
    if not isinstance(num_records, int) or isinstance(num_records, bool) or num_records < 1:
        raise ValueError(f"{what}num_records={num_records!r}: must be an integer >= 1")


def default_delta(num_records: int) -> float:
    """δ = 1 / (10 · N) for N records (examples or users); always < 1/N."""
    _check_records(num_records, "")
    return 1.0 / (DEFAULT_DELTA_FACTOR * num_records)


class DeltaRefused(ValueError):
    """δ ≥ 1/N for the N records at hand (and ``force_delta`` is off). The text names N: a node keeps it local."""


class _DeltaRule:
    """What both configs share: the δ rule, ``ValueError``s naming the field, and the dict round trip.

    Subclasses are dataclasses with the fields ``target_delta`` and ``force_delta``; ``_KEY_PREFIX`` is the
    optional run-config prefix of their keys (``"dp-"``, ``"user-dp-"``).
    """

    _KEY_PREFIX: ClassVar[str] = ""
    target_delta: float | None
    force_delta: bool

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {why}")

    def _check_delta_fields(self) -> None:
        if self.target_delta is not None and not (_is_number(self.target_delta) and 0 < self.target_delta < 1):
            raise self._bad("target_delta", "must lie in (0, 1) or be None (1/(10·N))")
        if not isinstance(self.force_delta, bool):
            raise self._bad("force_delta", "must be a bool")

    def resolve_delta(self, num_records: int) -> float:
        """δ for N = ``num_records`` records (a client's training examples, or the client population for user
        level); no 1/N check (see :meth:`check_delta`)."""
        return default_delta(num_records) if self.target_delta is None else float(self.target_delta)

    def check_delta(self, num_records: int) -> float:
        """Resolve δ for N = ``num_records`` and refuse δ ≥ 1/N unless ``force_delta``. Returns δ."""
        delta = self.resolve_delta(num_records)
        owner = type(self).__name__
        _check_records(num_records, f"{owner}: ")
        if delta >= 1.0 / num_records and not self.force_delta:
            raise DeltaRefused(
                f"{owner}.target_delta={delta!r}: must be < 1/N = {1.0 / num_records:.3g} for N={num_records} "
                f"records (set force_delta=True to allow it)"
            )
        return delta

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able except ``inf``, which Python's json writes as ``Infinity``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        """Inverse of :meth:`to_dict`; also accepts kebab-case keys (``"target-epsilon"``) and the optional
        run-config prefix (``"dp-"`` / ``"user-dp-"``). Unknown keys raise ``ValueError``; a string
        ``target_epsilon`` (``"inf"``) is read as a float."""
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = key.removeprefix(cls._KEY_PREFIX).replace("-", "_")
            if name not in names:
                raise ValueError(f"{cls.__name__}: unknown key {key!r} (expected one of {sorted(names)})")
            kwargs[name] = value
        if isinstance(kwargs.get("target_epsilon"), str):
            kwargs["target_epsilon"] = float(kwargs["target_epsilon"])
        return cls(**kwargs)


@dataclass
class DPConfig(_DeltaRule):
    """Sample-level DP-SGD on a client's inner parameters (opacus).

    Attributes:
        target_epsilon: total ε budget of the whole run (all rounds), > 0; ``math.inf`` disables DP
            unless a fixed ``noise_multiplier`` is given (then ε is accounted but never limits training).
        target_delta: δ ∈ (0, 1); ``None`` → ``1 / (10 · N)`` with N the client's training examples.
        max_grad_norm: per-sample clipping norm C > 0 (flat L2 over all trainable parameters).
        noise_multiplier: fixed σ ≥ 0 (noise std = σ·C on the summed clipped gradients); ``None`` →
            calibrated once for the whole run with :func:`fedlora.privacy.calibrate_noise`.
        accountant: ``"prv"`` (tight, opacus PRVAccountant) or ``"rdp"`` (opacus RDPAccountant); default
            :data:`DEFAULT_ACCOUNTANT`.
        force_delta: allow δ ≥ 1/N (refused otherwise).
        grad_sample_mode: ``"hooks"`` (per-sample gradients via opacus hooks) or ``"ghost"`` (opacus ghost
            clipping: per-sample gradient norms only, two backward passes).
    """

    _KEY_PREFIX: ClassVar[str] = "dp-"

    target_epsilon: float = math.inf
    target_delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: Literal["prv", "rdp"] = DEFAULT_ACCOUNTANT
    force_delta: bool = False
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if not _is_number(self.target_epsilon) or self.target_epsilon <= 0:
            raise self._bad("target_epsilon", "must be a number > 0 (math.inf disables DP)")
        self._check_delta_fields()
        if not _is_finite_at_least(self.max_grad_norm, 0.0, strict=True):
            raise self._bad("max_grad_norm", "must be a finite number > 0")
        if self.noise_multiplier is not None and not _is_finite_at_least(self.noise_multiplier, 0.0, strict=False):
            raise self._bad("noise_multiplier", "must be a finite number >= 0 or None (calibrated)")
        if self.accountant not in ACCOUNTANTS:
            raise self._bad("accountant", f"must be one of {list(ACCOUNTANTS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise self._bad("grad_sample_mode", f"must be one of {list(GRAD_SAMPLE_MODES)}")

    @property
    def enabled(self) -> bool:
        """DP-SGD runs iff ε is finite or a fixed σ is given."""
        return math.isfinite(self.target_epsilon) or self.noise_multiplier is not None


@dataclass
class UserDPConfig(_DeltaRule):
    """User-level DP on client updates (Flower fixed-clipping style, accounted with opacus RDP).

    Attributes:
        clip_norm: C_u > 0, flat L2 bound on each client's whole update (all arrays together).
        noise_multiplier: σ_u ≥ 0; Gaussian noise of std σ_u·C_u/m is added to the mean of m sampled updates.
        target_delta: δ ∈ (0, 1); ``None`` → ``1 / (10 · population)``.
        force_delta: allow δ ≥ 1/population.
    """

    _KEY_PREFIX: ClassVar[str] = "user-dp-"

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    target_delta: float | None = None
    force_delta: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if not _is_finite_at_least(self.clip_norm, 0.0, strict=True):
            raise self._bad("clip_norm", "must be a finite number > 0")
        if not _is_finite_at_least(self.noise_multiplier, 0.0, strict=False):
            raise self._bad("noise_multiplier", "must be a finite number >= 0")
        self._check_delta_fields()
