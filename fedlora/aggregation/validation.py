"""Screening of client states and weights before any aggregation (:mod:`fedlora.aggregation`).

A client state is a ``dict[str, np.ndarray]`` (keys and shapes: ``docs/architecture.md``). Every malformed
input raises :class:`AggregationError` naming the client index and key, so strategies can log and drop
exactly the offending reply. Checks: a non-empty sequence of mappings; str keys; finite, real floating-point
numpy arrays; the same key set on every client (the majority's set is the reference, so the blame lands on
the deviant client); weights finite, ≥ 0 with a positive sum; one rank rᵢ per client across its layers.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from fedlora.tensors import array_problem

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


def majority(values: Sequence[_H]) -> _H:
    """Most common value; ties go to the value seen first. ``values`` must be non-empty."""
    counts = Counter(values)
    best = max(counts.values())
    for value in values:
        if counts[value] == best:
            return value
    raise AssertionError("unreachable")  # pragma: no cover


def promote(arrays: Sequence[np.ndarray]) -> np.dtype:
    """Common dtype of ``arrays`` (reduce-based: no 32/64-argument limit of ``np.result_type``)."""
    return functools.reduce(np.promote_types, (a.dtype for a in arrays))


def as_f64(arr: np.ndarray) -> np.ndarray:
    """float64 view or copy of ``arr``; callers must not write into the result."""
    return arr.astype(np.float64, copy=False)


def check_array(arr: object, *, client: int | None, key: object, shape: ShapeSpec | None = None) -> None:
    """One state entry: a ``str`` key and a finite, real floating-point ``np.ndarray`` of ``shape`` (``None``
    entries are wildcard dimensions; no shape: any). Raises :class:`AggregationError` naming client and key,
    with the reason from :func:`fedlora.tensors.array_problem`."""
    if not isinstance(key, str):
        raise AggregationError(f"state key {key!r} is not a string", client=client)
    if not isinstance(arr, np.ndarray):
        raise AggregationError(
            f"value is {type(arr).__name__}, expected numpy.ndarray", client=client, key=key
        )
    problem = array_problem(arr, shape)
    if problem is not None:
        raise AggregationError(problem, client=client, key=key)


#: how client weights pᵢ are formed: by each client's number of examples, or uniform
WEIGHTINGS = ("num-examples", "uniform")


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
        check_array(state[key], client=client, key=key, shape=tuple(shape))


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
            check_array(arr, client=i, key=key)
    return states


def _check_same_keys(states: Sequence[State]) -> list[str]:
    """All clients must hold the same key set; return the keys in client 0's order.

    The reference set is the one most clients hold, so the blame lands on the deviant client
    (even when that is client 0).
    """
    keysets = [frozenset(s.keys()) for s in states]
    ref = majority(keysets)
    for i, keys in enumerate(keysets):
        missing = sorted(ref - keys)
        if missing:
            raise AggregationError("missing key (held by the other clients)", client=i, key=missing[0])
        extra = sorted(keys - ref)
        if extra:
            raise AggregationError("unexpected key (not held by the other clients)", client=i, key=extra[0])
    return list(states[0].keys())


def prepare(
    states: Sequence[State], weights: Sequence[float] | np.ndarray
) -> tuple[list[State], np.ndarray, list[str]]:
    """Common front end: normalised weights, screened states, their shared key list."""
    p = normalize_weights(weights)
    checked = _check_states(states, len(p))
    keys = _check_same_keys(checked)
    return checked, p, keys


def check_client_ranks(ranks: Mapping[str, list[int]], n_clients: int) -> None:
    """Every client must use one rank rᵢ across all its layers (architecture.md: one rᵢ per client).

    ``ranks`` maps a layer's key to the per-client rank list; the client's reference rank is the one
    most of its layers use, and the first deviating layer key is named.
    """
    for i in range(n_clients):
        per_layer = [(key, rs[i]) for key, rs in ranks.items()]
        if not per_layer:
            return
        ref = majority([r for _, r in per_layer])
        for key, r_i in per_layer:
            if r_i != ref:
                raise AggregationError(
                    f"rank {r_i} differs from rank {ref} this client uses on its other layers",
                    client=i,
                    key=key,
                )


def check_rank(r: object, name: str = "r") -> int:
    """``r`` as an int if it is a positive integer (not a bool); else AggregationError naming ``name``."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or int(r) < 1:
        raise AggregationError(f"{name} must be a positive integer, got {r!r}")
    return int(r)
