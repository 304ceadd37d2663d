"""Local training and evaluation loops for any transformers model that returns ``.loss``.

The loop itself is ``run_steps(model, optimizer, loader, ...)``: a privacy engine (e.g. Opacus) can
wrap the model, optimizer and loader first and hand them in unchanged. ``train_local`` adds the
optimizer construction (AdamW over ``requires_grad`` parameters), seeding and timing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Task = Literal["seq-cls", "causal-lm"]


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


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, lr: float = 5e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``model`` only."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=False everywhere)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("labels", "input_ids"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Mapping[str, Any]],
    max_steps: int | None = None,
    epochs: int = 1,
    device: torch.device | str = "cpu",
    on_empty_batch: Callable[[], None] | None = None,
) -> tuple[list[float], int]:
    """The bare training loop: ``model(**batch).loss`` → backward → ``optimizer.step()``.

    Iterates ``loader`` for up to ``epochs`` passes, stopping after ``max_steps`` steps if given.
    Does not change the model's train/eval mode. Returns ``(per-step losses, examples processed)``.

    Empty batches (Poisson sampling under DP-SGD) cannot go through a transformers model. By default
    they are skipped (no step). With ``on_empty_batch`` they count as a step: the callback runs
    instead of forward/backward (e.g. a DP engine's noise-only step, which DP accounting assumes
    happens) and the step's loss is recorded as nan.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max-steps must be >= 0, got {max_steps}")
    losses: list[float] = []
    num_examples = 0
    for _ in range(epochs):
        for batch in loader:
            if max_steps is not None and len(losses) >= max_steps:
                return losses, num_examples
            n = _batch_size(batch)
            if n == 0:
                if on_empty_batch is not None:
                    on_empty_batch()
                    losses.append(float("nan"))
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = model(**_to_device(batch, device)).loss
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            num_examples += n
    return losses, num_examples


def train_local(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 5e-3,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_empty_batch: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``loader`` (batches of keyword arguments including ``labels``).

    Uses ``optimizer`` if given (e.g. one wrapped by a DP engine), else AdamW(lr, weight_decay) over
    the ``requires_grad`` parameters. ``torch.manual_seed(seed)`` is set first so dropout is
    reproducible (loader order is the loader's own seed). The model is left in train mode.
    ``on_empty_batch``: see ``run_steps``; ``loss`` averages the non-empty steps only.
    """
    torch.manual_seed(seed)
    model.to(device)
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
        device=device,
        on_empty_batch=on_empty_batch,
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
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` under ``torch.no_grad`` in eval mode (its previous mode is restored).

    seq-cls: ``loss`` = mean cross-entropy per example, ``accuracy`` in [0, 1].
    causal-lm: ``loss`` = mean next-token cross-entropy per target token (labels -100 ignored),
    ``perplexity`` = exp(loss), ``num_tokens``. ``num_examples`` counts sequences in both cases.
    """
    if task not in ("seq-cls", "causal-lm"):
        raise ValueError(f"task must be one of ['seq-cls', 'causal-lm'], got {task!r}")
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
            batch = _to_device(batch, device)
            labels = batch["labels"]
            if labels.shape[0] == 0:
                continue
            inputs = {k: v for k, v in batch.items() if k != "labels"}
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
