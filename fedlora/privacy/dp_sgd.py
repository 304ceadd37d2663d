"""Sample-level DP-SGD with opacus on the trainable inner parts of nested adapters (or a peft LoRA model).

What runs (all opacus, nothing re-implemented):

- ``PrivacyEngine(accountant=state.mechanism, secure_mode=False)`` whose accountant is restored from the
  client's :class:`~fedlora.privacy.accounting.AccountantState` (kept across rounds);
- opacus ``DPDataLoader``: Poisson sampling at q = B/N (every example joins every batch independently);
  empty batches are *not* skipped: they take a noise-only step and are accounted, as the analysis assumes;
- per-sample gradients from opacus' hooks (``grad_sample_mode="hooks"``) or per-sample gradient norms
  from ghost clipping (``"ghost"``, ``GradSampleHooksFastGradientClipping`` + ``DPLossFastGradientClipping``);
- ``DPOptimizer``: flat clipping at C over all trainable parameters, Gaussian noise std σ·C on the sum,
  division by the expected batch size q·N; the accountant steps once per optimizer step at (σ, q).

Per-sample gradients of nested layers come from opacus' registered ``nn.Linear`` grad sampler applied to
the r-dimensional projected activations (the trainable ``R`` / ``P`` / ``Q`` are ``nn.Linear``; the frozen
base, A, B, S, R0 have no trainable parameter, so no hook touches them): per-sample gradient (n, rᵢ, rᵢ)
from activations (n, T, rᵢ) and backprops (n, T, rᵢ). :func:`check_grad_samplers` enforces that no module
falls back to functorch.

The loss is recomputed from the logits per example (HF models' internal causal-LM loss averages tokens
over the whole batch, which makes one example's gradient depend on the others' lengths):
seq-cls ``CE(logits_i, y_i)``; causal-LM mean next-token CE over example i's non-ignored tokens.
Ghost clipping uses the same per-example losses through opacus' ``DPLossFastGradientClipping``.

Randomness: ``dp_seed`` seeds Poisson sampling and the noise. Leave it ``None`` (fresh OS entropy) in real
runs: a sampling or noise seed known to anyone else (e.g. sent by the server) voids the guarantee.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from torch import nn
from torch.utils.data import DataLoader

from fedlora.privacy.accounting import (
    AccountantState,
    calibrate_noise,
    local_steps,
    poisson_sample_rate,
)
from fedlora.privacy.accounting import (
    total_steps as _total_steps,
)
from fedlora.privacy.config import DPConfig
from fedlora.privacy.metrics import dp_metrics

_QUIET = (
    "Secure RNG turned off",
    "Full backward hook is firing when gradients are computed with respect to module outputs",
    "Using a non-full backward hook",
)


@contextmanager
def _quiet() -> Any:
    """Silence opacus' secure-RNG notice and torch's full-backward-hook notice (both expected here)."""
    with warnings.catch_warnings():
        for msg in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{msg}.*")
        yield


# ----------------------------------------------------------------------------------- checks
def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def check_trainable_scope(model: nn.Module) -> None:
    """For a nested-adapter model: every trainable parameter must be an inner part (``R``, ``P``, ``Q``) or
    belong to a ``modules_to_save`` module. Raises ``ValueError`` naming the first offending parameter.
    Models without nested adapters (e.g. peft LoRA) are not checked here."""
    from fedlora.nested.model import CONFIG_ATTR, nested_layers, saved_modules

    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        return
    allowed: set[int] = set()
    for layer in nested_layers(model).values():
        for name in ("R", "P", "Q"):
            if name in layer._modules:
                allowed.update(id(p) for p in layer._modules[name].parameters())
    for module in saved_modules(model, cfg.modules_to_save).values():
        allowed.update(id(p) for p in module.parameters())
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in allowed:
            raise ValueError(
                f"parameter {name} requires grad but is neither a nested inner part (R/P/Q) nor in "
                f"modules_to_save: DP-SGD trains the inner parameters only"
            )


def check_grad_samplers(model: nn.Module, grad_sample_mode: str = "hooks") -> dict[str, str]:
    """Every module with its own trainable parameters must have an opacus grad sampler registered for its
    exact type (``GradSampleModule.GRAD_SAMPLERS``; ghost mode prefers ``NORM_SAMPLERS``), and no module may
    carry opacus' functorch fallback (``ft_compute_sample_grad``). Returns ``{module name: sampler}``;
    raises ``ValueError`` naming the first module that would fall back to functorch."""
    samplers = GradSampleHooks.GRAD_SAMPLERS
    norm_samplers = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    report: dict[str, str] = {}
    for name, module in trainable_modules(model):
        kind = type(module)
        if grad_sample_mode == "ghost" and kind in norm_samplers:
            report[name] = norm_samplers[kind].__name__
        elif kind in samplers:
            report[name] = samplers[kind].__name__
        else:
            raise ValueError(
                f"module {name or '<root>'} ({kind.__name__}) has trainable parameters but no registered opacus "
                f"grad sampler: opacus would fall back to functorch over the whole module. Make trainable parts "
                f"nn.Linear modules"
            )
    for name, module in model.named_modules():
        if hasattr(module, "ft_compute_sample_grad"):
            raise ValueError(f"module {name or '<root>'} uses opacus' functorch per-sample-gradient fallback")
    return report


# ----------------------------------------------------------------------------------- losses
def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each example, shape (n,).

    - seq-cls: logits (n, C), labels (n,) long → cross-entropy; C = 1 with float labels → squared error.
    - causal-LM: logits (n, T, V), labels (n, T) with -100 ignored → mean next-token CE over example i's
      valid targets (logits at t predict labels at t+1); an example without valid targets has loss 0.
    """
    if logits.dim() == 2 and labels.dim() == 1:
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return (logits.squeeze(-1).float() - labels.float()) ** 2
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() == 3 and labels.dim() == 2:
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        n, t, v = shift_logits.shape
        tok = F.cross_entropy(
            shift_logits.reshape(-1, v), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
        )
        valid = (shift_labels != -100).sum(dim=1).clamp(min=1)
        return tok.view(n, t).sum(dim=1) / valid
    raise ValueError(f"cannot infer the task from logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")


