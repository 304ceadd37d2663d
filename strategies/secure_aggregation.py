"""Secure aggregation (SecAgg+) of the exact nested strategies as a wrapper strategy: the server learns the sum
of the round's r×r updates and nothing about any single one.

fedsb (Σ pᵢRᵢ), hetero (Σ pᵢ·pad(Rᵢ)) and flora (Σ pᵢ·pad(PᵢQᵢ)) all move the global state by a weighted sum of
r×r matrices, plus the mean of the ``modules_to_save`` heads. Under :class:`SecureAggregation` each node sends that
r×r matrix (flora: the product PᵢQᵢ) and its head's change, quantised and masked
(:mod:`strategies.secagg_protocol`); the server unmasks only their sum and applies
``R0 ← R0 + Σ pᵢ·pad_r(ΔRᵢ)``, ``head ← head + Σ pᵢ·Δheadᵢ`` — the wrapped strategy's own rule, up to the
quantisation error (at most 2c/T per coordinate with uniform weights; see ``secagg-error-bound``).

Round flow: ``configure_train`` lets the wrapped strategy sample nodes and build its train messages, then runs
SecAgg+ setup and share-keys over the grid (``query`` messages, :mod:`strategies.secagg_server`) and returns the
train messages of the nodes that completed them, each carrying its forwarded encrypted shares. ``aggregate_train``
screens the replies (error, unexpected or duplicate node, fingerprint, metrics against their schema and the claim
rules of :mod:`strategies.reply_claims`, the masked vector's format; before a masked vector joins the sum), sums
the masked vectors, asks the survivors for the shares that remove the masks, and updates the wrapped strategy's
global state, history and ledgers as its own ``aggregate_train`` would. Any protocol failure (too few survivors,
a garbage share or masked vector) keeps the previous global state, with the reason in ``kept-reason``.

Round record: the wrapped strategy's (:mod:`strategies.round_record`; ``clients-used`` = accepted masked vectors;
``upload-bytes`` / ``download-bytes`` also count every protocol record at its serialized size) plus
``secure-aggregation``, ``secagg-shares`` (k), ``secagg-threshold`` (t), ``secagg-dropped`` (node → the stage it
was lost in), ``secagg-upload-bytes`` / ``secagg-download-bytes`` (the protocol's records alone),
``secagg-seconds`` (the stages' wall time), ``secagg-error-bound`` (2c·m/Σqᵢ) and, under distributed DP,
``secagg-noise-std`` (the noise std on the mean).

What screening cannot do under secure aggregation: norms, NaN/Inf, ``clip`` and the median-norm rule need the
individual update. Nodes refuse to mask a non-finite update, clip every coordinate to [−c, c] (Flower's
quantiser) and, under user-level DP, clip the whole vector to C; a malicious node can still move the sum by up
to c·wᵢ per coordinate. A garbage masked vector is caught only when it pushes the unmasked sum out of range.

Distributed DP: wrapped by :class:`~strategies.user_level_dp.UserLevelDP`, the DP wrapper calls
:meth:`SecureAggregation.distribute_noise` with σ and C; every node then adds N(0, σ²C²/t_min) inside its mask,
t_min = max(t, min-train-nodes) the fewest survivors a round aggregates, so m ≥ t_min survivors carry noise of
variance m·σ²C²/t_min ≥ σ²C² on the sum, and the DP wrapper only accounts (at σ: conservative when m > t_min).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.aggregation import AggregationError, apply_increment
from fedlora.secure_config import noise_headroom
from strategies.nested_base import NestedInnerStrategy
from strategies.outer_delivery import OuterDelivery
from strategies.reply_claims import ReplyRejected, check_train_metrics, claim_bound
from strategies.round_record import record_participation, round_record, scalar_metrics
from strategies.screening import UNREACHABLE_CODES, ClientUpdate, ScreenedRound
from strategies.secagg_protocol import (
    SECAGG_KEY,
    SecAggError,
    SecAggParams,
    increment_of,
    vector_layout,
    vector_size,
    weight_factor,
)
from strategies.secagg_server import SecAggRound
from strategies.wire import (
    TRAIN_LOSS,
    State,
    finite_number,
    payload_bytes,
    serialized_bytes,
    state_to_arrayrecord,
)

LOGGER = logging.getLogger("fedlora.strategy")
#: key of the wrapper's settings in the strategy checkpoint
STATE_KEY = "secure-aggregation"


class SecureAggregation(Strategy):
    """SecAgg+ around a nested exact strategy (fedsb, hetero, flora).

    Args:
        strategy: the wrapped strategy (``weighting`` ``uniform`` or ``num-examples``: weights pre-multiplied
            inside the mask as Flower's workflow does, nᵢ ≤ ``params.max_weight``).
        params: :class:`~strategies.secagg_protocol.SecAggParams` (validated defaults: Flower's c = 8, T = 2²²;
            every sampled node a neighbour; t = ⌈0.6·k⌉).
        timeout: seconds each protocol stage waits for replies (None: Flower's default, for ever).

    Attributes not set here are read through to the wrapped strategy (``round``, ``history`` with the ``secagg-*``
    entries, ``weighting``, ``min_train_nodes``, …).
    """

    def __init__(self, strategy: NestedInnerStrategy, params: SecAggParams | None = None,
                 timeout: float | None = None) -> None:
        if not isinstance(strategy, NestedInnerStrategy):
            raise ValueError(f"strategy={type(strategy).__name__}: secure aggregation wraps fedsb, hetero or flora")
        if strategy.weighting not in ("uniform", "num-examples"):
            raise ValueError(f"weighting={strategy.weighting!r}: must be 'uniform' or 'num-examples'")
        self.strategy = strategy
        self.params = params or SecAggParams()
        self.timeout = timeout
        self.noise_multiplier = 0.0
        self._clip_norm: float | None = None
        self._round: SecAggRound | None = None
        self._grid: Any = None
        #: the last round's protocol object (tests inspect what the server received: ``last_round.received``)
        self.last_round: SecAggRound | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __repr__(self) -> str:
        return f"SecureAggregation({self.strategy!r}, {self.params!r})"

    @property
    def global_state(self) -> State | None:
        """The wrapped strategy's global state (read-only here: only a round's unmasked sum changes it)."""
        return self.strategy.global_state

    @property
    def clip_norm(self) -> float | None:
        """The user-level DP clip C (set by :class:`~strategies.user_level_dp.UserLevelDP`)."""
        return self._clip_norm

    @clip_norm.setter
    def clip_norm(self, value: float | None) -> None:
        self._clip_norm = value
        self.strategy.clip_norm = value

    @property
    def noise_in_mask(self) -> bool:
        """Whether the nodes add the DP noise inside their masks (then the DP wrapper adds none)."""
        return self.noise_multiplier > 0

    def global_arrayrecord(self) -> ArrayRecord:
        """The wrapped strategy's global state as an ArrayRecord."""
        return self.strategy.global_arrayrecord()

    # ---------------------------------------------------------------- distributed DP
    def min_survivors(self, num_sampled: int) -> int:
        """t_min = max(t, min-train-nodes): the fewest masked vectors a round with ``num_sampled`` nodes unmasks."""
        return max(self.params.shares_and_threshold(num_sampled)[1], self.strategy.min_train_nodes)

    def node_noise_std(self, num_sampled: int) -> float:
        """Per-node noise std s = σ·C/√t_min (0 without distributed DP)."""
        if not self.noise_in_mask or self._clip_norm is None:
            return 0.0
        return self.noise_multiplier * self._clip_norm / math.sqrt(self.min_survivors(num_sampled))

    def distribute_noise(self, noise_multiplier: float, clip_norm: float) -> None:
        """Make the nodes add the user-level DP noise inside their masks (σ = ``noise_multiplier``, C = ``clip_norm``).

        Raises:
            ValueError: the clipping range c is below C + 6s for the largest per-node std s (t_min = 2 or
                min-train-nodes): noisy coordinates would be clipped, which the Gaussian accounting ignores.
        """
        if not (noise_multiplier > 0 and clip_norm > 0):
            raise ValueError(f"noise_multiplier={noise_multiplier!r}, clip_norm={clip_norm!r}: both must be > 0")
        need = noise_headroom(clip_norm, noise_multiplier, self.strategy.min_train_nodes)
        if self.params.clipping_range < need:
            raise ValueError(f"secagg-clipping-range={self.params.clipping_range:g} < C + 6·σC/√t_min = {need:.4g} "
                             f"(σ={noise_multiplier:.4g}, C={clip_norm:g}): noisy updates would be clipped; raise "
                             "secagg-clipping-range")
        self.noise_multiplier = float(noise_multiplier)
        self._clip_norm = float(clip_norm)

    # ---------------------------------------------------------------- Flower API: train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """The wrapped strategy's train messages for the nodes that completed SecAgg+ setup and share-keys, each
        with a ``secagg`` ConfigRecord (stage ``collect``: the encrypted shares addressed to it). If the protocol
        cannot start (fewer than t nodes answer), no message is sent and the round keeps the global state."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        nodes = [int(m.metadata.dst_node_id) for m in messages]
        state = SecAggRound(rnd=self.strategy.round + 1, nodes=nodes, params=self.params,
                            min_survivors=self.min_survivors(len(nodes)), noise_std=self.node_noise_std(len(nodes)),
                            weighting=self.strategy.weighting)
        self._round, self._grid, self.last_round = state, grid, state
        try:
            state.setup(grid, self.timeout)
            state.share_keys(grid, self.timeout)
        except SecAggError as err:
            state.abort = f"secure aggregation could not start: {err}"
            LOGGER.warning("round %d: %s", state.rnd, state.abort)
            return []
        return state.attach(messages)

    def _screen(self, state: SecAggRound, replies: list[Message], d: int) -> ScreenedRound:
        """Accept the replies that carry a well-formed masked vector from a node that completed share-keys; sum
        them at once. Rejected replies are listed as the base strategy lists them (the node counts as dropped)."""
        inner = self.strategy
        out = ScreenedRound(used=[], rejected=[], upload_payload=0, upload_serialized=0)
        tasks = inner._tasks  # the wrapped strategy's tasks of this round (rank, download)
        claims = claim_bound(replies, state.active, inner.metricrecord_key,
                             inner.num_examples_factor if inner.weighting == "num-examples" else None)
        for msg in replies:
            nid = int(msg.metadata.src_node_id)
            try:
                if msg.has_error() and msg.error.code in UNREACHABLE_CODES and nid in tasks:
                    out.unreachable.append(nid)  # the SuperLink says the node is gone: missing, not rejected
                    continue
                if msg.has_error():
                    raise ReplyRejected("error", f"error reply (code {msg.error.code}): {msg.error.reason}")
                if nid not in state.active or nid not in tasks:
                    raise ReplyRejected("unexpected-node", "reply from a node not in this round's SecAgg+ session")
                if nid in state.survivors:
                    raise ReplyRejected("duplicate", "second reply from this node in one round")
                record = msg.content.array_records.get(SECAGG_KEY)
                if record is not None:
                    out.upload_payload += payload_bytes(record)
                    out.upload_serialized += serialized_bytes(record)
                meta = msg.content.config_records.get(inner.meta_key)
                if inner.outer_fingerprint is not None and (meta is None or
                                                            meta.get("fingerprint") != inner.outer_fingerprint):
                    raise ReplyRejected("fingerprint", "missing or other outer-factor fingerprint than the server's")
                if inner.arrayrecord_key in msg.content.array_records:
                    raise ReplyRejected("secagg-format", f"an un-masked {inner.arrayrecord_key!r} record under secure "
                                                         "aggregation")
                metrics = msg.content.metric_records.get(inner.metricrecord_key)
                n = check_train_metrics(metrics if metrics is not None else {}, inner.max_num_examples, claims)
                try:
                    factor = weight_factor(inner.weighting, n, self.params)
                except ValueError as err:
                    raise ReplyRejected("bad-metrics", str(err)) from None
                masked = state.check_masked(record, d)
            except ReplyRejected as rej:
                self._reject(out, state, nid, rej.category, rej.reason)
                continue
            except ValueError as err:
                self._reject(out, state, nid, "secagg-format", str(err))
                continue
            state.add_masked(nid, masked, factor)
            numeric = {k: v for k, v in ((k, finite_number(v)) for k, v in (metrics or {}).items()) if v is not None}
            out.used.append(ClientUpdate(node_id=nid, rank=tasks[nid].rank, inner_rank=tasks[nid].inner_rank, state={},
                                         num_examples=n or 0.0, train_loss=numeric.get(TRAIN_LOSS),
                                         upload_payload=payload_bytes(record), upload_serialized=0, metrics=numeric))
        out.used.sort(key=lambda u: u.node_id)
        return out

    def _reject(self, out: ScreenedRound, state: SecAggRound, nid: int, category: str, reason: str) -> None:
        LOGGER.warning("round %d: node %d: reply rejected [%s]: %s", state.rnd, nid, category, reason)
        out.rejected.append({"node": nid, "category": category, "reason": reason[:2000]})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the masked vectors, unmask the sum, apply it (the wrapped strategy's rule); record the round.

        Returns the new global state's ArrayRecord and the round's scalar metrics; on any protocol failure the
        previous global state, bit-identical, with ``kept-previous`` and the reason.
        """
        inner = self.strategy
        if inner.global_state is None or self._round is None:
            raise RuntimeError("aggregate_train called before configure_train")
        state, grid, self._round = self._round, self._grid, None
        replies = list(replies)
        if inner.outer:
            inner.outer.observe(replies)
        previous = inner.global_state
        layout = vector_layout(previous)
        screened = self._screen(state, replies, vector_size(layout))
        t0 = time.perf_counter()
        new_state, reason, bound = previous, state.abort, 0.0
        if not reason:
            try:
                mean = state.unmask(grid, self.timeout)
                candidate = {k: np.ascontiguousarray(v) for k, v in
                             apply_increment(previous, increment_of(mean, layout, previous)).items()}
                inner.check_new_global(previous, candidate)
                new_state, bound = candidate, self.params.error_bound(len(state.factors), sum(state.factors.values()))
            except (SecAggError, AggregationError, ValueError) as err:
                reason = f"secure aggregation failed: {err}"
        if reason:
            LOGGER.warning("round %d: keeping the previous global state: %s", state.rnd, reason)
        return self._finish(server_round, state, replies, screened, new_state, reason, bound, time.perf_counter() - t0)

    def _finish(self, server_round: int, state: SecAggRound, replies: list[Message], screened: ScreenedRound,
                new_state: State, reason: str, bound: float, seconds: float
                ) -> tuple[ArrayRecord, MetricRecord]:
        """Install the new state in the wrapped strategy and append its round record (as its own
        ``aggregate_train`` does), with the SecAgg+ entries."""
        inner = self.strategy
        factors = np.array([state.factors[u.node_id] for u in screened.used], dtype=np.float64)
        weights = factors / factors.sum() if factors.size else np.zeros(0)  # pᵢ = qᵢ / Σq (uniform: 1/m)
        inner.global_state = new_state
        inner.round = state.rnd
        inner._pending_round = 0  # as the wrapped strategy's own aggregate_train leaves it
        tasks = inner._tasks
        entry = round_record(state.rnd, server_round, tasks, replies, screened, reason, seconds)
        unsent = [t for nid, t in tasks.items() if nid not in state.trained]  # left out before training
        entry["upload-bytes"] += state.upload_bytes
        entry["upload-serialized-bytes"] += state.upload_bytes
        entry["download-bytes"] += state.download_bytes - sum(t.download_payload for t in unsent)
        entry["download-serialized-bytes"] += state.download_bytes - sum(t.download_serialized for t in unsent)
        entry["download-overhead-bytes"] = entry["download-serialized-bytes"] - entry["download-bytes"]
        for key, value in inner.train_metrics_fn(replies, screened.used, weights).items():
            entry.setdefault(key, value)
        entry.update(inner.outer.round_stats() if inner.outer else OuterDelivery.NONE)
        entry.update({
            "secure-aggregation": True,
            "secagg-shares": state.k,
            "secagg-threshold": state.t,
            "secagg-dropped": {str(n): s for n, s in sorted(state.dropped.items())},
            "secagg-upload-bytes": state.upload_bytes,
            "secagg-download-bytes": state.download_bytes,
            "secagg-seconds": state.seconds,
            "secagg-error-bound": bound,
        })
        if state.noise_std > 0 and not reason:
            entry["secagg-noise-std"] = state.noise_std / math.sqrt(len(screened.used))
        record_participation(inner.node_rounds, tasks, replies, entry)
        inner.history.append(entry)
        return state_to_arrayrecord(new_state), scalar_metrics(entry)

    # ---------------------------------------------------------------- evaluate, summary, checkpoint
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        """Delegate (evaluation metrics are not securely aggregated)."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the SecAgg+ settings, then the wrapped strategy's summary."""
        LOGGER.info("secure aggregation: %s timeout=%s distributed-noise=%s", self.params, self.timeout,
                    self.noise_multiplier or "off")
        self.strategy.summary()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's checkpoint state plus the SecAgg+ settings (no secrets: a round in flight is
        redone with fresh keys after a resume)."""
        state = self.strategy.state_dict()
        state[STATE_KEY] = {"params": dict(vars(self.params))}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the wrapped strategy's part)."""
        self.strategy.load_state_dict({k: v for k, v in state.items() if k != STATE_KEY})
        self._round = None
