"""The ClientApp's side of secure aggregation (``secure-aggregation = true``; protocol: :mod:`strategies.secagg_node`).

- ``query`` messages with a ``secagg`` ConfigRecord run a protocol stage (setup, share-keys, unmask) on the node's
  protocol state, kept in ``context.state`` under ``secagg-state`` (its key pairs, mask seed and the shares it
  holds never leave the node; the state is wiped after unmask).
- A train message runs the ordinary train handler, then replaces its update by the masked vector: the reply
  carries ``metrics`` and ``meta`` as before (what the release policy allows), no ``arrays`` record and no
  ``layout``, and an ArrayRecord ``secagg`` with one uint32 Array ``masked`` (:mod:`strategies.secagg_protocol`).

A node whose run config says ``secure-aggregation = true`` never sends its update in the clear: a train message
without the ``collect`` stage is refused before training, as is one the protocol state does not expect.
Under user-level DP the node clips its vector (the r×r update and the head's change) to ``user-dp-clip`` and
refuses a session whose per-node noise std is 0: the server must never see an un-noised sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.refusal import Refusal
from fedlora.run_config import RunConfig
from strategies.secagg_node import ProtocolViolation, check_collect, handle, masked_vector, params_of
from strategies.secagg_protocol import (
    MASKED_KEY,
    NODE_STATE_KEY,
    SECAGG_KEY,
    node_vector,
    vector_layout,
    weight_factor,
)
from strategies.wire import LAYOUT_KEY, NUM_EXAMPLES, finite_number, unpack_state

LOGGER = logging.getLogger("fedlora.client")
#: the ClientApp's train handler: (message, context, run config) → reply
TrainHandler = Callable[[Message, Context, RunConfig], Message]


def is_secagg(msg: Message) -> bool:
    """Whether ``msg`` is a SecAgg+ stage (it carries a ``secagg`` ConfigRecord)."""
    return SECAGG_KEY in msg.content.config_records


def _load(context: Context) -> ConfigRecord | None:
    return context.state.config_records.get(NODE_STATE_KEY)


def _save(context: Context, state: ConfigRecord | None) -> None:
    if state is None:
        if NODE_STATE_KEY in context.state.config_records:
            del context.state[NODE_STATE_KEY]
    else:
        context.state[NODE_STATE_KEY] = state


def secagg_query(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Run the stage a ``query`` message asks for; reply with its ``secagg`` record. Raises (an error reply) on a
    request that breaks the protocol, or when this node's run config does not enable secure aggregation."""
    if not cfg.secure_aggregation:
        raise ProtocolViolation("a SecAgg+ stage, but this node's run config has secure-aggregation = false")
    out, state = handle(_load(context), msg.content.config_records[SECAGG_KEY])
    _save(context, state)
    return Message(RecordDict({SECAGG_KEY: ConfigRecord(out)}), reply_to=msg)


def secagg_train(msg: Message, context: Context, cfg: RunConfig, train: TrainHandler) -> Message:
    """Train with ``train`` and send the masked vector of the update instead of the update.

    Raises (an error reply, before training) if the message has no ``collect`` stage of this node's session, and
    under user-level DP if the session's noise std is 0."""
    request = msg.content.config_records.get(SECAGG_KEY)
    if request is None:
        raise ProtocolViolation("secure-aggregation = true: a train message without its SecAgg+ 'collect' stage; "
                                "refusing to send an update in the clear")
    state = check_collect(_load(context), request)
    noise_std = float(state["noise-std"])  # type: ignore[arg-type]
    if cfg.user_dp_enabled and noise_std <= 0:
        raise ProtocolViolation("user-level DP under secure aggregation, but the session's per-node noise std is 0: "
                                "refusing to send an un-noised update")
    reply = train(msg, context, cfg)
    if reply.has_error():
        return reply
    meta = dict(reply.content.config_records["meta"])
    upload = unpack_state(reply.content["arrays"], meta.pop(LAYOUT_KEY, None))
    config = msg.content.config_records.get("config")
    download = unpack_state(msg.content["arrays"], config.get(LAYOUT_KEY) if config is not None else None)
    vector = node_vector(upload, download, vector_layout(download))
    if cfg.user_dp_enabled:  # the sum's sensitivity is the norm of exactly this vector
        norm = float(np.linalg.norm(vector))
        if norm > cfg.user_dp_clip:
            vector = vector * (cfg.user_dp_clip / norm)
    metrics = reply.content.metric_records["metrics"]
    try:
        factor = weight_factor(str(state["weighting"]), finite_number(metrics.get(NUM_EXAMPLES)), params_of(state))
    except ValueError as err:  # its text names num-examples: a fixed reason leaves the node (clients/refusal.py)
        raise Refusal("secagg-weight", str(err)) from err
    masked, new_state = masked_vector(state, request, vector, factor)
    _save(context, new_state)
    content = RecordDict({"metrics": metrics, "meta": ConfigRecord(meta),
                          SECAGG_KEY: ArrayRecord({MASKED_KEY: Array(masked)})})
    LOGGER.info("secure aggregation: node %s sent its masked vector (%d values)", state["node"], masked.size)
    return Message(content, reply_to=msg)
