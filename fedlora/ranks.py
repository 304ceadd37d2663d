"""Per-node rank assignment for heterogeneous-rank strategies.

A :class:`RankAssigner` maps every Flower node id to the rank rᵢ it trains. The assignment is made
once per node and then remembered, so a node keeps its rank across rounds (and across a
checkpoint/resume, through :meth:`RankAssigner.state_dict`).

Specifications (``spec``):

- ``16`` / ``"16"``: every node gets rank 16.
- ``"16,8,4"`` or ``[16, 8, 4]``: the list is cycled over nodes in the order the assigner first
  sees them (node ids sorted within one call), so the ranks are balanced.
- ``"uniform"`` / ``"uniform:16,8,4"``: each node draws one rank uniformly from the set, seeded by
  ``(seed, node id)``: the draw depends only on the node, not on sampling order.
- ``"heavy-tail"`` / ``"heavy-tail:4,8,16"``: FlexLoRA-style heavy tail, seeded the same way: a
  fraction ``heavy_tail_fraction`` (default 0.85) of the nodes gets the smallest rank, the others draw
  uniformly from the larger ones (most clients small, few large).

Without an explicit set, ``uniform`` and ``heavy-tail`` use ``{r, r/2, r/4}`` (the values ≥ 1) where r
is ``max_rank``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

KINDS = ("constant", "cycle", "uniform", "heavy-tail")


def _parse_int_list(text: str, key: str) -> list[int]:
    try:
        values = [int(tok) for tok in text.replace(" ", "").split(",") if tok != ""]
    except ValueError as err:
        raise ValueError(f"{key}={text!r}: expected comma-separated integers") from err
    if not values:
        raise ValueError(f"{key}={text!r}: expected at least one rank")
    return values


def _node_uniform(seed: int, node_id: int) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, node id)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), int(node_id) & (2**64 - 1)]))
    return float(rng.random())


class RankAssigner:
    """Assigns each node a rank rᵢ ∈ [1, max_rank], stable per node.

    Args:
        spec: rank specification (see the module docstring); ``None`` means every node gets
            ``max_rank``.
        max_rank: the global rank r; every assigned rank must satisfy 1 ≤ rᵢ ≤ r.
        seed: seed of the ``uniform`` and ``heavy-tail`` draws.
        heavy_tail_fraction: fraction of nodes at the smallest rank for ``heavy-tail``, in (0, 1).

    Raises:
        ValueError: naming ``ranks`` (bad spec or a rank outside [1, max_rank]), ``max_rank`` or
            ``heavy_tail_fraction``.
    """

    def __init__(
        self,
        spec: str | int | Sequence[int] | None = None,
        *,
        max_rank: int,
        seed: int = 0,
        heavy_tail_fraction: float = 0.85,
    ) -> None:
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
            raise ValueError(f"max_rank={max_rank!r}: must be an integer >= 1")
        if not 0.0 < float(heavy_tail_fraction) < 1.0:
            raise ValueError(f"heavy_tail_fraction={heavy_tail_fraction!r}: must be in (0, 1)")
        self.max_rank = max_rank
        self.seed = int(seed)
        self.heavy_tail_fraction = float(heavy_tail_fraction)
        self.spec = spec
        self.kind, self.choices = self._parse(spec)
        for rank in self.choices:
            if rank < 1 or rank > max_rank:
                raise ValueError(f"ranks={spec!r}: rank {rank} outside [1, {max_rank}] (max_rank = r)")
        self._assigned: dict[int, int] = {}
        self._counter = 0

    # ------------------------------------------------------------------ parsing
    def _default_choices(self) -> list[int]:
        r = self.max_rank
        return sorted({v for v in (r, r // 2, r // 4) if v >= 1}, reverse=True)

    def _parse(self, spec: str | int | Sequence[int] | None) -> tuple[str, list[int]]:
        if spec is None or (isinstance(spec, str) and spec.strip() == ""):
            return "constant", [self.max_rank]
        if isinstance(spec, bool):
            raise ValueError(f"ranks={spec!r}: expected an int, a list of ints or a string")
        if isinstance(spec, (int, np.integer)):
            return "constant", [int(spec)]
        if isinstance(spec, str):
            text = spec.strip()
            for kind in ("uniform", "heavy-tail"):
                if text == kind:
                    return kind, self._default_choices()
                if text.startswith(kind + ":"):
                    choices = _parse_int_list(text[len(kind) + 1 :], "ranks")
                    return kind, sorted(set(choices), reverse=True)
            values = _parse_int_list(text, "ranks")
            return ("constant", values) if len(values) == 1 else ("cycle", values)
        if isinstance(spec, Sequence):
            values = []
            for v in spec:
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise ValueError(f"ranks={spec!r}: every rank must be an integer")
                values.append(int(v))
            if not values:
                raise ValueError(f"ranks={spec!r}: expected at least one rank")
            return ("constant", values) if len(values) == 1 else ("cycle", values)
        raise ValueError(f"ranks={spec!r}: expected an int, a list of ints or a string")

    # ------------------------------------------------------------------ assignment
    @property
    def heterogeneous(self) -> bool:
        """Whether nodes may get different ranks."""
        return len(set(self.choices)) > 1

    def _draw(self, node_id: int) -> int:
        if self.kind == "constant":
            return self.choices[0]
        if self.kind == "cycle":
            rank = self.choices[self._counter % len(self.choices)]
            self._counter += 1
            return rank
        u = _node_uniform(self.seed, node_id)
        if self.kind == "uniform":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        # heavy-tail: smallest rank with probability heavy_tail_fraction, else uniform over the others
        ascending = sorted(self.choices)
        if len(ascending) == 1 or u < self.heavy_tail_fraction:
            return ascending[0]
        rest = ascending[1:]
        v = (u - self.heavy_tail_fraction) / (1.0 - self.heavy_tail_fraction)
        return rest[min(int(v * len(rest)), len(rest) - 1)]

    def assign(self, node_ids: Iterable[int]) -> dict[int, int]:
        """Return {node id: rank} for ``node_ids``, assigning (and remembering) unseen nodes.

        Unseen nodes are assigned in ascending node-id order, so one call is deterministic.
        """
        ids = [int(n) for n in node_ids]
        for nid in sorted(set(ids)):
            if nid not in self._assigned:
                self._assigned[nid] = self._draw(nid)
        return {nid: self._assigned[nid] for nid in ids}

    def rank_of(self, node_id: int) -> int:
        """The rank of one node (assigning it if unseen)."""
        return self.assign([node_id])[int(node_id)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (spec, seed and the assignments made so far)."""
        spec = self.spec
        if spec is not None and not isinstance(spec, (str, int)):
            spec = [int(v) for v in spec]
        elif isinstance(spec, np.integer):
            spec = int(spec)
        return {
            "spec": spec,
            "max_rank": self.max_rank,
            "seed": self.seed,
            "heavy_tail_fraction": self.heavy_tail_fraction,
            "assigned": {str(k): int(v) for k, v in self._assigned.items()},
            "counter": self._counter,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore assignments saved by :meth:`state_dict` (spec and max rank must match)."""
        if state.get("max_rank") != self.max_rank:
            raise ValueError(
                f"max_rank: checkpoint has {state.get('max_rank')!r}, this assigner {self.max_rank!r}"
            )
        saved = self._parse(state.get("spec"))
        if saved != (self.kind, self.choices):
            raise ValueError(f"ranks: checkpoint spec {state.get('spec')!r} differs from {self.spec!r}")
        self.seed = int(state.get("seed", self.seed))
        self.heavy_tail_fraction = float(state.get("heavy_tail_fraction", self.heavy_tail_fraction))
        self._assigned = {int(k): int(v) for k, v in state.get("assigned", {}).items()}
        self._counter = int(state.get("counter", 0))

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RankAssigner:
        """Build an assigner from :meth:`state_dict` output."""
        obj = cls(
            state.get("spec"),
            max_rank=int(state["max_rank"]),
            seed=int(state.get("seed", 0)),
            heavy_tail_fraction=float(state.get("heavy_tail_fraction", 0.85)),
        )
        obj.load_state_dict(state)
        return obj

    def __repr__(self) -> str:
        return f"RankAssigner(kind={self.kind!r}, choices={self.choices}, max_rank={self.max_rank})"
