"""What DP-SGD refuses before it starts: trainable parameters outside the inner parts, and modules whose
per-sample gradients opacus would compute with its functorch fallback.

Nested layers keep their trainable parts as ``nn.Linear`` modules on the r-dimensional projected
activations (``R`` rᵢ×rᵢ, or ``P`` rᵢ×q and ``Q`` q×rᵢ); the frozen base weight and the buffers A, B, S,
R0 carry no trainable parameter. So every trainable module has opacus' registered ``nn.Linear`` grad
sampler: per-sample gradients (n, rᵢ, rᵢ) from activations (n, T, rᵢ) and backprops (n, T, rᵢ).
"""

from __future__ import annotations

from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.utils.module_utils import trainable_modules
from torch import nn

from fedlora.nested.model import CONFIG_ATTR, nested_layers, saved_modules


def check_trainable_scope(model: nn.Module) -> None:
    """For a nested-adapter model: every trainable parameter must be an inner part (``R``, ``P``, ``Q``) or
    belong to a ``modules_to_save`` module. Raises ``ValueError`` naming the first offending parameter.
    Models without nested adapters (e.g. peft LoRA) are not checked here."""
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
