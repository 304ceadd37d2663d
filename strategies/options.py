"""The federation settings every fedlora strategy shares, validated in one place.

:class:`StrategyOptions` groups what is not about the adapter (rank, ranks, fingerprint, initial state
are constructor arguments of the strategy itself): sampling, reply limits, weighting, seeding and the
train config sent to every node. A strategy accepts either ``options=StrategyOptions(...)`` or the same
fields as keywords (``build_strategy("fedsb", rank=16, fraction_train=0.5, ...)``); both go through
:meth:`StrategyOptions.__post_init__`, whose ``ValueError`` names the bad field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from fedlora.aggregation import WEIGHTINGS
from fedlora.ranks import RankAssigner
from strategies.wire import RESERVED_CONFIG_KEYS


@dataclass(frozen=True)
class StrategyOptions:
    """Federation settings of a strategy (immutable; validated on construction).

    Attributes:
        fraction_train: fraction of connected nodes sampled per round, in (0, 1].
        fraction_evaluate: same for federated evaluation, in [0, 1]; 0 skips evaluation (Flower's rule).
        min_train_nodes: at least this many nodes are sampled, and at least this many valid replies
            are needed to update the global state (≥ 1).
        min_evaluate_nodes: minimum nodes sampled for evaluation (≥ 0).
        min_available_nodes: wait until this many nodes are connected (≥ 1).
        weighting: ``"num-examples"`` (pᵢ ∝ the reply's ``num-examples``) or ``"uniform"``.
        max_update_bytes: reject a reply whose arrays carry more than this many bytes
            (Σ ``len(Array.data)``: payload + ~128 B npy header per array), checked before decoding;
            ``None`` = no limit (shapes are still checked).
        seed: run seed (≥ 0): node sampling, per-node client seeds, random rank draws.
        train_config: extra entries for every node's train ConfigRecord (``lr``, ``local-epochs``, …);
            merged over the ``config`` Flower passes to ``configure_train``; ConfigRecord-compatible
            values, no key of :data:`~strategies.wire.RESERVED_CONFIG_KEYS`.
        heavy_tail_fraction: passed to :class:`~fedlora.ranks.RankAssigner` for ``"heavy-tail"`` specs.
        max_num_examples: reject a train or evaluate reply declaring more ``num-examples`` than this
            (a client's claim bounds its weight pᵢ); ``None`` = no cap. Default 10⁷.
        max_update_norm: reject an update whose L2 norm ‖Δᵢ‖ (all arrays flattened together; Δᵢ = upload −
            download for keys the node downloaded, the upload itself otherwise) exceeds this; ``None`` = no
            bound. Default 10⁴: far above any adapter update of a sane run, far below a 1e30 attack.
        norm_factor: k > 1: also reject ‖Δᵢ‖ > k × the median norm of this round's otherwise valid
            updates; ``None`` = off (default; with few clients the median is the attacker's to move).
        num_examples_factor: k > 1: under ``weighting="num-examples"`` (and in federated evaluation) also
            reject a declared ``num-examples`` above k × the median claim of the round's replies
            (:mod:`strategies.reply_claims`); ``None`` = off. Default 10.
    """

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    weighting: str = "num-examples"
    max_update_bytes: int | None = None
    seed: int = 0
    train_config: Mapping[str, Any] = field(default_factory=dict)
    heavy_tail_fraction: float = 0.85
    max_num_examples: int | None = 10**7
    max_update_norm: float | None = 1e4
    norm_factor: float | None = None
    num_examples_factor: float | None = 10.0

    def __post_init__(self) -> None:
        check_fraction("fraction_train", self.fraction_train, allow_zero=False)
        check_fraction("fraction_evaluate", self.fraction_evaluate, allow_zero=True)
        check_int("min_train_nodes", self.min_train_nodes, minimum=1)
        check_int("min_evaluate_nodes", self.min_evaluate_nodes, minimum=0)
        check_int("min_available_nodes", self.min_available_nodes, minimum=1)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r}: must be one of {WEIGHTINGS}")
        if self.max_update_bytes is not None:
            check_int("max_update_bytes", self.max_update_bytes, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.max_num_examples is not None:
            check_int("max_num_examples", self.max_num_examples, minimum=1)
        check_positive("max_update_norm", self.max_update_norm, above=0.0)
        check_positive("norm_factor", self.norm_factor, above=1.0)
        check_positive("num_examples_factor", self.num_examples_factor, above=1.0)
        user_cfg = dict(self.train_config or {})
        clash = sorted(RESERVED_CONFIG_KEYS & set(user_cfg))
        if clash:
            raise ValueError(f"train_config: keys {clash} are set by the strategy per node")
        try:
            ConfigRecord(user_cfg)
        except (TypeError, ValueError) as err:
            raise ValueError(f"train_config: not ConfigRecord-compatible: {err}") from err
        object.__setattr__(self, "train_config", user_cfg)  # a private copy (the dataclass is frozen)

    def sampling(self) -> dict[str, Any]:
        """The node-sampling fields, as keywords of Flower's ``FedAvg``."""
        return {
            "fraction_train": self.fraction_train,
            "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": self.min_train_nodes,
            "min_evaluate_nodes": self.min_evaluate_nodes,
            "min_available_nodes": self.min_available_nodes,
        }


def check_int(name: str, value: Any, *, minimum: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer (not a bool) ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def check_positive(name: str, value: Any, *, above: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is None or a finite number > ``above``."""
    if value is None:
        return
    number = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not (number and np.isfinite(value) and float(value) > above):
        raise ValueError(f"{name}={value!r}: must be a finite number > {above:g} (or None: off)")


def check_fraction(name: str, value: Any, *, allow_zero: bool) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number in (0, 1] (or 0 if allowed)."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = number and (0.0 < float(value) <= 1.0 or (allow_zero and float(value) == 0.0))
    if not ok:
        raise ValueError(f"{name}={value!r}: must be in (0, 1]" + (" (or 0 to skip)" if allow_zero else ""))


def check_fingerprint(fingerprint: Any, *, required: bool, owner: str) -> None:
    """A fingerprint is a non-empty string, or ``None`` where ``owner`` does not require one."""
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
        raise ValueError(f"outer_fingerprint={fingerprint!r}: must be a non-empty string or None")
    if required and fingerprint is None:
        raise ValueError(
            f"outer_fingerprint=None: {owner} needs the server's outer-factor fingerprint "
            "(exact aggregation requires bit-identical outer factors on every client)"
        )


def check_ranks(rank: int, inner_rank: Any, *, uses_inner_rank: bool) -> int:
    """Validate the global rank r and the inner rank q; returns q (default ``max(1, r // 4)`` where the
    strategy uses one, else 0)."""
    check_int("rank", rank, minimum=1)
    if inner_rank is None:
        return max(1, rank // 4) if uses_inner_rank else 0
    check_int("inner_rank", inner_rank, minimum=1)
    if inner_rank > rank:
        raise ValueError(f"inner_rank={inner_rank!r}: must be <= rank ({rank})")
    return int(inner_rank) if uses_inner_rank else 0


def rank_assigner(ranks: Any, rank: int, options: StrategyOptions, *, heterogeneous: bool, owner: str) -> RankAssigner:
    """The :class:`~fedlora.ranks.RankAssigner` of a ``ranks`` spec (or the assigner given, whose
    ``max_rank`` must be ``rank``); a strategy without heterogeneous ranks accepts only specs yielding r."""
    if isinstance(ranks, RankAssigner):
        if ranks.max_rank != rank:
            raise ValueError(f"ranks: assigner max_rank={ranks.max_rank} differs from rank={rank}")
        assigner = ranks
    else:
        assigner = RankAssigner(ranks, max_rank=rank, seed=options.seed,
                                heavy_tail_fraction=options.heavy_tail_fraction)
    if not heterogeneous and set(assigner.choices) != {rank}:
        raise ValueError(
            f"ranks={assigner.spec!r}: {owner} trains every client at rank r={rank}; "
            "use a heterogeneous-rank strategy (hetero, flora, flora-lora, flexlora)"
        )
    return assigner
