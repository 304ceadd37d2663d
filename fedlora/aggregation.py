"""Exact server-side aggregation for nested low-rank adapters (DESIGN.md §1–2).

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

Exactness (DESIGN §1, conditions 2–3): the outer factors B (d×r), A (r×k) are shared and ordered by
singular value, so a client of rank rᵢ < r owns the top-left rᵢ×rᵢ block, and

    Σᵢ pᵢ · s·B·pad_r(Rᵢ)·A  =  s·B·(Σᵢ pᵢ pad_r(Rᵢ))·A

holds exactly when whole (zero-padded) matrices are averaged with weights pᵢ summing to 1. Averaging
each entry only over the clients that cover it (per-entry renormalisation) is *not* this mean.

All arithmetic is done in float64; results are returned in the inputs' dtype (the promotion of all
clients' dtypes for that key, so float64 stays float64). Inputs are never modified and outputs never
alias inputs. Every malformed input raises :class:`AggregationError` naming the client index and key.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

__all__ = [
    "AggregationError",
    "apply_increment",
    "exact_mean",
    "hetero_mean",
    "normalize_weights",
    "stack_inner",
    "validate_state",
]

State = Mapping[str, np.ndarray]
StateDict = dict[str, np.ndarray]
ShapeSpec = tuple[int | None, ...]

_H = TypeVar("_H", bound=Hashable)


class AggregationError(ValueError):
    """A client reply (or the weights) cannot be aggregated.

    Attributes:
        client: index of the offending client in the ``states`` / ``weights`` sequence, or ``None``
            when the problem is not attributable to one client (e.g. all weights are zero).
        key: the offending state key (layer key such as ``L.P`` or a ``modules_to_save`` key), or
            ``None``.

    The message starts with ``client <i>, key '<key>': `` whenever those are known.
    """

    def __init__(self, message: str, *, client: int | None = None, key: str | None = None) -> None:
        self.client = client
        self.key = key
        where = []
        if client is not None:
            where.append(f"client {client}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


# --------------------------------------------------------------------------------------------- helpers
def _majority(values: Sequence[_H]) -> _H:
    """Most common value; ties go to the value seen first. ``values`` must be non-empty."""
    counts = Counter(values)
    best = max(counts.values())
    for value in values:
        if counts[value] == best:
            return value
    raise AssertionError("unreachable")  # pragma: no cover


def _promote(arrays: Sequence[np.ndarray]) -> np.dtype:
    """Common dtype of ``arrays`` (reduce-based: no 32/64-argument limit of ``np.result_type``)."""
    return functools.reduce(np.promote_types, (a.dtype for a in arrays))


def _f64(arr: np.ndarray) -> np.ndarray:
    """float64 view or copy of ``arr``; callers must not write into the result."""
    return arr.astype(np.float64, copy=False)


def _check_array(arr: object, *, client: int | None, key: object, shape: ShapeSpec | None = None) -> None:
    """Type, dtype, (optional) shape and finiteness of one state entry.

    ``shape`` may contain ``None`` as a wildcard dimension.
    """
    if not isinstance(key, str):
        raise AggregationError(f"state key {key!r} is not a string", client=client)
    if not isinstance(arr, np.ndarray):
        raise AggregationError(
            f"value is {type(arr).__name__}, expected numpy.ndarray", client=client, key=key
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise AggregationError(f"dtype {arr.dtype} is not a real floating-point type", client=client, key=key)
    if shape is not None:
        ok = arr.ndim == len(shape) and all(e is None or e == s for e, s in zip(shape, arr.shape))
        if not ok:
            raise AggregationError(
                f"shape {arr.shape} does not match expected {shape}", client=client, key=key
            )
    if not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise AggregationError(f"non-finite values ({n_nan} NaN, {n_inf} Inf)", client=client, key=key)


def _check_states(states: Sequence[State], n_weights: int) -> list[State]:
    """Screen the client list: a non-empty sequence of str → float ndarray mappings, all finite."""
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise AggregationError(f"states must be a sequence of client states, got {type(states).__name__}")
    states = list(states)
    if not states:
        raise AggregationError("no client states to aggregate")
    if len(states) != n_weights:
        raise AggregationError(f"{len(states)} client states but {n_weights} weights")
    for i, state in enumerate(states):
        if not isinstance(state, Mapping):
            raise AggregationError(f"state is {type(state).__name__}, expected a mapping", client=i)
        for key, arr in state.items():
            _check_array(arr, client=i, key=key)
    return states


def _check_same_keys(states: Sequence[State]) -> list[str]:
    """All clients must hold the same key set; return the keys in client 0's order.

    The reference set is the one most clients hold, so the blame lands on the deviant client
    (even when that is client 0).
    """
    keysets = [frozenset(s.keys()) for s in states]
    ref = _majority(keysets)
    for i, keys in enumerate(keysets):
        missing = sorted(ref - keys)
        if missing:
            raise AggregationError("missing key (held by the other clients)", client=i, key=missing[0])
        extra = sorted(keys - ref)
        if extra:
            raise AggregationError("unexpected key (not held by the other clients)", client=i, key=extra[0])
    return list(states[0].keys())


def _prepare(
    states: Sequence[State], weights: Sequence[float] | np.ndarray
) -> tuple[list[State], np.ndarray, list[str]]:
    """Common front end: normalised weights, screened states, their shared key list."""
    p = normalize_weights(weights)
    checked = _check_states(states, len(p))
    keys = _check_same_keys(checked)
    return checked, p, keys


def _mean_keys(states: Sequence[State], p: np.ndarray, keys: Sequence[str]) -> StateDict:
    """Σᵢ pᵢ·stateᵢ[key] for each key; shapes must agree (the deviant client is named)."""
    out: StateDict = {}
    for key in keys:
        arrays = [s[key] for s in states]
        shape = _majority([a.shape for a in arrays])
        for i, a in enumerate(arrays):
            if a.shape != shape:
                raise AggregationError(
                    f"shape {a.shape} differs from {shape} held by the other clients", client=i, key=key
                )
        stacked = np.stack([_f64(a) for a in arrays])  # (n, *shape)
        # one vectorised weighted sum per key; numpy reductions are deterministic (reproducible runs)
        acc = (stacked * p.reshape((-1,) + (1,) * len(shape))).sum(axis=0)
        out[key] = acc.astype(_promote(arrays), copy=False)
    return out


def _check_rank_consistency(ranks: Mapping[str, list[int]], n_clients: int) -> None:
    """Every client must use one rank rᵢ across all its layers (architecture.md: one rᵢ per client).

    ``ranks`` maps a layer's key to the per-client rank list; the client's reference rank is the one
    most of its layers use, and the first deviating layer key is named.
    """
    for i in range(n_clients):
        per_layer = [(key, rs[i]) for key, rs in ranks.items()]
        if not per_layer:
            return
        ref = _majority([r for _, r in per_layer])
        for key, r_i in per_layer:
            if r_i != ref:
                raise AggregationError(
                    f"rank {r_i} differs from rank {ref} this client uses on its other layers",
                    client=i,
                    key=key,
                )


def _check_rank(r: object, name: str = "r") -> int:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or int(r) < 1:
        raise AggregationError(f"{name} must be a positive integer, got {r!r}")
    return int(r)


# -------------------------------------------------------------------------------------------- public API
def normalize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Turn raw client weights (e.g. example counts) into probabilities.

    Args:
        weights: n raw weights, each finite and ≥ 0, with a positive sum.

    Returns:
        float64 array p of shape (n,), pᵢ ≥ 0, Σ pᵢ = 1 (computed as w/max(w), then renormalised,
        so huge counts do not overflow).

    Raises:
        AggregationError: naming the client index of a negative or non-finite weight; ``client=None``
            for an empty list, a non-1-D input, or all-zero weights.
    """
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AggregationError(f"weights are not real numbers: {exc}") from exc
    if w.ndim != 1:
        raise AggregationError(f"weights must be one-dimensional, got shape {w.shape}")
    if w.size == 0:
        raise AggregationError("no client weights")
    for i, wi in enumerate(w):
        if not np.isfinite(wi):
            raise AggregationError(f"weight {wi!r} is not finite", client=i)
        if wi < 0:
            raise AggregationError(f"weight {wi!r} is negative", client=i)
    top = float(w.max())
    if top <= 0.0:
        raise AggregationError(f"the weights of all {w.size} clients are zero; their sum must be positive")
    scaled = w / top
    return scaled / scaled.sum()


