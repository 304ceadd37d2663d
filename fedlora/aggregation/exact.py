"""Exact server-side aggregation for nested low-rank adapters (docs/design.md §1–2).

State conventions follow ``docs/architecture.md``. A client state is a ``dict[str, np.ndarray]``:

=================  ==============  ===========================================================
key                shape           meaning
=================  ==============  ===========================================================
``L.R``            (rᵢ, rᵢ)        ``sb`` client update of layer ``L`` (rᵢ ≤ r)
``L.P``, ``L.Q``   (rᵢ, qᵢ),       ``nora`` client update, ΔR = P·Q
                   (qᵢ, rᵢ)
``L.R0``           (r, r)          global state (server → client)
anything else      model shape     ``modules_to_save`` parameters (full values)
=================  ==============  ===========================================================

Every aggregator returns the r×r *increment* keyed ``L.R`` plus the weighted mean of every
``modules_to_save`` key; :func:`apply_increment` adds the increment to ``L.R0``.

Exactness (docs/design.md §1, conditions 2–3): the outer factors B (d×r), A (r×k) are shared and ordered by
singular value, so a client of rank rᵢ < r owns the top-left rᵢ×rᵢ block, and

    Σᵢ pᵢ · s·B·pad_r(Rᵢ)·A  =  s·B·(Σᵢ pᵢ pad_r(Rᵢ))·A

holds exactly when whole (zero-padded) matrices are averaged with weights pᵢ summing to 1. Averaging
each entry only over the clients that cover it (per-entry renormalisation) is *not* this mean.

All arithmetic is done in float64; results are returned in the inputs' dtype (the promotion of all
clients' dtypes for that key, so float64 stays float64). Inputs are never modified and outputs never
alias inputs. Malformed input raises :class:`~fedlora.aggregation.AggregationError` naming the client
index and key (:mod:`fedlora.aggregation.validation`).
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
    check_client_ranks,
    check_rank,
    prepare,
    promote,
)
from fedlora.aggregation.weighted import in_key_order, weighted_mean_keys


def exact_mean(states: Sequence[State], weights: Sequence[float] | np.ndarray) -> StateDict:
    """Fed-SB aggregation: Σᵢ pᵢ·stateᵢ[key] for every key (exact for full-rank ``L.R``).

    Args:
        states: n client states with identical keys and identical shapes per key, all finite floats.
        weights: n raw weights (see :func:`normalize_weights`).

    Returns:
        New dict with the same keys (client 0's order); each value has the common shape and the
        promoted dtype of the clients' arrays; computed in float64.

    Raises:
        AggregationError: naming the client and key of a missing/extra key, a shape mismatch, a
            non-float dtype, or a NaN/Inf value; or the client of a bad weight.
    """
    checked, p, keys = prepare(states, weights)
    return weighted_mean_keys(checked, p, keys)




def stack_inner(
    states: Sequence[State],
    weights: Sequence[float] | np.ndarray,
    r: int | None = None,
    *,
    return_factors: bool = False,
    check_rank_consistency: bool = True,
) -> StateDict:
    """FLoRA aggregation of nested ``nora`` updates by stacking (exact, docs/design.md §2).

    For each layer ``L`` with client keys ``L.P`` (rᵢ×qᵢ) and ``L.Q`` (qᵢ×rᵢ) — outer ranks rᵢ and
    inner ranks qᵢ may differ by client — compute

        P_stack = [p₁P̃₁ … pₙP̃ₙ]   (r × Σqᵢ),   P̃ᵢ = Pᵢ zero-padded to r rows (bottom),
        Q_stack = [Q̃₁; …; Q̃ₙ]     (Σqᵢ × r),   Q̃ᵢ = Qᵢ zero-padded to r columns (right),
        L.R     = P_stack · Q_stack = Σᵢ pᵢ pad_r(PᵢQᵢ)   (r × r).

    Clients with weight 0 keep their (zero-scaled) block, so stack shapes depend only on the qᵢ.

    Args:
        states: n client states; every layer has both ``L.P`` and ``L.Q``; any other key is a
            ``modules_to_save`` parameter, averaged with :func:`exact_mean` rules.
        weights: n raw weights.
        r: global rank; ``None`` → per layer, the largest rᵢ any client uses on it.
        return_factors: also return ``L.P_stack`` (r×Σqᵢ, weights folded in) and ``L.Q_stack``
            (Σqᵢ×r), e.g. for bandwidth accounting.
        check_rank_consistency: require each client to use one rank rᵢ on all its layers.

    Returns:
        New dict: ``L.R`` (r×r) per layer (plus the stacks if asked) and the mean of every other key,
        in the order the keys first appear in client 0's state.

    Raises:
        AggregationError: naming client and key for a missing ``L.P``/``L.Q`` partner, a non-2-D or
            mismatched P/Q pair, rᵢ > r, an inconsistent client rank, or any :func:`exact_mean` error.
    """
    checked, p, keys = prepare(states, weights)
    r_global = None if r is None else check_rank(r)
    key_set = set(keys)
    layers: dict[str, None] = {}
    others: list[str] = []
    for key in keys:
        if key.endswith((".P", ".Q")):
            layer = key[:-2]
            for partner in (f"{layer}.P", f"{layer}.Q"):
                if partner not in key_set:
                    raise AggregationError(f"{key!r} has no partner {partner!r}", key=partner)
            layers.setdefault(layer, None)
        else:
            others.append(key)
    out_keys = {f"{layer}.R" for layer in layers}
    if return_factors:
        out_keys |= {f"{layer}.{name}" for layer in layers for name in ("P_stack", "Q_stack")}
    for key in others:
        if key in out_keys:
            raise AggregationError("collides with an output key of a P/Q layer", key=key)

    ranks: dict[str, list[int]] = {}
    inner: dict[str, list[int]] = {}
    for layer in layers:
        kp, kq = f"{layer}.P", f"{layer}.Q"
        ranks[kp], inner[layer] = [], []
        for i, s in enumerate(checked):
            P, Q = s[kp], s[kq]
            if P.ndim != 2 or 0 in P.shape:
                raise AggregationError(
                    f"P must be a non-empty rᵢ×qᵢ matrix, got shape {P.shape}", client=i, key=kp
                )
            r_i, q_i = P.shape
            if Q.shape != (q_i, r_i):
                raise AggregationError(
                    f"Q has shape {Q.shape}, expected {(q_i, r_i)} to match P {P.shape}", client=i, key=kq
                )
            if r_global is not None and r_i > r_global:
                raise AggregationError(f"rank {r_i} exceeds the global rank r={r_global}", client=i, key=kp)
            ranks[kp].append(r_i)
            inner[layer].append(q_i)
    if check_rank_consistency:
        check_client_ranks(ranks, len(checked))

    def build(layer: str) -> StateDict:
        kp, kq = f"{layer}.P", f"{layer}.Q"
        r_l = r_global if r_global is not None else max(ranks[kp])
        qs = inner[layer]
        P_stack = np.zeros((r_l, sum(qs)), dtype=np.float64)
        Q_stack = np.zeros((sum(qs), r_l), dtype=np.float64)
        col = 0
        for pi, s, r_i, q_i in zip(p, checked, ranks[kp], qs):
            P_stack[:r_i, col : col + q_i] = float(pi) * as_f64(s[kp])
            Q_stack[col : col + q_i, :r_i] = as_f64(s[kq])
            col += q_i
        dtype = promote([s[k] for s in checked for k in (kp, kq)])
        out = {f"{layer}.R": (P_stack @ Q_stack).astype(dtype, copy=False)}
        if return_factors:
            out[f"{layer}.P_stack"] = P_stack.astype(dtype, copy=False)
            out[f"{layer}.Q_stack"] = Q_stack.astype(dtype, copy=False)
        return out

    return in_key_order(keys, weighted_mean_keys(checked, p, others), lambda key: key[:-2], build)


def hetero_mean(
    states: Sequence[State],
    weights: Sequence[float] | np.ndarray,
    r: int,
    *,
    check_rank_consistency: bool = True,
) -> StateDict:
    """Heterogeneous-rank aggregation: Σᵢ pᵢ·pad_r(Rᵢ) on whole zero-padded matrices (exact).

    Each ``L.R`` is a square rᵢ×rᵢ block with 1 ≤ rᵢ ≤ r placed top-left in an r×r zero matrix
    (design condition 2). Entries outside a small client's block therefore receive that client's
    weight times zero — this is the true weighted mean of the ΔWᵢ; per-entry renormalisation is not
    (design condition 3).

    Args:
        states: n client states; keys ending in ``.R`` are layer updates, other keys are
            ``modules_to_save`` (averaged with :func:`exact_mean` rules).
        weights: n raw weights.
        r: global rank (positive int).
        check_rank_consistency: require each client to use one rank rᵢ on all its layers.

    Returns:
        New dict with the same keys: ``L.R`` (r×r) increments and the mean of the other keys.

    Raises:
        AggregationError: naming client and key for a non-square ``L.R``, rᵢ > r, an inconsistent
            client rank, or any :func:`exact_mean` error.
    """
    checked, p, keys = prepare(states, weights)
    r_global = check_rank(r)
    layer_keys = [k for k in keys if k.endswith(".R")]
    others = [k for k in keys if not k.endswith(".R")]

    ranks: dict[str, list[int]] = {}
    for key in layer_keys:
        ranks[key] = []
        for i, s in enumerate(checked):
            R = s[key]
            if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
                raise AggregationError(
                    f"R must be a non-empty square matrix, got shape {R.shape}", client=i, key=key
                )
            if R.shape[0] > r_global:
                raise AggregationError(
                    f"rank {R.shape[0]} exceeds the global rank r={r_global}", client=i, key=key
                )
            ranks[key].append(R.shape[0])
    if check_rank_consistency:
        check_client_ranks(ranks, len(checked))

    def build(key: str) -> StateDict:
        acc = np.zeros((r_global, r_global), dtype=np.float64)
        for pi, s, r_i in zip(p, checked, ranks[key]):
            acc[:r_i, :r_i] += float(pi) * as_f64(s[key])
        return {key: acc.astype(promote([s[key] for s in checked]), copy=False)}

    return in_key_order(keys, weighted_mean_keys(checked, p, others), lambda key: key, build)


def apply_increment(global_state: State, increment: State, *, strict: bool = True) -> StateDict:
    """New global state: ``L.R0 + increment[L.R]`` per layer; ``modules_to_save`` keys replaced.

    Args:
        global_state: ``L.R0`` (r×r) per layer plus ``modules_to_save`` keys.
        increment: output of :func:`exact_mean` / :func:`stack_inner` / :func:`hetero_mean`:
            ``L.R`` (r×r) per layer plus aggregated ``modules_to_save`` keys. ``L.P_stack`` /
            ``L.Q_stack`` (from ``return_factors=True``) are ignored; an ``L.R0`` key is refused.
        strict: every ``L.R0`` must receive an increment and every other global key a replacement.

    Returns:
        A new dict with global_state's keys, order and dtypes (sums computed in float64); no array
        aliases an input.

    Raises:
        AggregationError: (``client=None``) naming the key of a non-finite/non-float value, an
            increment without a global target, a shape mismatch, or (strict) a global key left
            without an update.
    """
    for label, st in (("global_state", global_state), ("increment", increment)):
        if not isinstance(st, Mapping):
            raise AggregationError(f"{label} is {type(st).__name__}, expected a mapping")
        for key, arr in st.items():
            check_array(arr, client=None, key=key)
    out: StateDict = {k: np.array(v, copy=True) for k, v in global_state.items()}
    touched: set[str] = set()
    for key, inc in increment.items():
        if key.endswith((".P_stack", ".Q_stack")):
            continue
        if key.endswith(".R0"):
            raise AggregationError("increments are keyed 'L.R', not 'L.R0'", key=key)
        target = f"{key}0" if key.endswith(".R") else key
        if target not in global_state:
            raise AggregationError(f"no global key {target!r} to update", key=key)
        g = global_state[target]
        if inc.shape != g.shape:
            raise AggregationError(f"shape {inc.shape} does not match global {target!r} {g.shape}", key=key)
        new = as_f64(g) + as_f64(inc) if target != key else as_f64(inc)
        out[target] = np.array(new, dtype=g.dtype, copy=True)
        touched.add(target)
    if strict:
        for key in global_state:
            if key not in touched:
                want = f"{key[:-1]}" if key.endswith(".R0") else key
                raise AggregationError(
                    f"global key {key!r} received no update (increment lacks {want!r})", key=key
                )
    return out