def _batch_size(batch: Mapping[str, Any]) -> int:
    """Examples in a batch; 0 for the empty mapping an empty Poisson batch collates to."""
    if len(batch) == 0:
        return 0
    for key in ("labels", "input_ids"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("batch has neither 'labels' nor 'input_ids' tensors")


class _EmptySafeCollate:
    """Collate that maps an empty Poisson batch to ``{}`` and defers to ``collate_fn`` otherwise.

    opacus' ``CollateFnWithEmpty`` cannot build an empty batch of a dict-per-example dataset before it has
    seen a non-empty one (it then fails with a TypeError); :func:`dp_step` treats ``{}`` as a noise-only
    step. Picklable (DataLoader workers)."""

    def __init__(self, collate_fn: Any) -> None:
        self.collate_fn = collate_fn if collate_fn is not None else torch.utils.data.default_collate

    def __call__(self, items: list[Any]) -> Any:
        return {} if len(items) == 0 else self.collate_fn(items)


# ----------------------------------------------------------------------------------- make_private
class PrivateSetup(NamedTuple):
    """What :func:`make_private` returns; unpack the first three like opacus:
    ``model, optimizer, loader, *_ = make_private(...)``.

    model: the same model object, with opacus hooks attached (not wrapped).
    optimizer: opacus ``DPOptimizer`` (``DPOptimizerFastGradientClipping`` in ghost mode).
    loader: opacus ``DPDataLoader`` (Poisson sampling at ``sample_rate``; iterate it repeatedly).
    criterion: ``DPLossFastGradientClipping`` in ghost mode, else None.
    engine: the ``PrivacyEngine`` whose accountant continues the restored history.
    hooks: opacus hooks object (``cleanup()`` via :func:`release`).
    sample_rate, noise_multiplier, max_grad_norm, grad_sample_mode: what the step hook accounts.
    """

    model: nn.Module
    optimizer: DPOptimizer
    loader: DataLoader
    criterion: Any
    engine: PrivacyEngine
    hooks: GradSampleHooks
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str


def _generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # non-deterministic (OS entropy)
    else:
        g.manual_seed(int(seed))
    return g


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant_state: AccountantState,
    grad_sample_mode: str = "hooks",
    seed: int | None = None,
    sample_rate: float | None = None,
) -> PrivateSetup:
    """Make ``model``/``optimizer``/``loader`` differentially private with opacus.

    Args:
        model: a model whose only trainable parameters are inner parts / ``modules_to_save`` (nested) or
            peft LoRA parameters; it stays the same object (opacus hooks are attached, not wrapped).
        optimizer: an optimizer over exactly the model's trainable parameters (checked: a stale or partial
            parameter set is the opacus#820 failure mode).
        loader: a map-style ``DataLoader`` with ``batch_size`` B; its dataset and ``collate_fn`` are reused by
            a ``DPDataLoader`` at q = B/N (or ``sample_rate``).
        noise_multiplier: σ ≥ 0. max_grad_norm: C > 0.
        accountant_state: the client's state; the engine's opacus accountant is restored from it.
        grad_sample_mode: ``"hooks"`` or ``"ghost"``.
        seed: seeds Poisson sampling and noise; ``None`` = OS entropy (use None in real runs).
        sample_rate: override q (default B/N).

    Raises ``ValueError`` on a parameter scope violation or a module without a registered grad sampler.
    """
    if grad_sample_mode not in ("hooks", "ghost"):
        raise ValueError(f"grad_sample_mode={grad_sample_mode!r}: must be 'hooks' or 'ghost'")
    if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be > 0")
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r}: must be a finite number >= 0")
    check_trainable_scope(model)
    trainable = trainable_parameters(model)
    if not trainable:
        raise ValueError("model has no trainable parameters")
    opt_params = [p for group in optimizer.param_groups for p in group["params"]]
    if {id(p) for p in opt_params} != {id(p) for p in trainable}:
        raise ValueError(
            "optimizer parameters differ from the model's trainable parameters (stale references after a "
            "device move or re-wrap, opacus#820): build the optimizer after the model is final"
        )
    check_grad_samplers(model, grad_sample_mode)

    dataset = loader.dataset
    n = len(dataset)  # type: ignore[arg-type]
    if sample_rate is None:
        if loader.batch_size is None:
            raise ValueError("loader has no batch_size: pass sample_rate")
        sample_rate = poisson_sample_rate(n, int(loader.batch_size))
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r}: must lie in (0, 1]")
    device = trainable[0].device
    dp_loader = DPDataLoader(
        dataset,
        sample_rate=sample_rate,
        collate_fn=loader.collate_fn,
        generator=_generator(seed),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
    dp_loader.collate_fn = _EmptySafeCollate(loader.collate_fn)
    with _quiet():
        engine = PrivacyEngine(accountant=accountant_state.mechanism, secure_mode=False)
        engine.accountant.load_state_dict(accountant_state.to_opacus())
        out = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=dp_loader,
            criterion=nn.CrossEntropyLoss(ignore_index=-100),
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            poisson_sampling=False,  # dp_loader already samples at exactly q
            grad_sample_mode=grad_sample_mode,
            wrap_model=False,
            noise_generator=_generator(None if seed is None else seed + 1, device),
        )
    if grad_sample_mode == "ghost":
        hooks, dp_optimizer, criterion, _ = out
    else:
        hooks, dp_optimizer, _ = out
        criterion = None
    hooks.forbid_grad_accumulation()
    # opacus derives q from len(loader) (1/int(1/q)); account at the exact Poisson rate and average by the
    # exact expected batch size q·N instead.
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    dp_optimizer.expected_batch_size = sample_rate * n
    check_grad_samplers(model, grad_sample_mode)  # no functorch fallback was prepared
    return PrivateSetup(
        model, dp_optimizer, dp_loader, criterion, engine, hooks,
        float(sample_rate), float(noise_multiplier), float(max_grad_norm), grad_sample_mode,
    )


