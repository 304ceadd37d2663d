"""User-level DP on the server: Gaussian noise on the aggregated update and RDP accounting over rounds.

Clients clip their whole update to C (``clients/dp.py``); with uniform weights over the m clients used
the mean has L2 sensitivity C/m, so the server adds N(0, (σC/m)²) to every coordinate of the new global
state's change and accounts one Gaussian mechanism per round with opacus RDP at sampling rate
m / population. Flower's own DP wrappers assume identical shapes in every reply (not true with
heterogeneous ranks) and their accountant only accepts plain FedAvg, so fedlora does this itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlora.privacy import UserLevelAccountant, add_gaussian_noise


class ServerUserDP:
    """Noise + accounting; serialisable through :meth:`state_dict`."""

    def __init__(self, noise_multiplier: float, clip_norm: float, delta: float, population: int, seed: int) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.population = int(population)
        self.accountant = UserLevelAccountant(self.noise_multiplier)
        self._rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xD1FF]))

    def apply(self, before: dict[str, np.ndarray], after: dict[str, np.ndarray], num_used: int) -> dict[str, Any]:
        """Noise the change ``after - before`` in place in ``after``; returns this round's metrics."""
        if num_used <= 0 or after is before:
            return {"user-dp-epsilon": self.epsilon()}
        change = {k: after[k].astype(np.float64) - before[k].astype(np.float64) for k in after}
        noisy = add_gaussian_noise(change, self.noise_multiplier, self.clip_norm, num_used, self._rng)
        for k in after:
            after[k] = (before[k].astype(np.float64) + noisy[k]).astype(after[k].dtype)
        self.accountant.step(num_used, max(self.population, num_used))
        return {"user-dp-epsilon": self.epsilon(), "user-dp-noise-std": self.noise_multiplier * self.clip_norm
                / num_used, "user-dp-sample-rate": num_used / max(self.population, num_used)}

    def epsilon(self) -> float:
        return float(self.accountant.epsilon(self.delta)) if self.accountant.rounds else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.to_config(), "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant = UserLevelAccountant.from_config(state["accountant"], self.noise_multiplier)
        self._rng.bit_generator.state = state["rng"]
