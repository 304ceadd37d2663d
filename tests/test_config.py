"""Run config: defaults match pyproject, every key is reachable, bad values fail at start naming the key."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib

from fedlora.experiment import ExperimentSpec
from fedlora.run_config import ConfigError, RunConfig, closest_key, parse_run_config, run_config_keys

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_config_matches_runconfig_defaults():
    app_cfg = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert app_cfg == RunConfig().to_dict()
    parsed = parse_run_config(app_cfg)
    assert parsed == RunConfig()


def test_pyproject_and_runconfig_list_the_same_keys():
    app_keys = set(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    keys = set(run_config_keys())
    assert sorted(keys - app_keys) == [], "RunConfig fields without a [tool.flwr.app.config] key (unreachable)"
    assert sorted(app_keys - keys) == [], "[tool.flwr.app.config] keys RunConfig does not know"


def test_every_experiment_spec_field_comes_from_a_key():
    """A run config that changes every model/adapter key changes every field of the ExperimentSpec."""
    cfg = parse_run_config({
        "strategy": "flora", "model": "smollm2", "task": "causal-lm", "dataset": "dialogues", "max-length": 32,
        "rank": 8, "inner-rank": 2, "init": "principal", "alpha": 4.0, "lora-alpha": 8.0,
        "target-modules": "q_proj", "modules-to-save": "none", "model-seed": 3, "svd-method": "randomized",
        "device": "cpu", "dtype": "bfloat16", "amp": True, "gradient-checkpointing": True,
    })
    spec, default = cfg.spec(), ExperimentSpec()
    same = [f.name for f in fields(ExperimentSpec) if getattr(spec, f.name) == getattr(default, f.name)]
    assert same == [], f"ExperimentSpec fields no run-config key sets: {same}"


@pytest.mark.parametrize(
    "override, key, text",
    [
        ({"strategy": "fedavg"}, "strategy", "must be one of"),
        ({"rank": 0}, "rank", ">= 1"),
        ({"rank": -4}, "rank", ">= 1"),
        ({"rank": 8, "inner-rank": 9}, "inner-rank", "<= rank"),
        ({"dirichlet-alpha": 0.0}, "dirichlet-alpha", "> 0"),
        ({"dirichlet-alpha": -1.0}, "dirichlet-alpha", "> 0"),
        ({"partitioner": "zipf"}, "partitioner", "must be one of"),
        ({"task": "vision"}, "task", "must be one of"),
        ({"lr": 0.0}, "lr", "> 0"),
        ({"fraction-train": 1.5}, "fraction-train", "(0, 1]"),
        ({"num-server-rounds": "three"}, "num-server-rounds", "expected int"),
        ({"rank": 2.5}, "rank", "expected int"),
        ({"ranks": "16,x"}, "ranks", "ranks"),
        ({"ranks": "32,16", "strategy": "hetero"}, "ranks", "ranks"),
        ({"ranks": "16,8", "strategy": "fedsb"}, "ranks", "hetero"),
        ({"dp-epsilon": -1.0}, "dp-epsilon", "> 0"),
        ({"dp-clip": 0.0}, "dp-clip", "> 0"),
        ({"dp-noise": -0.5}, "dp-noise", ">= 0"),
        ({"dp-delta": 1.0}, "dp-delta", "(0, 1)"),
        ({"task": "causal-lm", "dataset": "rotten_tomatoes"}, "dataset", "causal-lm"),
        ({"min-train-nodes": 3, "min-available-nodes": 2}, "min-available-nodes", ">= min-train-nodes"),
        ({"no-such-knob": 1}, "no-such-knob", "unknown key"),
        ({"num-server-round": 3}, "num-server-round", "unknown key (did you mean 'num-server-rounds'?)"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"svd-method": "qr"}, "svd-method", "must be one of"),
        ({"dp-clip": math.inf}, "dp-clip", "must be finite"),
        ({"dp-noise": math.inf}, "dp-noise", "must be finite"),
        ({"user-dp-clip": math.inf}, "user-dp-clip", "must be finite"),
        ({"max-update-mb": math.inf}, "max-update-mb", "must be finite"),
        ({"dirichlet-alpha": math.inf}, "dirichlet-alpha", "must be finite"),
        ({"lr": math.nan}, "lr", "> 0"),
        ({"rank": math.inf}, "rank", "expected int"),
        ({"results-dir": "results"}, "results-dir", "absolute path"),
    ],
)
def test_bad_config_names_key(override, key, text):
    with pytest.raises(ConfigError) as exc:
        parse_run_config(override)
    assert exc.value.key == key
    assert f"run config '{key}'" in str(exc.value)
    assert text in str(exc.value)


def test_unknown_key_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean"):
        parse_run_config({"rank-list": "4"})
    assert closest_key("lora_lr") == "lora-lr" and closest_key("dp-epsillon") == "dp-epsilon"
    assert closest_key("zzzzzz") is None


def test_infinite_values_where_a_key_allows_them():
    assert not parse_run_config({"dp-epsilon": math.inf}).dp_enabled
    assert parse_run_config({"round-timeout": math.inf}).round_timeout == math.inf
    assert parse_run_config({"results-dir": "/abs/results"}).results_dir == "/abs/results"


def test_valid_overrides_and_derived_values():
    cfg = parse_run_config({"strategy": "flora", "rank": 8, "inner-rank": 2, "lora-lr": 0.01, "central-eval": "false"})
    assert cfg.mode == "nora" and cfg.lr_for_strategy() == cfg.lr and cfg.central_eval is False
    spec = cfg.spec()
    assert spec.is_nested and spec.r == 8 and spec.inner_rank == 2
    lora = parse_run_config({"strategy": "fedit"})
    assert lora.lr_for_strategy() == lora.lora_lr and not lora.spec().is_nested
    assert parse_run_config({"modules-to-save": "none"}).spec().modules_to_save == ()
    assert parse_run_config({"dp-epsilon": 3.0}).dp_enabled
    assert not parse_run_config({"dp-epsilon": float("inf")}).dp_enabled


def test_user_level_dp_refuses_federated_evaluation():
    base = {"user-dp-clip": 1.0, "user-dp-noise": 1.0, "dp-release-metrics": True}
    parse_run_config(base)
    with pytest.raises(ConfigError, match="fraction-evaluate") as err:
        parse_run_config({**base, "fraction-evaluate": 0.5})
    assert "same noise" in str(err.value)