def dp_step(setup: PrivateSetup, batch: Mapping[str, Any], device: torch.device | str | None = None) -> float:
    """One DP-SGD step on a Poisson batch (possibly empty: noise-only step). Returns the batch's mean
    per-example loss (nan for an empty batch). The accountant steps once."""
    model, optimizer = setup.model, setup.optimizer
    optimizer.zero_grad(set_to_none=True)
    if _batch_size(batch) == 0:
        # Same as opacus on an empty batch: zero clipped sum, noise std σ·C, accounted step.
        for p in optimizer.params:
            if setup.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    if device is None:
        device = optimizer.params[0].device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with _quiet():
        logits = model(**inputs).logits
        if setup.criterion is not None:  # ghost clipping: opacus' DP loss does both backward passes
            if logits.dim() == 3:
                shift_logits = logits[:, :-1].float()
                shift_labels = labels[:, 1:]
                v = shift_logits.shape[-1]
                loss = setup.criterion(
                    shift_logits.reshape(-1, v), shift_labels.reshape(-1), shape=tuple(shift_labels.shape)
                )
            else:
                loss = setup.criterion(logits.float(), labels)
            value = float(loss.detach())
            loss.backward()
        else:
            loss = per_example_loss(logits, labels).mean()
            value = float(loss.detach())
            loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def update_state(setup: PrivateSetup, previous: AccountantState) -> AccountantState:
    """The client's new accountant state: ``previous`` (plan kept) with the engine accountant's history,
    i.e. the restored history plus every step taken since :func:`make_private`."""
    return previous.with_history(setup.engine.accountant)


