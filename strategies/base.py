"""The Flower Message-API machinery every fedlora strategy shares.

:class:`NestedStrategyBase` subclasses Flower's ``FedAvg`` and holds the *global state*
(``dict[str, np.ndarray]``, sent as an ``ArrayRecord``; see :mod:`strategies.wire` for the message
formats and byte accounting). Each concrete strategy only says what a node downloads, what it must
upload (keys and shapes for its rank), and how validated uploads become the next global state.
This module does the rest, with its helpers: sampling and per-node configs (:mod:`strategies.sampling`),
reply screening (:mod:`strategies.screening`), client metrics (the ``train_metrics_fn``,
:mod:`strategies.client_metrics`), the round record and history (:mod:`strategies.round_record`) and
the checkpoint state (:mod:`strategies.persistence`).

Flower's Strategy contract: ``configure_train(server_round, arrays, ...)`` takes the global state from
``arrays`` in every round (they must have the keys, dtypes and shapes of the strategy's global state)
and sends that; ``aggregate_train`` returns ``(ArrayRecord of the new global state, MetricRecord)``.
So ``Strategy.start(grid, initial_arrays, num_rounds)`` drives a fedlora strategy, and wrapper
strategies that change the arrays between rounds compose. Rounds are counted by the strategy itself
(``self.round``), so they continue after a checkpoint is loaded.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.aggregation import AggregationError
from fedlora.outer_bundle import OuterBundle
from fedlora.ranks import RankAssigner
from strategies.client_metrics import TrainMetricsFn, default_train_metrics, weighted_evaluate_metrics
from strategies.options import StrategyOptions, check_fingerprint, check_ranks, rank_assigner
from strategies.outer_delivery import OUTER_DIGEST, OuterDelivery
from strategies.persistence import STATE_FORMAT, check_loadable
from strategies.round_record import record_participation, round_record, scalar_metrics
from strategies.sampling import derive_seed, node_config, sample_node_ids
from strategies.screening import ClientUpdate, NodeTask, ScreeningRules, screen_replies
from strategies.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LAYOUT_KEY,
    META_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    Shape,
    State,
    arrayrecord_to_state,
    copy_state,
    pack_state,
    payload_bytes,
    serialized_bytes,
    state_to_arrayrecord,
)

LOGGER = logging.getLogger("fedlora.strategy")


class NestedStrategyBase(FedAvg):
    """Base class of every fedlora strategy (a Flower ``FedAvg`` subclass).

    Args:
        rank: global rank r (> 0).
        inner_rank: inner rank q for strategies with P/Q factors (1 ≤ q ≤ rank; default
            ``max(1, rank // 4)``); ignored by the others.
        ranks: per-node rank spec for :class:`~fedlora.ranks.RankAssigner` (or an assigner);
            ``None`` = every node trains rank r. Only heterogeneous-rank strategies accept a spec
            that yields a rank other than r.
        outer_fingerprint: the server's outer-factor fingerprint; replies must carry the same string
            in their ``meta`` ConfigRecord. Required by the nested strategies; optional for the peft
            baselines (``None`` skips the check).
        outer_bundle: the server's outer factors, delivered to each node once
            (:class:`~strategies.outer_delivery.OuterDelivery`); ``None``: nodes compute their own.
        initial_state: global state to start from; ``None`` takes it from the ``arrays`` of the first
            ``configure_train`` call (Flower's ``start(initial_arrays=...)``).
        options: the federation settings (:class:`~strategies.options.StrategyOptions`); its fields may
            also be given as keywords (``fraction_train=0.5``, ``weighting="uniform"``, …), which
            override those of ``options``.
        train_metrics_fn: turns a round's replies into round-record entries
            (:data:`~strategies.client_metrics.TrainMetricsFn`; default
            :func:`~strategies.client_metrics.default_train_metrics`).
        arrayrecord_key / configrecord_key: record names in messages (Flower's defaults).
    """

    #: registry name (``strategies.STRATEGIES`` key) and ``strategy`` config value
    name: ClassVar[str] = "base"
    #: ``mode`` config value: ``"sb"`` / ``"nora"`` (nested) or ``"lora"`` (peft baselines)
    mode: ClassVar[str] = "sb"
    #: whether nodes may train ranks rᵢ < r
    heterogeneous_ranks: ClassVar[bool] = False
    #: whether the strategy uses an inner rank q (P/Q factors)
    uses_inner_rank: ClassVar[bool] = False
    #: whether clients must re-initialise their trainable factors every round
    restart_inner: ClassVar[bool] = False
    #: whether ``outer_fingerprint`` is mandatory
    requires_fingerprint: ClassVar[bool] = True
    #: key suffixes of global arrays whose shape may change from round to round
    reshaped_suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        rank: int,
        inner_rank: int | None = None,
        ranks: str | int | Sequence[int] | RankAssigner | None = None,
        outer_fingerprint: str | None = None,
        outer_bundle: OuterBundle | None = None,
        initial_state: Mapping[str, np.ndarray] | None = None,
        options: StrategyOptions | None = None,
        train_metrics_fn: TrainMetricsFn = default_train_metrics,
        arrayrecord_key: str = ARRAYS_KEY,
        configrecord_key: str = CONFIG_KEY,
        **option_fields: Any,
    ) -> None:
        q = check_ranks(rank, inner_rank, uses_inner_rank=self.uses_inner_rank)
        opts = replace(options or StrategyOptions(), **option_fields)
        check_fingerprint(outer_fingerprint, required=self.requires_fingerprint, owner=type(self).__name__)
        if not callable(train_metrics_fn):
            raise ValueError(f"train_metrics_fn={train_metrics_fn!r}: must be callable")
        self.assigner = rank_assigner(ranks, rank, opts, heterogeneous=self.heterogeneous_ranks,
                                      owner=type(self).__name__)
        super().__init__(
            **opts.sampling(),
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
        )
        self.rank = rank
        self.inner_rank = q
        self.outer_fingerprint = outer_fingerprint
        self.outer = OuterDelivery(outer_bundle) if outer_bundle is not None else None
        self.weighting = opts.weighting
        self.max_update_bytes = opts.max_update_bytes
        self.max_num_examples = opts.max_num_examples
        self.max_update_norm = opts.max_update_norm
        self.norm_factor, self.num_examples_factor = opts.norm_factor, opts.num_examples_factor
        #: the user-level DP clip C every update must respect (set by :class:`~strategies.UserLevelDP`)
        self.clip_norm: float | None = None
        self.seed = int(opts.seed)
        self.train_config = dict(opts.train_config)
        self.train_metrics_fn = train_metrics_fn
        self.metricrecord_key = METRICS_KEY
        self.meta_key = META_KEY

        self.global_state: State | None = None
        self.round = 0  # last aggregated round (absolute, survives resume)
        self.history: list[dict[str, Any]] = []
        #: per node: rounds trained and rounds used (:func:`~strategies.round_record.record_participation`)
        self.node_rounds: dict[str, dict[str, int]] = {}
        self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5A4D]))
        self._tasks: dict[int, NodeTask] = {}
        self._pending_round = 0
        if initial_state is not None:
            self.global_state = self.init_global_state(copy_state(initial_state))

    # ====================================================================== hooks for subclasses
    def init_global_state(self, state: State) -> State:
        """Check (and possibly convert) a global state given from outside; return the state to hold."""
        return state

    def download_state(self, node_id: int, rank: int) -> State:
        """The arrays a node of rank ``rank`` receives (default: the whole global state).

        Must depend on ``rank`` only (one ArrayRecord per rank is built and shared each round).
        """
        assert self.global_state is not None
        return self.global_state

    def expected_upload(self, rank: int, inner_rank: int) -> dict[str, Shape]:
        """Keys → shapes a node of rank ``rank`` (inner rank ``inner_rank``) must upload."""
        raise NotImplementedError

    def aggregate_updates(self, updates: list[ClientUpdate], weights: np.ndarray) -> State:
        """Validated updates (weights pᵢ sum to 1) → the new global state."""
        raise NotImplementedError

    def check_new_global(self, old: State, new: State) -> None:
        """Sanity check of a new global state: the same keys, and the same shape for every key but those
        ending in :attr:`reshaped_suffixes`."""
        if set(old) != set(new):
            raise AggregationError(f"aggregated keys {sorted(set(new) ^ set(old))} differ from the global state")
        for key, arr in new.items():
            if not key.endswith(self.reshaped_suffixes) and arr.shape != old[key].shape:
                raise AggregationError(f"shape {arr.shape} != global {old[key].shape}", key=key)

    def extra_config(self, node_id: int, rank: int) -> dict[str, Any]:
        """Strategy-specific per-node config entries (beyond the reserved keys)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Strategy-specific JSON-serialisable checkpoint state."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    # ====================================================================== global state and nodes
    def node_inner_rank(self, rank: int) -> int:
        """Inner rank qᵢ of a node of rank rᵢ (min(q, rᵢ); 0 when unused)."""
        return min(self.inner_rank, rank) if self.uses_inner_rank else 0

    def global_arrayrecord(self) -> ArrayRecord:
        """The current global state as an ArrayRecord (e.g. ``start(initial_arrays=...)`` on resume)."""
        if self.global_state is None:
            raise RuntimeError("global state not initialised (no initial_state and no round configured)")
        return state_to_arrayrecord(self.global_state)

    def adopt_arrays(self, arrays: ArrayRecord | None) -> State:
        """Make ``arrays`` the global state (Flower passes the current global arrays to every
        ``configure_*`` call) and return it.

        The first state (no ``initial_state``) only has to be valid for the strategy
        (:meth:`init_global_state`); later ones must also have the held state's keys and dtypes and
        shapes (:meth:`check_new_global`). Raises ``ValueError`` saying what differs.
        """
        if self.global_state is None:
            if arrays is None or len(arrays) == 0:
                raise ValueError("initial_state: no global state (pass initial_state or non-empty initial arrays)")
            self.global_state = self.init_global_state(arrayrecord_to_state(arrays))
            return self.global_state
        held = self.global_state
        if arrays is None:
            raise ValueError("arrays=None: configure_train / configure_evaluate need the global arrays")
        try:
            incoming = self.init_global_state(arrayrecord_to_state(arrays))
            self.check_new_global(held, incoming)
        except (AggregationError, ValueError) as err:
            raise ValueError(f"arrays are not a global state of this {type(self).__name__}: {err}") from err
        dtypes = [f"{k}: {incoming[k].dtype} != {v.dtype}" for k, v in held.items() if incoming[k].dtype != v.dtype]
        if dtypes:
            raise ValueError(f"arrays are not a global state of this {type(self).__name__}: dtypes {dtypes[:5]}")
        self.global_state = {k: incoming[k] for k in held}
        return self.global_state

    def _node_config(self, base: Mapping[str, Any] | None, node_id: int, rank: int, rnd: int) -> ConfigRecord:
        reserved = {
            "rank": int(rank),
            "global-rank": int(self.rank),
            "inner-rank": int(self.node_inner_rank(rank)),
            "server-round": int(rnd),
            "seed": derive_seed(self.seed, rnd, node_id),
            "fingerprint": self.outer_fingerprint or "",
            OUTER_DIGEST: self.outer.digest if self.outer else "",
            "mode": self.mode,
            "strategy": self.name,
            "restart-inner": bool(self.restart_inner),
        }
        return node_config(base, self.train_config, reserved, self.extra_config(node_id, rank))

    def _messages(
        self, node_ids: list[int], ranks: Mapping[int, int], config: ConfigRecord, rnd: int, kind: str
    ) -> tuple[list[Message], dict[int, tuple[ArrayRecord, bytes]], dict[int, State]]:
        """One ``kind`` message per node; returns (messages, rank → packed (ArrayRecord, layout), rank → download)."""
        records: dict[int, tuple[ArrayRecord, bytes]] = {}
        downloads: dict[int, State] = {}
        messages = []
        for nid in node_ids:
            rank = ranks[nid]
            if rank not in records:
                downloads[rank] = self.download_state(nid, rank)
                records[rank] = pack_state(downloads[rank])
            cfg = self._node_config(config, nid, rank, rnd)
            cfg[LAYOUT_KEY] = records[rank][1]  # reserved: no config before may set it
            content = RecordDict({self.arrayrecord_key: records[rank][0], self.configrecord_key: cfg})
            messages.append(Message(content=content, dst_node_id=nid, message_type=kind))
        return messages, records, downloads

    # ====================================================================== Flower API: train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Adopt ``arrays`` as the global state, sample nodes and send each the global state for its rank
        and its own ConfigRecord.

        The strategy counts rounds itself (``self.round + 1``), so rounds continue after a resume;
        Flower's ``server_round`` is only logged.
        """
        self.adopt_arrays(arrays)
        rnd = self.round + 1
        node_ids, all_nodes = sample_node_ids(grid, self._rng, self.fraction_train, self.min_train_nodes,
                                              self.min_available_nodes)
        ranks = self.assigner.assign(all_nodes)
        LOGGER.info("round %d (flower round %d): sampled %d of %d nodes", rnd, server_round, len(node_ids),
                    len(all_nodes))
        messages, records, downloads = self._messages(node_ids, ranks, config, rnd, MessageType.TRAIN)
        if self.outer:
            self.outer.attach(messages)
        sizes = {rank: (payload_bytes(rec), serialized_bytes(rec, lay)) for rank, (rec, lay) in records.items()}
        self._pending_round = rnd
        self._tasks = {}
        for msg in messages:
            nid = int(msg.metadata.dst_node_id)
            rank, q = ranks[nid], self.node_inner_rank(ranks[nid])
            pay, ser = sizes[rank]
            self._tasks[nid] = NodeTask(
                node_id=nid,
                rank=rank,
                inner_rank=q,
                seed=int(msg.content[self.configrecord_key]["seed"]),  # type: ignore[arg-type]
                expected=self.expected_upload(rank, q),
                download_payload=pay,
                download_serialized=ser,
                download=downloads[rank],
            )
        return messages

    def _weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        if not updates:
            return np.zeros(0)
        if self.weighting == "uniform":
            w = np.ones(len(updates), dtype=np.float64)
        else:
            w = np.array([u.num_examples for u in updates], dtype=np.float64)
        return w / w.sum()

    def _aggregate(self, used: list[ClientUpdate], weights: np.ndarray) -> tuple[State, str, float]:
        """(new global state, reason the previous one was kept or "", aggregation seconds)."""
        previous = self.global_state
        assert previous is not None
        if len(used) < max(1, self.min_train_nodes):
            return previous, f"{len(used)} valid replies < min_train_nodes={self.min_train_nodes}", 0.0
        t0 = time.perf_counter()
        try:
            candidate = {k: np.ascontiguousarray(v) for k, v in self.aggregate_updates(used, weights).items()}
            for key, arr in candidate.items():
                if not np.all(np.isfinite(arr)):
                    raise AggregationError("aggregated value is not finite", key=key)
            self.check_new_global(previous, candidate)
        except (AggregationError, ValueError, np.linalg.LinAlgError) as err:
            return previous, f"aggregation failed: {err}", time.perf_counter() - t0
        return candidate, "", time.perf_counter() - t0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, aggregate the valid ones, update the global state and record the round.

        Returns the new global state's ArrayRecord and the round's scalar metrics. With fewer than
        ``min_train_nodes`` valid replies (or an aggregation failure) the previous global state is kept
        bit-identical and returned. The full round record (:mod:`strategies.round_record`, plus what
        ``train_metrics_fn`` adds) is appended to :attr:`history`.
        """
        if self.global_state is None:
            raise RuntimeError("aggregate_train called before configure_train / without initial_state")
        rnd = self._pending_round or self.round + 1
        replies = list(replies)
        if self.outer:
            self.outer.observe(replies)
        rules = ScreeningRules(self.arrayrecord_key, self.metricrecord_key, self.meta_key, self.outer_fingerprint,
                               self.weighting, self.max_update_bytes, self.max_num_examples, self.max_update_norm,
                               self.norm_factor, self.clip_norm, self.num_examples_factor)
        screened = screen_replies(replies, self._tasks, rules, rnd)
        used = screened.used
        weights = self._weights(used)
        new_state, kept_reason, agg_seconds = self._aggregate(used, weights)
        if kept_reason:
            LOGGER.warning("round %d: keeping the previous global state: %s", rnd, kept_reason)
        self.global_state = new_state
        self.round = rnd
        self._pending_round = 0

        entry = round_record(rnd, server_round, self._tasks, replies, screened, kept_reason, agg_seconds)
        for key, value in self.train_metrics_fn(replies, used, weights).items():
            entry.setdefault(key, value)
        entry.update(self.outer.round_stats() if self.outer else OuterDelivery.NONE)
        record_participation(self.node_rounds, self._tasks, replies, entry)
        self.history.append(entry)
        return state_to_arrayrecord(self.global_state), scalar_metrics(entry)

    # ====================================================================== Flower API: evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Adopt ``arrays``; send sampled nodes the global state for their rank plus the reserved config keys."""
        if self.fraction_evaluate == 0.0:
            return []
        self.adopt_arrays(arrays)
        node_ids, all_nodes = sample_node_ids(grid, self._rng, self.fraction_evaluate, self.min_evaluate_nodes,
                                              self.min_available_nodes)
        messages, _, _ = self._messages(node_ids, self.assigner.assign(all_nodes), config, self.round,
                                        MessageType.EVALUATE)
        if self.outer:
            self.outer.attach(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted (``num-examples``) mean of the metrics of the evaluate replies that pass screening
        (:func:`~strategies.client_metrics.weighted_evaluate_metrics`)."""
        replies = list(replies)
        if self.outer:
            self.outer.observe(replies)
        return weighted_evaluate_metrics(replies, self.metricrecord_key, self.max_num_examples, server_round,
                                         self.num_examples_factor)

    def summary(self) -> None:
        """Log the strategy configuration."""
        super().summary()
        LOGGER.info("%s: rank=%d inner_rank=%d ranks=%r weighting=%s fingerprint=%s outer=%s max_update_bytes=%s",
                    type(self).__name__, self.rank, self.inner_rank, self.assigner.spec, self.weighting,
                    (self.outer_fingerprint or "-")[:16], self.outer.digest[:16] if self.outer else "node-computed",
                    self.max_update_bytes)

    # ====================================================================== checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state (see :mod:`strategies.persistence`): ``global_state`` (numpy arrays) plus
        JSON-serialisable everything else, ``nodes`` the per-node participation ledger (:attr:`node_rounds`).
        Save with :func:`~strategies.persistence.save_strategy_state`."""
        return {
            "format": STATE_FORMAT,
            "strategy": self.name,
            "round": int(self.round),
            "global_state": copy_state(self.global_state) if self.global_state is not None else None,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "assigner": self.assigner.state_dict(),
            "history": copy.deepcopy(self.history),
            "nodes": copy.deepcopy(self.node_rounds),
            "settings": {"rank": self.rank, "inner_rank": self.inner_rank, "outer_fingerprint": self.outer_fingerprint,
                         "weighting": self.weighting, "seed": self.seed},
            "extra": copy.deepcopy(self.extra_state()),
            "outer-holders": sorted(self.outer.holders) if self.outer else [],  # nodes holding the outer factors
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next ``configure_train`` continues at ``round + 1``.

        Raises:
            ValueError: naming the mismatching key (``format``, ``strategy``, ``rank``,
                ``outer_fingerprint``, …).
        """
        check_loadable(state, self.name, {k: getattr(self, k) for k in ("rank", "inner_rank", "outer_fingerprint")})
        gs = state.get("global_state")
        self.global_state = copy_state(gs) if gs is not None else None
        self.round = int(state["round"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.assigner.load_state_dict(state["assigner"])
        self.history = copy.deepcopy(list(state.get("history", [])))
        self.node_rounds = {str(k): {"trained": int(v["trained"]), "used": int(v["used"])}
                            for k, v in dict(state.get("nodes", {})).items()}
        self.load_extra_state(copy.deepcopy(state.get("extra", {})))
        if self.outer:  # they are not sent again after a resume (a node that lost them says so)
            self.outer.holders = {int(n) for n in state.get("outer-holders", [])}
        self._tasks = {}
        self._pending_round = 0

