"""FlexLoRA baseline (peft LoRA): dense Σ pᵢΔWᵢ, SVD, truncate to each client's rank.

Global state (exact): the weighted mean of the clients' full LoRA products, ΔW = Σ pᵢsᵢBᵢAᵢ, held in
exact low-rank delta form ``<prefix>.delta_B`` (d×ρ) = U·diag(S), ``<prefix>.delta_A`` (ρ×k) = Vᵀ
(see ``strategies.lora_base``) + ``modules_to_save``. Each round *replaces* the global ΔW (clients
start from it and upload their full product, not an increment).

Download differs per node: a node of rank rᵢ receives peft keys ``<prefix>.lora_B.weight`` =
U[:, :rᵢ]·√S[:rᵢ]/√sᵢ and ``<prefix>.lora_A.weight`` = √S[:rᵢ]·Vᵀ[:rᵢ]/√sᵢ, so that sᵢ·B'·A' is the best
rank-rᵢ approximation of ΔW (the same split and sign convention as
``fedlora.lora_math.flexlora_aggregate``; the truncation loses the tail of the spectrum, which is
FlexLoRA's known inexactness). Where ΔW has fewer than rᵢ non-zero singular values (round 1: ΔW = 0),
the missing A rows are fresh peft-style rows (uniform ±1/√k, seeded by run seed, round and layer)
with zero B columns: the product is unchanged and every direction still receives gradients.
Nodes upload their trained ``lora_A`` (rᵢ×k), ``lora_B`` (d×rᵢ) + ``modules_to_save``.
"""

from __future__ import annotations

import zlib

import numpy as np

from fedlora.lora_math import A_SUFFIX, B_SUFFIX, DELTA_A, DELTA_B, flora_lora_stack
from strategies.lora_base import DeltaLoraStrategy, delta_prefixes, exact_lowrank
from strategies.screening import ClientUpdate
from strategies.wire import State


class FlexLoRA(DeltaLoraStrategy):
    """Exact dense aggregate, per-node SVD truncation to the node's rank."""

    name = "flexlora"
    restart_inner = False
    download_format = "peft"

    def download_state(self, node_id: int, rank: int) -> State:
        """peft factors of rank rᵢ: the best rank-rᵢ approximation of the global ΔW, scaled by 1/sᵢ."""
        assert self.global_state is not None
        gs = self.global_state
        s = self.scaling(rank)
        out: State = {}
        for key, arr in gs.items():
            if key.endswith(DELTA_B):
                continue
            if key.endswith(DELTA_A):
                prefix = key[: -len(DELTA_A)]
                Bg = gs[prefix + DELTA_B].astype(np.float64)
                Ag = arr.astype(np.float64)
                d, k = Bg.shape[0], Ag.shape[1]
                S = np.linalg.norm(Bg[:, : min(rank, Ag.shape[0])], axis=0)  # columns of delta_B are U·S
                t = int(np.count_nonzero(S > 0))
                root = np.sqrt(S[:t])
                U = Bg[:, :t] / S[:t]
                B_new = np.zeros((d, rank))
                A_new = np.zeros((rank, k))
                B_new[:, :t] = U * root / np.sqrt(s)
                A_new[:t] = root[:, None] * Ag[:t] / np.sqrt(s)
                if t < rank:
                    seq = [self.seed, self.round + 1, zlib.crc32(prefix.encode())]
                    rng = np.random.default_rng(np.random.SeedSequence(seq))
                    bound = 1.0 / np.sqrt(k)
                    A_new[t:] = rng.uniform(-bound, bound, size=(rank - t, k))
                out[prefix + B_SUFFIX] = B_new.astype(gs[prefix + DELTA_B].dtype)
                out[prefix + A_SUFFIX] = A_new.astype(arr.dtype)
            else:
                out[key] = arr
        return out

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """ΔW ← Σ pᵢsᵢBᵢAᵢ (exact low-rank form); modules_to_save ← Σ pᵢ·mᵢ."""
        assert self.global_state is not None
        stacked = flora_lora_stack(self.scaled_states(updates), weights)
        factors = {}
        for prefix in delta_prefixes(self.global_state):
            B_stack, A_stack = stacked[prefix]
            factors[prefix] = exact_lowrank(np.asarray(B_stack), np.asarray(A_stack))
        return self.merged_state(stacked, factors)
