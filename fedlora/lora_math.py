"""Aggregation math of the peft LoRA baselines (docs/design.md §2): FedIT, FFA-LoRA, FLoRA, FlexLoRA.

States use peft's keys (``get_peft_model_state_dict``, adapter name stripped):

* ``<prefix>.lora_A.weight``: A, shape (rᵢ, k)
* ``<prefix>.lora_B.weight``: B, shape (d, rᵢ)
* any other key: a ``modules_to_save`` parameter, aggregated by weighted mean.

A client's update of a d×k layer is ΔWᵢ = sᵢ·Bᵢ·Aᵢ with peft's scaling sᵢ = alpha/rᵢ. These
functions work on A and B only; the caller applies the scaling (with heterogeneous ranks, fold each
client's sᵢ into its B before calling if the scalings differ).

Exactness: FedIT (mean of A, mean of B separately) is *not* the mean of the products; FFA-LoRA
(shared, frozen A) and FLoRA stacking are exact; FlexLoRA's dense global sum is exact, its per-client
truncation is the best rank-rᵢ approximation (Eckart–Young) and loses the tail of the spectrum.

Validation and errors are those of :mod:`fedlora.aggregation` (:class:`AggregationError` naming the
client index and key). Arithmetic is float64; results come back in the inputs' promoted dtype.
Inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.aggregation.validation import (
    AggregationError,
    State,
    StateDict,
    as_f64,
    check_array,
    majority,
    prepare,
    promote,
)
from fedlora.aggregation.weighted import in_key_order, weighted_mean_keys

__all__ = [
    "dense_delta",
    "fedit_mean",
    "ffa_mean",
    "flexlora_aggregate",
    "flexlora_truncation_errors",
    "flora_lora_stack",
]

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
#: delta-form keys (FLoRA, FlexLoRA global state): ``<prefix>.delta_B`` (d×ρ), ``<prefix>.delta_A`` (ρ×k) of the
#: exact aggregate ΔW = delta_B·delta_A merged into the base weights
DELTA_A = ".delta_A"
DELTA_B = ".delta_B"

LoRAPair = tuple[np.ndarray, np.ndarray]


def _prefix_of(key: str) -> str:
    """The LoRA prefix of an A or B key (both suffixes have the same length)."""
    return key[: -len(A_SUFFIX)]


def _lora_layout(
    states: Sequence[State], keys: Sequence[str], *, same_rank: bool, outputs_by_prefix: bool = False
) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """Split keys into LoRA prefixes and ``modules_to_save`` keys and validate every A/B pair.

    Checks per prefix and client: A (rᵢ×k) and B (d×rᵢ) are non-empty 2-D with matching rᵢ; d and k
    agree across clients; with ``same_rank`` rᵢ agrees across clients too. ``outputs_by_prefix`` (the rule
    keys its output by prefix): a ``modules_to_save`` key equal to a prefix is refused.

    Returns:
        (prefixes in client-0 order, other keys, prefix → per-client ranks).
    """
    key_set = set(keys)
    prefixes: list[str] = []
    others: list[str] = []
    for key in keys:
        if key.endswith((A_SUFFIX, B_SUFFIX)):
            prefix = _prefix_of(key)
            for partner in (prefix + A_SUFFIX, prefix + B_SUFFIX):
                if partner not in key_set:
                    raise AggregationError(f"{key!r} has no partner {partner!r}", key=partner)
            if prefix not in prefixes:
                prefixes.append(prefix)
        else:
            others.append(key)
    if outputs_by_prefix:
        for key in others:
            if key in prefixes:
                raise AggregationError("modules_to_save key collides with a LoRA prefix", key=key)
    ranks: dict[str, list[int]] = {}
    for prefix in prefixes:
        ka, kb = prefix + A_SUFFIX, prefix + B_SUFFIX
        ranks[prefix] = []
        for i, s in enumerate(states):
            A, B = s[ka], s[kb]
            if A.ndim != 2 or 0 in A.shape:
                raise AggregationError(
                    f"A must be a non-empty r×k matrix, got shape {A.shape}", client=i, key=ka
                )
            if B.ndim != 2 or 0 in B.shape:
                raise AggregationError(
                    f"B must be a non-empty d×r matrix, got shape {B.shape}", client=i, key=kb
                )
            if B.shape[1] != A.shape[0]:
                raise AggregationError(f"B {B.shape} and A {A.shape} disagree on the rank", client=i, key=kb)
            ranks[prefix].append(A.shape[0])
        for key, axis in ((ka, 1), (kb, 0)):
            dims = [s[key].shape[axis] for s in states]
            ref = majority(dims)
            for i, dim in enumerate(dims):
                if dim != ref:
                    what = "k (in features)" if key == ka else "d (out features)"
                    raise AggregationError(
                        f"{what} is {dim}, the other clients use {ref}; shape {states[i][key].shape}",
                        client=i,
                        key=key,
                    )
        if same_rank:
            ref = majority(ranks[prefix])
            for i, r_i in enumerate(ranks[prefix]):
                if r_i != ref:
                    raise AggregationError(
                        f"rank {r_i} differs from rank {ref} of the other clients (this baseline needs equal "
                        f"ranks); shape {states[i][ka].shape}",
                        client=i,
                        key=ka,
                    )
    return prefixes, others, ranks


def _stacks(states: Sequence[State], p: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 B_stack = [p₁B₁ … pₙBₙ] (d×Σrᵢ) and A_stack = [A₁; …; Aₙ] (Σrᵢ×k)."""
    ka, kb = prefix + A_SUFFIX, prefix + B_SUFFIX
    B_stack = np.concatenate([float(pi) * as_f64(s[kb]) for pi, s in zip(p, states)], axis=1)
    A_stack = np.concatenate([as_f64(s[ka]) for s in states], axis=0)
    return B_stack, A_stack


