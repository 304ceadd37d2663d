"""Delivery of the server's outer factors to the nodes: once per node, re-sent only when a node lacks them.

The server is the one source of truth for the outer factors B, S, A (:mod:`fedlora.outer_bundle`): every
train and evaluate message carries the bundle's digest in its ConfigRecord (``outer-digest``), and the
bundle itself, as an extra ``ArrayRecord`` named :data:`OUTER_RECORD`, rides along with a node's message
until the node is known to hold it. A node holds it once it has replied to a message that carried it
(the ClientApp stores the bundle before it does anything else), or when a reply echoes the digest in its
``meta`` ConfigRecord. A node whose copy is missing or corrupt answers with an error whose reason contains
:data:`OUTER_MISSING`; it is then sent the bundle again with its next message.

Bytes: the bundle's payload is r·(d + k + 1) numbers per layer; each delivery is counted in the round
record as ``outer-nodes`` (nodes sent the bundle), ``outer-bytes`` (payload) and
``outer-serialized-bytes`` (on the wire), separately from the per-round ``download-bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from flwr.app import Message

from fedlora.outer_bundle import OuterBundle
from fedlora.privacy.release_policy import OUTER_FACTORS_MISSING
from strategies.wire import META_KEY, payload_bytes, serialized_bytes, state_to_arrayrecord

#: name of the ArrayRecord that carries the bundle in a train / evaluate message
OUTER_RECORD = "outer"
#: ConfigRecord key of the bundle's digest (server → node every message; node → server in ``meta``)
OUTER_DIGEST = "outer-digest"
#: ConfigRecord key of the server's sketch (float32 bytes) when nodes compute their own factors
OUTER_SKETCH = "outer-sketch"
#: marker in the reason of a node's error reply when it does not hold the announced bundle (also in the fixed
#: reason a node sends under DP or secure aggregation: fedlora.privacy.release_policy.REFUSALS)
OUTER_MISSING = OUTER_FACTORS_MISSING


class OuterDelivery:
    """Tracks which nodes hold the server's bundle and attaches it to the messages of those that do not.

    :attr:`holders` is part of the strategy's checkpoint (``outer-holders``), so a resumed run does not send the
    factors again to nodes that hold them."""

    #: the round-record entries of a strategy without a bundle (nothing delivered)
    NONE: Mapping[str, int] = MappingProxyType({"outer-nodes": 0, "outer-bytes": 0, "outer-serialized-bytes": 0})

    def __init__(self, bundle: OuterBundle) -> None:
        self.digest = bundle.digest
        self.record = state_to_arrayrecord(bundle.to_state())  # one Array per key: sent once, large, unpacked
        self.payload = payload_bytes(self.record)
        self.serialized = serialized_bytes(self.record)
        self.holders: set[int] = set()
        self._carried: set[int] = set()
        self._round_nodes: list[int] = []

    def attach(self, messages: Iterable[Message]) -> None:
        """Add the bundle to every message whose destination is not known to hold it."""
        for msg in messages:
            nid = int(msg.metadata.dst_node_id)
            if nid in self.holders:
                continue
            msg.content[OUTER_RECORD] = self.record
            self._carried.add(nid)
            self._round_nodes.append(nid)

    def observe(self, replies: Iterable[Message]) -> None:
        """Update :attr:`holders` from a round's replies (see the module docstring)."""
        for msg in replies:
            nid = int(msg.metadata.src_node_id)
            if msg.has_error():
                if OUTER_MISSING in (msg.error.reason or ""):
                    self.holders.discard(nid)
                elif nid in self._carried:
                    self.holders.add(nid)
                continue
            meta = msg.content.config_records.get(META_KEY)
            if nid in self._carried or (meta is not None and meta.get(OUTER_DIGEST) == self.digest):
                self.holders.add(nid)
        self._carried.clear()

    def round_stats(self) -> dict[str, Any]:
        """``outer-nodes``, ``outer-bytes``, ``outer-serialized-bytes`` of the deliveries since the last call."""
        n = len(self._round_nodes)
        self._round_nodes = []
        return {"outer-nodes": n, "outer-bytes": n * self.payload, "outer-serialized-bytes": n * self.serialized}
