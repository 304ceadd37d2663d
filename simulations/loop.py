"""The server's round loop with checkpoint/resume (Flower's ``Strategy.start`` always begins at round 1
and keeps no state on disk, so fedlora drives the rounds itself through the same strategy API)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from strategies.base import NestedStrategyBase

LOGGER = logging.getLogger("fedlora.server")

EvaluateFn = Callable[[int, dict], dict[str, float] | None]
RoundHook = Callable[[int, dict[str, Any]], None]
PostAggregate = Callable[[int, dict, dict[str, Any]], dict[str, Any]]

#: error replies Flower sends on behalf of a node that is gone (not errors of the ClientApp)
UNREACHABLE_CODES = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                               ErrorCode.NODE_UNAVAILABLE})


class TooFewReplies(RuntimeError):
    """Nodes did not answer and a round got fewer valid replies than ``min-train-nodes``: the run stops
    (metrics.jsonl and the checkpoint keep the last good round; ``resume=true`` continues from it)."""


DP_KEYS = ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-sample-rate", "dp-steps", "dp-clip-norm")


def client_dp_metrics(replies: list) -> dict[str, Any]:
    """Per-client ``dp-*`` metrics of this round's replies and their maximum over clients; counts the nodes
    that refused to train because their privacy budget is spent."""
    per_client: dict[str, dict[str, float]] = {}
    refused = 0
    for msg in replies:
        if msg.has_error():
            refused += int("privacy budget exhausted" in str(msg.error.reason))
            continue
        metrics = msg.content.metric_records.get("metrics")
        if metrics is None:
            continue
        values = {k: float(metrics[k]) for k in DP_KEYS if k in metrics}
        if values:
            per_client[str(msg.metadata.src_node_id)] = values
    out: dict[str, Any] = {}
    if per_client:
        out = {k: max(v[k] for v in per_client.values() if k in v) for k in DP_KEYS
               if any(k in v for v in per_client.values())}
        out["dp-per-client"] = per_client
    if refused:
        out["dp-refused"] = refused
    return out


def run_rounds(
    grid: Grid,
    strategy: NestedStrategyBase,
    *,
    num_rounds: int,
    timeout: float,
    evaluate_fn: EvaluateFn | None = None,
    on_round_end: RoundHook | None = None,
    post_aggregate: PostAggregate | None = None,
) -> None:
    """Run rounds ``strategy.round + 1 … num_rounds``.

    Per round: ``configure_train`` → ``grid.send_and_receive`` (replies past ``timeout`` are absent
    and counted as missing) → ``aggregate_train`` → optional ``post_aggregate`` hook (e.g. user-level
    DP noise on the new global state) → federated evaluation (if the strategy samples any) → central
    ``evaluate_fn(round, global_state)`` → ``on_round_end(round, record)`` (metrics, checkpoint).

    A round short of ``min_train_nodes`` valid replies because nodes did not answer (see
    :func:`_stop_if_nodes_gone`) raises :class:`TooFewReplies` before ``on_round_end``: the run stops and
    the checkpoint stays at the last good round. Short for other reasons (ClientApp errors such as an
    exhausted DP budget, rejected updates), the strategy keeps the previous global state and the run goes on.
    """
    start = strategy.round + 1
    for rnd in range(start, num_rounds + 1):
        t0 = time.perf_counter()
        arrays = strategy.global_arrayrecord()
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout)) if messages else []
        before = strategy.global_state
        strategy.aggregate_train(rnd, replies)
        record: dict[str, Any] = dict(strategy.history[-1]) if strategy.history else {"round": rnd}
        _stop_if_nodes_gone(rnd, record, replies, strategy.min_train_nodes, timeout)
        record.update(client_dp_metrics(replies))
        if post_aggregate is not None:
            record.update(post_aggregate(rnd, before, record))
        eval_messages = list(strategy.configure_evaluate(rnd, strategy.global_arrayrecord(), ConfigRecord(), grid))
        if eval_messages:
            eval_replies = grid.send_and_receive(messages=eval_messages, timeout=timeout)
            fed_eval = strategy.aggregate_evaluate(rnd, eval_replies)
            if fed_eval is not None:
                record.update({f"client-{k}": float(v) for k, v in fed_eval.items()})
        if evaluate_fn is not None:
            central = evaluate_fn(rnd, strategy.global_state or {})
            if central:
                record.update(central)
        record["round-seconds"] = time.perf_counter() - t0
        if on_round_end is not None:
            on_round_end(rnd, record)


def _stop_if_nodes_gone(rnd: int, record: dict[str, Any], replies: list, min_train_nodes: int,
                        timeout: float) -> None:
    """Raise :class:`TooFewReplies` if the round kept the previous global state for lack of valid replies
    and at least one sampled node did not answer (no reply within ``timeout``, or the SuperLink reported
    it unavailable)."""
    used = int(record.get("clients-used") or 0)
    if not record.get("kept-previous") or used >= min_train_nodes:
        return
    unavailable = sum(1 for r in replies if r.has_error() and r.error.code in UNREACHABLE_CODES)
    missing = int(record.get("clients-missing") or 0)
    if missing + unavailable == 0:
        return
    rejected = ", ".join(f"node {r['node']} [{r['category']}]" for r in record.get("rejected", []))
    raise TooFewReplies(
        f"round {rnd}: {used} valid replies < min-train-nodes={min_train_nodes}: of "
        f"{record.get('clients-sampled')} sampled nodes {missing} did not reply within round-timeout={timeout:g}s "
        f"and {unavailable} were reported unavailable by the SuperLink"
        f"{'; rejected: ' + rejected if rejected else ''}. Stopping the run: the checkpoint keeps the last good "
        f"global state (round {rnd - 1}); bring the nodes back and start the same run again with resume=true"
    )
