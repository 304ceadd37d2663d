"""Flower Message-API strategies of fedlora, one per file (see ``docs/architecture.md``).

=============  ====================  ==============================================================
name           class                 rule
=============  ====================  ==============================================================
``fedsb``      :class:`FedSB`        R0 ← R0 + Σ pᵢRᵢ (r×r uploads), exact
``flora``      :class:`FLoRA`        R0 ← R0 + Σ pᵢ pad(PᵢQᵢ) by stacking (nested), exact
``hetero``     :class:`HeteroRank`   R0 ← R0 + Σ pᵢ pad(Rᵢ) (rᵢ×rᵢ uploads), exact
``fedit``      :class:`FedIT`        peft LoRA: mean A, mean B (inexact baseline)
``ffa``        :class:`FFALoRA`      peft LoRA: frozen shared A, mean B, exact
``flora-lora`` :class:`FLoRALoRA`    peft LoRA: stacked factors merged into a global delta, exact
``flexlora``   :class:`FlexLoRA`     peft LoRA: dense Σ pᵢΔWᵢ, per-node SVD truncation
=============  ====================  ==============================================================

:class:`UserLevelDP` wraps fedsb, hetero or flora with user-level differential privacy. Module map:
``base`` (:class:`NestedStrategyBase`), ``nested_base`` / ``lora_base`` (the two families),
``options`` (:class:`StrategyOptions`), ``wire`` (message formats, conversions, byte accounting),
``screening`` (reply checks), ``client_metrics`` (round metrics from client replies),
``persistence`` (checkpoints on disk), ``inprocess_grid`` (a Grid answering in-process).
"""

from __future__ import annotations

from typing import Any

from fedlora.ranks import RankAssigner
from strategies.base import NestedStrategyBase
from strategies.client_metrics import TrainMetricsFn, default_train_metrics
from strategies.fedit import FedIT
from strategies.fedsb import FedSB
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.flora_lora import FLoRALoRA
from strategies.hetero import HeteroRank
from strategies.options import StrategyOptions
from strategies.persistence import load_strategy_state, save_strategy_state
from strategies.user_level_dp import UserLevelDP
from strategies.wire import META_KEY, METRICS_KEY

STRATEGIES: dict[str, type[NestedStrategyBase]] = {
    "fedsb": FedSB,
    "flora": FLoRA,
    "hetero": HeteroRank,
    "fedit": FedIT,
    "ffa": FFALoRA,
    "flora-lora": FLoRALoRA,
    "flexlora": FlexLoRA,
}


def build_strategy(name: str, **kwargs: Any) -> NestedStrategyBase:
    """Instantiate the strategy registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: ``strategy=<name>`` is not one of :data:`STRATEGIES` (the message lists them), or
            a constructor argument is invalid (the message names it).
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"strategy={name!r}: must be one of {sorted(STRATEGIES)}")
    return cls(**kwargs)


__all__ = [
    "FFALoRA",
    "FLoRA",
    "FLoRALoRA",
    "FedIT",
    "FedSB",
    "FlexLoRA",
    "HeteroRank",
    "META_KEY",
    "METRICS_KEY",
    "NestedStrategyBase",
    "RankAssigner",
    "STRATEGIES",
    "StrategyOptions",
    "TrainMetricsFn",
    "UserLevelDP",
    "build_strategy",
    "default_train_metrics",
    "load_strategy_state",
    "save_strategy_state",
]
