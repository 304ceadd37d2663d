"""The run configuration: every knob of ``[tool.flwr.app.config]``, typed, and the one place that validates it.

Flower passes ``context.run_config`` (pyproject defaults overridden by ``--run-config "k=v ..."``).
:func:`parse_run_config` turns it into a :class:`RunConfig`. Every user-facing error about a run-config
value comes from here, before any model or data is loaded, as a :class:`ConfigError` whose message names
the key: an unknown key (with the closest valid key), a value of the wrong type, a value out of its range
(the allowed values are named), or keys that cannot work together.

Deeper objects (``ExperimentSpec``, ``NestedLoraConfig``, ``DPConfig``, the strategies) still assert the
invariants of their own fields; a run config that parses never trips them. What only the data can tell
is checked where the data is (e.g. whether a partitioning of the dataset exists, whether ``dp-delta`` is
below 1/N for a client's N examples).

Invariants:

- the fields of :class:`RunConfig` are exactly the keys of ``[tool.flwr.app.config]`` in
  ``pyproject.toml``, with the same defaults (field ``foo_bar`` is key ``foo-bar``; tests/test_config.py);
- every field of :class:`~fedlora.experiment.ExperimentSpec` is set from a key (:meth:`RunConfig.spec`);
- every float value is finite unless its key says otherwise (``dp-epsilon = inf`` disables DP,
  ``round-timeout = inf`` waits for ever).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import PurePath
from typing import Any, TypeVar

from fedlora.aggregation import WEIGHTINGS
from fedlora.data import DATASETS, PARTITIONERS
from fedlora.experiment import STRATEGY_ADAPTERS, ExperimentSpec
from fedlora.models import TASKS
from fedlora.nested.config import INITS, SVD_METHODS
from fedlora.privacy.config import ACCOUNTANTS, DEFAULT_ACCOUNTANT

__all__ = ["ConfigError", "RunConfig", "parse_run_config", "run_config_keys", "closest_key"]

#: ``weighting`` values (how the server weights client updates)

T = TypeVar("T")
#: a value check: None if the value is fine, else the reason (appended to the value in the message)
Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """A run-config value is invalid; ``key`` is the run-config key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"run config '{key}': {message}")
        self.key = key


def _one_of(allowed: tuple[str, ...]) -> Check:
    return lambda v: None if v in allowed else f"must be one of {list(allowed)}"


def _at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _absolute_path(v: str) -> str | None:
    if not v or v.startswith("~") or PurePath(v).is_absolute():
        return None
    return "must be an absolute path (the ServerApp runs in the SuperLink's working directory)"


def _key(default: T, check: Check | None = None, *, infinite: bool = False) -> T:
    """A run-config key: its default, its value check, and whether a float may be infinite."""
    return field(default=default, metadata={"check": check, "infinite": infinite})


