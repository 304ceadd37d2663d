"""Differential privacy on the client.

Sample-level: DP-SGD with opacus on the inner parameters (and ``modules_to_save``), σ calibrated once
for the whole run, the accountant's state kept per node in Flower's ``Context.state`` across rounds; a
node whose budget would be exceeded refuses to train (an error reply that says so).

User-level: the client clips its whole update (r×r inner matrices + change of the head) to
``user-dp-clip`` in L2; the server adds Gaussian noise and accounts ε (``strategies/user_level_dp.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from fedlora.experiment import ExperimentSpec, make_loader
from fedlora.privacy import AccountantState, DPConfig, clip_update, run_dp_training
from fedlora.run_config import RunConfig

STATE_RECORD = "dp"


def dp_config(cfg: RunConfig) -> DPConfig:
    return DPConfig(
        target_epsilon=cfg.dp_epsilon,
        target_delta=cfg.dp_delta or None,
        max_grad_norm=cfg.dp_clip,
        noise_multiplier=None if cfg.dp_noise < 0 else cfg.dp_noise,
        accountant=cfg.dp_accountant,
        force_delta=cfg.dp_force_delta,
    )


def train_private(model, spec: ExperimentSpec, train_ds, cfg: RunConfig, context: Context, tconf: Mapping[str, Any],
                  *, lr: float, steps: int | None, epochs: int, seed: int):
    """One round of DP-SGD; raises ``BudgetExhausted`` (→ an error reply) before training if the run's
    budget would be exceeded. Returns (result, metrics with the ``dp-*`` keys)."""
    dp = dp_config(cfg)
    loader = make_loader(spec, train_ds, batch_size=cfg.batch_size, shuffle=False)
    stored = context.state.config_records.get(STATE_RECORD)
    state = AccountantState.from_config(dict(stored.items()) if stored is not None else {}, mechanism=dp.accountant)
    result, state = run_dp_training(model, loader, dp, state, num_rounds=cfg.num_server_rounds, epochs=epochs,
                                    steps=steps, lr=lr, weight_decay=cfg.weight_decay, seed=seed)
    context.state[STATE_RECORD] = ConfigRecord(state.to_config())
    return result, result.metrics()


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
