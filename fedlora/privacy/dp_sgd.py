"""Sample-level DP-SGD for one client round: plan σ once per run, check the budget, train, account.

:func:`run_dp_training` is the one-call API. With DP it runs the *non-DP training loop*
(:func:`fedlora.training.train_local`, objective: mean :func:`~fedlora.training.per_example_loss`) on what the
privacy engine (:func:`~fedlora.privacy.engine.make_private`: ``DPOptimizer``, Poisson ``DPDataLoader``,
per-sample gradient hooks) returns; without DP (``not dp_config.enabled``, e.g. the privacy sweep's ε = ∞
cell) it runs the same loop on the plain model, optimizer and loader. The privacy engine is therefore the
only difference between the two.

Steps per round: ``local_steps(N, B, epochs, steps)`` = epochs · ⌈N/B⌉ capped at ``steps``, with N =
``len(loader.dataset)`` and B = ``loader.batch_size``; a DP round iterates the Poisson loader (⌊1/q⌋ batches
a pass) as often as needed and counts empty batches as (noise-only, accounted) steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedlora.precision import precision_of
from fedlora.privacy.accounting import AccountantState, calibrate_noise, local_steps, poisson_sample_rate
from fedlora.privacy.accounting import total_steps as _total_steps
from fedlora.privacy.config import DPConfig
from fedlora.privacy.engine import make_private, noise_only_step, quiet_opacus, release, update_state
from fedlora.privacy.metrics import dp_metrics
from fedlora.training import TrainResult, make_optimizer, train_local, trainable_parameters


@dataclass(frozen=True)
class DPTrainResult:
    """Outcome of :func:`run_dp_training`.

    loss: mean per-example training loss over the non-empty steps (nan if none); steps: DP-SGD steps this
    round (empty Poisson batches included); num_examples: examples processed; seconds: wall time;
    epsilon: ε spent after this round at ``delta`` (whole run so far); total_steps: steps accounted so
    far; sample_rate q, noise_multiplier σ, max_grad_norm C.
    """

    loss: float
    steps: int
    num_examples: int
    seconds: float
    epsilon: float
    delta: float
    total_steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float

    def metrics(self, include_loss: bool = False) -> dict[str, float | int]:
        """``dp_metrics`` keys plus ``train-steps`` and ``train-seconds``; ``train-loss`` only with
        ``include_loss``: the training loss is computed on private data WITHOUT noise and is not covered by
        the accounted ε, so do not send it to the server in a DP run."""
        m: dict[str, float | int] = dp_metrics(
            epsilon=self.epsilon, delta=self.delta, noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate, steps=self.total_steps, clip_norm=self.max_grad_norm,
        )
        m.update({"train-steps": self.steps, "train-seconds": self.seconds})
        if include_loss:
            m["train-loss"] = self.loss
        return m


def plan_noise(
    dp_config: DPConfig,
    state: AccountantState,
    *,
    num_examples: int,
    batch_size: int,
    steps_per_round: int,
    num_rounds: int,
) -> AccountantState:
    """The state with the run's plan filled in (σ, q, δ, target ε). σ: the fixed ``dp_config.noise_multiplier``,
    else the state's stored plan (calibrated in an earlier round), else ``calibrate_noise`` once for
    ``steps_per_round · num_rounds`` steps at q = B/N. Raises ``ValueError`` on δ ≥ 1/N (unless forced)."""
    delta = dp_config.check_delta(num_examples)
    q = poisson_sample_rate(num_examples, batch_size)
    target = dp_config.target_epsilon if math.isfinite(dp_config.target_epsilon) else None
    if dp_config.noise_multiplier is not None:
        sigma = float(dp_config.noise_multiplier)
    elif state.noise_multiplier is not None:
        sigma = state.noise_multiplier
    else:
        sigma = calibrate_noise(
            dp_config.target_epsilon, delta, q, max(1, _total_steps(steps_per_round, num_rounds)),
            accountant=dp_config.accountant,
        )
    return AccountantState(
        mechanism=state.mechanism, history=list(state.history), noise_multiplier=sigma,
        sample_rate=q, delta=delta, target_epsilon=target,
    )


def run_dp_training(
    model: nn.Module,
    loader: DataLoader,
    dp_config: DPConfig,
    accountant_state: AccountantState | None,
    *,
    num_rounds: int,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 5e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    dp_seed: int | None = None,
) -> tuple[DPTrainResult, AccountantState]:
    """One client round of DP-SGD, in place on ``model``; returns (result, new accountant state).

    Steps this round: ``local_steps(N, B, epochs, steps)`` (N = ``len(loader.dataset)``, B =
    ``loader.batch_size``). σ is planned once for ``num_rounds`` rounds (:func:`plan_noise`) and kept in the
    state. Before anything is touched, the budget is checked: if these steps would push ε past
    ``dp_config.target_epsilon``, :class:`~fedlora.privacy.BudgetExhausted` is raised and the model is
    unchanged. Optimizer: AdamW(lr, weight_decay) over the trainable parameters (DP post-processing).
    ``seed`` seeds dropout; ``dp_seed`` seeds sampling and noise (keep None in real runs).

    With DP disabled (``not dp_config.enabled``) this is ``train_local(model, loader, epochs, steps, …)``: the
    non-DP loop on ``loader`` as it is; it reports ``dp-epsilon = inf``, σ = 0 and the state unchanged.
    """
    if not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds!r}: must be an integer >= 1")
    n = len(loader.dataset)  # type: ignore[arg-type]
    if loader.batch_size is None:
        raise ValueError("loader has no batch_size")
    batch_size = int(loader.batch_size)
    state = accountant_state if accountant_state is not None else AccountantState(mechanism=dp_config.accountant)
    if state.mechanism != dp_config.accountant:
        raise ValueError(
            f"DPConfig.accountant={dp_config.accountant!r} differs from the stored state's {state.mechanism!r}"
        )
    n_steps = local_steps(n, batch_size, epochs, steps)
    params = trainable_parameters(model)
    device = params[0].device if params else torch.device("cpu")
    if not dp_config.enabled:
        trained = train_local(model, loader, epochs=epochs, max_steps=steps, lr=lr, weight_decay=weight_decay,
                              seed=seed, device=device)
        return _result(trained, epsilon=math.inf, delta=0.0, total_steps=0, sample_rate=0.0, noise_multiplier=0.0,
                       max_grad_norm=0.0), state

    if precision_of(model).scale_loss:
        raise ValueError("amp: DP-SGD with float16 compute (loss scaling) is refused, the GradScaler would scale the "
                         "per-sample gradients opacus clips; this GPU has no bfloat16: set amp=false")
    plan = plan_noise(dp_config, state, num_examples=n, batch_size=batch_size, steps_per_round=n_steps,
                      num_rounds=num_rounds)
    plan.check_budget(n_steps)  # BudgetExhausted before any change to the model

    model.train()
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay)
    before = [p.detach().clone() for p in params]
    setup = make_private(
        model, optimizer, loader, noise_multiplier=plan.noise_multiplier or 0.0,
        max_grad_norm=dp_config.max_grad_norm, accountant_state=plan,
        grad_sample_mode=dp_config.grad_sample_mode, seed=dp_seed, sample_rate=plan.sample_rate,
    )
    passes = max(1, math.ceil(n_steps / max(1, len(setup.loader))))
    try:
        with quiet_opacus():
            trained = train_local(
                setup.model, setup.loader, epochs=passes, max_steps=n_steps, optimizer=setup.optimizer, seed=seed,
                device=device, on_empty_batch=lambda: noise_only_step(setup), reduce_loss=setup.reduce_loss,
            )
        new_state = update_state(setup, plan)
    finally:
        release(setup)
    after = trainable_parameters(model)
    if not all(bool(torch.isfinite(p).all()) for p in after):
        raise RuntimeError("DP-SGD produced non-finite trainable parameters")
    if n_steps > 0 and lr > 0 and all(torch.equal(a, b) for a, b in zip(before, after)):
        raise RuntimeError(
            "DP-SGD steps left every trainable parameter unchanged: the optimizer is not updating the model's "
            "parameters (opacus#820-like stale references)"
        )
    delta = float(plan.delta)  # type: ignore[arg-type]  # set by plan_noise
    result = _result(
        trained, epsilon=new_state.epsilon(delta), delta=delta, total_steps=new_state.steps,
        sample_rate=float(plan.sample_rate or 0.0), noise_multiplier=float(plan.noise_multiplier or 0.0),
        max_grad_norm=float(dp_config.max_grad_norm),
    )
    return result, new_state


def _result(trained: TrainResult, **privacy: Any) -> DPTrainResult:
    """A :class:`DPTrainResult` from the loop's result and the round's privacy figures (the other fields)."""
    return DPTrainResult(loss=trained.loss, steps=trained.steps, num_examples=trained.num_examples,
                         seconds=trained.seconds, **privacy)
