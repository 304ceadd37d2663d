"""The privacy engine: opacus' ``make_private`` around a model, its optimizer and its loader, and one DP step.

What runs (all opacus, nothing re-implemented):

- ``PrivacyEngine(accountant=state.mechanism, secure_mode=False)`` whose accountant is restored from the
  client's :class:`~fedlora.privacy.accounting.AccountantState` (kept across rounds);
- opacus ``DPDataLoader``: Poisson sampling at q = B/N (every example joins every batch independently);
  empty batches are *not* skipped: they take a noise-only step and are accounted, as the analysis assumes;
- per-sample gradients from opacus' hooks (``grad_sample_mode="hooks"``) or per-sample gradient norms
  from ghost clipping (``"ghost"``, ``GradSampleHooksFastGradientClipping`` + opacus'
  ``DPTensorFastGradientClipping`` around the per-example losses);
- ``DPOptimizer``: flat clipping at C over all trainable parameters, Gaussian noise std σ·C on the sum,
  division by the expected batch size q·N; the accountant steps once per optimizer step at (σ, q).

The loss is :func:`fedlora.training.per_example_loss`, the objective of the non-DP loop too: one example's
gradient never depends on the other examples of its batch (transformers' causal-LM ``.loss`` would couple
them through the batch's token count). :func:`dp_step` is :func:`fedlora.training.train_step` on the
private model / optimizer; :func:`fedlora.privacy.run_dp_training` runs the whole non-DP loop on them.

Randomness: ``seed`` seeds Poisson sampling and the noise. Leave it ``None`` (fresh OS entropy) in real
runs: a sampling or noise seed known to anyone else (e.g. sent by the server) voids the guarantee.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from fedlora.privacy.accounting import AccountantState, poisson_sample_rate
from fedlora.privacy.checks import check_grad_samplers, check_trainable_scope
from fedlora.tensors import seeded_generator
from fedlora.training import batch_examples, train_step, trainable_parameters

_QUIET = (
    "Secure RNG turned off",
    "Full backward hook is firing when gradients are computed with respect to module outputs",
    "Using a non-full backward hook",
)


@contextmanager
def quiet_opacus() -> Iterator[None]:
    """Silence opacus' secure-RNG notice and torch's full-backward-hook notice (both expected here)."""
    with warnings.catch_warnings():
        for msg in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{msg}.*")
        yield


class _EmptySafeCollate:
    """Collate that maps an empty Poisson batch to ``{}`` and defers to ``collate_fn`` otherwise.

    opacus' ``CollateFnWithEmpty`` cannot build an empty batch of a dict-per-example dataset before it has
    seen a non-empty one (it then fails with a TypeError); the training loop treats ``{}`` as an empty
    batch (:func:`noise_only_step`). Picklable (DataLoader workers)."""

    def __init__(self, collate_fn: Any) -> None:
        self.collate_fn = collate_fn if collate_fn is not None else torch.utils.data.default_collate

    def __call__(self, items: list[Any]) -> Any:
        return {} if len(items) == 0 else self.collate_fn(items)


class PrivateSetup(NamedTuple):
    """What :func:`make_private` returns; unpack the first three like opacus:
    ``model, optimizer, loader, *_ = make_private(...)``.

    model: the same model object, with opacus hooks attached (not wrapped).
    optimizer: opacus ``DPOptimizer`` (``DPOptimizerFastGradientClipping`` in ghost mode).
    loader: opacus ``DPDataLoader`` (Poisson sampling at ``sample_rate``; iterate it repeatedly).
    criterion: ``DPLossFastGradientClipping`` in ghost mode, else None (the training loop does not need it:
        :meth:`reduce_loss` wraps the per-example losses directly).
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

    def reduce_loss(self, losses: torch.Tensor) -> Any:
        """The step's loss from the per-example losses (n,): their mean (hooks mode), or opacus'
        ``DPTensorFastGradientClipping`` over them (ghost mode: its ``backward()`` takes the per-sample
        gradient norms, then back-propagates the clipped losses; ``detach()`` is their mean)."""
        if self.grad_sample_mode == "ghost":
            return DPTensorFastGradientClipping(self.hooks, self.optimizer, losses, "mean")
        return losses.mean()


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
        generator=seeded_generator(seed),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
    dp_loader.collate_fn = _EmptySafeCollate(loader.collate_fn)
    with quiet_opacus():
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
            noise_generator=seeded_generator(None if seed is None else seed + 1, device),
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


def noise_only_step(setup: PrivateSetup) -> None:
    """The DP step of an empty Poisson batch, as opacus takes it: zero clipped sum, Gaussian noise of std
    σ·C, an optimizer step and one accounted step."""
    optimizer = setup.optimizer
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        if setup.grad_sample_mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dp_step(setup: PrivateSetup, batch: Mapping[str, Any], device: torch.device | str | None = None) -> float:
    """One DP-SGD step on a Poisson batch (possibly empty: :func:`noise_only_step`). Returns the batch's mean
    per-example loss (nan for an empty batch). The accountant steps once."""
    if batch_examples(batch) == 0:
        noise_only_step(setup)
        return float("nan")
    if device is None:
        device = setup.optimizer.params[0].device
    with quiet_opacus():
        value = train_step(setup.model, setup.optimizer, batch, device, setup.reduce_loss)
    setup.optimizer.zero_grad(set_to_none=True)
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
