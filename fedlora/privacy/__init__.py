"""Differential privacy for fedlora (opacus-backed; never imports flwr).

- Sample-level DP-SGD on each client's inner parameters: :class:`DPConfig`, :func:`run_dp_training`
  (one call per round), or :func:`make_private` / :func:`dp_step` / :func:`update_state` / :func:`release`.
- Accounting across rounds: :class:`AccountantState` (JSON-able opacus history + the run's plan),
  :func:`calibrate_noise` (σ once per run), :class:`BudgetExhausted`.
- User-level DP on r×r updates: :class:`UserDPConfig`, :func:`clip_update`, :func:`add_gaussian_noise`,
  :class:`UserLevelAccountant`.
- :func:`dp_metrics`: the ``dp-*`` metric keys.
"""

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
from fedlora.privacy.config import DPConfig, UserDPConfig, default_delta
from fedlora.privacy.dp_sgd import (
    DPTrainResult,
    PrivateSetup,
    check_grad_samplers,
    check_trainable_scope,
    dp_step,
    make_private,
    per_example_loss,
    plan_noise,
    release,
    run_dp_training,
    update_state,
)
from fedlora.privacy.metrics import DP_METRIC_KEYS, dp_metrics
from fedlora.privacy.user_level import (
    USER_STATE_KEY,
    UserLevelAccountant,
    add_gaussian_noise,
    clip_update,
    update_norm,
)

__all__ = [
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
    "per_example_loss",
    "plan_noise",
    "poisson_sample_rate",
    "release",
    "run_dp_training",
    "total_steps",
    "update_norm",
    "update_state",
]
