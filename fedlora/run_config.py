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
from fedlora.precision import DEVICE_PATTERN, DTYPES, check_dtype, resolve_device
from fedlora.privacy.config import ACCOUNTANTS, DEFAULT_ACCOUNTANT

__all__ = ["ConfigError", "RunConfig", "parse_run_config", "run_config_keys", "closest_key",
           "RESUME_MAY_CHANGE", "resume_differences"]

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


def _split_size(v: float) -> str | None:
    if v == 0 or 0 < v < 1 or (v >= 1 and float(v).is_integer()):
        return None
    return "must be 0 (the default), a fraction in (0, 1) or a whole number of examples >= 1"


def as_split_size(v: float) -> int | float | None:
    """A ``test-size``/``validation-size`` value as fedlora.data takes it: None for 0 (the default), a fraction
    for a value in (0, 1), a number of examples (int) otherwise."""
    return None if v == 0 else (float(v) if v < 1 else int(v))


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
    svd_method: str = _key("auto", _one_of(SVD_METHODS))  # auto: randomized for large layers
    model_seed: int = _key(0, _at_least(0))  # initialisation of a new task head and of peft's A
    # data
    partitioner: str = _key("dirichlet", _one_of(PARTITIONERS))
    dirichlet_alpha: float = _key(0.5, _positive)
    classes_per_partition: int = _key(2, _at_least(1))
    min_partition_size: int = _key(0, _at_least(0))
    num_partitions: int = _key(0, _at_least(0))
    val_fraction: float = _key(0.1, lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    max_client_examples: int = _key(0, _at_least(0))
    test_size: float = _key(0.0, _split_size)  # 0 = the dataset's default (fedlora.data.DEFAULT_TEST_SIZE)
    validation_size: float = _key(0.0, _split_size)  # > 0: central eval on a split of the pool, not the test set
    max_test_examples: int = _key(0, _at_least(0))  # central eval on the first N rows of the split (0 = all)
    final_full_test: bool = _key(False)  # the last round's central eval uses the whole split
    # local training
    local_steps: int = _key(40, _at_least(0))
    local_epochs: int = _key(1, _at_least(1))
    batch_size: int = _key(16, _at_least(1))
    lr: float = _key(2e-2, _positive)
    lora_lr: float = _key(1e-3, _positive)
    weight_decay: float = _key(0.0, _at_least(0.0))
    client_threads: int = _key(1)  # <= 0: torch's default
    # device and precision (fedlora/precision.py): availability is checked at start (RunConfig.spec)
    device: str = _key("auto", lambda v: None if DEVICE_PATTERN.fullmatch(v) else
                       "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")  # auto: cuda when available
    dtype: str = _key("float32", _one_of(tuple(DTYPES)))  # of the frozen base; adapters and uploads stay fp32
    amp: bool = _key(False)  # autocast: bf16 on CPU, bf16 (else fp16 + GradScaler) on CUDA
    gradient_checkpointing: bool = _key(False)
    # federation
    fraction_train: float = _key(0.5, _fraction)
    min_train_nodes: int = _key(2, _at_least(1))
    min_available_nodes: int = _key(2, _at_least(1))
    fraction_evaluate: float = _key(0.0, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    weighting: str = _key("auto", _one_of(("auto", *WEIGHTINGS)))  # auto: num-examples; uniform under DP, SecAgg
    outer_factors: str = _key("server", _one_of(("server", "local")))  # who computes B, S, A (fedlora.outer_bundle)
    round_timeout: float = _key(600.0, _positive, infinite=True)
    max_update_mb: float = _key(64.0, _positive)
    # evaluation, checkpoints
    central_eval: bool = _key(True)
    eval_batch_size: int = _key(64, _at_least(1))
    resume: bool = _key(False)  # continue the run in <results-dir>/<run-name> (refused without a checkpoint)
    overwrite: bool = _key(False)  # replace a previous run of the same name (refused otherwise)
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
    user_dp_delta: float = _key(0.0, lambda v: None if 0 <= v < 1 else  # 0 = 1/(10·population); < 1/population
                                "must be in [0, 1) (0 = 1/(10·population))")
    population: int = _key(0, _at_least(0))  # user-level DP: 0 = the nodes connected at start
    # release policy under DP (fedlora/privacy/release_policy.py): un-noised metrics leave nodes only on request
    dp_release_metrics: bool = _key(False)
    # user-level DP target, bounded client claims, honest exit (strategies/screening.py, simulations/loop.py)
    user_dp_epsilon: float = _key(0.0, _at_least(0.0))  # 0 = no target; with user-dp-noise=0: σ calibrated to it
    max_num_examples: int = _key(10**7, _at_least(0))  # reject a declared num-examples above it; 0 = no cap
    max_update_norm: float = _key(1e4, _at_least(0.0))  # reject an update with ‖Δᵢ‖ above it; 0 = no bound
    max_update_norm_factor: float = _key(0.0, lambda v: None if v == 0 or v > 1 else "must be > 1 (or 0: off)")
    # reject a declared num-examples above k × the round's median claim (weighting num-examples; evaluation); 0 = off
    max_num_examples_factor: float = _key(10.0, lambda v: None if v == 0 or v > 1 else "must be > 1 (or 0: off)")
    allow_empty_rounds: bool = _key(False)  # a round that aggregated nothing (all rejected) does not fail the run
    # secure aggregation (SecAgg+; strategies/secure_aggregation.py, checks: fedlora/secure_config.py)
    secure_aggregation: bool = _key(False)  # fedsb, hetero, flora: the server learns only the sum of the updates
    secagg_num_shares: int = _key(0, _at_least(0))  # 0 = every sampled node; an odd k >= 3: SecAgg+ neighbourhoods
    secagg_threshold: float = _key(0.6, lambda v: None if 0.5 < v <= 1 else "must be in (0.5, 1]")  # t = ⌈·k⌉
    secagg_clipping_range: float = _key(8.0, _positive)  # c: coordinates clipped to [-c, c] before quantisation
    secagg_quantization_range: int = _key(4194304, lambda v: None if 2 <= v < 2**31 else "must be in [2, 2**31)")
    secagg_max_weight: float = _key(10000.0, _positive)  # num-examples weighting: nᵢ ≤ max-weight

    # ------------------------------------------------------------------ derived
    @property
    def mode(self) -> str:
        return STRATEGY_ADAPTERS[self.strategy][1]

    @property
    def dp_enabled(self) -> bool:
        """DP-SGD runs with a finite ``dp-epsilon`` (σ calibrated, budget enforced) or a fixed ``dp-noise``
        σ > 0 (ε accounted and reported, no budget refusal unless ``dp-epsilon`` is also finite)."""
        return (self.dp_epsilon > 0 and math.isfinite(self.dp_epsilon)) or self.dp_noise > 0

    @property
    def aggregation_weighting(self) -> str:
        """The strategy's weighting: ``weighting``, with ``auto`` = ``uniform`` under any DP (a node's example
        count is not released there) and under secure aggregation (weights pre-multiplied inside the mask cost
        precision: fedlora/secure_config.py), ``num-examples`` otherwise."""
        if self.weighting != "auto":
            return self.weighting
        return "uniform" if self.dp_enabled or self.user_dp_enabled or self.secure_aggregation else "num-examples"

    def default_run_name(self) -> str:
        """The run name when ``run-name`` is "": ``<strategy>-r<rank>-<dataset>-<partitioner>-s<seed>``."""
        return f"{self.strategy}-r{self.rank}-{self.dataset}-{self.partitioner}-s{self.seed}"

    @property
    def resolved_run_name(self) -> str:
        """``run-name``, or :meth:`default_run_name` when it is ""."""
        return self.run_name or self.default_run_name()

    @property
    def test_split_size(self) -> int | float | None:
        """``test-size`` for fedlora.data: None = the dataset's default, a fraction or a number of examples."""
        return as_split_size(self.test_size)

    @property
    def validation_split_size(self) -> int | float | None:
        """``validation-size`` for fedlora.data: None = no central validation split (evaluate on the test set)."""
        return as_split_size(self.validation_size)

    @property
    def user_dp_enabled(self) -> bool:
        return self.user_dp_clip > 0

    def lr_for_strategy(self) -> float:
        return self.lr if STRATEGY_ADAPTERS[self.strategy][0] == "nested" else self.lora_lr

    def resolved_device(self) -> str:
        """``device`` as this process runs it (``auto`` → ``cuda`` or ``cpu``). Raises :class:`ConfigError`
        naming ``device`` when CUDA is asked for and absent, naming ``dtype`` for float16 on the CPU."""
        try:
            device = resolve_device(self.device)
        except ValueError as err:
            raise ConfigError("device", str(err).removeprefix("device=")) from None
        try:
            check_dtype(self.dtype, device)
        except ValueError as err:
            raise ConfigError("dtype", str(err).removeprefix("dtype=")) from None
        return str(device)

    def spec(self) -> ExperimentSpec:
        """The model and adapter of this run (every ``ExperimentSpec`` field comes from a key; ``device``
        resolved: :meth:`resolved_device`, whose ConfigError stops a process that cannot run it at start)."""
        return ExperimentSpec(
            strategy=self.strategy, model=self.model, task=self.task, dataset=self.dataset,
            max_length=self.max_length, r=self.rank, inner_rank=self.inner_rank, init=self.init,
            alpha=self.alpha or None, lora_alpha=self.lora_alpha or None,
            target_modules=_csv(self.target_modules) or None,
            modules_to_save=(() if self.modules_to_save == "none" else _csv(self.modules_to_save) or None),
            model_seed=self.model_seed, svd_method=self.svd_method, device=self.resolved_device(),
            dtype=self.dtype, amp=self.amp, gradient_checkpointing=self.gradient_checkpointing,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


#: keys a ``resume=true`` run may set differently from the run it continues: how long and where it runs
#: (``device``, ``gradient-checkpointing``: the same computation), how it writes its outputs. Every other key
#: (strategy, model, data, ranks, training, ``dtype``, ``amp``, weighting, seed, every DP key, ...) must be as
#: in the checkpoint, or the resume is refused (:func:`resume_differences`).
RESUME_MAY_CHANGE = frozenset({"num-server-rounds", "round-timeout", "resume", "overwrite", "results-dir",
                               "run-name", "checkpoint", "export-adapter", "eval-batch-size", "client-threads",
                               "device", "gradient-checkpointing"})


def resume_differences(saved: Mapping[str, Any], cfg: RunConfig) -> list[str]:
    """``"key: checkpoint has X, now Y"`` for each key outside :data:`RESUME_MAY_CHANGE` where ``saved`` (the
    run config stored in a checkpoint) and ``cfg`` differ; a key absent from ``saved`` counts as its
    default, a saved key that is no run-config key any more is a difference. Empty: the resume is honoured."""
    defaults, now = RunConfig().to_dict(), cfg.to_dict()
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUME_MAY_CHANGE:
            continue
        if key not in now:
            out.append(f"{key!r}: checkpoint has {saved[key]!r}, not a run-config key any more")
        elif saved.get(key, defaults[key]) != now[key]:
            out.append(f"{key!r}: checkpoint has {saved.get(key, defaults[key])!r}, now {now[key]!r}")
    return out


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
    if cfg.resume and cfg.overwrite:
        raise ConfigError("overwrite", "resume=true continues the run, overwrite=true replaces it: set one of them")
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
    _dp_release_checks(cfg)
    _precision_checks(cfg)
    if cfg.user_dp_noise > 0 and not cfg.user_dp_enabled:
        raise ConfigError("user-dp-clip", "user-dp-noise > 0 needs user-dp-clip > 0 (clients must clip their updates)")
    _user_dp_checks(cfg)
    from fedlora.secure_config import secure_aggregation_checks

    secure_aggregation_checks(cfg)
    if cfg.min_available_nodes < cfg.min_train_nodes:
        raise ConfigError("min-available-nodes", f"{cfg.min_available_nodes} must be >= min-train-nodes")


def _dp_release_checks(cfg: RunConfig) -> None:
    """No silent non-DP and no un-noised count under DP (the release policy, fedlora/privacy/release_policy.py)."""
    if cfg.dp_noise == 0:
        raise ConfigError("dp-noise", "0 adds no noise (no DP, ε = ∞): give σ > 0, or -1 to calibrate σ from "
                                      "dp-epsilon")
    private = cfg.dp_enabled or cfg.user_dp_enabled
    if private and cfg.weighting == "num-examples":
        raise ConfigError("weighting", "'num-examples' under DP (dp-epsilon / dp-noise / user-dp-clip) would "
                                       "release each node's example count, which no noise covers, and user-level DP "
                                       "needs sensitivity C/m: use 'auto' or 'uniform'")
    if private and cfg.fraction_evaluate > 0 and not cfg.dp_release_metrics:
        raise ConfigError("fraction-evaluate", "under DP (dp-epsilon / dp-noise / user-dp-clip) nodes do not "
                                               "release local validation metrics: set fraction-evaluate=0, or "
                                               "dp-release-metrics=true (outside the DP guarantee)")


def _precision_checks(cfg: RunConfig) -> None:
    """What DP-SGD cannot run with: gradient checkpointing (the recomputed forward pass leaves opacus' per-sample
    gradient hooks without their activations) and float16 compute (the GradScaler would scale the per-sample
    gradients opacus clips). bfloat16 bases and bf16 autocast work under DP (tests/test_precision.py)."""
    if cfg.dp_enabled and cfg.gradient_checkpointing:
        raise ConfigError("gradient-checkpointing", "must be false under DP-SGD (dp-epsilon / dp-noise): opacus' "
                                                    "per-sample gradient hooks do not survive the recomputed forward")
    if cfg.dp_enabled and cfg.dtype == "float16":
        raise ConfigError("dtype", "'float16' under DP-SGD (dp-epsilon / dp-noise) is refused: loss scaling would "
                                   "scale the per-sample gradients opacus clips; use 'bfloat16' or 'float32'")


def _user_dp_checks(cfg: RunConfig) -> None:
    """User-level DP adds noise (a target ε or a σ, never clipping alone) and δ < 1/population when the
    population is given (otherwise the ServerApp checks it against the nodes connected at start)."""
    if cfg.user_dp_epsilon > 0 and not cfg.user_dp_enabled:
        raise ConfigError("user-dp-epsilon", "a user-level ε target needs user-dp-clip > 0 (clients clip updates)")
    if cfg.user_dp_enabled and cfg.user_dp_noise == 0 and cfg.user_dp_epsilon == 0:
        raise ConfigError("user-dp-clip", "user-level DP without noise protects nothing (ε = ∞): set user-dp-epsilon "
                                          "(σ calibrated to it) or user-dp-noise > 0")
    if cfg.user_dp_enabled and cfg.max_update_norm_factor:
        raise ConfigError("max-update-norm-factor", "must be 0 under user-level DP: rejecting by the round's median "
                                                    "norm lets one client's update decide whether another's counts "
                                                    "(the sensitivity C/m assumes it cannot); C already bounds every "
                                                    "update")
    if cfg.user_dp_enabled and cfg.fraction_evaluate > 0:
        raise ConfigError("fraction-evaluate", "must be 0 under user-level DP: federated evaluation sends a round's "
                                               "noised state before that round's checkpoint exists, so a crash and "
                                               "resume would redo the round with the same noise on another aggregate")
    if cfg.user_dp_enabled and cfg.population and cfg.user_dp_delta >= 1.0 / cfg.population:
        raise ConfigError("user-dp-delta", f"{cfg.user_dp_delta!r} must be < 1/population = {1.0 / cfg.population:.3g} "
                                           "(0 = 1/(10·population))")
