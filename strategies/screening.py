"""Reply screening: every train reply is checked before anything of it is aggregated.

A reply is dropped — logged on the ``fedlora.strategy`` logger with the node and the reason, and listed
in the round's ``rejected`` entries as ``{"node", "category", "reason"}`` — when it is (category):

- an error reply of the ClientApp or the SuperLink (``error``),
- from a node not sampled this round (``unexpected-node``) or a second reply of a node (``duplicate``),
- missing its ``arrays`` / ``metrics`` record, or its ``meta`` fingerprint record while the server has a
  fingerprint (``missing-record``),
- carrying another outer-factor fingerprint than the server's (``fingerprint``),
- without a finite ``num-examples`` > 0 under ``weighting="num-examples"`` (``bad-metrics``),
- over ``max_update_bytes`` of array data, checked before decoding (``oversized``),
- with missing or extra keys (``keys``) or a shape other than its rank implies (``shape``),
- undecodable (``undecodable``), non-finite (``non-finite``), not floating point (``dtype``) or
  otherwise invalid for :func:`fedlora.aggregation.validate_state` (``invalid``).

Accepted replies become :class:`ClientUpdate` s, sorted by node id (sums must not depend on the order in
which replies arrive).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from fedlora.aggregation import AggregationError, validate_state
from strategies.wire import (
    NUM_EXAMPLES,
    TRAIN_LOSS,
    Shape,
    State,
    arrayrecord_to_state,
    finite_number,
    payload_bytes,
    raw_data_bytes,
    serialized_bytes,
)

LOGGER = logging.getLogger("fedlora.strategy")


@dataclass
class NodeTask:
    """What one sampled node was asked to do in the current round (``expected``: upload key → shape)."""

    node_id: int
    rank: int
    inner_rank: int
    seed: int
    expected: dict[str, Shape]
    download_payload: int
    download_serialized: int


@dataclass
class ClientUpdate:
    """A screened, accepted client reply: ``state`` has exactly the keys/shapes of its task, all finite
    floating-point arrays; ``metrics`` holds the reply's finite numeric metrics."""

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
    """A reply failed screening (``category`` is a short machine-readable tag, see the module docstring)."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


@dataclass(frozen=True)
class ScreeningRules:
    """What a reply must satisfy: its record names, the server's fingerprint (``None`` = unchecked), the
    weighting (``"num-examples"`` requires that metric) and the byte limit (``None`` = none)."""

    arrays_key: str
    metrics_key: str
    meta_key: str
    fingerprint: str | None
    weighting: str
    max_update_bytes: int | None


@dataclass
class ScreenedRound:
    """The outcome of screening one round's replies (bytes count every non-error reply's arrays)."""

    used: list[ClientUpdate]
    rejected: list[dict[str, Any]]
    upload_payload: int
    upload_serialized: int


def screen_reply(msg: Message, task: NodeTask | None, rules: ScreeningRules, seen: set[int]) -> ClientUpdate:
    """Validate one reply against its node's ``task`` (``None``: the node was not sampled).

    Raises:
        ReplyRejected: with the category and reason of the first failed check.
    """
    if msg.has_error():
        reason = (msg.error.reason or "").strip()
        raise ReplyRejected("error", f"error reply (code {msg.error.code}): {reason}")
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
    if rules.fingerprint is not None:
        meta = content.config_records.get(rules.meta_key)
        if meta is None:
            raise ReplyRejected("missing-record", f"reply has no ConfigRecord {rules.meta_key!r} (fingerprint)")
        got = meta.get("fingerprint")
        if got != rules.fingerprint:
            raise ReplyRejected(
                "fingerprint",
                f"fingerprint {str(got)[:16]!r}… differs from the server's {rules.fingerprint[:16]!r}…",
            )
    num_examples = finite_number(metrics.get(NUM_EXAMPLES))
    if rules.weighting == "num-examples" and (num_examples is None or num_examples <= 0):
        raise ReplyRejected(
            "bad-metrics", f"metric {NUM_EXAMPLES!r} = {metrics.get(NUM_EXAMPLES)!r}: need a finite number > 0"
        )
    raw = raw_data_bytes(arrays)
    if rules.max_update_bytes is not None and raw > rules.max_update_bytes:
        raise ReplyRejected("oversized", f"arrays carry {raw} bytes > max_update_bytes={rules.max_update_bytes}")
    _check_keys_and_shapes(arrays, task)
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
    numeric = {k: finite_number(v) for k, v in metrics.items()}
    return ClientUpdate(
        node_id=nid,
        rank=task.rank,
        inner_rank=task.inner_rank,
        state=state,
        num_examples=num_examples if num_examples is not None else 0.0,
        train_loss=numeric.get(TRAIN_LOSS),
        upload_payload=payload_bytes(arrays),
        upload_serialized=serialized_bytes(arrays),
        metrics={k: v for k, v in numeric.items() if v is not None},
    )


def _check_keys_and_shapes(arrays: Any, task: NodeTask) -> None:
    got_keys, want_keys = set(arrays.keys()), set(task.expected)
    if got_keys != want_keys:
        missing, extra = sorted(want_keys - got_keys), sorted(got_keys - want_keys)
        raise ReplyRejected("keys", f"missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for key, arr in arrays.items():
        if tuple(arr.shape) != tuple(task.expected[key]):
            raise ReplyRejected(
                "shape", f"key {key!r}: shape {tuple(arr.shape)} != expected {task.expected[key]} (rank {task.rank})"
            )


def screen_replies(
    replies: Iterable[Message], tasks: Mapping[int, NodeTask], rules: ScreeningRules, rnd: int
) -> ScreenedRound:
    """Screen a round's replies: accepted updates in node-id order, rejections logged and listed."""
    seen: set[int] = set()
    out = ScreenedRound(used=[], rejected=[], upload_payload=0, upload_serialized=0)
    for msg in replies:
        nid = int(msg.metadata.src_node_id)
        if not msg.has_error():
            rec = msg.content.array_records.get(rules.arrays_key)
            if rec is not None:
                out.upload_payload += payload_bytes(rec)
                out.upload_serialized += serialized_bytes(rec)
        try:
            update = screen_reply(msg, tasks.get(nid), rules, seen)
        except ReplyRejected as rej:
            if rej.category == "error":
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
    # canonical order: floating-point sums must not depend on reply arrival order (reproducibility)
    out.used.sort(key=lambda u: u.node_id)
    return out
