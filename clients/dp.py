"""Differential privacy on the client.

Sample-level: DP-SGD with opacus on the inner parameters (and ``modules_to_save``), σ calibrated once for
the whole run. The accountant's state lives in the node's own privacy ledger on node-local disk
(:mod:`fedlora.privacy.ledger`, directory from the node config ``state-dir``), the one source of truth:
it survives ``resume=true`` and restarts of the SuperNode; the node trusts no number from the server.
Each round's steps are written to the ledger before training; a node whose budget would be exceeded, or
whose ledger cannot be read, trusted or written, refuses to train (an error reply that says so).

User-level: the client clips its whole update (r×r inner matrices + change of the head) to
``user-dp-clip`` in L2; the server adds Gaussian noise and accounts ε (``strategies/user_level_dp.py``).

What a reply may carry in each mode is :mod:`fedlora.privacy.release_policy` (applied by ``clients/client_app.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context

from clients.refusal import Refusal
from fedlora.experiment import ExperimentSpec, make_loader
from fedlora.identity import node_identity
from fedlora.privacy import DP_METRIC_KEYS, BudgetExhausted, DPConfig, clip_update, run_dp_training
from fedlora.privacy.ledger import NODE_CONFIG_KEY, LedgerError, LedgerKey, PrivacyLedger, reserve_round, state_dir
from fedlora.privacy.release_policy import BUDGET_REFUSAL
from fedlora.run_config import RunConfig

LOGGER = logging.getLogger("fedlora.client")


def dp_config(cfg: RunConfig) -> DPConfig:
    """The run config's DP-SGD settings: ``dp-epsilon`` 0/inf = no budget (then ``dp-noise`` σ > 0 runs
    DP-SGD that only accounts ε), ``dp-noise`` -1 = σ calibrated from ``dp-epsilon``."""
    return DPConfig(
        target_epsilon=cfg.dp_epsilon if cfg.dp_epsilon > 0 else math.inf,
        target_delta=cfg.dp_delta or None,
        max_grad_norm=cfg.dp_clip,
        noise_multiplier=None if cfg.dp_noise < 0 else cfg.dp_noise,
        accountant=cfg.dp_accountant,
        force_delta=cfg.dp_force_delta,
    )


def node_ledger(cfg: RunConfig, context: Context) -> PrivacyLedger:
    """This node's ledger for this run: key (resolved run name, dataset, node identity), directory from the
    node config ``state-dir`` (else ``$FEDLORA_STATE_DIR``, else ``~/.fedlora/ledger``)."""
    node_config = dict(context.node_config)
    identity = node_identity(node_config)
    if not identity:
        raise LedgerError("the node has no identity for its privacy ledger (node config 'partition-id' or "
                          "'data-path'); refusing to train")
    key = LedgerKey(run_name=cfg.resolved_run_name, dataset=cfg.dataset, node=identity)
    return PrivacyLedger(state_dir(str(node_config.get(NODE_CONFIG_KEY, "") or "") or None), key)


def train_private(model, spec: ExperimentSpec, train_ds, cfg: RunConfig, context: Context, *, lr: float,
                  steps: int | None, epochs: int, seed: int) -> tuple[Any, dict[str, float | int]]:
    """One round of DP-SGD accounted in the node's ledger. Returns (result, the ``dp-*`` metrics).

    Raises before training: ``BudgetExhausted`` (or, unless ``dp-release-metrics``, a
    :class:`~clients.refusal.Refusal` (RuntimeError) that names only the public target ε) if the round would
    exceed the budget; ``LedgerError`` if the ledger cannot be read, trusted or written; ``DeltaRefused`` if
    δ ≥ 1/N. Their texts name N-dependent figures or paths: the ClientApp sends only a fixed reason for each
    (:mod:`clients.refusal`)."""
    dp = dp_config(cfg)
    loader = make_loader(spec, train_ds, batch_size=cfg.batch_size, shuffle=False)
    ledger = node_ledger(cfg, context)
    try:
        before, reserved = reserve_round(ledger, dp, num_examples=len(loader.dataset), batch_size=cfg.batch_size,
                                         epochs=epochs, steps=steps, num_rounds=cfg.num_server_rounds)
    except BudgetExhausted as err:
        LOGGER.warning("%s (ledger %s)", err, ledger.path)
        if cfg.dp_release_metrics:
            raise
        # ε spent, δ and the step count depend on N: only the public target leaves the node
        raise Refusal("budget", f"{BUDGET_REFUSAL}: another round would exceed this node's target ε = "
                                f"{err.target_epsilon:g}; refusing to train") from None
    result, state = run_dp_training(model, loader, dp, before, num_rounds=cfg.num_server_rounds, epochs=epochs,
                                    steps=steps, lr=lr, weight_decay=cfg.weight_decay, seed=seed)
    if state.history != reserved.history:
        raise LedgerError(f"privacy ledger {ledger.path}: the round accounted {state.history}, not the reserved "
                          f"{reserved.history}; not releasing the update")
    LOGGER.info("DP-SGD: ε spent = %.4g at δ = %.3g (σ = %.4g, q = %.4g, %d steps, target %s); ledger %s",
                result.epsilon, result.delta, result.noise_multiplier, result.sample_rate, result.total_steps,
                state.target_epsilon, ledger.path)
    metrics = result.metrics()
    return result, {k: metrics[k] for k in DP_METRIC_KEYS}


def clip_upload(upload: dict[str, np.ndarray], download: Mapping[str, np.ndarray], clip_norm: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """Clip the client's update to L2 norm ``clip_norm``; returns (upload to send, pre-clip norm).

    The update is the inner matrices ``L.R`` themselves (they start at zero every round) and, for every
    ``modules_to_save`` parameter, its change from the downloaded global value."""
    update = {k: (v - download[k] if k in download else v) for k, v in upload.items()}
    clipped, norm = clip_update(update, clip_norm)
    out = {k: (clipped[k] + download[k] if k in download else clipped[k]).astype(upload[k].dtype)
           for k in upload}
    return out, float(norm)
