"""Constructor validation (strategies.options): every bad argument fails with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest

from strategies import STRATEGIES, StrategyOptions, build_strategy
from strategies._testing import FINGERPRINT, R, make, nested_global


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("fedsb", {"rank": 0}, "rank"),
        ("fedsb", {"rank": -4}, "rank"),
        ("flora", {"inner_rank": 9}, "inner_rank"),
        ("flora", {"inner_rank": 0}, "inner_rank"),
        ("fedsb", {"fraction_train": 0.0}, "fraction_train"),
        ("fedsb", {"fraction_train": 1.5}, "fraction_train"),
        ("fedsb", {"fraction_evaluate": -0.1}, "fraction_evaluate"),
        ("fedsb", {"weighting": "loss"}, "weighting"),
        ("fedsb", {"max_update_bytes": 0}, "max_update_bytes"),
        ("fedsb", {"max_num_examples": 0}, "max_num_examples"),
        ("fedsb", {"max_update_norm": 0.0}, "max_update_norm"),
        ("fedsb", {"max_update_norm": float("inf")}, "max_update_norm"),
        ("fedsb", {"norm_factor": 1.0}, "norm_factor"),
        ("fedsb", {"min_train_nodes": 0}, "min_train_nodes"),
        ("fedsb", {"ranks": "8,4"}, "ranks"),
        ("fedit", {"ranks": "uniform"}, "ranks"),
        ("hetero", {"ranks": "16,8"}, "ranks"),
        ("hetero", {"ranks": "8,0"}, "ranks"),
        ("hetero", {"ranks": "eight"}, "ranks"),
        ("fedsb", {"outer_fingerprint": None}, "outer_fingerprint"),
        ("fedsb", {"train_config": {"rank": 3}}, "train_config"),
        ("fedit", {"lora_alpha": 0}, "lora_alpha"),
        ("fedsb", {"initial_state": {"x.R0": np.zeros((4, 4))}}, "initial_state"),
        ("fedit", {"initial_state": nested_global(R)}, "initial_state"),
        ("fedsb", {"train_metrics_fn": "mean"}, "train_metrics_fn"),
    ],
)
def test_constructor_validation_names_the_key(name, kwargs, key):
    base = {"rank": R, "outer_fingerprint": FINGERPRINT}
    if name == "flora":
        base["inner_rank"] = 2
    base.update(kwargs)
    with pytest.raises(ValueError, match=key):
        build_strategy(name, **base)


def test_build_strategy_unknown_name():
    with pytest.raises(ValueError, match="strategy") as err:
        build_strategy("fedavg", rank=4)
    for allowed in STRATEGIES:
        assert allowed in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("fraction_evaluate", 1.01), ("min_available_nodes", 0), ("seed", -1), ("min_evaluate_nodes", -1),
     ("train_config", {"lr": object()}), ("max_update_bytes", True)],
)
def test_options_validate_on_their_own(field, value):
    with pytest.raises(ValueError, match=field):
        StrategyOptions(**{field: value})


def test_options_object_and_keywords_are_the_same_strategy():
    """``options=StrategyOptions(...)`` and the same fields as keywords configure the same strategy;
    keywords override the fields of ``options``; the options object is immutable."""
    opts = StrategyOptions(fraction_train=0.6, min_train_nodes=3, weighting="uniform", max_update_bytes=10_000,
                           seed=7, train_config={"lr": 0.1})
    common = {"rank": R, "outer_fingerprint": FINGERPRINT, "initial_state": nested_global(R)}
    a = build_strategy("fedsb", options=opts, **common)
    b = build_strategy("fedsb", fraction_train=0.6, min_train_nodes=3, weighting="uniform", max_update_bytes=10_000,
                       seed=7, train_config={"lr": 0.1}, **common)
    for attr in ("fraction_train", "min_train_nodes", "weighting", "max_update_bytes", "seed", "train_config"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.fraction_train == 0.6 and a.min_train_nodes == 3 and a.train_config == {"lr": 0.1}
    c = build_strategy("fedsb", options=opts, seed=9, **common)
    assert c.seed == 9 and c.weighting == "uniform" and c.min_train_nodes == 3
    with pytest.raises(AttributeError):
        opts.seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="fraction_trian"):
        make("fedsb", fraction_trian=0.5)