def _canonical_signs(U: np.ndarray, Vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip singular pairs so the largest-|·| entry of each column of U is positive (first on ties)."""
    if U.shape[1] == 0:
        return U, Vt
    idx = np.argmax(np.abs(U), axis=0)
    signs = np.sign(U[idx, np.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, Vt * signs[:, None]


def fedit_mean(states: Sequence[State], weights: Sequence[float] | np.ndarray) -> StateDict:
    """FedIT baseline: Σ pᵢAᵢ and Σ pᵢBᵢ separately (inexact: mean(B)·mean(A) ≠ mean(B·A)).

    Args:
        states: n peft LoRA states with identical keys and equal ranks (rᵢ = r) for every prefix.
        weights: n raw weights.

    Returns:
        New dict with the same keys: mean A (r×k), mean B (d×r), mean of ``modules_to_save`` keys.

    Raises:
        AggregationError: naming client and key (missing partner, rank/shape mismatch, NaN/Inf, …).
    """
    checked, p, keys = prepare(states, weights)
    _lora_layout(checked, keys, same_rank=True)
    return weighted_mean_keys(checked, p, keys)


def ffa_mean(states: Sequence[State], weights: Sequence[float] | np.ndarray) -> StateDict:
    """FFA-LoRA baseline: A frozen and shared, Σ pᵢBᵢ (exact: Σ pᵢBᵢA = (Σ pᵢBᵢ)A).

    Args:
        states: n peft LoRA states with equal ranks; every client's A must be bit-identical
            (same dtype, shape and bytes) for each prefix.
        weights: n raw weights.

    Returns:
        New dict with the same keys: the shared A (a copy), mean B, mean ``modules_to_save`` keys.

    Raises:
        AggregationError: naming the client whose A differs from the one most clients hold (and its
            key), or any :func:`fedit_mean` validation error.
    """
    checked, p, keys = prepare(states, weights)
    prefixes, _, _ = _lora_layout(checked, keys, same_rank=True)
    shared: dict[str, np.ndarray] = {}
    for prefix in prefixes:
        ka = prefix + A_SUFFIX
        sigs = [(s[ka].dtype.str, s[ka].shape, s[ka].tobytes()) for s in checked]
        ref = majority(sigs)
        A_ref = checked[sigs.index(ref)][ka]
        for i, sig in enumerate(sigs):
            if sig != ref:
                A_i = checked[i][ka]  # shapes already agree (_lora_layout)
                diff = float(np.max(np.abs(as_f64(A_i) - as_f64(A_ref))))
                raise AggregationError(
                    "A is not bit-identical to the shared frozen A of the other clients "
                    f"(max |diff| {diff:.3g}, dtype {A_i.dtype} vs {A_ref.dtype})",
                    client=i,
                    key=ka,
                )
        shared[ka] = np.array(A_ref, copy=True)
    means = weighted_mean_keys(checked, p, [k for k in keys if k not in shared])
    return {k: shared[k] if k in shared else means[k] for k in keys}


def flora_lora_stack(
    states: Sequence[State], weights: Sequence[float] | np.ndarray
) -> dict[str, LoRAPair | np.ndarray]:
    """FLoRA baseline: stack the clients' LoRA factors (exact, heterogeneous ranks allowed).

    Args:
        states: n peft LoRA states; per prefix, ranks rᵢ may differ, d and k may not.
        weights: n raw weights.

    Returns:
        New dict: ``prefix`` → ``(B_stack, A_stack)`` with B_stack = [p₁B₁ … pₙBₙ] (d×Σrᵢ, weights
        folded into B) and A_stack = [A₁; …; Aₙ] (Σrᵢ×k), so B_stack·A_stack = Σ pᵢBᵢAᵢ; plus each
        ``modules_to_save`` key → its weighted mean (ndarray). Tell the two apart with
        ``isinstance(value, tuple)``. Order: first appearance in client 0's state.

    Raises:
        AggregationError: naming client and key; also if a ``modules_to_save`` key equals a prefix.
    """
    checked, p, keys = prepare(states, weights)
    _, others, _ = _lora_layout(checked, keys, same_rank=False, outputs_by_prefix=True)

    def build(prefix: str) -> dict[str, LoRAPair]:
        B_stack, A_stack = _stacks(checked, p, prefix)
        ka, kb = prefix + A_SUFFIX, prefix + B_SUFFIX
        return {prefix: (B_stack.astype(promote([s[kb] for s in checked]), copy=False),
                         A_stack.astype(promote([s[ka] for s in checked]), copy=False))}

    means: dict[str, LoRAPair | np.ndarray] = dict(weighted_mean_keys(checked, p, others))
    return in_key_order(keys, means, _prefix_of, build)


def dense_delta(B: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Dense update B·A (d×k) of a LoRA pair B (d×r), A (r×k), computed in float64.

    Returns:
        New array of shape (d, k) in the promoted dtype of B and A (scaling s not applied).

    Raises:
        AggregationError: (``client=None``, ``key='B'``/``'A'``) for non-float, non-finite, non-2-D or
            inner-dimension-mismatched inputs.
    """
    check_array(B, client=None, key="B", shape=(None, None))
    check_array(A, client=None, key="A", shape=(None, None))
    if B.shape[1] != A.shape[0]:
        raise AggregationError(f"B {B.shape} and A {A.shape} disagree on the rank", key="B")
    return (as_f64(B) @ as_f64(A)).astype(np.promote_types(B.dtype, A.dtype), copy=False)


def flexlora_aggregate(
    states: Sequence[State], weights: Sequence[float] | np.ndarray, ranks: Sequence[int]
) -> tuple[StateDict, list[dict[str, LoRAPair]]]:
    """FlexLoRA baseline: dense Σ pᵢBᵢAᵢ, SVD, truncate to each client's rank.

    With the dense sum ΔW = U·diag(S)·Vᵀ (canonical signs: the largest-|·| entry of each column of U
    is positive), client i restarts from B'ᵢ = U[:, :rᵢ]·diag(√S[:rᵢ]) (d×rᵢ) and
    A'ᵢ = diag(√S[:rᵢ])·Vᵀ[:rᵢ] (rᵢ×k): the best rank-rᵢ approximation of ΔW, singular values split
    evenly (B'ᵀB' = A'A'ᵀ = diag(S[:rᵢ])). If rᵢ exceeds the rank of ΔW (≤ min(d, k, Σⱼ rⱼ)) the extra
    columns of B' and rows of A' are zero. The SVD is taken of the small core of the stacked factors
    (QR of B_stack and A_stackᵀ), never of the d×k matrix.

    Args:
        states: n peft LoRA states; per prefix, uploaded ranks may differ, d and k may not.
        weights: n raw weights.
        ranks: n target ranks rᵢ ≥ 1 (one per client, used for every prefix).

    Returns:
        ``(dense, clients)``: ``dense[prefix]`` = Σ pᵢBᵢAᵢ (d×k) plus each ``modules_to_save`` key →
        its weighted mean; ``clients[i][prefix]`` = (B'ᵢ, A'ᵢ). Arrays in the inputs' promoted dtype.

    Raises:
        AggregationError: naming the client of a bad rank, or client and key of a malformed state.
    """
    checked, p, keys = prepare(states, weights)
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != len(checked):
        raise AggregationError(f"ranks must be a sequence of {len(checked)} positive integers, got {ranks!r}")
    target: list[int] = []
    for i, r_i in enumerate(ranks):
        if isinstance(r_i, bool) or not isinstance(r_i, (int, np.integer)) or int(r_i) < 1:
            raise AggregationError(f"target rank must be a positive integer, got {r_i!r}", client=i)
        target.append(int(r_i))
    _, others, _ = _lora_layout(checked, keys, same_rank=False, outputs_by_prefix=True)
    clients: list[dict[str, LoRAPair]] = [{} for _ in checked]

    def build(prefix: str) -> StateDict:
        ka, kb = prefix + A_SUFFIX, prefix + B_SUFFIX
        dtype = promote([s[k] for s in checked for k in (ka, kb)])
        B_stack, A_stack = _stacks(checked, p, prefix)
        dense = (B_stack @ A_stack).astype(dtype, copy=False)
        Qb, Rb = np.linalg.qr(B_stack)
        Qa, Ra = np.linalg.qr(A_stack.T)
        Uc, S, Vtc = np.linalg.svd(Rb @ Ra.T, full_matrices=False)
        U, Vt = _canonical_signs(Qb @ Uc, Vtc @ Qa.T)
        d, k = dense.shape
        for i, r_i in enumerate(target):
            t = min(r_i, S.size)
            root = np.sqrt(S[:t])
            B_new = np.zeros((d, r_i), dtype=np.float64)
            A_new = np.zeros((r_i, k), dtype=np.float64)
            B_new[:, :t] = U[:, :t] * root
            A_new[:t] = root[:, None] * Vt[:t]
            clients[i][prefix] = (B_new.astype(dtype, copy=False), A_new.astype(dtype, copy=False))
        return {prefix: dense}

    dense = in_key_order(keys, weighted_mean_keys(checked, p, others), _prefix_of, build)
    return dense, clients


def flexlora_truncation_errors(
    dense: Mapping[str, np.ndarray], clients: Sequence[Mapping[str, LoRAPair]]
) -> list[dict[str, float]]:
    """Relative Frobenius error ‖ΔW − B'ᵢA'ᵢ‖ / ‖ΔW‖ of each client's truncated pair, per prefix.

    Args:
        dense, clients: the two outputs of :func:`flexlora_aggregate`.

    Returns:
        ``errors[i][prefix]`` ≥ 0 (0.0 where ΔW = 0 and the pair reproduces it exactly).
    """
    errors: list[dict[str, float]] = []
    for pairs in clients:
        row: dict[str, float] = {}
        for prefix, (B, A) in pairs.items():
            W = as_f64(dense[prefix])
            resid = float(np.linalg.norm(W - as_f64(B) @ as_f64(A)))
            norm = float(np.linalg.norm(W))
            row[prefix] = resid / norm if norm > 0 else resid
        errors.append(row)
    return errors
