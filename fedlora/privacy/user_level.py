"""User-level DP on client updates of heterogeneous shapes (r×r blocks of different rᵢ, P/Q pairs, heads).

Mechanism (as Flower's ``DifferentialPrivacy{Client,Server}SideFixedClipping``, client-side clipping):

1. each sampled client clips its whole update Δᵢ (all arrays flattened together) to L2 norm ≤ C
   (:func:`clip_update`);
2. the server takes the *uniform* mean of the m sampled clipped updates and adds N(0, (σ·C/m)²) to every
   entry (:func:`add_gaussian_noise`). One client changes the sum by ≤ C, so this is the Gaussian
   mechanism with noise multiplier σ on the sum.
3. :class:`UserLevelAccountant` accounts one opacus RDP step per round at q = m / population.

Caveats: the sensitivity C/m holds for uniform weights 1/m only (example-count weights need std
σ·C·maxᵢ pᵢ); Flower samples a fixed number of clients without replacement, which the Poisson-subsampled
RDP analysis at q = m/population approximates (standard practice, not a proof for fixed-size sampling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlora.privacy.accounting import AccountantState
from fedlora.tensors import flat_norm

USER_STATE_KEY = "user-dp-accountant-state"


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """Flat L2 norm of all arrays together (computed in float64; :func:`fedlora.tensors.flat_norm`)."""
    return flat_norm(update.values())


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update by min(1, C / ‖Δ‖₂) (flat L2 over every array); keys, shapes and dtypes are kept.

    Returns (clipped copy, pre-clip norm). Invariant: ``update_norm(clipped) <= C`` (up to float rounding
    of the array dtype). Non-finite entries raise ``ValueError`` naming the key.
    """
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm={clip_norm!r}: must be a finite number > 0")
    for key, a in update.items():
        if not np.all(np.isfinite(a)):
            raise ValueError(f"update[{key!r}] has non-finite values")
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped: dict[str, np.ndarray] = {}
    for key, a in update.items():
        arr = np.asarray(a)
        out = (arr.astype(np.float64) * scale).astype(arr.dtype)
        clipped[key] = out
    # float32 rounding may overshoot C by ~1 ulp: shave it off so the bound holds exactly
    if update_norm(clipped) > clip_norm:
        shave = clip_norm / update_norm(clipped) * (1 - 1e-7)
        clipped = {k: (v.astype(np.float64) * shave).astype(v.dtype) for k, v in clipped.items()}
    return clipped, norm


def add_gaussian_noise(
    aggregate: Mapping[str, np.ndarray],
    noise_multiplier: float,
    clip_norm: float,
    num_sampled: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Add i.i.d. N(0, std²) with std = σ·C / num_sampled to every entry of the uniform mean of
    ``num_sampled`` clipped updates (Flower's fixed-clipping rule). Returns new arrays (same dtypes)."""
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r}: must be a finite number >= 0")
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm={clip_norm!r}: must be a finite number > 0")
    if not isinstance(num_sampled, int) or num_sampled < 1:
        raise ValueError(f"num_sampled={num_sampled!r}: must be an integer >= 1")
    std = noise_multiplier * clip_norm / num_sampled
    out: dict[str, np.ndarray] = {}
    for key, a in aggregate.items():
        arr = np.asarray(a)
        noisy = arr.astype(np.float64) + rng.normal(0.0, std, size=arr.shape)
        out[key] = noisy.astype(arr.dtype if arr.dtype.kind == "f" else np.float64)
    return out


class UserLevelAccountant:
    """User-level ε with opacus' RDP accountant: one step per round at q = num_sampled / population with the
    server's noise multiplier σ. State is an :class:`AccountantState` (mechanism ``"rdp"``), serialisable."""

    def __init__(self, noise_multiplier: float, state: AccountantState | None = None) -> None:
        if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)
                and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier={noise_multiplier!r}: must be a finite number >= 0")
        self.noise_multiplier = float(noise_multiplier)
        self.state = state if state is not None else AccountantState(mechanism="rdp")
        if self.state.mechanism != "rdp":
            raise ValueError(f"UserLevelAccountant needs an 'rdp' state, got {self.state.mechanism!r}")

    def step(self, num_sampled: int, population: int) -> None:
        """Account one round in which ``num_sampled`` of ``population`` clients contributed."""
        if not isinstance(population, int) or population < 1:
            raise ValueError(f"population={population!r}: must be an integer >= 1")
        if not isinstance(num_sampled, int) or not 1 <= num_sampled <= population:
            raise ValueError(f"num_sampled={num_sampled!r}: must be an integer in [1, population={population}]")
        acc = self.state.to_accountant()
        acc.step(noise_multiplier=self.noise_multiplier, sample_rate=num_sampled / population)
        self.state = self.state.with_history(acc)

    @property
    def rounds(self) -> int:
        """Rounds accounted so far."""
        return self.state.steps

    def epsilon(self, delta: float) -> float:
        """ε spent so far at δ (0 before any round; inf if σ = 0)."""
        return self.state.epsilon(delta)

    def to_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "state": self.state.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UserLevelAccountant:
        return cls(float(d["noise_multiplier"]), AccountantState.from_dict(d["state"]))

    def to_config(self, key: str = USER_STATE_KEY) -> dict[str, str]:
        """``{key: JSON}`` (the state) plus the σ it is kept with, for a Flower ConfigRecord."""
        return {key: self.state.to_json(), f"{key}-noise-multiplier": repr(self.noise_multiplier)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], noise_multiplier: float,
                    key: str = USER_STATE_KEY) -> UserLevelAccountant:
        """Restore (a fresh accountant if ``key`` is absent)."""
        state = AccountantState.from_config(config, key, mechanism="rdp")
        return cls(noise_multiplier, state)


__all__ = [
    "USER_STATE_KEY",
    "UserLevelAccountant",
    "add_gaussian_noise",
    "clip_update",
    "update_norm",
]
