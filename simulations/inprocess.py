"""A whole federation in one Python process: the real ServerApp loop and the real ClientApp, no Ray.

:class:`~strategies.inprocess_grid.InProcessGrid` (a Flower ``Grid`` that hands every instruction
``Message`` to a client function and returns its replies) carries the messages. :func:`run_in_process` joins
:func:`simulations.server_app.run_server` (stable node ids, strategy screening, byte accounting, central
evaluation, outputs) to :func:`clients.client_app.make_client_app` (query / train / evaluate handlers)
through it, with one Flower ``Context`` per simulated SuperNode carrying ``partition-id`` and
``num-partitions`` exactly as the simulation engine does. Clients of a round run one after the other.

Used by the benchmarks (``bench.comm_measured``, ``bench.accuracy``): no Ray start-up per run and no
actor processes, so several runs can share the machine side by side, one thread each. A real
deployment or ``flwr run .`` goes through Flower's own Grid; the server and client code is the same.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from strategies.inprocess_grid import InProcessGrid

FIRST_NODE_ID = 1000
LOGGER = logging.getLogger("fedlora.inprocess")


def node_contexts(num_supernodes: int, run_id: int = 1) -> dict[int, Context]:
    """One Context per SuperNode (node ids ``FIRST_NODE_ID + i``), node config as the simulation engine
    sets it: ``partition-id=i``, ``num-partitions=num_supernodes``; empty state and run config."""
    return {
        FIRST_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_NODE_ID + i,
                                   node_config={"partition-id": i, "num-partitions": num_supernodes},
                                   state=RecordDict(), run_config={})
        for i in range(num_supernodes)
    }


def run_in_process(overrides: Mapping[str, Any], num_supernodes: int,
                   node_configs: Mapping[int, Mapping[str, Any]] | None = None) -> Path:
    """Run the fedlora job of run-config ``overrides`` over ``num_supernodes`` in-process SuperNodes;
    returns its results directory (``metrics.jsonl``, ``config.json``, plots...). ``node_configs``: extra node
    config of some nodes, by index (e.g. ``{2: {"model-path": ...}}``). A ClientApp exception becomes an error
    reply, as Flower's runtime makes it."""
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes={num_supernodes} must be >= 1")
    from clients.client_app import make_client_app
    from fedlora.run_config import parse_run_config
    from simulations.server_app import run_server

    cfg = parse_run_config(dict(overrides))
    app = make_client_app(dict(overrides))
    contexts = node_contexts(num_supernodes)
    for i, extra in (node_configs or {}).items():
        contexts[FIRST_NODE_ID + i].node_config.update(dict(extra))

    def client_fn(msg: Message) -> Message:
        from flwr.supercore.task_identity import TaskIdentity

        node_id = int(msg.metadata.dst_node_id)
        TaskIdentity.node_id = node_id  # a reply's src_node_id is the running process's node id
        try:
            return app(msg, contexts[node_id])
        except Exception as ex:  # noqa: BLE001 - as flwr.supernode.runtime.run_clientapp reports it
            LOGGER.error("ClientApp of node %d raised: %s", node_id, ex)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"),
                           reply_to=msg)
        finally:
            TaskIdentity.node_id = 0

    grid = InProcessGrid(contexts, client_fn)
    with server_task_identity(run_id=1):
        return run_server(grid, cfg)


@contextlib.contextmanager
def server_task_identity(run_id: int, task_id: int = 1) -> Iterator[None]:
    """Set Flower's process-wide ``TaskIdentity`` as a running ServerApp has it (``Message()`` reads the
    run id from it), and restore the previous values afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
