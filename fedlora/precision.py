"""Where and in what precision a model computes: device, base dtype, mixed precision, gradient checkpointing.

One policy (peft's ``autocast_adapter_dtype``): the frozen base may be ``float32``, ``bfloat16`` or
``float16``; everything that trains or travels stays float32 (nested layers' R, P, Q, R0 and the
buffers A, B, S, the ``modules_to_save`` parameters), inputs are cast at the adapter boundary and the
adapter path computes in float32, also under autocast. Uploads and global states are therefore float32
whatever the base dtype, and the outer factors (computed before the base is cast, from the float32 weights
upcast to float64) give the same fingerprint for a bf16 node and an fp32 server.

- :func:`resolve_device`: ``"auto" | "cpu" | "cuda" | "cuda:N"`` → ``torch.device`` (ValueError naming
  ``device`` when CUDA is asked for and absent).
- :func:`check_dtype`: the base dtype on a device (float16 on the CPU is refused).
- :class:`Precision`: how a model trains and evaluates (device, autocast dtype, loss scaling), kept on the
  model (:data:`PRECISION_ATTR`) and read by :func:`fedlora.training.train_local` / ``evaluate``.
- :func:`cast_frozen_base`: the base's parameters to a dtype, the kept (adapter) modules in float32 behind
  casting hooks.
- :func:`enable_gradient_checkpointing`: transformers' non-reentrant checkpointing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "DEVICE_PATTERN", "PRECISION_ATTR", "Precision", "resolve_device", "check_dtype",
           "amp_dtype", "precision_for", "precision_of", "adapter_dtype", "cast_frozen_base",
           "enable_gradient_checkpointing", "float32_region"]

#: run-config ``dtype`` values → torch dtypes of the frozen base
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: run-config ``device`` values
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
#: attribute of a built model holding its :class:`Precision`
PRECISION_ATTR = "fedlora_precision"
_GPU_HINT = ("in a Flower simulation give each ClientApp a GPU share: flwr run . --federation-config "
             "\"client-resources-num-gpus=0.25\" (README: Device, precision and GPUs)")


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``device`` value: ``auto`` = ``cuda`` when CUDA is available, else ``cpu``.

    Raises ValueError (its message names ``device``) for a malformed value, for ``cuda``/``cuda:N`` when no
    CUDA device is visible to this process, and for ``cuda:N`` with N ≥ the visible device count."""
    if not DEVICE_PATTERN.fullmatch(str(name)):
        raise ValueError(f"device={name!r}: must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        raise ValueError(f"device={name!r}: CUDA is not available in this process (torch {torch.__version__}, "
                         f"{built}); use device='cpu' or 'auto', or {_GPU_HINT}")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) visible "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a ``dtype`` value on ``device``. ValueError (naming ``dtype``) for an unknown value,
    and for ``float16`` on the CPU (many CPU kernels have no fast or no float16 path: use ``bfloat16``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {list(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("dtype='float16' on the CPU is refused (slow or missing float16 CPU kernels): use "
                         "dtype='bfloat16' on the CPU, float16 on a CUDA device")
    return DTYPES[dtype]


def amp_dtype(device: torch.device, base: torch.dtype = torch.float32) -> torch.dtype:
    """The autocast dtype of ``amp = true``: bfloat16 on the CPU; on CUDA bfloat16 when the GPU supports it
    and the base is not float16, else float16 (then losses are scaled, :attr:`Precision.scale_loss`)."""
    if device.type == "cuda" and (base == torch.float16 or not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


@dataclass(frozen=True)
class Precision:
    """How a model trains and evaluates: on ``device``, under ``torch.autocast(autocast_dtype)`` (None: no
    autocast), with a ``GradScaler`` when ``scale_loss`` (float16 compute on CUDA)."""

    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None
    scale_loss: bool = False

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's autocast context (a no-op context without amp)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh ``GradScaler`` for one training run when losses are scaled, else None."""
        return torch.amp.GradScaler(self.device.type) if self.scale_loss else None


def precision_for(device: torch.device, dtype: torch.dtype, amp: bool) -> Precision:
    """The :class:`Precision` of a model with base ``dtype`` on ``device``, ``amp`` on or off."""
    autocast = amp_dtype(device, dtype) if amp else None
    half = torch.float16 in (autocast, dtype)
    return Precision(device=device, autocast_dtype=autocast, scale_loss=device.type == "cuda" and half)


def precision_of(model: nn.Module, device: torch.device | str | None = None) -> Precision:
    """The model's :class:`Precision` (:data:`PRECISION_ATTR`), else fp32 without autocast on the device of its
    first parameter; ``device`` given overrides the device."""
    prec = getattr(model, PRECISION_ATTR, None)
    if not isinstance(prec, Precision):
        first = next(iter(model.parameters()), None)
        prec = Precision(device=first.device if first is not None else torch.device("cpu"))
    if device is not None and torch.device(device) != prec.device:
        prec = Precision(torch.device(device), prec.autocast_dtype, prec.scale_loss)
    return prec


def adapter_dtype(base: torch.dtype) -> torch.dtype:
    """The dtype of adapter tensors on a base of dtype ``base``: float32, or float64 on a float64 base."""
    return torch.promote_types(base, torch.float32)


# ---------------------------------------------------------------------------------------- casting
def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    return value


def _keep_float32(module: nn.Module, base: torch.dtype) -> None:
    """Hooks that run ``module`` (float32 parameters) inside a ``base``-dtype model: floating inputs cast to
    float32, floating outputs cast back to ``base`` (under autocast the module computes as autocast says,
    from its float32 parameters: the usual mixed precision)."""

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _cast_floats(args, torch.float32), {k: _cast_floats(v, torch.float32) for k, v in kwargs.items()}

    def post(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> Any:
        return _cast_floats(out, base)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post)


def cast_frozen_base(model: nn.Module, dtype: torch.dtype, keep: Iterable[nn.Module] = (),
                     keep_parameters: Iterable[nn.Parameter] = ()) -> nn.Module:
    """Cast every floating parameter of ``model`` to ``dtype`` in place, except ``keep_parameters`` and the
    parameters of the ``keep`` modules (which also get float32 boundary hooks). Buffers are left as they are
    (rotary frequencies, position ids; nested layers' A, B, S, R0 are float32 already), as are the modules
    transformers keeps in float32 (``_keep_in_fp32_modules``). A no-op for ``dtype`` float32. Returns ``model``."""
    if dtype == torch.float32:
        return model
    keep = list(keep)
    kept = {id(p) for m in keep for p in m.parameters()} | {id(p) for p in keep_parameters}
    fp32_names = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():
        if id(p) in kept or not p.is_floating_point() or any(n in name.split(".") for n in fp32_names):
            continue
        p.data = p.data.to(dtype)
    for module in keep:
        _keep_float32(module, dtype)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' gradient (activation) checkpointing of every block, non-reentrant
    (``use_reentrant=False``: the frozen embeddings' outputs need no ``requires_grad`` for the adapters inside
    a checkpointed block to get gradients). ValueError naming ``gradient-checkpointing`` when the model does
    not support it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient-checkpointing=true: {type(inner).__name__} does not support gradient "
                         "checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def float32_region(x: torch.Tensor) -> Iterator[None]:
    """Autocast off for the block when it is on for ``x``'s device (the adapter path computes in float32)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(device_type=x.device.type, enabled=False):
            yield
    else:
        yield
