"""A Flower ``Grid`` that answers every instruction in the same Python process.

:class:`InProcessGrid` holds fixed node ids; ``send_and_receive`` hands each instruction ``Message`` to a
client function and returns its reply ``Message``s (``None`` = no reply, as after a timeout). The
strategy tests drive strategies through it; ``simulations.inprocess`` joins it to the real ClientApp.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class InProcessGrid(Grid):
    """A Grid over fixed node ids; ``send_and_receive`` answers each message with ``client_fn(message)``
    (``None`` = no reply, as after a timeout)."""

    def __init__(self, node_ids: Iterable[int], client_fn: Callable[[Message], Message | None] | None = None):
        self._node_ids = list(node_ids)
        self.client_fn = client_fn

    def set_run(self, run: Any) -> None:  # noqa: D102 - abstract API
        self._run = run

    @property
    def run(self) -> Any:  # noqa: D102
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102, ANN001
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Give each message an id as the SuperLink does when it is pushed (replies refer to it by
        ``reply_to_message_id``), call ``client_fn`` on each in order; drop ``None`` answers."""
        if self.client_fn is None:
            raise RuntimeError("InProcessGrid has no client_fn")
        messages = list(messages)
        for m in messages:
            if not m.metadata.message_id:
                m.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # no public setter (cf. InMemoryGrid)
        replies = [self.client_fn(m) for m in messages]
        return [r for r in replies if r is not None]