def release(setup: PrivateSetup) -> None:
    """Remove opacus hooks and per-parameter attributes; the model is a plain model again."""
    setup.hooks.cleanup()
    for p in setup.model.parameters():
        for attr in ("summed_grad", "grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None


# ----------------------------------------------------------------------------------- one-call API
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

    With DP disabled (``not dp_config.enabled``) this trains without DP (shuffled loader order) and reports
    ``dp-epsilon = inf``, σ = 0.
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
    if not dp_config.enabled:
        return _train_without_dp(model, loader, n_steps, lr, weight_decay, seed), state

    plan = plan_noise(dp_config, state, num_examples=n, batch_size=batch_size, steps_per_round=n_steps,
                      num_rounds=num_rounds)
    plan.check_budget(n_steps)  # BudgetExhausted before any change to the model

    from fedlora.training import make_optimizer

    torch.manual_seed(seed)
    model.train()
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay)
    before = [p.detach().clone() for p in trainable_parameters(model)]
    setup = make_private(
        model, optimizer, loader, noise_multiplier=plan.noise_multiplier or 0.0,
        max_grad_norm=dp_config.max_grad_norm, accountant_state=plan,
        grad_sample_mode=dp_config.grad_sample_mode, seed=dp_seed, sample_rate=plan.sample_rate,
    )
    start = time.perf_counter()
    losses: list[float] = []
    num_examples = 0
    done = 0
    try:
        while done < n_steps:
            for batch in setup.loader:
                if done >= n_steps:
                    break
                value = dp_step(setup, batch)
                done += 1
                size = _batch_size(batch)
                num_examples += size
                if size:
                    losses.append(value)
        new_state = update_state(setup, plan)
    finally:
        release(setup)
    seconds = time.perf_counter() - start
    after = trainable_parameters(model)
    if not all(bool(torch.isfinite(p).all()) for p in after):
        raise RuntimeError("DP-SGD produced non-finite trainable parameters")
    if n_steps > 0 and lr > 0 and all(torch.equal(a, b) for a, b in zip(before, after)):
        raise RuntimeError(
            "DP-SGD steps left every trainable parameter unchanged: the optimizer is not updating the model's "
            "parameters (opacus#820-like stale references)"
        )
    delta = float(plan.delta)  # type: ignore[arg-type]  # set by plan_noise
    result = DPTrainResult(
        loss=sum(losses) / len(losses) if losses else float("nan"), steps=done, num_examples=num_examples,
        seconds=seconds, epsilon=new_state.epsilon(delta), delta=delta, total_steps=new_state.steps,
        sample_rate=float(plan.sample_rate or 0.0), noise_multiplier=float(plan.noise_multiplier or 0.0),
        max_grad_norm=float(dp_config.max_grad_norm),
    )
    return result, new_state


def _train_without_dp(
    model: nn.Module, loader: Iterable[Mapping[str, Any]], n_steps: int, lr: float, weight_decay: float, seed: int
) -> DPTrainResult:
    from fedlora.training import make_optimizer

    torch.manual_seed(seed)
    model.train()
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay)
    device = trainable_parameters(model)[0].device
    start = time.perf_counter()
    losses: list[float] = []
    num_examples = 0
    while len(losses) < n_steps:
        before = len(losses)
        for batch in loader:
            if len(losses) >= n_steps:
                break
            if _batch_size(batch) == 0:
                continue
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss = per_example_loss(model(**inputs).logits, batch["labels"]).mean()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            num_examples += _batch_size(batch)
        if len(losses) == before:
            break  # empty loader
    return DPTrainResult(
        loss=sum(losses) / len(losses) if losses else float("nan"), steps=len(losses), num_examples=num_examples,
        seconds=time.perf_counter() - start, epsilon=math.inf, delta=0.0, total_steps=0, sample_rate=0.0,
        noise_multiplier=0.0, max_grad_norm=0.0,
    )
