"""Shared Flower Message-API machinery of every fedlora strategy.

:class:`NestedStrategyBase` subclasses Flower's ``FedAvg`` and owns the *global state*
(``dict[str, np.ndarray]``, converted to/from ``ArrayRecord`` of ``Array`` values). Each concrete
strategy only says what a node downloads, what it must upload (keys and shapes for its rank), and how
validated uploads become the next global state. Everything else lives here: sampling, per-node
configs, reply screening, weighting, byte accounting, history and checkpoint state.

Message formats
---------------
Server → client (``MessageType.TRAIN``): ``RecordDict({"arrays": ArrayRecord, "config": ConfigRecord})``.
The ConfigRecord holds the user's train config (``lr``, ``local-epochs``, …) plus the reserved keys
``rank``, ``global-rank``, ``inner-rank``, ``server-round``, ``seed``, ``fingerprint``, ``mode``,
``strategy``, ``restart-inner`` and any strategy extras (see each strategy).

Client → server (reply): ``RecordDict`` with

- ``"arrays"``: ``ArrayRecord`` holding exactly the keys/shapes the node was asked for,
- ``"metrics"``: ``MetricRecord`` with ``num-examples`` (> 0; required with ``weighting="num-examples"``)
  and optionally ``train-loss``,
- ``"meta"``: ``ConfigRecord`` with ``fingerprint`` (str) — required whenever the server has a
  fingerprint (MetricRecords cannot hold strings, hence a separate ConfigRecord).

Byte accounting
---------------
``payload`` bytes = Σ over the Arrays of (number of elements × item size), i.e. the ``nbytes`` of the
numbers carried. ``serialized`` bytes = what Flower 1.41 puts on the wire for that ArrayRecord: the
sum of the deflated inflatable objects (ArrayRecord, Arrays, ArrayChunks: npy headers, keys, object
headers). ``overhead`` = serialized − payload, reported separately.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlora.aggregation import AggregationError, validate_state
from fedlora.ranks import RankAssigner

LOGGER = logging.getLogger("fedlora.strategy")

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
META_KEY = "meta"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
WEIGHTINGS = ("num-examples", "uniform")
STATE_FORMAT = "fedlora.strategy/1"

#: config keys the strategy sets per node; a user train config may not override them
RESERVED_CONFIG_KEYS = frozenset(
    {
        "rank",
        "global-rank",
        "inner-rank",
        "server-round",
        "seed",
        "fingerprint",
        "mode",
        "strategy",
        "restart-inner",
    }
)

State = dict[str, np.ndarray]
Shape = tuple[int, ...]


# ------------------------------------------------------------------------------------------ conversions
def state_to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``dict[str, ndarray]`` → ``ArrayRecord`` of ``Array`` values (keys in order)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def arrayrecord_to_state(record: ArrayRecord) -> State:
    """``ArrayRecord`` → ``dict[str, ndarray]`` (decodes every Array)."""
    return {k: v.numpy() for k, v in record.items()}


def array_payload_bytes(array: Array) -> int:
    """Bytes of the numbers one Array carries (elements × item size = the ndarray's ``nbytes``)."""
    try:
        itemsize = np.dtype(array.dtype).itemsize
    except TypeError:  # dtype numpy cannot name: fall back to the raw data length
        return len(array.data)
    return int(math.prod(array.shape)) * itemsize


def payload_bytes(record: ArrayRecord) -> int:
    """Σ payload bytes of an ArrayRecord (see the module docstring)."""
    return sum(array_payload_bytes(a) for a in record.values())


def raw_data_bytes(record: ArrayRecord) -> int:
    """Σ ``len(Array.data)`` (npy-encoded bytes, payload + per-array npy header)."""
    return sum(len(a.data) for a in record.values())


def serialized_bytes(record: ArrayRecord) -> int:
    """Bytes Flower 1.41 transmits for ``record``: Σ deflated size of its unique inflatable objects."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def derive_seed(run_seed: int, server_round: int, node_id: int) -> int:
    """Deterministic per-(run seed, round, node) seed in [0, 2³¹)."""
    seq = np.random.SeedSequence([int(run_seed), int(server_round), int(node_id) & (2**64 - 1)])
    return int(seq.generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def _num(value: Any) -> float | None:
    """A finite float from a metric value, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


# ------------------------------------------------------------------------------------------ records
@dataclass
class NodeTask:
    """What one sampled node was asked to do in the current round."""

    node_id: int
    rank: int
    inner_rank: int
    seed: int
    expected: dict[str, Shape]
    download_payload: int
    download_serialized: int


@dataclass
class ClientUpdate:
    """A screened, accepted client reply."""

    node_id: int
    rank: int
    inner_rank: int
    state: State
    num_examples: float
    train_loss: float | None
    upload_payload: int
    upload_serialized: int
    metrics: dict[str, float] = field(default_factory=dict)


class ReplyRejected(Exception):
    """Internal: a reply failed screening (``category`` is a short machine-readable tag)."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


# ------------------------------------------------------------------------------------------ strategy
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
        initial_state: global state to start from; ``None`` takes it from the ``arrays`` of the first
            ``configure_train`` call (Flower's ``start(initial_arrays=...)``).
        fraction_train: fraction of connected nodes sampled per round, in (0, 1].
        fraction_evaluate: same for federated evaluation, in (0, 1]; 0 skips evaluation (Flower's rule).
        min_train_nodes: at least this many nodes are sampled, and at least this many valid replies
            are needed to update the global state (≥ 1).
        min_evaluate_nodes: minimum nodes sampled for evaluation (≥ 0).
        min_available_nodes: wait until this many nodes are connected (≥ 1).
        weighting: ``"num-examples"`` (pᵢ ∝ the reply's ``num-examples``) or ``"uniform"``.
        max_update_bytes: reject a reply whose arrays carry more than this many bytes
            (Σ ``len(Array.data)``: payload + ~128 B npy header per array), checked before decoding;
            ``None`` = no limit (shapes are still checked).
        seed: run seed: node sampling, per-node client seeds, random rank draws.
        train_config: extra entries for every node's train ConfigRecord (``lr``, ``local-epochs``, …);
            merged over the ``config`` Flower passes to ``configure_train``; may not use reserved keys.
        heavy_tail_fraction: passed to :class:`RankAssigner` for ``"heavy-tail"`` specs.
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

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        *,
        rank: int,
        inner_rank: int | None = None,
        ranks: str | int | Sequence[int] | RankAssigner | None = None,
        outer_fingerprint: str | None = None,
        initial_state: Mapping[str, np.ndarray] | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighting: str = "num-examples",
        max_update_bytes: int | None = None,
        seed: int = 0,
        train_config: Mapping[str, Any] | None = None,
        heavy_tail_fraction: float = 0.85,
        arrayrecord_key: str = ARRAYS_KEY,
        configrecord_key: str = CONFIG_KEY,
    ) -> None:
        _check_int("rank", rank, minimum=1)
        if self.uses_inner_rank:
            if inner_rank is None:
                inner_rank = max(1, rank // 4)
            _check_int("inner_rank", inner_rank, minimum=1)
            if inner_rank > rank:
                raise ValueError(f"inner_rank={inner_rank!r}: must be <= rank ({rank})")
        elif inner_rank is not None:
            _check_int("inner_rank", inner_rank, minimum=1)
            if inner_rank > rank:
                raise ValueError(f"inner_rank={inner_rank!r}: must be <= rank ({rank})")
        _check_fraction("fraction_train", fraction_train, allow_zero=False)
        _check_fraction("fraction_evaluate", fraction_evaluate, allow_zero=True)
        _check_int("min_train_nodes", min_train_nodes, minimum=1)
        _check_int("min_evaluate_nodes", min_evaluate_nodes, minimum=0)
        _check_int("min_available_nodes", min_available_nodes, minimum=1)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: must be one of {WEIGHTINGS}")
        if max_update_bytes is not None:
            _check_int("max_update_bytes", max_update_bytes, minimum=1)
        _check_int("seed", seed, minimum=0)
        if outer_fingerprint is not None and (
            not isinstance(outer_fingerprint, str) or not outer_fingerprint
        ):
            raise ValueError(f"outer_fingerprint={outer_fingerprint!r}: must be a non-empty string or None")
        if self.requires_fingerprint and outer_fingerprint is None:
            raise ValueError(
                f"outer_fingerprint=None: {type(self).__name__} needs the server's outer-factor fingerprint "
                "(exact aggregation requires bit-identical outer factors on every client)"
            )
        user_cfg = dict(train_config or {})
        clash = sorted(RESERVED_CONFIG_KEYS & set(user_cfg))
        if clash:
            raise ValueError(f"train_config: keys {clash} are set by the strategy per node")
        try:
            ConfigRecord(user_cfg)
        except (TypeError, ValueError) as err:
            raise ValueError(f"train_config: not ConfigRecord-compatible: {err}") from err

        if isinstance(ranks, RankAssigner):
            if ranks.max_rank != rank:
                raise ValueError(f"ranks: assigner max_rank={ranks.max_rank} differs from rank={rank}")
            assigner = ranks
        else:
            assigner = RankAssigner(ranks, max_rank=rank, seed=seed, heavy_tail_fraction=heavy_tail_fraction)
        if not self.heterogeneous_ranks and set(assigner.choices) != {rank}:
            raise ValueError(
                f"ranks={assigner.spec!r}: {type(self).__name__} trains every client at rank r={rank}; "
                "use a heterogeneous-rank strategy (hetero, flora, flora-lora, flexlora)"
            )

        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
        )
        self.rank = rank
        self.inner_rank = int(inner_rank) if (self.uses_inner_rank and inner_rank is not None) else 0
        self.assigner = assigner
        self.outer_fingerprint = outer_fingerprint
        self.weighting = weighting
        self.max_update_bytes = max_update_bytes
        self.seed = int(seed)
        self.train_config = user_cfg
        self.metricrecord_key = METRICS_KEY
        self.meta_key = META_KEY

        self.global_state: State | None = None
        self.round = 0  # last aggregated round (absolute, survives resume)
        self.history: list[dict[str, Any]] = []
        self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5A4D]))
        self._tasks: dict[int, NodeTask] = {}
        self._pending_round = 0
        self._sampled_round = 0
        if initial_state is not None:
            self.global_state = self.init_global_state(_copy_state(initial_state))

    # ====================================================================== hooks for subclasses
    def init_global_state(self, state: State) -> State:
        """Check (and possibly convert) the initial global state; return the state to hold."""
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
        """Sanity check of a freshly aggregated global state (default: same keys and shapes)."""
        if set(old) != set(new):
            raise AggregationError(
                f"aggregated keys {sorted(set(new) ^ set(old))} differ from the global state"
            )
        for key, arr in new.items():
            if arr.shape != old[key].shape:
                raise AggregationError(f"shape {arr.shape} != global {old[key].shape}", key=key)

    def extra_config(self, node_id: int, rank: int) -> dict[str, Any]:
        """Strategy-specific per-node config entries (beyond the reserved keys)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Strategy-specific JSON-serialisable checkpoint state."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    # ====================================================================== helpers
    def node_inner_rank(self, rank: int) -> int:
        """Inner rank qᵢ of a node of rank rᵢ (min(q, rᵢ); 0 when unused)."""
        return min(self.inner_rank, rank) if self.uses_inner_rank else 0

    def global_arrayrecord(self) -> ArrayRecord:
        """The current global state as an ArrayRecord (e.g. ``start(initial_arrays=...)`` on resume)."""
        if self.global_state is None:
            raise RuntimeError("global state not initialised (no initial_state and no round configured)")
        return state_to_arrayrecord(self.global_state)

    def _ensure_global(self, arrays: ArrayRecord | None) -> State:
        if self.global_state is None:
            if arrays is None or len(arrays) == 0:
                raise ValueError(
                    "initial_state: no global state (pass initial_state or non-empty initial arrays)"
                )
            self.global_state = self.init_global_state(arrayrecord_to_state(arrays))
        return self.global_state

    def _sample(self, grid: Grid, fraction: float, min_nodes: int) -> tuple[list[int], list[int]]:
        """Sample nodes with Flower's ``sample_nodes`` (waits for min_available_nodes), reproducibly."""
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        sample_size = max(num_nodes, min_nodes)
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, sample_size)
        pool = sorted(int(n) for n in all_nodes)
        sample_size = min(sample_size, len(pool))
        picked = self._rng.choice(len(pool), size=sample_size, replace=False)
        return sorted(pool[i] for i in picked), pool

    def _node_config(
        self, base: ConfigRecord | Mapping[str, Any] | None, node_id: int, rank: int, server_round: int
    ) -> ConfigRecord:
        cfg: dict[str, Any] = {}
        if base is not None:
            for key, value in base.items():
                if key in RESERVED_CONFIG_KEYS:
                    continue  # the strategy sets these per node
                cfg[key] = value
        cfg.update(self.train_config)
        cfg.update(
            {
                "rank": int(rank),
                "global-rank": int(self.rank),
                "inner-rank": int(self.node_inner_rank(rank)),
                "server-round": int(server_round),
                "seed": derive_seed(self.seed, server_round, node_id),
                "fingerprint": self.outer_fingerprint or "",
                "mode": self.mode,
                "strategy": self.name,
                "restart-inner": bool(self.restart_inner),
            }
        )
        cfg.update(self.extra_config(node_id, rank))
        return ConfigRecord(cfg)

    # ====================================================================== Flower API: train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the global state (for its rank) and its own ConfigRecord.

        The strategy counts rounds itself (``self.round + 1``), so rounds continue after a resume;
        Flower's ``server_round`` is only logged. ``arrays`` seeds the global state on the first call
        when no ``initial_state`` was given; afterwards the strategy's own global state is sent.
        """
        self._ensure_global(arrays)
        rnd = self.round + 1
        node_ids, all_nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        ranks = self.assigner.assign(all_nodes)
        LOGGER.info(
            "round %d (flower round %d): sampled %d of %d nodes",
            rnd,
            server_round,
            len(node_ids),
            len(all_nodes),
        )
        self._tasks = {}
        self._pending_round = rnd
        records: dict[int, tuple[ArrayRecord, int, int]] = {}
        messages = []
        for nid in node_ids:
            rank = ranks[nid]
            if rank not in records:  # one ArrayRecord per rank, shared by the messages (like FedAvg)
                rec = state_to_arrayrecord(self.download_state(nid, rank))
                records[rank] = (rec, payload_bytes(rec), serialized_bytes(rec))
            rec, pay, ser = records[rank]
            cfg = self._node_config(config, nid, rank, rnd)
            q = self.node_inner_rank(rank)
            self._tasks[nid] = NodeTask(
                node_id=nid,
                rank=rank,
                inner_rank=q,
                seed=int(cfg["seed"]),  # type: ignore[arg-type]
                expected=self.expected_upload(rank, q),
                download_payload=pay,
                download_serialized=ser,
            )
            content = RecordDict({self.arrayrecord_key: rec, self.configrecord_key: cfg})
            messages.append(Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN))
        return messages

    def _screen(self, msg: Message, seen: set[int]) -> ClientUpdate:
        """Validate one reply; raise :class:`ReplyRejected` with a reason, or return the update."""
        if msg.has_error():
            reason = (msg.error.reason or "").strip()
            raise ReplyRejected("error", f"error reply (code {msg.error.code}): {reason}")
        nid = int(msg.metadata.src_node_id)
        task = self._tasks.get(nid)
        if task is None:
            raise ReplyRejected("unexpected-node", "reply from a node not sampled this round")
        if nid in seen:
            raise ReplyRejected("duplicate", "second reply from this node in one round")
        content = msg.content
        arrays = content.array_records.get(self.arrayrecord_key)
        if arrays is None:
            raise ReplyRejected("missing-record", f"reply has no ArrayRecord {self.arrayrecord_key!r}")
        metrics = content.metric_records.get(self.metricrecord_key)
        if metrics is None:
            raise ReplyRejected("missing-record", f"reply has no MetricRecord {self.metricrecord_key!r}")
        if self.outer_fingerprint is not None:
            meta = content.config_records.get(self.meta_key)
            if meta is None:
                raise ReplyRejected(
                    "missing-record", f"reply has no ConfigRecord {self.meta_key!r} (fingerprint)"
                )
            got = meta.get("fingerprint")
            if got != self.outer_fingerprint:
                raise ReplyRejected(
                    "fingerprint",
                    f"fingerprint {str(got)[:16]!r}… differs from the server's "
                    f"{self.outer_fingerprint[:16]!r}…",
                )
        num_examples = _num(metrics.get(NUM_EXAMPLES))
        if self.weighting == "num-examples" and (num_examples is None or num_examples <= 0):
            raise ReplyRejected(
                "bad-metrics",
                f"metric {NUM_EXAMPLES!r} = {metrics.get(NUM_EXAMPLES)!r}: need a finite number > 0",
            )
        raw = raw_data_bytes(arrays)
        if self.max_update_bytes is not None and raw > self.max_update_bytes:
            raise ReplyRejected(
                "oversized", f"arrays carry {raw} bytes > max_update_bytes={self.max_update_bytes}"
            )
        got_keys, want_keys = set(arrays.keys()), set(task.expected)
        if got_keys != want_keys:
            missing, extra = sorted(want_keys - got_keys), sorted(got_keys - want_keys)
            raise ReplyRejected("keys", f"missing keys {missing[:5]}, unexpected keys {extra[:5]}")
        for key, arr in arrays.items():
            if tuple(arr.shape) != tuple(task.expected[key]):
                raise ReplyRejected(
                    "shape",
                    f"key {key!r}: shape {tuple(arr.shape)} != expected {task.expected[key]} "
                    f"(rank {task.rank})",
                )
        try:
            state = arrayrecord_to_state(arrays)
        except Exception as err:  # noqa: BLE001 - any decoding failure rejects the reply
            raise ReplyRejected("undecodable", f"cannot decode arrays: {err}") from err
        try:
            validate_state(state, task.expected, client=None)
        except AggregationError as err:
            text = str(err)
            category = "non-finite" if "non-finite" in text else "dtype" if "dtype" in text else "invalid"
            raise ReplyRejected(category, text) from err
        extra_metrics = {k: v for k, v in metrics.items() if _num(v) is not None}
        return ClientUpdate(
            node_id=nid,
            rank=task.rank,
            inner_rank=task.inner_rank,
            state=state,
            num_examples=num_examples if num_examples is not None else 0.0,
            train_loss=_num(metrics.get(TRAIN_LOSS)),
            upload_payload=payload_bytes(arrays),
            upload_serialized=serialized_bytes(arrays),
            metrics={k: float(v) for k, v in extra_metrics.items()},  # type: ignore[arg-type]
        )

    def _weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        if self.weighting == "uniform":
            w = np.ones(len(updates), dtype=np.float64)
        else:
            w = np.array([u.num_examples for u in updates], dtype=np.float64)
        return w / w.sum()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, aggregate the valid ones, update the global state and record metrics.

        With fewer than ``min_train_nodes`` valid replies (or an aggregation failure) the previous
        global state is kept bit-identical and returned.
        """
        if self.global_state is None:
            raise RuntimeError("aggregate_train called before configure_train / without initial_state")
        rnd = self._pending_round or self.round + 1
        replies = list(replies)
        seen: set[int] = set()
        used: list[ClientUpdate] = []
        rejected: list[dict[str, Any]] = []
        up_payload = up_serialized = 0
        for msg in replies:
            nid = int(msg.metadata.src_node_id)
            if not msg.has_error():
                rec = msg.content.array_records.get(self.arrayrecord_key)
                if rec is not None:
                    up_payload += payload_bytes(rec)
                    up_serialized += serialized_bytes(rec)
            try:
                update = self._screen(msg, seen)
            except ReplyRejected as rej:
                if rej.category == "error":
                    LOGGER.warning(
                        "round %d: node %d: error reply code %s, reason: %s",
                        rnd,
                        nid,
                        msg.error.code,
                        msg.error.reason,
                    )
                else:
                    LOGGER.warning(
                        "round %d: node %d: reply rejected [%s]: %s", rnd, nid, rej.category, rej.reason
                    )
                rejected.append({"node": nid, "category": rej.category, "reason": rej.reason[:2000]})
                if rej.category not in ("duplicate", "unexpected-node"):
                    seen.add(nid)
                continue
            seen.add(nid)
            used.append(update)

        # canonical order: floating-point sums must not depend on reply arrival order (reproducibility)
        used.sort(key=lambda u: u.node_id)
        previous = self.global_state
        kept_reason = ""
        agg_seconds = 0.0
        new_state = previous
        if len(used) < max(1, self.min_train_nodes):
            kept_reason = f"{len(used)} valid replies < min_train_nodes={self.min_train_nodes}"
        else:
            weights = self._weights(used)
            t0 = time.perf_counter()
            try:
                candidate = self.aggregate_updates(used, weights)
                candidate = {k: np.ascontiguousarray(v) for k, v in candidate.items()}
                for key, arr in candidate.items():
                    if not np.all(np.isfinite(arr)):
                        raise AggregationError("aggregated value is not finite", key=key)
                self.check_new_global(previous, candidate)
                new_state = candidate
            except (AggregationError, ValueError, np.linalg.LinAlgError) as err:
                kept_reason = f"aggregation failed: {err}"
            agg_seconds = time.perf_counter() - t0
        kept = bool(kept_reason)
        if kept:
            LOGGER.warning("round %d: keeping the previous global state: %s", rnd, kept_reason)
        self.global_state = new_state
        self.round = rnd
        self._pending_round = 0

        losses = [
            (u.train_loss, p)
            for u, p in zip(used, self._weights(used) if used else [])
            if u.train_loss is not None
        ]
        train_loss = float(sum(l * p for l, p in losses) / sum(p for _, p in losses)) if losses else None
        down_payload = sum(t.download_payload for t in self._tasks.values())
        down_serialized = sum(t.download_serialized for t in self._tasks.values())
        entry: dict[str, Any] = {
            "round": rnd,
            "flower-round": int(server_round),
            "clients-sampled": len(self._tasks),
            "clients-replied": len(replies),
            "clients-used": len(used),
            "clients-rejected": len(rejected),
            "clients-missing": len(set(self._tasks) - {int(m.metadata.src_node_id) for m in replies}),
            "rejected": rejected,
            "used-nodes": [u.node_id for u in used],
            "ranks": {str(nid): t.rank for nid, t in self._tasks.items()},
            "num-examples": float(sum(u.num_examples for u in used)),
            "upload-bytes": int(up_payload),
            "upload-serialized-bytes": int(up_serialized),
            "upload-overhead-bytes": int(up_serialized - up_payload),
            "download-bytes": int(down_payload),
            "download-serialized-bytes": int(down_serialized),
            "download-overhead-bytes": int(down_serialized - down_payload),
            "aggregation-seconds": float(agg_seconds),
            "train-loss": train_loss,
            "kept-previous": kept,
            "kept-reason": kept_reason,
        }
        self.history.append(entry)
        metrics = MetricRecord(
            {
                k: (int(v) if isinstance(v, bool) else v)
                for k, v in entry.items()
                if k not in ("rejected", "used-nodes", "ranks", "kept-reason") and v is not None
            }
        )
        return state_to_arrayrecord(self.global_state), metrics

    # ====================================================================== Flower API: evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send sampled nodes the global state for their rank plus the reserved config keys."""
        if self.fraction_evaluate == 0.0:
            return []
        self._ensure_global(arrays)
        node_ids, all_nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        ranks = self.assigner.assign(all_nodes)
        messages = []
        for nid in node_ids:
            rec = state_to_arrayrecord(self.download_state(nid, ranks[nid]))
            cfg = self._node_config(config, nid, ranks[nid], self.round)
            content = RecordDict({self.arrayrecord_key: rec, self.configrecord_key: cfg})
            messages.append(Message(content=content, dst_node_id=nid, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted (``num-examples``) mean of the numeric metrics every valid reply reports."""
        good: list[tuple[float, dict[str, float]]] = []
        for msg in replies:
            if msg.has_error():
                LOGGER.warning(
                    "evaluate: node %d: error reply code %s, reason: %s",
                    msg.metadata.src_node_id,
                    msg.error.code,
                    msg.error.reason,
                )
                continue
            metrics = msg.content.metric_records.get(self.metricrecord_key)
            if metrics is None and len(msg.content.metric_records) == 1:
                metrics = next(iter(msg.content.metric_records.values()))
            n = _num(metrics.get(NUM_EXAMPLES)) if metrics is not None else None
            if metrics is None or n is None or n <= 0:
                LOGGER.warning(
                    "evaluate: node %d: reply without %r, ignored", msg.metadata.src_node_id, NUM_EXAMPLES
                )
                continue
            vals = {k: _num(v) for k, v in metrics.items() if k != NUM_EXAMPLES}
            good.append((n, {k: v for k, v in vals.items() if v is not None}))
        if not good:
            return None
        common = set.intersection(*(set(m) for _, m in good))
        total = sum(n for n, _ in good)
        out: dict[str, float] = {k: sum(n * m[k] for n, m in good) / total for k in sorted(common)}
        out[NUM_EXAMPLES] = float(total)
        return MetricRecord(out)

    def summary(self) -> None:
        """Log the strategy configuration."""
        super().summary()
        LOGGER.info(
            "%s: rank=%d inner_rank=%d ranks=%r weighting=%s fingerprint=%s max_update_bytes=%s",
            type(self).__name__,
            self.rank,
            self.inner_rank,
            self.assigner.spec,
            self.weighting,
            (self.outer_fingerprint or "-")[:16],
            self.max_update_bytes,
        )

    # ====================================================================== checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: ``global_state`` (numpy arrays) plus JSON-serialisable everything else.

        Save with :func:`save_strategy_state`; restore with :meth:`load_state_dict`.
        """
        return {
            "format": STATE_FORMAT,
            "strategy": self.name,
            "round": int(self.round),
            "global_state": _copy_state(self.global_state) if self.global_state is not None else None,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "assigner": self.assigner.state_dict(),
            "history": copy.deepcopy(self.history),
            "settings": {
                "rank": self.rank,
                "inner_rank": self.inner_rank,
                "outer_fingerprint": self.outer_fingerprint,
                "weighting": self.weighting,
                "seed": self.seed,
            },
            "extra": copy.deepcopy(self.extra_state()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next ``configure_train`` continues at ``round + 1``.

        Raises:
            ValueError: naming the mismatching key (``format``, ``strategy``, ``rank``,
                ``outer_fingerprint``, …).
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format={state.get('format')!r}: expected {STATE_FORMAT!r}")
        if state.get("strategy") != self.name:
            raise ValueError(f"strategy={state.get('strategy')!r}: this strategy is {self.name!r}")
        settings = state.get("settings", {})
        for key in ("rank", "inner_rank", "outer_fingerprint"):
            if settings.get(key) != getattr(self, key):
                raise ValueError(
                    f"{key}: checkpoint has {settings.get(key)!r}, strategy has {getattr(self, key)!r}"
                )
        gs = state.get("global_state")
        self.global_state = _copy_state(gs) if gs is not None else None
        self.round = int(state["round"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.assigner.load_state_dict(state["assigner"])
        self.history = copy.deepcopy(list(state.get("history", [])))
        self.load_extra_state(copy.deepcopy(state.get("extra", {})))
        self._tasks = {}
        self._pending_round = 0


# ------------------------------------------------------------------------------------------ persistence
def save_strategy_state(state: Mapping[str, Any], directory: str | Path) -> None:
    """Write :meth:`NestedStrategyBase.state_dict` output as ``global_state.npz`` + ``strategy.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in state.items() if k != "global_state"}
    gs = state.get("global_state")
    meta["global_keys"] = list(gs.keys()) if gs is not None else None
    if gs is not None:
        np.savez(out / "global_state.npz", **{f"a{i}": v for i, v in enumerate(gs.values())})
    (out / "strategy.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def load_strategy_state(directory: str | Path) -> dict[str, Any]:
    """Read what :func:`save_strategy_state` wrote."""
    src = Path(directory)
    meta = json.loads((src / "strategy.json").read_text())
    keys = meta.pop("global_keys")
    if keys is None:
        meta["global_state"] = None
    else:
        with np.load(src / "global_state.npz", allow_pickle=False) as npz:
            meta["global_state"] = {k: npz[f"a{i}"].copy() for i, k in enumerate(keys)}
    return meta


# ------------------------------------------------------------------------------------------ validation
def _copy_state(state: Mapping[str, np.ndarray]) -> State:
    return {str(k): np.array(v, copy=True) for k, v in state.items()}


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def _check_fraction(name: str, value: Any, *, allow_zero: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0
    if allow_zero and not isinstance(value, bool) and isinstance(value, (int, float)) and float(value) == 0.0:
        ok = True
    if not ok:
        raise ValueError(f"{name}={value!r}: must be in (0, 1]" + (" (or 0 to skip)" if allow_zero else ""))


# ------------------------------------------------------------------------------------------ nested family
def nested_layer_names(state: Mapping[str, np.ndarray]) -> list[str]:
    """Layer names ``L`` of the ``L.R0`` keys of a nested global state (in key order)."""
    return [k[: -len(".R0")] for k in state if k.endswith(".R0")]


class NestedInnerStrategy(NestedStrategyBase):
    """Common base of the nested strategies (global state: ``L.R0`` (r×r) + ``modules_to_save``)."""

    def init_global_state(self, state: State) -> State:
        """Require ≥ 1 ``L.R0`` of shape (r, r), float arrays, finite values."""
        layers = nested_layer_names(state)
        if not layers:
            raise ValueError("initial_state: no 'L.R0' keys (expected a nested global state)")
        for key, arr in state.items():
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"initial_state: key {key!r} has dtype {arr.dtype}, expected floating point")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"initial_state: key {key!r} has non-finite values")
            if key.endswith(".R0") and arr.shape != (self.rank, self.rank):
                raise ValueError(
                    f"initial_state: key {key!r} has shape {arr.shape}, expected ({self.rank}, {self.rank})"
                )
            for suffix in (".R", ".P", ".Q"):
                if key.endswith(suffix):
                    raise ValueError(f"initial_state: key {key!r} is a client-update key, not global state")
        return state

    def modules_to_save_shapes(self) -> dict[str, Shape]:
        """Shapes of the ``modules_to_save`` keys (everything but ``L.R0``)."""
        assert self.global_state is not None
        return {k: tuple(v.shape) for k, v in self.global_state.items() if not k.endswith(".R0")}
