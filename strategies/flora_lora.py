"""FLoRA baseline (peft LoRA, stacking) — exact, heterogeneous ranks allowed.

Each round node i trains a fresh LoRA pair of its rank rᵢ (config ``restart-inner=True``: A from
``seed`` as peft initialises it, B = 0) on top of the merged global update and uploads
``<prefix>.lora_A.weight`` (rᵢ×k) and ``<prefix>.lora_B.weight`` (d×rᵢ) + ``modules_to_save``.
The server stacks [p₁s₁B₁ … pₙsₙBₙ]·[A₁; …; Aₙ] = Σ pᵢΔWᵢ (``fedlora.lora_math.flora_lora_stack``)
and adds it to the merged update of all previous rounds.

How the merged update reaches clients (choice): the global state carries it in exact low-rank *delta*
form, ``<prefix>.delta_B`` (d×ρ) and ``<prefix>.delta_A`` (ρ×k), ΔW_merged = delta_B·delta_A (scaling
folded in), refactorised exactly after every round (QR + SVD of the stacked factors, only numerically
zero singular values dropped; see ``strategies.lora_base.exact_lowrank``). Clients add
delta_B·delta_A to the frozen base weight (``lora-format="delta"``). ρ grows by at most Σrᵢ per round
and never exceeds min(d, k), so this costs ≤ the paper's stacked-factor download ((Σrᵢ)(d+k)) and is
bounded by a dense layer; the download bytes reported are those of the delta arrays actually sent.
"""

from __future__ import annotations

import numpy as np

from fedlora.lora_math import DELTA_A, DELTA_B, flora_lora_stack
from strategies.lora_base import DeltaLoraStrategy, delta_prefixes, exact_lowrank
from strategies.screening import ClientUpdate
from strategies.wire import State


class FLoRALoRA(DeltaLoraStrategy):
    """Stacked LoRA factors merged into an exact low-rank global delta."""

    name = "flora-lora"
    restart_inner = True
    download_format = "delta"

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """ΔW_merged ← ΔW_merged + Σ pᵢsᵢBᵢAᵢ, exactly refactorised; modules_to_save ← Σ pᵢ·mᵢ."""
        assert self.global_state is not None
        gs = self.global_state
        stacked = flora_lora_stack(self.scaled_states(updates), weights)
        factors = {}
        for prefix in delta_prefixes(gs):
            B_round, A_round = stacked[prefix]
            factors[prefix] = exact_lowrank(
                np.concatenate([gs[prefix + DELTA_B].astype(np.float64), np.asarray(B_round, np.float64)], axis=1),
                np.concatenate([gs[prefix + DELTA_A].astype(np.float64), np.asarray(A_round, np.float64)], axis=0),
            )
        return self.merged_state(stacked, factors)
