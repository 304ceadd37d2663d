"""The run configuration: every knob of ``[tool.flwr.app.config]``, typed and validated at start.

Flower passes ``context.run_config`` (pyproject defaults overridden by ``--run-config "k=v ..."``).
:func:`parse_run_config` turns it into a :class:`RunConfig`; a bad value raises
:class:`ConfigError` whose message names the key and the allowed values, before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedlora.experiment import STRATEGY_ADAPTERS, ExperimentSpec

TASKS = ("seq-cls", "causal-lm")
DATASETS = ("rotten_tomatoes", "bbc", "twitter", "dialogues")
PARTITIONERS = ("iid", "dirichlet", "pathological", "by-class")
INITS = ("zero", "principal")
WEIGHTINGS = ("num-examples", "uniform")
ACCOUNTANTS = ("rdp", "prv")


class ConfigError(ValueError):
    """A run-config value is invalid; ``key`` is the run-config key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"run config '{key}': {message}")
        self.key = key


@dataclass(frozen=True)
class RunConfig:
    """Typed run config. Field ``foo_bar`` is run-config key ``foo-bar``."""

    # what runs
    num_server_rounds: int = 5
    strategy: str = "fedsb"
    seed: int = 42
    run_name: str = ""
    results_dir: str = ""
    # model and adapter
    model: str = "minilm"
    task: str = "seq-cls"
    dataset: str = "rotten_tomatoes"
    max_length: int = 64
    target_modules: str = ""
    modules_to_save: str = ""
    rank: int = 16
    inner_rank: int = 4
    init: str = "zero"
    alpha: float = 0.0
    lora_alpha: float = 0.0
    ranks: str = ""
    # data
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    min_partition_size: int = 0
    num_partitions: int = 0
    val_fraction: float = 0.1
    max_client_examples: int = 0
    test_size: int = 2000
    max_test_examples: int = 0
    # local training
    local_steps: int = 40
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-2
    lora_lr: float = 1e-3
    weight_decay: float = 0.0
    client_threads: int = 1
    # federation
    fraction_train: float = 0.5
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    fraction_evaluate: float = 0.0
    weighting: str = "num-examples"
    round_timeout: float = 600.0
    max_update_mb: float = 64.0
    # evaluation, checkpoints
    central_eval: bool = True
    eval_batch_size: int = 64
    resume: bool = False
    checkpoint: bool = True
    export_adapter: bool = True
    # differential privacy (sample-level DP-SGD on clients; user-level on updates)
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    dp_clip: float = 1.0
    dp_noise: float = -1.0
    dp_accountant: str = "rdp"
    dp_force_delta: bool = False
    user_dp_clip: float = 0.0
    user_dp_noise: float = 0.0
    user_dp_delta: float = 1e-5
    population: int = 0

    # ------------------------------------------------------------------ derived
    @property
    def mode(self) -> str:
        return STRATEGY_ADAPTERS[self.strategy][1]

    @property
    def dp_enabled(self) -> bool:
        return self.dp_epsilon > 0 and math.isfinite(self.dp_epsilon)

    @property
    def user_dp_enabled(self) -> bool:
        return self.user_dp_clip > 0

    def lr_for_strategy(self) -> float:
        return self.lr if STRATEGY_ADAPTERS[self.strategy][0] == "nested" else self.lora_lr

    def spec(self) -> ExperimentSpec:
        return ExperimentSpec(
            strategy=self.strategy, model=self.model, task=self.task, dataset=self.dataset,
            max_length=self.max_length, r=self.rank, inner_rank=self.inner_rank, init=self.init,
            alpha=self.alpha or None, lora_alpha=self.lora_alpha or None,
            target_modules=_csv(self.target_modules) or None,
            modules_to_save=(() if self.modules_to_save == "none" else _csv(self.modules_to_save) or None),
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def _csv(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(value).split(",") if x.strip())


def _coerce(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected {kind.__name__}, got {value!r}") from None


def _one_of(allowed: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"must be one of {list(allowed)}"


def _at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "num_server_rounds": _at_least(1),
    "strategy": _one_of(tuple(sorted(STRATEGY_ADAPTERS))),
    "task": _one_of(TASKS),
    "dataset": _one_of(DATASETS),
    "max_length": _at_least(8),
    "rank": _at_least(1),
    "inner_rank": _at_least(1),
    "init": _one_of(INITS),
    "alpha": _at_least(0.0),
    "lora_alpha": _at_least(0.0),
    "partitioner": _one_of(PARTITIONERS),
    "dirichlet_alpha": _positive,
    "classes_per_partition": _at_least(1),
    "min_partition_size": _at_least(0),
    "num_partitions": _at_least(0),
    "val_fraction": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    "max_client_examples": _at_least(0),
    "test_size": _at_least(1),
    "max_test_examples": _at_least(0),
    "local_steps": _at_least(0),
    "local_epochs": _at_least(1),
    "batch_size": _at_least(1),
    "lr": _positive,
    "lora_lr": _positive,
    "weight_decay": _at_least(0.0),
    "fraction_train": _fraction,
    "min_train_nodes": _at_least(1),
    "min_available_nodes": _at_least(1),
    "fraction_evaluate": lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
    "weighting": _one_of(WEIGHTINGS),
    "round_timeout": _positive,
    "max_update_mb": _positive,
    "eval_batch_size": _at_least(1),
    "dp_epsilon": lambda v: None if v >= 0 else "must be > 0 (or 0 / inf to disable DP)",
    "dp_delta": lambda v: None if 0 <= v < 1 else "must be in (0, 1) (0 = default 1/(10·N))",
    "dp_clip": _positive,
    "dp_noise": lambda v: None if v >= 0 or v == -1 else "must be >= 0 (or -1 to calibrate from dp-epsilon)",
    "dp_accountant": _one_of(ACCOUNTANTS),
    "user_dp_clip": _at_least(0.0),
    "user_dp_noise": _at_least(0.0),
    "user_dp_delta": lambda v: None if 0 < v < 1 else "must be in (0, 1)",
    "population": _at_least(0),
}


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate Flower's ``context.run_config`` into a :class:`RunConfig` (ConfigError names the key)."""
    defaults = RunConfig()
    by_key = {f.name.replace("_", "-"): f.name for f in fields(RunConfig)}
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        if key not in by_key:
            close = [k for k in by_key if k.split("-")[0] == str(key).split("-")[0]][:4]
            hint = f" (did you mean {close}?)" if close else ""
            raise ConfigError(key, f"unknown key{hint}")
        name = by_key[key]
        values[name] = _coerce(key, value, getattr(defaults, name))
    cfg = RunConfig(**values)
    for name, check in CHECKS.items():
        problem = check(getattr(cfg, name))
        if problem:
            raise ConfigError(name.replace("_", "-"), f"{getattr(cfg, name)!r} {problem}")
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: RunConfig) -> None:
    if cfg.inner_rank > cfg.rank:
        raise ConfigError("inner-rank", f"{cfg.inner_rank} must be <= rank ({cfg.rank})")
    if cfg.ranks:
        from fedlora.ranks import RankAssigner

        try:
            assigner = RankAssigner(cfg.ranks, max_rank=cfg.rank, seed=cfg.seed)
        except ValueError as err:
            raise ConfigError("ranks", f"{cfg.ranks!r}: {err} (a list '16,8,4', 'uniform[:set]' or "
                                       "'heavy-tail[:set]', ranks in [1, rank])") from None
        if set(assigner.choices) != {cfg.rank} and cfg.strategy in ("fedsb", "fedit", "ffa"):
            raise ConfigError("ranks", f"{cfg.ranks!r}: strategy {cfg.strategy!r} trains every client at rank "
                                       f"{cfg.rank}; use hetero, flora, flora-lora or flexlora")
    if cfg.task == "causal-lm" and cfg.dataset not in ("dialogues", "bbc"):
        raise ConfigError("dataset", f"{cfg.dataset!r}: causal-lm fine-tuning uses text data: 'dialogues' or 'bbc'")
    if cfg.user_dp_enabled and cfg.strategy not in ("fedsb", "hetero"):
        raise ConfigError("user-dp-clip", f"user-level DP clips r×r updates: strategy must be 'fedsb' or 'hetero', "
                                          f"not {cfg.strategy!r}")
    if cfg.user_dp_enabled and cfg.weighting != "uniform":
        raise ConfigError("weighting", "user-level DP (user-dp-clip > 0) needs weighting='uniform' (sensitivity C/m)")
    if cfg.user_dp_noise > 0 and not cfg.user_dp_enabled:
        raise ConfigError("user-dp-clip", "user-dp-noise > 0 needs user-dp-clip > 0 (clients must clip their updates)")
    if cfg.min_available_nodes < cfg.min_train_nodes:
        raise ConfigError("min-available-nodes", f"{cfg.min_available_nodes} must be >= min-train-nodes")
