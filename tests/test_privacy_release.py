"""The release policy (fedlora.privacy.release_policy) and the run-config rules that go with it: the README's
table is the code's list, nothing unlisted leaves a node, no silent non-DP, no example counts under DP."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.privacy.release_policy import METRICS, TABLE_MODES, ReleaseMode, allowed_metrics, policy_table, released
from fedlora.run_config import ConfigError, parse_run_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_policy():
    assert policy_table() in README.read_text(), "README.md's release table differs from policy_table(): paste it"


def test_under_dp_nothing_but_the_update_leaves_unless_released():
    for mode in TABLE_MODES:
        for kind in ("train", "evaluate"):
            keys = allowed_metrics(kind, mode, "seq-cls")
            assert bool(keys) == (not mode.private or mode.release_metrics), (mode, kind)
    plain, dp = ReleaseMode(), ReleaseMode(dp_sgd=True, release_metrics=True)
    assert "num-examples" in allowed_metrics("train", plain, "seq-cls")
    assert "dp-epsilon" not in allowed_metrics("train", plain, "seq-cls")  # only where DP-SGD runs
    assert "dp-sample-rate" in allowed_metrics("train", dp, "seq-cls")
    assert "update-norm" in allowed_metrics("train", ReleaseMode(user_dp=True, release_metrics=True), "seq-cls")
    assert "perplexity" in allowed_metrics("evaluate", plain, "causal-lm")
    assert "accuracy" not in allowed_metrics("evaluate", plain, "causal-lm")
    assert len({(m.kind, m.key) for m in METRICS}) == len(METRICS)


def test_released_filters_and_refuses_unlisted_metrics():
    metrics = {"num-examples": 36, "train-loss": 0.7, "steps": 2, "train-seconds": 1.0, "client-seconds": 2.0}
    assert released("train", metrics, ReleaseMode(), "seq-cls") == metrics
    assert released("train", metrics, ReleaseMode(dp_sgd=True), "seq-cls") == {}
    with pytest.raises(ValueError, match="'secret-metric'.*not in fedlora.privacy.release_policy.METRICS"):
        released("train", {**metrics, "secret-metric": 1.0}, ReleaseMode(), "seq-cls")
    with pytest.raises(ValueError, match="train-loss"):
        released("evaluate", {"train-loss": 1.0}, ReleaseMode(), "seq-cls")


def test_weighting_auto_is_uniform_under_dp():
    assert parse_run_config({}).aggregation_weighting == "num-examples"
    assert parse_run_config({"dp-epsilon": 3.0}).aggregation_weighting == "uniform"
    assert parse_run_config({"dp-noise": 1.0}).aggregation_weighting == "uniform"
    assert parse_run_config({"user-dp-clip": 0.5, "user-dp-noise": 1.0}).aggregation_weighting == "uniform"
    assert parse_run_config({"weighting": "uniform"}).aggregation_weighting == "uniform"


@pytest.mark.parametrize("override, key, texts", [
    ({"dp-epsilon": 3.0, "weighting": "num-examples"}, "weighting", ["num-examples", "dp-epsilon"]),
    ({"dp-noise": 1.0, "weighting": "num-examples"}, "weighting", ["dp-noise", "auto"]),
    ({"user-dp-clip": 0.5, "user-dp-noise": 1.0, "weighting": "num-examples"}, "weighting", ["user-dp-clip"]),
    ({"dp-noise": 0.0}, "dp-noise", ["no noise", "dp-epsilon"]),
    ({"dp-noise": 0.0, "dp-epsilon": 3.0}, "dp-noise", ["no noise"]),
    ({"dp-epsilon": 3.0, "fraction-evaluate": 0.5}, "fraction-evaluate", ["dp-release-metrics=true"]),
])
def test_dp_release_config_errors_name_the_keys(override, key, texts):
    with pytest.raises(ConfigError) as err:
        parse_run_config(override)
    assert err.value.key == key and f"run config '{key}'" in str(err.value)
    for text in texts:
        assert text in str(err.value)


def test_dp_noise_alone_runs_dp_sgd():
    """Item 3: dp-noise without dp-epsilon is DP-SGD with that σ (ε accounted, no budget), never plain SGD."""
    from clients.dp import dp_config

    cfg = parse_run_config({"dp-noise": 1.5})
    dp = dp_config(cfg)
    assert cfg.dp_enabled and dp.enabled and dp.noise_multiplier == 1.5 and dp.target_epsilon == float("inf")
    assert parse_run_config({"dp-noise": 1.5, "dp-epsilon": float("inf")}).dp_enabled
    ok = parse_run_config({"dp-epsilon": 3.0, "fraction-evaluate": 0.5, "dp-release-metrics": True})
    assert ok.dp_release_metrics and ok.fraction_evaluate == 0.5