def validate_state(state: State, expected: Mapping[str, ShapeSpec], *, client: int | None = None) -> None:
    """Screen one state against an expected-shape spec (strategies use it on every reply).

    Args:
        state: ``dict[str, np.ndarray]``.
        expected: key → shape; a ``None`` dimension matches any size (e.g. ``(None, None)`` for a
            heterogeneous-rank ``L.R`` whose rank is validated later by :func:`hetero_mean`).
        client: index reported in errors.

    Checks, in order: mapping type; no missing and no extra keys; each value a numpy array of a real
    floating dtype; shape matches; all values finite.

    Raises:
        AggregationError: naming ``client`` and the offending key.
    """
    if not isinstance(state, Mapping):
        raise AggregationError(f"state is {type(state).__name__}, expected a mapping", client=client)
    for key in expected:
        if key not in state:
            raise AggregationError("missing key", client=client, key=key)
    for key in state:
        if key not in expected:
            raise AggregationError(
                "unexpected key", client=client, key=key if isinstance(key, str) else repr(key)
            )
    for key, shape in expected.items():
        _check_array(state[key], client=client, key=key, shape=tuple(shape))


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
    checked, p, keys = _prepare(states, weights)
    return _mean_keys(checked, p, keys)


def stack_inner(
    states: Sequence[State],
    weights: Sequence[float] | np.ndarray,
    r: int | None = None,
    *,
    return_factors: bool = False,
    check_rank_consistency: bool = True,
) -> StateDict:
    """FLoRA aggregation of nested ``nora`` updates by stacking (exact, DESIGN §2).

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
    checked, p, keys = _prepare(states, weights)
    r_global = None if r is None else _check_rank(r)
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
        _check_rank_consistency(ranks, len(checked))

    means = _mean_keys(checked, p, others)
    out: StateDict = {}
    for key in keys:
        if key in means:
            out[key] = means[key]
            continue
        layer = key[:-2]
        if f"{layer}.R" in out:
            continue
        kp, kq = f"{layer}.P", f"{layer}.Q"
        r_l = r_global if r_global is not None else max(ranks[kp])
        qs = inner[layer]
        P_stack = np.zeros((r_l, sum(qs)), dtype=np.float64)
        Q_stack = np.zeros((sum(qs), r_l), dtype=np.float64)
        col = 0
        for pi, s, r_i, q_i in zip(p, checked, ranks[kp], qs):
            P_stack[:r_i, col : col + q_i] = float(pi) * _f64(s[kp])
            Q_stack[col : col + q_i, :r_i] = _f64(s[kq])
            col += q_i
        dtype = _promote([s[k] for s in checked for k in (kp, kq)])
        out[f"{layer}.R"] = (P_stack @ Q_stack).astype(dtype, copy=False)
        if return_factors:
            out[f"{layer}.P_stack"] = P_stack.astype(dtype, copy=False)
            out[f"{layer}.Q_stack"] = Q_stack.astype(dtype, copy=False)
    return out


def hetero_mean(
    states: Sequence[State],
    weights: Sequence[float] | np.ndarray,
    r: int,
    *,
    check_rank_consistency: bool = True,
) -> StateDict:
    """Heterogeneous-rank aggregation: Σᵢ pᵢ·pad_r(Rᵢ) on whole zero-padded matrices (exact).

    Each ``L.R`` is a square rᵢ×rᵢ block with 1 ≤ rᵢ ≤ r placed top-left in an r×r zero matrix
    (DESIGN condition 2). Entries outside a small client's block therefore receive that client's
    weight times zero — this is the true weighted mean of the ΔWᵢ; per-entry renormalisation is not
    (DESIGN condition 3).

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
    checked, p, keys = _prepare(states, weights)
    r_global = _check_rank(r)
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
        _check_rank_consistency(ranks, len(checked))

    means = _mean_keys(checked, p, others)
    out: StateDict = {}
    for key in keys:
        if key in means:
            out[key] = means[key]
            continue
        acc = np.zeros((r_global, r_global), dtype=np.float64)
        for pi, s, r_i in zip(p, checked, ranks[key]):
            acc[:r_i, :r_i] += float(pi) * _f64(s[key])
        out[key] = acc.astype(_promote([s[key] for s in checked]), copy=False)
    return out


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
            _check_array(arr, client=None, key=key)
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
        new = _f64(g) + _f64(inc) if target != key else _f64(inc)
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
