"""An aggregation audit trail for tests and debugging: every round's accepted client updates, their weights, and
the global state before and after, written by the ServerApp when ``$FEDLORA_AUDIT_DIR`` is set.

With it anyone can recompute a round outside the server and check it: for the exact strategies the new global
state minus the old equals the weighted mean of the clients' inner matrices, so ΔW = s·B·(R0ₙ − R0ₙ₋₁)·A
equals Σᵢ pᵢ·s·B·pad(Rᵢ)·A with the run's outer factors (``<run>/outer-factors/``).

Files (one pair per round ``N``): ``round-N.safetensors`` with ``before/<key>``, ``after/<key>`` (the global
state) and ``node-<id>/<key>`` (each used upload), and ``round-N.json`` with ``{"weights": {node id: pᵢ}}``.

Not for production: the files hold individual client updates in the clear on the server's disk (the server
receives them anyway; under DP-SGD each is already differentially private, under user-level DP they are the
clipped, un-noised updates). Enabling it logs a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from fedlora.durable import replace_durably
from strategies.client_metrics import TrainMetricsFn
from strategies.screening import ClientUpdate

LOGGER = logging.getLogger("fedlora.audit")
AUDIT_ENV = "FEDLORA_AUDIT_DIR"


def audit_dir() -> Path | None:
    """``$FEDLORA_AUDIT_DIR`` as a path, or None when unset."""
    value = os.environ.get(AUDIT_ENV, "").strip()
    return Path(value) if value else None


def install_audit(strategy: Any, directory: Path) -> None:
    """Wrap ``strategy.train_metrics_fn`` so that every aggregated round is also written to ``directory``."""
    LOGGER.warning("aggregation audit on: individual client updates are written to %s (tests and debugging only)",
                   directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner: TrainMetricsFn = strategy.train_metrics_fn
    before = {k: np.array(v, copy=True) for k, v in (strategy.global_state or {}).items()}

    def audited(replies: Sequence[Message], used: Sequence[ClientUpdate], weights: np.ndarray) -> dict[str, Any]:
        nonlocal before
        from safetensors.numpy import save

        after = {k: np.array(v, copy=True) for k, v in strategy.global_state.items()}
        arrays = {f"before/{k}": v for k, v in before.items()} | {f"after/{k}": v for k, v in after.items()}
        for update in used:
            arrays.update({f"node-{update.node_id}/{k}": np.ascontiguousarray(v) for k, v in update.state.items()})
        rnd = int(strategy.round)
        replace_durably(directory / f"round-{rnd}.safetensors", save(arrays))
        weights_by_node = {str(u.node_id): float(w) for u, w in zip(used, weights, strict=True)}
        replace_durably(directory / f"round-{rnd}.json", json.dumps({"weights": weights_by_node}).encode())
        before = after
        return inner(replies, used, weights)

    strategy.train_metrics_fn = audited