@dataclass(frozen=True)
class RunConfig:
    """Typed run config. Field ``foo_bar`` is run-config key ``foo-bar``; its default is pyproject's."""

    # what runs
    num_server_rounds: int = _key(5, _at_least(1))
    strategy: str = _key("fedsb", _one_of(tuple(sorted(STRATEGY_ADAPTERS))))
    seed: int = _key(42, _at_least(0))
    run_name: str = _key("")  # "" = <strategy>-r<rank>-<dataset>-<partitioner>-s<seed>
    results_dir: str = _key("", _absolute_path)  # "" = $FEDLORA_RESULTS_DIR or ~/fedlora-results
    # model and adapter
    model: str = _key("minilm")  # offline alias, local directory or hub id
    task: str = _key("seq-cls", _one_of(TASKS))
    dataset: str = _key("rotten_tomatoes", _one_of(DATASETS))
    max_length: int = _key(64, _at_least(8))
    target_modules: str = _key("")  # comma list; "" = the model family's defaults
    modules_to_save: str = _key("")  # comma list; "" = the task head, "none" = nothing
    rank: int = _key(16, _at_least(1))
    inner_rank: int = _key(4, _at_least(1))
    init: str = _key("zero", _one_of(INITS))
    alpha: float = _key(0.0, _at_least(0.0))  # 0 = rank (scaling 1)
    lora_alpha: float = _key(0.0, _at_least(0.0))
    ranks: str = _key("")  # client ranks: "16,8,4", "uniform[:set]", "heavy-tail[:set]"
    svd_method: str = _key("full", _one_of(SVD_METHODS))
    model_seed: int = _key(0, _at_least(0))  # initialisation of a new task head and of peft's A
    # data
    partitioner: str = _key("dirichlet", _one_of(PARTITIONERS))
    dirichlet_alpha: float = _key(0.5, _positive)
    classes_per_partition: int = _key(2, _at_least(1))
    min_partition_size: int = _key(0, _at_least(0))
    num_partitions: int = _key(0, _at_least(0))
    val_fraction: float = _key(0.1, lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    max_client_examples: int = _key(0, _at_least(0))
    test_size: int = _key(2000, _at_least(1))
    max_test_examples: int = _key(0, _at_least(0))
    # local training
    local_steps: int = _key(40, _at_least(0))
    local_epochs: int = _key(1, _at_least(1))
    batch_size: int = _key(16, _at_least(1))
    lr: float = _key(2e-2, _positive)
    lora_lr: float = _key(1e-3, _positive)
    weight_decay: float = _key(0.0, _at_least(0.0))
    client_threads: int = _key(1)  # <= 0: torch's default
    # federation
    fraction_train: float = _key(0.5, _fraction)
    min_train_nodes: int = _key(2, _at_least(1))
    min_available_nodes: int = _key(2, _at_least(1))
    fraction_evaluate: float = _key(0.0, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    weighting: str = _key("num-examples", _one_of(WEIGHTINGS))
    round_timeout: float = _key(600.0, _positive, infinite=True)
    max_update_mb: float = _key(64.0, _positive)
    # evaluation, checkpoints
    central_eval: bool = _key(True)
    eval_batch_size: int = _key(64, _at_least(1))
    resume: bool = _key(False)
    checkpoint: bool = _key(True)
    export_adapter: bool = _key(True)
    # differential privacy (sample-level DP-SGD on clients; user-level on updates)
    dp_epsilon: float = _key(0.0, lambda v: None if v >= 0 else "must be > 0 (or 0 / inf to disable DP)",
                             infinite=True)
    dp_delta: float = _key(0.0, lambda v: None if 0 <= v < 1 else "must be in (0, 1) (0 = default 1/(10·N))")
    dp_clip: float = _key(1.0, _positive)
    dp_noise: float = _key(-1.0, lambda v: None if v >= 0 or v == -1 else
                           "must be >= 0 (or -1 to calibrate from dp-epsilon)")
    dp_accountant: str = _key(DEFAULT_ACCOUNTANT, _one_of(ACCOUNTANTS))
    dp_force_delta: bool = _key(False)
    user_dp_clip: float = _key(0.0, _at_least(0.0))
    user_dp_noise: float = _key(0.0, _at_least(0.0))
    user_dp_delta: float = _key(1e-5, lambda v: None if 0 < v < 1 else "must be in (0, 1)")
    population: int = _key(0, _at_least(0))  # user-level DP: 0 = the nodes connected at start

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
        """The model and adapter of this run (every ``ExperimentSpec`` field comes from a key)."""
        return ExperimentSpec(
            strategy=self.strategy, model=self.model, task=self.task, dataset=self.dataset,
            max_length=self.max_length, r=self.rank, inner_rank=self.inner_rank, init=self.init,
            alpha=self.alpha or None, lora_alpha=self.lora_alpha or None,
            target_modules=_csv(self.target_modules) or None,
            modules_to_save=(() if self.modules_to_save == "none" else _csv(self.modules_to_save) or None),
            model_seed=self.model_seed, svd_method=self.svd_method,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def run_config_keys() -> tuple[str, ...]:
    """Every run-config key, in the order of :class:`RunConfig` (= ``[tool.flwr.app.config]``)."""
    return tuple(f.name.replace("_", "-") for f in fields(RunConfig))


def closest_key(key: str) -> str | None:
    """The valid run-config key closest to ``key`` (``difflib``), or None if none is close."""
    close = difflib.get_close_matches(str(key), run_config_keys(), n=1, cutoff=0.6)
    return close[0] if close else None


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
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(key, f"expected {kind.__name__}, got {value!r}") from None


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate Flower's ``context.run_config`` into a :class:`RunConfig` (ConfigError names the key)."""
    defaults = RunConfig()
    by_key = {f.name.replace("_", "-"): f for f in fields(RunConfig)}
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        if key not in by_key:
            close = closest_key(key)
            hint = f" (did you mean '{close}'?)" if close else " (the keys are those of [tool.flwr.app.config])"
            raise ConfigError(key, f"unknown key{hint}")
        name = by_key[key].name
        values[name] = _coerce(key, value, getattr(defaults, name))
    cfg = RunConfig(**values)
    for key, f in by_key.items():
        value = getattr(cfg, f.name)
        if isinstance(value, float) and math.isinf(value) and not f.metadata["infinite"]:
            raise ConfigError(key, f"{value!r} must be finite")
        problem = f.metadata["check"](value) if f.metadata["check"] else None
        if problem:
            raise ConfigError(key, f"{value!r} {problem}")
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
