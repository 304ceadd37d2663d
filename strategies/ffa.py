"""FFA-LoRA baseline (peft LoRA): A frozen and shared, only B trained and averaged — exact.

Global state: peft keys ``<prefix>.lora_A.weight`` (r×k, fixed for the whole run: the server's
initial A, e.g. a seeded peft initialisation) and ``<prefix>.lora_B.weight`` (d×r) + ``modules_to_save``.
Nodes receive A and B (config ``freeze-a=True``), train B only and upload ``lora_B`` +
``modules_to_save`` (no A). The new global is (A, Σ pᵢBᵢ) via ``fedlora.lora_math.ffa_mean`` with the
server's A: Σ pᵢBᵢA = (Σ pᵢBᵢ)A exactly.

Bytes: download r(d+k) per layer (A is re-sent every round because ClientApp processes are stateless),
upload d·r.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlora.lora_math import A_SUFFIX, ffa_mean
from strategies.lora_base import PeftLoraStrategy
from strategies.screening import ClientUpdate
from strategies.wire import Shape, State


class FFALoRA(PeftLoraStrategy):
    """Frozen shared A (the peft global state's A of rank r), mean of B (homogeneous rank r)."""

    name = "ffa"
    heterogeneous_ranks = False

    def extra_config(self, node_id: int, rank: int) -> dict[str, Any]:
        """Adds ``freeze-a=True``."""
        return {**super().extra_config(node_id, rank), "freeze-a": True}

    def expected_upload(self, rank: int, inner_rank: int) -> dict[str, Shape]:
        """B (d×r) per layer + ``modules_to_save`` (A is frozen and never uploaded)."""
        return self.lora_upload_shapes(rank, with_a=False)

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """(A, Σ pᵢBᵢ) with the server's A (bit-identical to before)."""
        assert self.global_state is not None
        gs = self.global_state
        frozen = {k: v for k, v in gs.items() if k.endswith(A_SUFFIX)}
        mean = ffa_mean([{**u.state, **frozen} for u in updates], weights)
        out = {k: mean[k].astype(v.dtype, copy=False) for k, v in gs.items()}
        out.update({k: np.array(v, copy=True) for k, v in frozen.items()})
        return out
