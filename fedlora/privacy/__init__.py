"""Differential privacy for fedlora (opacus-backed; never imports flwr).

- Sample-level DP-SGD on each client's inner parameters: :class:`DPConfig`, :func:`run_dp_training`
  (one call per round: the non-DP training loop on the private model, optimizer and loader), or the
  privacy engine's pieces :func:`make_private` / :func:`dp_step` / :func:`update_state` / :func:`release`.
- Accounting across rounds: :class:`AccountantState` (JSON-able opacus history + the run's plan),
  :func:`calibrate_noise` (σ once per run), :class:`BudgetExhausted`.
- User-level DP on r×r updates: :class:`UserDPConfig`, :func:`clip_update`, :func:`add_gaussian_noise`,
  :class:`UserLevelAccountant`.
- :func:`dp_metrics`: the ``dp-*`` metric keys.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedlora.privacy.config import ACCOUNTANTS, DEFAULT_ACCOUNTANT, DPConfig, UserDPConfig, default_delta
from fedlora.privacy.metrics import DP_METRIC_KEYS, dp_metrics

if TYPE_CHECKING:
    from fedlora.privacy.accounting import (
        STATE_KEY,
        AccountantState,
        BudgetExhausted,
        calibrate_noise,
        epsilon_of,
        local_steps,
        poisson_sample_rate,
        total_steps,
    )
    from fedlora.privacy.checks import check_grad_samplers, check_trainable_scope
    from fedlora.privacy.dp_sgd import DPTrainResult, plan_noise, run_dp_training
    from fedlora.privacy.engine import PrivateSetup, dp_step, make_private, noise_only_step, release, update_state
    from fedlora.privacy.user_level import (
        USER_STATE_KEY,
        UserLevelAccountant,
        add_gaussian_noise,
        clip_update,
        update_norm,
    )
    from fedlora.training import per_example_loss  # the loss DP-SGD and the non-DP loop both optimise

#: where the names above live; they load on first use, because these modules import opacus (~1.5 s), and
#: the configs (``fedlora.privacy.config``: the run config's accountant constants) must stay cheap to import
_LAZY_MODULES = (
    "fedlora.privacy.accounting",
    "fedlora.privacy.checks",
    "fedlora.privacy.dp_sgd",
    "fedlora.privacy.engine",
    "fedlora.privacy.user_level",
    "fedlora.training",
)

_MISSING = object()


def __getattr__(name: str) -> Any:
    """Import the public name ``name`` from the module that defines it, on first access."""
    if name in __all__:
        for module in _LAZY_MODULES:
            value = getattr(importlib.import_module(module), name, _MISSING)
            if value is not _MISSING:
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "DP_METRIC_KEYS",
    "STATE_KEY",
    "USER_STATE_KEY",
    "AccountantState",
    "BudgetExhausted",
    "DPConfig",
    "DPTrainResult",
    "PrivateSetup",
    "UserDPConfig",
    "UserLevelAccountant",
    "add_gaussian_noise",
    "calibrate_noise",
    "check_grad_samplers",
    "check_trainable_scope",
    "clip_update",
    "default_delta",
    "dp_metrics",
    "dp_step",
    "epsilon_of",
    "local_steps",
    "make_private",
    "noise_only_step",
    "per_example_loss",
    "plan_noise",
    "poisson_sample_rate",
    "release",
    "run_dp_training",
    "total_steps",
    "update_norm",
    "update_state",
]
