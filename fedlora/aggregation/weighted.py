"""What every aggregation rule shares: the weighted mean of whole arrays and the output's key order.

``weighted_mean_keys`` is the exact rule for any key whose arrays all have one shape (``modules_to_save``
parameters, Fed-SB's ``L.R``, FedIT's separate A and B); ``in_key_order`` assembles a rule's output in the
order keys first appear in client 0's state, a group of keys (a layer's ``L.P``/``L.Q``, a LoRA prefix's
A/B) replaced by what the rule builds for it. float64 arithmetic, results in the inputs' promoted dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from fedlora.aggregation.validation import AggregationError, State, StateDict, as_f64, majority, promote

_V = TypeVar("_V")


def weighted_mean_keys(states: Sequence[State], p: np.ndarray, keys: Sequence[str]) -> StateDict:
    """Σᵢ pᵢ·stateᵢ[key] for each key; shapes must agree (the deviant client is named)."""
    out: StateDict = {}
    for key in keys:
        arrays = [s[key] for s in states]
        shape = majority([a.shape for a in arrays])
        for i, a in enumerate(arrays):
            if a.shape != shape:
                raise AggregationError(
                    f"shape {a.shape} differs from {shape} held by the other clients", client=i, key=key
                )
        stacked = np.stack([as_f64(a) for a in arrays])  # (n, *shape)
        # one vectorised weighted sum per key; numpy reductions are deterministic (reproducible runs)
        acc = (stacked * p.reshape((-1,) + (1,) * len(shape))).sum(axis=0)
        out[key] = acc.astype(promote(arrays), copy=False)
    return out


def in_key_order(
    keys: Sequence[str],
    means: Mapping[str, _V],
    group_of: Callable[[str], str],
    build: Callable[[str], Mapping[str, _V]],
) -> dict[str, _V]:
    """A rule's output in client 0's key order.

    Each key of ``means`` (keys averaged as they are) keeps its place with its mean; every other key belongs to
    the group ``group_of(key)``, and the first key of each group is replaced by ``build(group)`` (called once
    per group, in order), e.g. a layer's ``L.P``/``L.Q`` by its ``L.R``.
    """
    out: dict[str, _V] = {}
    built: set[str] = set()
    for key in keys:
        if key in means:
            out[key] = means[key]
            continue
        group = group_of(key)
        if group not in built:
            built.add(group)
            out.update(build(group))
    return out
