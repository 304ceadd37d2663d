"""Fixtures of the strategy tests: Flower task identity (needed to build instruction Messages)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def flower_task_identity() -> Iterator[None]:
    """Set ``TaskIdentity`` as a running ServerApp would (Message() needs run/node/task ids)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
