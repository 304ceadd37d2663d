"""Reply screening: every train reply is checked before anything of it is aggregated.

A reply is dropped — logged on the ``fedlora.strategy`` logger with the node and the reason, and listed
in the round's ``rejected`` entries as ``{"node", "category", "reason"}`` — when it is (category):

- an error reply of the ClientApp or the SuperLink (``error``),
- from a node not sampled this round (``unexpected-node``) or a second reply of a node (``duplicate``),
- missing its ``arrays`` / ``metrics`` record, or its ``meta`` fingerprint record while the server has a
  fingerprint (``missing-record``),
- carrying another outer-factor fingerprint than the server's (``fingerprint``),
- with a metric the schema lists (:data:`fedlora.privacy.metrics.REPLY_METRIC_BOUNDS`: ``num-examples``, the
  ``dp-*`` figures, ...) that is not a finite number in its range, e.g. a list, NaN or 1e308 for ``dp-epsilon``
  (``bad-metrics``), or without a finite ``num-examples`` > 0 under ``weighting="num-examples"`` (``bad-metrics``),
- over ``max_update_bytes`` of array data, checked before decoding (``oversized``),
- with a malformed packed layout, or packed arrays that do not fit it (``layout``: the reason names the
  problem, see :func:`strategies.wire.unpack_state`),
- with missing or extra keys (``keys``) or a shape other than its rank implies (``shape``),
- undecodable (``undecodable``), non-finite (``non-finite``), not floating point (``dtype``) or
  otherwise invalid for :func:`fedlora.aggregation.validate_state` (``invalid``),
- declaring more ``num-examples`` than ``max_num_examples`` (``num-examples``): a claim bounds the weight
  pᵢ it buys, whatever the weighting; under ``weighting="num-examples"`` also more than ``claim_factor`` × the
  median claim of the round's replies (``num-examples``; :mod:`strategies.reply_claims` says what it bounds),
- an update whose L2 norm ‖Δᵢ‖ (:func:`change_norm`) is above the user-level DP clip C (``clip``: the client
  skipped clipping; tolerance :func:`clip_tolerance`), above ``max_update_norm`` or above
  ``norm_factor`` × the median norm of the round's otherwise valid updates (``norm``).

Evaluate replies are screened too (:func:`screen_evaluate_replies`): an error reply, no metrics, a bad,
over-cap or over k × median ``num-examples``, a non-finite or huge (> :data:`EVAL_METRIC_LIMIT`) metric, or a
reply missing a metric most replies report is dropped with its reason; the others are aggregated.

An error reply the SuperLink sends for a node that is gone (:data:`UNREACHABLE_CODES`) is not a rejection:
the node is listed in ``unreachable`` and counted missing, like a node that never replied.

Accepted replies become :class:`ClientUpdate` s, sorted by node id (sums must not depend on the order in
which replies arrive).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.constant import ErrorCode

from fedlora.aggregation import AggregationError, validate_state
from fedlora.tensors import flat_norm
from strategies.reply_claims import (
    ClaimBound,
    ReplyRejected,
    check_num_examples,
    check_train_metrics,
    claim_bound,
    median_claim,
)
from strategies.wire import (
    LAYOUT_KEY,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    Shape,
    State,
    WireFormatError,
    finite_number,
    parse_layout,
    payload_bytes,
    raw_data_bytes,
    serialized_bytes,
    unpack_state,
)

LOGGER = logging.getLogger("fedlora.strategy")

#: error replies Flower sends on behalf of a node that is gone (not errors of the ClientApp): counted missing
UNREACHABLE_CODES = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                               ErrorCode.NODE_UNAVAILABLE})
#: an evaluate metric larger than this in absolute value is not a loss, accuracy or perplexity: dropped
EVAL_METRIC_LIMIT = 1e9


@dataclass
class NodeTask:
    """What one sampled node was asked to do in the current round (``expected``: upload key → shape;
    ``download``: the arrays it was sent, the reference its update Δᵢ is measured from)."""

    node_id: int
    rank: int
    inner_rank: int
    seed: int
    expected: dict[str, Shape]
    download_payload: int
    download_serialized: int
    download: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """A screened, accepted client reply: ``state`` has exactly the keys/shapes of its task, all finite
    floating-point arrays; ``metrics`` holds the reply's finite numeric metrics; ``norm`` = ‖Δᵢ‖
    (:func:`change_norm`), within every configured bound."""

    node_id: int
    rank: int
    inner_rank: int
    state: State
    num_examples: float
    train_loss: float | None
    upload_payload: int
    upload_serialized: int
    metrics: dict[str, float] = field(default_factory=dict)
    norm: float = 0.0


@dataclass(frozen=True)
class ScreeningRules:
    """What a reply must satisfy: its record names, the server's fingerprint (``None`` = unchecked), the
    weighting (``"num-examples"`` requires that metric), the byte limit, the cap on ``num-examples``, the
    norm bounds (:class:`~strategies.options.StrategyOptions`), the user-level DP clip C and the median-claim
    factor k (applied under ``weighting="num-examples"`` only) (``None`` everywhere = unchecked)."""

    arrays_key: str
    metrics_key: str
    meta_key: str
    fingerprint: str | None
    weighting: str
    max_update_bytes: int | None
    max_num_examples: int | None = None
    max_update_norm: float | None = None
    norm_factor: float | None = None
    clip_norm: float | None = None
    claim_factor: float | None = None


@dataclass
class ScreenedRound:
    """The outcome of screening one round's replies (bytes count every non-error reply's arrays;
    ``unreachable``: nodes the SuperLink reported gone, counted missing, not rejected)."""

    used: list[ClientUpdate]
    rejected: list[dict[str, Any]]
    upload_payload: int
    upload_serialized: int
    unreachable: list[int] = field(default_factory=list)


def screen_reply(msg: Message, task: NodeTask | None, rules: ScreeningRules, seen: set[int],
                 claims: ClaimBound | None = None) -> ClientUpdate:
    """Validate one reply against its node's ``task`` (``None``: the node was not sampled) and the round's
    ``claims`` rule (:func:`claim_bound`; None: off).

    Raises:
        ReplyRejected: with the category and reason of the first failed check.
    """
    if msg.has_error():
        reason = (msg.error.reason or "").strip()
        category = "unreachable" if msg.error.code in UNREACHABLE_CODES else "error"
        raise ReplyRejected(category, f"error reply (code {msg.error.code}): {reason}")
    nid = int(msg.metadata.src_node_id)
    if task is None:
        raise ReplyRejected("unexpected-node", "reply from a node not sampled this round")
    if nid in seen:
        raise ReplyRejected("duplicate", "second reply from this node in one round")
    content = msg.content
    arrays = content.array_records.get(rules.arrays_key)
    if arrays is None:
        raise ReplyRejected("missing-record", f"reply has no ArrayRecord {rules.arrays_key!r}")
    metrics = content.metric_records.get(rules.metrics_key)
    if metrics is None:
        raise ReplyRejected("missing-record", f"reply has no MetricRecord {rules.metrics_key!r}")
    meta = content.config_records.get(rules.meta_key)
    if rules.fingerprint is not None:
        if meta is None:
            raise ReplyRejected("missing-record", f"reply has no ConfigRecord {rules.meta_key!r} (fingerprint)")
        got = meta.get("fingerprint")
        if got != rules.fingerprint:
            raise ReplyRejected(
                "fingerprint",
                f"fingerprint {str(got)[:16]!r}… differs from the server's {rules.fingerprint[:16]!r}…",
            )
    num_examples = check_train_metrics(metrics, rules.max_num_examples, claims)
    if rules.weighting == "num-examples" and (num_examples is None or num_examples <= 0):
        raise ReplyRejected(
            "bad-metrics", f"metric {NUM_EXAMPLES!r} = {metrics.get(NUM_EXAMPLES)!r}: need a finite number > 0"
        )
    raw = raw_data_bytes(arrays)
    if rules.max_update_bytes is not None and raw > rules.max_update_bytes:
        raise ReplyRejected("oversized", f"arrays carry {raw} bytes > max_update_bytes={rules.max_update_bytes}")
    layout = meta.get(LAYOUT_KEY) if meta is not None else None
    try:
        entries = parse_layout(layout) if layout is not None else None
        declared = {k: s for k, s, _ in entries} if entries is not None else {k: a.shape for k, a in arrays.items()}
        _check_keys_and_shapes(declared, task)
        state = unpack_state(arrays, entries)
    except WireFormatError as err:
        raise ReplyRejected("layout", f"packed arrays: {err}") from err
    except ReplyRejected:
        raise
    except Exception as err:  # noqa: BLE001 - any decoding failure rejects the reply
        raise ReplyRejected("undecodable", f"cannot decode arrays: {err}") from err
    try:
        validate_state(state, task.expected, client=None)
    except AggregationError as err:
        text = str(err)
        category = "non-finite" if "non-finite" in text else "dtype" if "dtype" in text else "invalid"
        raise ReplyRejected(category, text) from err
    norm = check_norm(state, task.download, rules)
    numeric = {k: finite_number(v) for k, v in metrics.items()}
    return ClientUpdate(
        node_id=nid,
        rank=task.rank,
        inner_rank=task.inner_rank,
        state=state,
        num_examples=num_examples if num_examples is not None else 0.0,
        train_loss=numeric.get(TRAIN_LOSS),
        upload_payload=payload_bytes(arrays),
        upload_serialized=serialized_bytes(arrays, layout),
        metrics={k: v for k, v in numeric.items() if v is not None},
        norm=norm,
    )


def change_norm(upload: Mapping[str, np.ndarray], download: Mapping[str, np.ndarray]) -> float:
    """‖Δ‖₂ over all arrays flattened together, in float64, where Δ = upload − download for a key the node
    downloaded with the same shape (``modules_to_save``, peft factors) and the upload itself otherwise (inner
    updates ``L.R``, ``L.P``/``L.Q``): the update a user-level DP client clips. A sum of squares that
    overflows is recomputed scaled by the largest entry, so no finite input gives ``inf``; ``inf`` only when
    a difference itself overflows."""
    parts = []
    with np.errstate(over="ignore", invalid="ignore"):
        for key, value in upload.items():
            arr = np.asarray(value, dtype=np.float64)
            ref = download.get(key)
            parts.append(arr - np.asarray(ref, dtype=np.float64) if ref is not None and np.shape(ref) == arr.shape
                         else arr)
    return flat_norm(parts)


def clip_tolerance(upload: Mapping[str, np.ndarray], download: Mapping[str, np.ndarray], clip: float) -> float:
    """How far above C the server may measure a correctly clipped update: 1e-6·C (the clip's own rounding)
    plus ε_mach(dtype)·‖upload of downloaded keys‖ (the client sends clipped Δ + download rounded to the
    upload dtype, and the server measures Δ back by subtraction). Tiny next to C in any sane run."""
    ref = {k: v for k, v in upload.items() if k in download}
    eps = max((float(np.finfo(v.dtype).eps) for v in upload.values() if v.dtype.kind == "f"), default=0.0)
    return 1e-6 * clip + eps * change_norm(ref, {})


def check_norm(state: Mapping[str, np.ndarray], download: Mapping[str, np.ndarray], rules: ScreeningRules) -> float:
    """‖Δᵢ‖ of an update; raise :class:`ReplyRejected` (``clip``, ``norm``) above the absolute bounds."""
    norm = change_norm(state, download)
    if rules.clip_norm is not None and norm > rules.clip_norm + clip_tolerance(state, download, rules.clip_norm):
        raise ReplyRejected("clip", f"update norm {norm:.6g} > user-dp-clip C={rules.clip_norm:g}: the client did "
                                    "not clip its update (user-level DP)")
    if rules.max_update_norm is not None and not norm <= rules.max_update_norm:
        raise ReplyRejected("norm", f"update norm {norm:.4g} > max_update_norm={rules.max_update_norm:g}")
    return norm


def _check_keys_and_shapes(declared: Mapping[str, Any], task: NodeTask) -> None:
    """``declared``: key → shape the reply declares (its layout, or its Arrays' shapes), before decoding."""
    got_keys, want_keys = set(declared), set(task.expected)
    if got_keys != want_keys:
        missing, extra = sorted(want_keys - got_keys), sorted(got_keys - want_keys)
        raise ReplyRejected("keys", f"missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for key, shape in declared.items():
        if tuple(shape) != tuple(task.expected[key]):
            raise ReplyRejected(
                "shape", f"key {key!r}: shape {tuple(shape)} != expected {task.expected[key]} (rank {task.rank})"
            )


def screen_replies(
    replies: Iterable[Message], tasks: Mapping[int, NodeTask], rules: ScreeningRules, rnd: int
) -> ScreenedRound:
    """Screen a round's replies: accepted updates in node-id order, rejections logged and listed."""
    replies = list(replies)
    seen: set[int] = set()
    out = ScreenedRound(used=[], rejected=[], upload_payload=0, upload_serialized=0)
    claims = claim_bound(replies, tasks, rules.metrics_key,
                         rules.claim_factor if rules.weighting == "num-examples" else None)
    for msg in replies:
        nid = int(msg.metadata.src_node_id)
        if not msg.has_error():
            rec = msg.content.array_records.get(rules.arrays_key)
            meta = msg.content.config_records.get(rules.meta_key)
            if rec is not None:
                out.upload_payload += payload_bytes(rec)
                out.upload_serialized += serialized_bytes(rec, meta.get(LAYOUT_KEY) if meta is not None else None)
        try:
            update = screen_reply(msg, tasks.get(nid), rules, seen, claims)
        except ReplyRejected as rej:
            if rej.category == "unreachable" and nid in tasks and nid not in seen:
                LOGGER.warning("round %d: node %d: error reply code %s (node unavailable, counted missing), "
                               "reason: %s", rnd, nid, msg.error.code, msg.error.reason)
                out.unreachable.append(nid)
                seen.add(nid)
                continue
            if rej.category in ("error", "unreachable"):
                LOGGER.warning(
                    "round %d: node %d: error reply code %s, reason: %s", rnd, nid, msg.error.code, msg.error.reason
                )
            else:
                LOGGER.warning("round %d: node %d: reply rejected [%s]: %s", rnd, nid, rej.category, rej.reason)
            out.rejected.append({"node": nid, "category": rej.category, "reason": rej.reason[:2000]})
            if rej.category not in ("duplicate", "unexpected-node"):
                seen.add(nid)
            continue
        seen.add(nid)
        out.used.append(update)
    _drop_outlier_norms(out, rules.norm_factor, rnd)
    # canonical order: floating-point sums must not depend on reply arrival order (reproducibility)
    out.used.sort(key=lambda u: u.node_id)
    return out


def _drop_outlier_norms(out: ScreenedRound, factor: float | None, rnd: int) -> None:
    """Move the updates with ‖Δᵢ‖ > ``factor`` × median(‖Δ‖ of this round's valid updates) to the rejected
    (``norm``); nothing when ``factor`` is None."""
    if factor is None or not out.used:
        return
    bound = factor * float(np.median([u.norm for u in out.used]))
    for update in [u for u in out.used if u.norm > bound]:
        reason = f"update norm {update.norm:.4g} > {factor:g} x the round's median norm ({bound / factor:.4g})"
        LOGGER.warning("round %d: node %d: reply rejected [norm]: %s", rnd, update.node_id, reason)
        out.rejected.append({"node": update.node_id, "category": "norm", "reason": reason})
        out.used.remove(update)


def screen_evaluate_replies(replies: Iterable[Message], metrics_key: str, max_num_examples: int | None,
                            rnd: int | None = None, claim_factor: float | None = None
                            ) -> list[tuple[int, float, dict[str, float]]]:
    """The evaluate replies that pass screening as ``(node, num-examples, metrics without num-examples)``;
    every dropped reply is logged with its node and reason (see the module docstring). Every returned reply
    carries the same metric keys: those more than half of the otherwise valid replies report, and declares at
    most ``claim_factor`` × their median ``num-examples`` (None: no median rule)."""
    good: list[tuple[int, float, dict[str, float]]] = []
    where = f"evaluate round {rnd}" if rnd is not None else "evaluate"

    def drop(nid: int, category: str, reason: str) -> None:
        LOGGER.warning("%s: node %d: reply dropped [%s]: %s", where, nid, category, reason)

    for msg in replies:
        nid = int(msg.metadata.src_node_id)
        if msg.has_error():
            drop(nid, "error", f"error reply code {msg.error.code}, reason: {msg.error.reason}")
            continue
        metrics = msg.content.metric_records.get(metrics_key)
        if metrics is None and len(msg.content.metric_records) == 1:
            metrics = next(iter(msg.content.metric_records.values()))
        if metrics is None:
            drop(nid, "missing-record", f"reply has no MetricRecord {metrics_key!r}")
            continue
        n = finite_number(metrics.get(NUM_EXAMPLES))
        try:
            if n is None or n <= 0:
                raise ReplyRejected("bad-metrics", f"{NUM_EXAMPLES}={metrics.get(NUM_EXAMPLES)!r}: need a finite "
                                                   "number > 0")
            check_num_examples(n, max_num_examples)
            values = {k: finite_number(v) for k, v in metrics.items() if k != NUM_EXAMPLES}
            bad = sorted(k for k, v in values.items() if v is None)
            if bad:
                raise ReplyRejected("non-finite", f"metrics {bad} are not finite numbers")
            huge = sorted(k for k, v in values.items() if v is not None and abs(v) > EVAL_METRIC_LIMIT)
            if huge:
                raise ReplyRejected("huge-metric", f"metrics {huge} exceed {EVAL_METRIC_LIMIT:g} in absolute value")
        except ReplyRejected as rej:
            drop(nid, rej.category, rej.reason)
            continue
        good.append((nid, n, {k: v for k, v in values.items() if v is not None}))
    claims = median_claim([n for _, n, _ in good], claim_factor)
    if claims is not None:
        for nid, n, _ in good:
            if (why := claims.problem(n)) is not None:
                drop(nid, "num-examples", why)
        good = [g for g in good if claims.problem(g[1]) is None]
    counts: dict[str, int] = {}
    for _, _, m in good:
        for key in m:
            counts[key] = counts.get(key, 0) + 1
    required = {k for k, c in counts.items() if 2 * c > len(good)}
    kept = []
    for nid, n, m in good:
        missing = sorted(required - set(m))
        if missing:
            drop(nid, "missing-metrics", f"reply lacks metrics {missing} that the other replies report")
            continue
        kept.append((nid, n, {k: m[k] for k in sorted(required)}))
    return kept
