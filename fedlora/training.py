"""The training loop of fedlora (with and without DP) and the evaluation loop.

One loop, one objective. Every step, with or without differential privacy, minimises the mean over the
batch's examples of :func:`per_example_loss`:

- seq-cls: the cross-entropy of each example, so the mean is transformers' own ``.loss`` (mean
  cross-entropy over the batch);
- causal-LM: each example's mean next-token cross-entropy over its *own* target tokens, then the mean
  over examples. transformers' ``.loss`` averages over all target tokens of the batch instead, which
  weights long sequences more and makes one example's gradient depend on the others' lengths (not
  allowed under DP-SGD). The two agree when every example of a batch has the same number of targets.

Pieces: :func:`train_step` (one optimizer step on a non-empty batch), :func:`run_steps` (the loop over a
loader: epochs, step cap, empty batches), :func:`train_local` (seeding, AdamW, timing). DP-SGD
(:func:`fedlora.privacy.run_dp_training`) runs this same loop over what opacus' ``make_private`` returns
(the model with per-sample-gradient hooks, a ``DPOptimizer``, a Poisson ``DPDataLoader``) and adds only two
hooks: ``on_empty_batch`` (a noise-only step for an empty Poisson batch) and, for ghost clipping,
``reduce_loss`` (opacus' wrapper around the same per-example losses).

Batches are mappings of keyword arguments for the model, always with ``labels``: seq-cls ``labels`` (n,),
causal-LM ``labels`` (n, T) with -100 on ignored positions (padding).

Device and precision: a model built by :func:`fedlora.experiment.build_model` carries its
:class:`~fedlora.precision.Precision` (device, autocast dtype under ``amp``, loss scaling for float16 on CUDA);
:func:`train_local` and :func:`evaluate` move batches to its device and run the forward pass under its
autocast. Without one: float32, no autocast, on the device of the model's parameters (or ``device``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.models import TASKS, Task
from fedlora.precision import Precision, precision_of

Batch = Mapping[str, Any]
#: per-example losses (n,) → the step's loss: something with ``.backward()`` and ``.detach()`` (a scalar)
LossReducer = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class TrainResult:
    """Outcome of local training.

    loss: mean of the per-step training losses (nan if no step ran); steps: training steps taken;
    num_examples: examples (sequences) processed, counting repeats over epochs; seconds: wall time.
    """

    loss: float
    steps: int
    num_examples: int
    seconds: float


# ------------------------------------------------------------------------------------------ helpers
def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, lr: float = 5e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``model`` only."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=False everywhere)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def to_device(batch: Batch, device: torch.device | str) -> dict[str, Any]:
    """A copy of ``batch`` with every tensor moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_examples(batch: Batch) -> int:
    """Examples in a batch: the first dimension of ``labels`` (else ``input_ids``); 0 for an empty batch,
    including the empty mapping an empty Poisson batch collates to. Raises ``ValueError`` for a non-empty
    mapping with neither tensor."""
    if len(batch) == 0:
        return 0
    for key in ("labels", "input_ids"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("batch has neither 'labels' nor 'input_ids' tensors")


# ------------------------------------------------------------------------------------------ objective
def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each example, shape (n,), computed in float32 (or wider).

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


def batch_losses(model: nn.Module, batch: Batch) -> torch.Tensor:
    """:func:`per_example_loss` of ``model`` on ``batch`` (n,): the model sees every key except ``labels``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return per_example_loss(model(**inputs).logits, batch["labels"])


def _mean(losses: torch.Tensor) -> torch.Tensor:
    return losses.mean()


# ------------------------------------------------------------------------------------------ the loop
def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    device: torch.device | str = "cpu",
    reduce_loss: LossReducer | None = None,
    precision: Precision | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One optimizer step on a non-empty batch; returns the step's loss.

    zero grads → loss = ``reduce_loss(batch_losses(model, batch))`` (default: the mean; the forward pass under
    ``precision``'s autocast) → backward → ``optimizer.step()`` (through ``scaler`` when given: scaled loss,
    unscaled gradients, a step skipped on overflow). Gradients are left in place after the step.
    """
    optimizer.zero_grad(set_to_none=True)
    with (precision or Precision()).autocast():
        losses = batch_losses(model, to_device(batch, device))
    loss = (reduce_loss or _mean)(losses)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return float(loss.detach())


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    max_steps: int | None = None,
    epochs: int = 1,
    device: torch.device | str = "cpu",
    on_empty_batch: Callable[[], None] | None = None,
    reduce_loss: LossReducer | None = None,
    precision: Precision | None = None,
) -> tuple[list[float], int]:
    """The training loop: :func:`train_step` on every batch of ``loader``.

    Iterates ``loader`` for up to ``epochs`` passes, stopping after ``max_steps`` steps if given.
    Does not change the model's train/eval mode. Returns ``(per-step losses, examples processed)``.

    Empty batches (Poisson sampling under DP-SGD) cannot go through a transformers model. By default
    they are skipped (no step). With ``on_empty_batch`` they count as a step: the callback runs
    instead of forward/backward (e.g. a DP engine's noise-only step, which DP accounting assumes
    happens) and the step's loss is recorded as nan. ``reduce_loss``, ``precision``: see :func:`train_step`
    (one ``GradScaler`` for the whole loop when ``precision.scale_loss``).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max-steps must be >= 0, got {max_steps}")
    losses: list[float] = []
    num_examples = 0
    scaler = precision.grad_scaler() if precision is not None else None
    for _ in range(epochs):
        for batch in loader:
            if max_steps is not None and len(losses) >= max_steps:
                return losses, num_examples
            n = batch_examples(batch)
            if n == 0:
                if on_empty_batch is not None:
                    on_empty_batch()
                    losses.append(float("nan"))
                continue
            losses.append(train_step(model, optimizer, batch, device, reduce_loss, precision, scaler))
            num_examples += n
    return losses, num_examples


def train_local(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 5e-3,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    on_empty_batch: Callable[[], None] | None = None,
    reduce_loss: LossReducer | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``loader`` (batches of keyword arguments including ``labels``).

    Uses ``optimizer`` if given (e.g. one wrapped by a DP engine), else AdamW(lr, weight_decay) over
    the ``requires_grad`` parameters. ``torch.manual_seed(seed)`` is set first so dropout is
    reproducible (loader order is the loader's own seed). The model is left in train mode.
    ``on_empty_batch``, ``reduce_loss``: see :func:`run_steps`; ``loss`` averages the non-empty steps only.
    Device and autocast: the model's :class:`~fedlora.precision.Precision` (``device`` given: that device).
    """
    torch.manual_seed(seed)
    precision = precision_of(model, device)
    model.to(precision.device)
    if optimizer is None:
        optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay)
    model.train()
    start = time.perf_counter()
    losses, num_examples = run_steps(
        model,
        optimizer,
        loader,
        max_steps=max_steps,
        epochs=epochs,
        device=precision.device,
        on_empty_batch=on_empty_batch,
        reduce_loss=reduce_loss,
        precision=precision,
    )
    seconds = time.perf_counter() - start
    finite = [x for x in losses if not math.isnan(x)]
    loss = sum(finite) / len(finite) if finite else float("nan")
    return TrainResult(loss=loss, steps=len(losses), num_examples=num_examples, seconds=seconds)
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    task: Task = "seq-cls",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` under ``torch.no_grad`` in eval mode (its previous mode is restored), on the device
    and under the autocast of its :class:`~fedlora.precision.Precision` (``device`` given: that device).

    seq-cls: ``loss`` = mean cross-entropy per example, ``accuracy`` in [0, 1].
    causal-lm: ``loss`` = mean next-token cross-entropy per target token (labels -100 ignored),
    ``perplexity`` = exp(loss), ``num_tokens``. ``num_examples`` counts sequences in both cases.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    precision = precision_of(model, device)
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    num_examples = 0
    num_tokens = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(batch, precision.device)
            labels = batch["labels"]
            if labels.shape[0] == 0:
                continue
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with precision.autocast():
                logits = model(**inputs).logits.float()
            if task == "seq-cls":
                total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(dim=-1) == labels).sum())
            else:
                # next-token prediction: logits at t predict labels at t+1
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                shift_labels = labels[:, 1:].reshape(-1)
                loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                total_loss += float(loss_sum)
                num_tokens += int((shift_labels != -100).sum())
            num_examples += int(labels.shape[0])
    finally:
        model.train(was_training)
    if task == "seq-cls":
        loss = total_loss / num_examples if num_examples else float("nan")
        accuracy = correct / num_examples if num_examples else float("nan")
        return {"loss": loss, "accuracy": accuracy, "num_examples": num_examples}
    loss = total_loss / num_tokens if num_tokens else float("nan")
    perplexity = math.exp(min(loss, 700.0)) if num_tokens else float("nan")
    return {"loss": loss, "perplexity": perplexity, "num_examples": num_examples, "num_tokens": num_tokens}
