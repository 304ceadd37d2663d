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

from fedlora.lora_math import flora_lora_stack
from strategies.base import ClientUpdate, Shape, State
from strategies.lora_base import DELTA_A, DELTA_B, PeftLoraStrategy, delta_prefixes, exact_lowrank


class FLoRALoRA(PeftLoraStrategy):
    """Stacked LoRA factors merged into an exact low-rank global delta."""

    name = "flora-lora"
    heterogeneous_ranks = True
    restart_inner = True
    download_format = "delta"

    def init_global_state(self, state: State) -> State:
        """Delta-form state, or a peft state of rank r converted to delta form (ΔW = s·B·A)."""
        return self.init_delta_state(state)

    def expected_upload(self, rank: int, inner_rank: int) -> dict[str, Shape]:
        """A (rᵢ×k), B (d×rᵢ) per layer + ``modules_to_save``."""
        return self.lora_upload_shapes(rank)

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """ΔW_merged ← ΔW_merged + Σ pᵢsᵢBᵢAᵢ, exactly refactorised; modules_to_save ← Σ pᵢ·mᵢ."""
        assert self.global_state is not None
        gs = self.global_state
        stacked = flora_lora_stack(self.scaled_states(updates), weights)
        out: State = {}
        for key, arr in gs.items():
            if key.endswith((DELTA_A, DELTA_B)):
                continue
            out[key] = np.asarray(stacked[key]).astype(arr.dtype, copy=False)
        for prefix in delta_prefixes(gs):
            B_round, A_round = stacked[prefix]
            Bg, Ag = gs[prefix + DELTA_B], gs[prefix + DELTA_A]
            Bn, An = exact_lowrank(
                np.concatenate([Bg.astype(np.float64), np.asarray(B_round, dtype=np.float64)], axis=1),
                np.concatenate([Ag.astype(np.float64), np.asarray(A_round, dtype=np.float64)], axis=0),
            )
            out[prefix + DELTA_B] = Bn.astype(Bg.dtype)
            out[prefix + DELTA_A] = An.astype(Ag.dtype)
        return {k: out[k] for k in gs}

    def check_new_global(self, old: State, new: State) -> None:
        """Delta-form check (ρ may change)."""
        self.check_delta_global(old, new)
