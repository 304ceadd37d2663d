"""Shared parts of the peft LoRA baseline strategies (FedIT, FFA-LoRA, FLoRA, FlexLoRA).

States use peft's keys from ``get_peft_model_state_dict`` (adapter name stripped):
``<prefix>.lora_A.weight`` (rᵢ×k), ``<prefix>.lora_B.weight`` (d×rᵢ), plus ``modules_to_save`` keys.
A client's update is ΔWᵢ = sᵢ·Bᵢ·Aᵢ with peft's scaling sᵢ = lora_alpha/rᵢ (``lora_alpha/√rᵢ`` with
rsLoRA); the strategies send ``lora-alpha`` and ``use-rslora`` in every config so clients match.

FLoRA and FlexLoRA keep the aggregated dense update in an exact low-rank *delta* form instead of peft
keys: ``<prefix>.delta_B`` (d×ρ) = U·diag(S) and ``<prefix>.delta_A`` (ρ×k) = Vᵀ, singular values in
descending order, canonical signs (the largest-|·| entry of each column of U is positive), scaling
already folded in (ΔW = delta_B·delta_A). Only numerically-zero singular values are dropped
(S ≤ rtol·S_max, rtol = max(d, k)·ε_float64), so the form is exact to round-off and ρ ≤ min(d, k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedlora.aggregation import AggregationError
from fedlora.lora_math import A_SUFFIX, B_SUFFIX, DELTA_A, DELTA_B
from strategies.base import NestedStrategyBase
from strategies.screening import ClientUpdate
from strategies.wire import Shape, State, check_float_state


def lora_prefixes(state: Mapping[str, np.ndarray]) -> list[str]:
    """Prefixes of the ``<prefix>.lora_A.weight`` keys (in key order)."""
    return [k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]


def delta_prefixes(state: Mapping[str, np.ndarray]) -> list[str]:
    """Prefixes of the ``<prefix>.delta_A`` keys (in key order)."""
    return [k[: -len(DELTA_A)] for k in state if k.endswith(DELTA_A)]


def exact_lowrank(B: np.ndarray, A: np.ndarray, rtol: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact low-rank refactorisation of B·A (d×m · m×k) as (U·diag(S), Vᵀ) in float64.

    Uses QR of B and Aᵀ and the SVD of the small core, never the d×k product. Drops singular values
    ≤ rtol·S_max (default rtol = max(d, k)·ε); canonical signs as in ``fedlora.lora_math``.

    Returns:
        (Bn, An) with Bn (d×ρ), An (ρ×k), Bn·An = B·A to round-off, ρ ≤ min(d, k, m).
    """
    B = np.asarray(B, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    d, m = B.shape
    k = A.shape[1]
    if A.shape[0] != m:
        raise AggregationError(f"B {B.shape} and A {A.shape} disagree on the inner dimension")
    if m == 0:
        return np.zeros((d, 0)), np.zeros((0, k))
    Qb, Rb = np.linalg.qr(B)
    Qa, Ra = np.linalg.qr(A.T)
    Uc, S, Vtc = np.linalg.svd(Rb @ Ra.T, full_matrices=False)
    U = Qb @ Uc
    Vt = Vtc @ Qa.T
    if U.shape[1]:
        idx = np.argmax(np.abs(U), axis=0)
        signs = np.sign(U[idx, np.arange(U.shape[1])])
        signs[signs == 0] = 1.0
        U, Vt = U * signs, Vt * signs[:, None]
    tol = (max(d, k) * np.finfo(np.float64).eps if rtol is None else rtol) * (S[0] if S.size else 0.0)
    keep = S > tol
    return U[:, keep] * S[keep], Vt[keep]


class PeftLoraStrategy(NestedStrategyBase):
    """Base of the peft LoRA baselines (``mode="lora"``; the fingerprint check is optional).

    By default the global state is a peft state of rank r and every node uploads A (rᵢ×k) and
    B (d×rᵢ) per layer plus ``modules_to_save``.

    Extra args:
        lora_alpha: peft ``lora_alpha`` (> 0); default ``rank`` (s = 1 at rank r).
        use_rslora: peft rsLoRA scaling alpha/√r instead of alpha/r.
    """

    mode = "lora"
    requires_fingerprint = False
    #: config value ``lora-format`` telling clients how to read the downloaded arrays
    download_format: ClassVar[str] = "peft"

    def __init__(self, *, lora_alpha: float | None = None, use_rslora: bool = False, **kwargs: Any) -> None:
        rank = kwargs.get("rank")
        if lora_alpha is None and isinstance(rank, int):
            lora_alpha = float(rank)
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
            raise ValueError(f"lora_alpha={lora_alpha!r}: must be a positive number")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora={use_rslora!r}: must be a bool")
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        super().__init__(**kwargs)

    def init_global_state(self, state: State) -> State:
        """Require a peft state of rank r."""
        return self.init_peft_state(state)

    def expected_upload(self, rank: int, inner_rank: int) -> dict[str, Shape]:
        """A (rᵢ×k), B (d×rᵢ) per layer + ``modules_to_save``."""
        return self.lora_upload_shapes(rank)

    def scaling(self, rank: int) -> float:
        """peft's scaling s(rᵢ) = alpha/rᵢ (or alpha/√rᵢ with rsLoRA)."""
        return self.lora_alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def extra_config(self, node_id: int, rank: int) -> dict[str, Any]:
        """``lora-alpha``, ``use-rslora``, ``lora-format``."""
        return {
            "lora-alpha": self.lora_alpha,
            "use-rslora": self.use_rslora,
            "lora-format": self.download_format,
        }

    def layer_dims(self) -> dict[str, tuple[int, int]]:
        """prefix → (d, k) of every adapted layer, from the global state."""
        assert self.global_state is not None
        gs = self.global_state
        dims = {p: (gs[p + B_SUFFIX].shape[0], gs[p + A_SUFFIX].shape[1]) for p in lora_prefixes(gs)}
        dims.update({p: (gs[p + DELTA_B].shape[0], gs[p + DELTA_A].shape[1]) for p in delta_prefixes(gs)})
        return dims

    def modules_to_save_shapes(self) -> dict[str, Shape]:
        """Shapes of the global keys that are neither LoRA nor delta factors."""
        assert self.global_state is not None
        suffixes = (A_SUFFIX, B_SUFFIX, DELTA_A, DELTA_B)
        return {k: tuple(v.shape) for k, v in self.global_state.items() if not k.endswith(suffixes)}

    def lora_upload_shapes(self, rank: int, *, with_a: bool = True) -> dict[str, Shape]:
        """peft keys of rank ``rank`` for every layer (+ ``modules_to_save``)."""
        out: dict[str, Shape] = {}
        for prefix, (d, k) in self.layer_dims().items():
            if with_a:
                out[prefix + A_SUFFIX] = (rank, k)
            out[prefix + B_SUFFIX] = (d, rank)
        out.update(self.modules_to_save_shapes())
        return out

    def scaled_states(self, updates: list[ClientUpdate]) -> list[State]:
        """Client states with sᵢ folded into every B (so Σ pᵢ·B̃ᵢ·Aᵢ = Σ pᵢΔWᵢ)."""
        out = []
        for u in updates:
            s = self.scaling(u.rank)
            out.append(
                {k: (v.astype(np.float64) * s if k.endswith(B_SUFFIX) else v) for k, v in u.state.items()}
            )
        return out

    def init_peft_state(self, state: State) -> State:
        """Validate a peft global state of rank r (A: r×k, B: d×r)."""
        check_float_state(state)
        prefixes = lora_prefixes(state)
        if not prefixes:
            raise ValueError("initial_state: no '<prefix>.lora_A.weight' keys (expected a peft LoRA state)")
        for p in prefixes:
            A, B = state.get(p + A_SUFFIX), state.get(p + B_SUFFIX)
            if B is None:
                raise ValueError(f"initial_state: key {p + B_SUFFIX!r} missing")
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != self.rank or B.shape[1] != self.rank:
                raise ValueError(
                    f"initial_state: layer {p!r}: A {A.shape}, B {B.shape}; expected rank {self.rank} factors"
                )
        return state


class DeltaLoraStrategy(PeftLoraStrategy):
    """Base of the peft baselines whose global state is the exact low-rank *delta* form of ΔW
    (``<prefix>.delta_B`` d×ρ, ``<prefix>.delta_A`` ρ×k; ρ may change every round) + ``modules_to_save``:
    FLoRA (stacking) and FlexLoRA. Heterogeneous ranks allowed; nodes upload A (rᵢ×k), B (d×rᵢ)."""

    heterogeneous_ranks = True
    reshaped_suffixes = (DELTA_A, DELTA_B)

    def init_global_state(self, state: State) -> State:
        """Accept a delta-form state, or convert a peft state of rank r (ΔW = s(r)·B·A) to delta form."""
        check_float_state(state)
        if delta_prefixes(state):
            for p in delta_prefixes(state):
                A, B = state[p + DELTA_A], state.get(p + DELTA_B)
                if B is None or A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
                    raise ValueError(f"initial_state: layer {p!r}: bad delta factors")
            return state
        state = self.init_peft_state(state)
        s = self.scaling(self.rank)
        out: State = {}
        dtype = next(iter(state.values())).dtype
        for key, arr in state.items():
            if key.endswith(B_SUFFIX):
                continue
            if key.endswith(A_SUFFIX):
                p = key[: -len(A_SUFFIX)]
                Bn, An = exact_lowrank(s * state[p + B_SUFFIX].astype(np.float64), arr)
                out[p + DELTA_B] = Bn.astype(dtype)
                out[p + DELTA_A] = An.astype(dtype)
            else:
                out[key] = arr
        return out

    def check_new_global(self, old: State, new: State) -> None:
        """Same keys, same shapes but for ρ; per layer the same d and k, and delta_B, delta_A agree on ρ."""
        super().check_new_global(old, new)
        for key, arr in new.items():
            if key.endswith(DELTA_B):
                p = key[: -len(DELTA_B)]
                A = new[p + DELTA_A]
                if arr.shape[0] != old[key].shape[0] or A.shape[1] != old[p + DELTA_A].shape[1]:
                    raise AggregationError("layer dimensions changed", key=key)
                if arr.shape[1] != A.shape[0]:
                    raise AggregationError("delta_B and delta_A disagree on ρ", key=key)

    def merged_state(self, stacked: Mapping[str, Any], factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> State:
        """The next global state in key order: ``modules_to_save`` from ``stacked`` (the weighted means),
        each layer's (delta_B, delta_A) from ``factors[prefix]`` (float64), all in the global dtypes."""
        assert self.global_state is not None
        out: State = {}
        for key, arr in self.global_state.items():
            if key.endswith(DELTA_B):
                out[key] = factors[key[: -len(DELTA_B)]][0].astype(arr.dtype)
            elif key.endswith(DELTA_A):
                out[key] = factors[key[: -len(DELTA_A)]][1].astype(arr.dtype)
            else:
                out[key] = np.asarray(stacked[key]).astype(arr.dtype, copy=False)
        return out
