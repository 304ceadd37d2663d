"""The server's round loop with checkpoint/resume (Flower's ``Strategy.start`` always begins at round 1
and keeps no state on disk, so fedlora drives the rounds itself through the same strategy API)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from strategies.base import NestedStrategyBase

LOGGER = logging.getLogger("fedlora.server")

EvaluateFn = Callable[[int, dict], dict[str, float] | None]
RoundHook = Callable[[int, dict[str, Any]], None]


def run_rounds(
    grid: Grid,
    strategy: NestedStrategyBase,
    *,
    num_rounds: int,
    timeout: float,
    evaluate_fn: EvaluateFn | None = None,
    on_round_end: RoundHook | None = None,
    post_aggregate: Callable[[int], dict[str, float]] | None = None,
) -> None:
    """Run rounds ``strategy.round + 1 … num_rounds``.

    Per round: ``configure_train`` → ``grid.send_and_receive`` (replies past ``timeout`` are absent
    and counted as missing) → ``aggregate_train`` → optional ``post_aggregate`` hook (e.g. user-level
    DP noise on the new global state) → federated evaluation (if the strategy samples any) → central
    ``evaluate_fn(round, global_state)`` → ``on_round_end(round, record)`` (metrics, checkpoint).
    """
    start = strategy.round + 1
    for rnd in range(start, num_rounds + 1):
        t0 = time.perf_counter()
        arrays = strategy.global_arrayrecord()
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout)) if messages else []
        _, train_metrics = strategy.aggregate_train(rnd, replies)
        record: dict[str, Any] = dict(strategy.history[-1]) if strategy.history else {"round": rnd}
        if post_aggregate is not None:
            record.update(post_aggregate(rnd))
        eval_messages = list(strategy.configure_evaluate(rnd, strategy.global_arrayrecord(), ConfigRecord(), grid))
        if eval_messages:
            eval_replies = grid.send_and_receive(messages=eval_messages, timeout=timeout)
            fed_eval = strategy.aggregate_evaluate(rnd, eval_replies)
            if fed_eval is not None:
                record.update({f"client-{k}": float(v) for k, v in fed_eval.items()})
        if isinstance(train_metrics, MetricRecord):
            for key in ("dp-epsilon", "dp-noise-multiplier", "dp-steps"):
                if key in train_metrics:
                    record[key] = train_metrics[key]
        if evaluate_fn is not None:
            central = evaluate_fn(rnd, strategy.global_state or {})
            if central:
                record.update(central)
        record["round-seconds"] = time.perf_counter() - t0
        if on_round_end is not None:
            on_round_end(rnd, record)
