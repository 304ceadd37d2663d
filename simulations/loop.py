"""The server's round loop with checkpoint/resume.

Flower's ``Strategy.start`` always begins at round 1 and keeps no state on disk, so fedlora drives the
rounds itself through the same Strategy API and in the same way: the arrays ``aggregate_train`` returns
are what the next ``configure_train`` (and this round's ``configure_evaluate``) gets. The strategy counts
its rounds (``strategy.round``), so a strategy restored from a checkpoint continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies import NestedStrategyBase, UserLevelDP
from strategies.screening import UNREACHABLE_CODES

LOGGER = logging.getLogger("fedlora.server")

#: ``(round, global state) -> metrics or None``: central evaluation after each round
EvaluateFn = Callable[[int, dict], dict[str, float] | None]
#: ``(round, round record) -> None``: called once a round is complete (metrics, checkpoint)
RoundHook = Callable[[int, dict[str, Any]], None]
#: what :func:`run_rounds` drives: a fedlora strategy, possibly wrapped with user-level DP
LoopStrategy = NestedStrategyBase | UserLevelDP

__all__ = ["UNREACHABLE_CODES", "RoundAggregatedNothing", "TooFewReplies", "run_rounds"]


class TooFewReplies(RuntimeError):
    """Nodes did not answer and a round got fewer valid replies than ``min-train-nodes``: the run stops
    (metrics.jsonl and the checkpoint keep the last good round; ``resume=true`` continues from it)."""


class RoundAggregatedNothing(RuntimeError):
    """Every sampled node answered but the round aggregated nothing (every reply rejected, fewer valid
    replies than ``min-train-nodes``, or the aggregation failed) and ``allow-empty-rounds`` is off: the run
    fails after the round's metrics are written (their ``failed`` entry names the reasons); the round is not
    checkpointed, so the checkpoint keeps the last good round and ``resume=true`` retries this one."""


def run_rounds(
    grid: Grid,
    strategy: LoopStrategy,
    *,
    num_rounds: int,
    timeout: float,
    evaluate_fn: EvaluateFn | None = None,
    on_round_end: RoundHook | None = None,
    arrays: ArrayRecord | None = None,
    allow_empty_rounds: bool = False,
) -> ArrayRecord:
    """Run rounds ``strategy.round + 1 … num_rounds`` starting from ``arrays`` (default: the strategy's
    current global state) and return the final global arrays.

    Per round: ``configure_train`` → ``grid.send_and_receive`` (replies past ``timeout`` are absent
    and counted as missing) → ``aggregate_train`` (screening, aggregation, client metrics, and with
    :class:`~strategies.UserLevelDP` the noise) → federated evaluation (if the strategy samples any) →
    central ``evaluate_fn(round, global_state)`` → ``on_round_end(round, record)``. The record is the
    strategy's round record (``strategy.history[-1]``) plus ``client-*`` federated evaluation metrics,
    the central ones and ``round-seconds``.

    A round short of ``min_train_nodes`` valid replies because nodes did not answer (no reply, or the
    SuperLink's "node unavailable" error: both counted in ``clients-missing``; see
    :func:`_stop_if_nodes_gone`) raises :class:`TooFewReplies` before ``on_round_end``: the run stops and
    the checkpoint stays at the last good round. A round that aggregated nothing for other reasons (every
    reply rejected or a ClientApp error such as an exhausted DP budget, the aggregation failed) keeps the
    previous global state; then, unless ``allow_empty_rounds``, its record gets ``failed`` (the reasons),
    is passed to ``on_round_end`` without any evaluation (the hook must not checkpoint a failed round) and
    :class:`RoundAggregatedNothing` is raised. With ``allow_empty_rounds`` the run goes on.
    """
    if arrays is None:
        arrays = strategy.global_arrayrecord()
    for rnd in range(strategy.round + 1, num_rounds + 1):
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = _send(grid, messages, timeout)
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        record: dict[str, Any] = dict(strategy.history[-1]) if strategy.history else {"round": rnd}
        _stop_if_nodes_gone(rnd, record, strategy.min_train_nodes, timeout)
        if record.get("kept-previous") and not allow_empty_rounds:
            record["failed"] = _empty_round_reasons(rnd, record)
            record["round-seconds"] = time.perf_counter() - t0
            if on_round_end is not None:
                on_round_end(rnd, record)
            raise RoundAggregatedNothing(record["failed"])
        eval_messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
        if eval_messages:
            fed_eval = strategy.aggregate_evaluate(rnd, _send(grid, eval_messages, timeout))
            if fed_eval is not None:
                record.update({f"client-{k}": float(v) for k, v in fed_eval.items()})
        if evaluate_fn is not None:
            central = evaluate_fn(rnd, strategy.global_state or {})
            if central:
                record.update(central)
        record["round-seconds"] = time.perf_counter() - t0
        if on_round_end is not None:
            on_round_end(rnd, record)
    return arrays


def _send(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    return list(grid.send_and_receive(messages=messages, timeout=timeout)) if messages else []


def _empty_round_reasons(rnd: int, record: dict[str, Any]) -> str:
    """Why round ``rnd`` aggregated nothing: the kept reason and every rejected reply's node, category and
    reason, and how to go on."""
    rejected = "; ".join(f"node {r['node']} [{r['category']}]: {r['reason'][:300]}" for r in record.get("rejected", []))
    return (f"round {rnd} aggregated nothing: {record.get('kept-reason') or 'no valid reply'}"
            f"{'; rejected: ' + rejected if rejected else ''}. The run fails: metrics.jsonl has this round, the "
            f"checkpoint keeps round {rnd - 1}; fix the cause and start the same run with resume=true, or set "
            f"allow-empty-rounds=true to let rounds that aggregate nothing pass")


def _stop_if_nodes_gone(rnd: int, record: dict[str, Any], min_train_nodes: int, timeout: float) -> None:
    """Raise :class:`TooFewReplies` if the round kept the previous global state for lack of valid replies
    and at least one sampled node did not answer (``clients-missing``: no reply within ``timeout``, or the
    SuperLink reported it unavailable, ``unreachable``)."""
    used = int(record.get("clients-used") or 0)
    if not record.get("kept-previous") or used >= min_train_nodes:
        return
    unavailable = len(record.get("unreachable", []))
    missing = int(record.get("clients-missing") or 0) - unavailable
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
