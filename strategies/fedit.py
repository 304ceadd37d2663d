"""FedIT baseline (peft LoRA): average A and B separately — *inexact* by design.

Global state: peft keys ``<prefix>.lora_A.weight`` (r×k), ``<prefix>.lora_B.weight`` (d×r) +
``modules_to_save``. Every node trains rank r starting from the global A, B and uploads both; the new
global is (Σ pᵢAᵢ, Σ pᵢBᵢ) (``fedlora.lora_math.fedit_mean``), whose product is not Σ pᵢBᵢAᵢ.
Communication: r(d+k) floats per layer each way.
"""

from __future__ import annotations

import numpy as np

from fedlora.lora_math import fedit_mean
from strategies.lora_base import PeftLoraStrategy
from strategies.screening import ClientUpdate
from strategies.wire import State


class FedIT(PeftLoraStrategy):
    """Mean of A, mean of B (homogeneous rank r; peft global state and uploads as in the base class)."""

    name = "fedit"
    heterogeneous_ranks = False

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """(Σ pᵢAᵢ, Σ pᵢBᵢ); the result keeps the global dtypes."""
        assert self.global_state is not None
        mean = fedit_mean([u.state for u in updates], weights)
        return {k: mean[k].astype(v.dtype, copy=False) for k, v in self.global_state.items()}
