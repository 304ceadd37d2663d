"""Run config: defaults match pyproject, bad values fail at start naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fedlora.run_config import ConfigError, RunConfig, parse_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_config_matches_runconfig_defaults():
    app_cfg = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert app_cfg == RunConfig().to_dict()
    parsed = parse_run_config(app_cfg)
    assert parsed == RunConfig()


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
