"""What the accuracy grid compares: one :class:`Method` per label, its learning-rate family, and the
settings every cell shares.

A method is a strategy plus the run-config keys that make it that method (weighting, rank, client ranks).
Methods of one *family* share one learning rate, chosen by :mod:`bench.tuning` on a validation split held
out from the training pool (never the test set) and stored in ``bench/tuned_lr.json``; the grid
(:mod:`bench.accuracy`) reads it and refuses to run a method whose family has no tuned rate.

Families (fixed before the grid ran; docs/results.md says why):

- ``nested-avg``: the nested adapters: fedsb (exact r×r averaging, both weightings, every rank), hetero
  (client ranks 16/8/4, top-left blocks) and flora (stacking of nested ``nora`` pairs); tuned on ``fedsb``.
  flora has no sweep of its own: on this 2-core machine the budget of issue 15 allowed three families, and
  the two FedIT-side families differ more (FFA-LoRA trains only B);
- ``lora``: peft LoRA with both factors trained: fedit and flexlora; tuned on ``fedit``;
- ``lora-ffa``: peft LoRA with A frozen (FFA-LoRA), whose B alone must carry the update; tuned on ``ffa``.

``lora-alpha`` is left at its default (scaling 1): with AdamW a LoRA scaling and the learning rate act
together on the size of an update, so one sweep over the learning rate covers both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: the tuned learning rates (written by ``python -m bench.tuning``, committed)
TUNED_LR = HERE / "tuned_lr.json"
CLIENTS = 10
HETERO_RANKS = "16,8,4"


@dataclass(frozen=True)
class Family:
    """Methods that share one learning rate: the run-config key it sets, the sweep, the method tuned."""

    lr_key: str
    grid: tuple[float, ...]
    tuned_on: str


FAMILIES: dict[str, Family] = {
    "nested-avg": Family("lr", (1e-2, 2e-2, 5e-2), "fedsb"),
    "lora": Family("lora-lr", (3e-4, 1e-3, 3e-3), "fedit"),
    "lora-ffa": Family("lora-lr", (1e-3, 3e-3, 1e-2), "ffa"),
}


@dataclass(frozen=True)
class Method:
    """A grid row: ``strategy`` with ``overrides``; ``central`` methods run on one node holding the whole
    training pool with the same total steps per round as a federated round (the upper bounds)."""

    label: str
    strategy: str
    family: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    central: bool = False

    def rank(self) -> int:
        return int(self.overrides.get("rank", 16))


METHODS: dict[str, Method] = {m.label: m for m in (
    Method("fedsb", "fedsb", "nested-avg", {"weighting": "num-examples"}),
    Method("fedsb-uniform", "fedsb", "nested-avg", {"weighting": "uniform"}),
    Method("fedsb-r64", "fedsb", "nested-avg", {"weighting": "num-examples", "rank": 64}),
    Method("fedsb-r128", "fedsb", "nested-avg", {"weighting": "num-examples", "rank": 128}),
    Method("flora", "flora", "nested-avg"),
    Method("hetero", "hetero", "nested-avg", {"ranks": HETERO_RANKS}),
    Method("fedit", "fedit", "lora"),
    Method("ffa", "ffa", "lora-ffa"),
    Method("flexlora", "flexlora", "lora", {"ranks": HETERO_RANKS}),
    Method("central-nested", "fedsb", "nested-avg", central=True),
    Method("central-lora", "fedit", "lora", central=True),
)}
#: the default grid of bench.accuracy, in the order its cells run (the published orderings first); fedsb-r128
#: only on request
DEFAULT_METHODS = ("central-nested", "central-lora", "fedsb", "fedit", "flora", "ffa", "hetero", "fedsb-r64",
                   "flexlora", "fedsb-uniform")


@dataclass(frozen=True)
class Setting:
    """What every cell of a grid shares (the cost knobs of issue 15's grid)."""

    dataset: str = "rotten_tomatoes"
    rounds: int = 15
    local_steps: int = 10
    fraction: float = 1.0
    max_length: int = 32
    eval_examples: int = 500  # per round; the last round evaluates the whole split (final-full-test)
    dtype: str = "bfloat16"
    amp: bool = True

    def overrides(self) -> dict[str, Any]:
        return {"model": "minilm", "dataset": self.dataset, "num-server-rounds": self.rounds,
                "local-steps": self.local_steps, "batch-size": 16, "max-length": self.max_length,
                "max-test-examples": self.eval_examples, "final-full-test": True, "dtype": self.dtype,
                "amp": self.amp, "checkpoint": False, "export-adapter": False}

    def describe(self) -> str:
        return (f"MiniLM, {self.dataset}, {CLIENTS} clients, {self.rounds} rounds, fraction-train {self.fraction}, "
                f"{self.local_steps} local AdamW steps of batch 16, max-length {self.max_length}, base {self.dtype}"
                f"{' + autocast' if self.amp else ''}, {self.eval_examples} evaluation examples per round and the "
                "whole split after the last round")


#: the DP grid's methods (issue 15: under sample-level DP-SGD, fedsb vs FFA-LoRA vs FedIT)
DP_METHODS = ("fedsb", "ffa", "fedit")
#: tuned_lr.json key suffix of a family tuned under DP-SGD (learning rate and dp-clip)
DP_SUFFIX = "@dp"


def cell_overrides(method: Method, setting: Setting, seed: int, alpha: float | None, lr: float,
                   dp: tuple[float, float] | None = None) -> dict[str, Any]:
    """The run config of one cell (without ``results-dir``/``run-name``); ``dp = (ε, clip)`` adds sample-level
    DP-SGD with σ calibrated to ``dp-epsilon`` = ε."""
    family = FAMILIES[method.family]
    ov: dict[str, Any] = {**setting.overrides(), "strategy": method.strategy, "seed": seed, family.lr_key: lr,
                          **method.overrides}
    if dp is not None:
        if method.central:
            raise ValueError(f"{method.label}: the DP grid has no centralised cells")
        # a node's example count is not covered by the noise, so DP runs weight uniformly (run config 'weighting')
        ov.update({"dp-epsilon": dp[0], "dp-clip": dp[1], "weighting": "uniform"})
    if method.central:
        per_round = max(1, round(setting.fraction * CLIENTS)) * setting.local_steps
        ov.update({"partitioner": "iid", "num-partitions": 1, "fraction-train": 1.0, "min-train-nodes": 1,
                   "min-available-nodes": 1, "local-steps": per_round})
    else:
        ov.update({"partitioner": "dirichlet", "dirichlet-alpha": alpha, "num-partitions": CLIENTS,
                   "fraction-train": setting.fraction})
    return ov


def load_tuned(path: Path = TUNED_LR) -> dict[str, Any]:
    """``{family: {"lr": ..., ...}}`` from ``bench/tuned_lr.json`` ({} when it does not exist yet)."""
    return json.loads(path.read_text()) if path.exists() else {}


def _entry(method: Method, tuned: Mapping[str, Any], dp: bool) -> Mapping[str, Any]:
    key = method.family + (DP_SUFFIX if dp else "")
    entry = tuned.get(key)
    if not entry or entry.get("lr") is None:
        cmd = "python -m bench.tuning" + (" --dp-epsilon 3" if dp else "")
        raise SystemExit(f"no tuned learning rate for {key!r} (method {method.label!r}) in {TUNED_LR}: run `{cmd}` "
                         "first, or pass --lr/--lora-lr")
    return entry


def tuned_lr(method: Method, tuned: Mapping[str, Any], dp: bool = False) -> float:
    """The learning rate ``bench.tuning`` chose for ``method``'s family (under DP-SGD: the ``@dp`` entry);
    SystemExit naming the command if none."""
    return float(_entry(method, tuned, dp)["lr"])


def tuned_clip(method: Method, tuned: Mapping[str, Any]) -> float:
    """The ``dp-clip`` ``bench.tuning --dp-epsilon`` chose for ``method``'s family."""
    return float(_entry(method, tuned, True)["dp_clip"])
