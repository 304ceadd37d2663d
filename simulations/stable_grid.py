"""Stable node identities for reproducible runs and resume.

Flower gives simulated SuperNodes random node ids in every run, so anything a strategy keys by node id
(per-client seeds, rank assignment, client sampling) would change from run to run and would not survive
a resume. :class:`StableIdGrid` asks each node once, with a ``query`` message, for its identity (its
``partition-id``, or ``data-path`` in deployments) and shows the strategy stable ids derived from it,
translating destinations and reply sources on the way. Nodes that do not answer keep their Flower id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.identity import IDENTITY_KEY, stable_id

LOGGER = logging.getLogger("fedlora.server")

class _Metadata:
    def __init__(self, inner: Any, src_node_id: int) -> None:
        self._inner = inner
        self._src = src_node_id

    @property
    def src_node_id(self) -> int:
        return self._src

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class RemappedReply:
    """A reply as the strategy sees it: the same message with ``metadata.src_node_id`` = the stable id."""

    def __init__(self, message: Message, src_node_id: int) -> None:
        self._message = message
        self.metadata = _Metadata(message.metadata, src_node_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)


class StableIdGrid:
    """A Grid proxy with stable node ids (see module docstring)."""

    def __init__(self, grid: Grid, query_timeout: float = 120.0) -> None:
        self._grid = grid
        self._timeout = query_timeout
        self._to_real: dict[int, int] = {}
        self._to_stable: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _discover(self, real_ids: list[int]) -> None:
        unknown = [n for n in real_ids if n not in self._to_stable]
        if not unknown:
            return
        msgs = [
            Message(content=RecordDict({"config": ConfigRecord({"ask": IDENTITY_KEY})}), dst_node_id=n,
                    message_type=MessageType.QUERY)
            for n in unknown
        ]
        answered: dict[int, str] = {}
        for reply in self._grid.send_and_receive(messages=msgs, timeout=self._timeout):
            if reply.has_error():
                continue
            rec = reply.content.config_records.get(IDENTITY_KEY)
            if rec is not None and rec.get(IDENTITY_KEY):
                answered[int(reply.metadata.src_node_id)] = str(rec[IDENTITY_KEY])
        for real in unknown:
            sid = stable_id(answered[real]) if real in answered else real
            if sid in self._to_real and self._to_real[sid] != real:
                LOGGER.warning("node %d reports identity %s already held by node %d; keeping its Flower id",
                               real, answered.get(real), self._to_real[sid])
                sid = real
            self._to_real[sid] = real
            self._to_stable[real] = sid
        LOGGER.info("stable node ids: %s", {self._to_stable[r]: r for r in unknown})

    def get_node_ids(self) -> Iterable[int]:
        real = [int(n) for n in self._grid.get_node_ids()]
        self._discover(real)
        return [self._to_stable[n] for n in real]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Any]:
        out = []
        for m in messages:
            m.metadata.dst_node_id = self._to_real.get(int(m.metadata.dst_node_id), int(m.metadata.dst_node_id))
            out.append(m)
        replies = self._grid.send_and_receive(messages=out, timeout=timeout)
        # A reply belongs to the node its instruction went to: error replies Flower generates itself (node
        # unavailable, message expired) come from the SuperLink (src_node_id 1), not from that node.
        dst_of = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in out}
        remapped = []
        for r in replies:
            real = dst_of.get(r.metadata.reply_to_message_id, int(r.metadata.src_node_id))
            remapped.append(RemappedReply(r, self._to_stable.get(real, real)))
        return remapped
