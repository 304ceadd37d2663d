"""DP configs: validation errors name the field, δ < 1/N unless forced, metric keys, serialisation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from fedlora.privacy import (
    DEFAULT_ACCOUNTANT,
    DP_METRIC_KEYS,
    AccountantState,
    DPConfig,
    UserDPConfig,
    calibrate_noise,
    default_delta,
    dp_metrics,
    local_steps,
    poisson_sample_rate,
)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": float("nan")}, "target_epsilon"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -0.5}, "max_grad_norm"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"target_delta": 0.0}, "target_delta"),
        ({"target_delta": 1.0}, "target_delta"),
        ({"target_delta": 1.5}, "target_delta"),
        ({"accountant": "gdp"}, "accountant"),
        ({"grad_sample_mode": "functorch"}, "grad_sample_mode"),
    ],
)
def test_dpconfig_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"DPConfig\.{field}="):
        DPConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"target_delta": 0.0}, "target_delta"),
        ({"target_delta": 2.0}, "target_delta"),
    ],
)
def test_user_dpconfig_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"UserDPConfig\.{field}="):
        UserDPConfig(**kwargs)


def test_delta_must_be_below_one_over_n_unless_forced():
    n = 100
    assert DPConfig(target_epsilon=1.0).check_delta(n) == pytest.approx(1 / (10 * n))
    assert default_delta(n) < 1 / n
    assert DPConfig(target_epsilon=1.0, target_delta=0.5 / n).check_delta(n) == 0.5 / n
    for bad in (1 / n, 0.05):
        with pytest.raises(ValueError, match=r"DPConfig\.target_delta=.*1/N"):
            DPConfig(target_epsilon=1.0, target_delta=bad).check_delta(n)
        assert DPConfig(target_epsilon=1.0, target_delta=bad, force_delta=True).check_delta(n) == bad
    with pytest.raises(ValueError, match=r"UserDPConfig\.target_delta="):
        UserDPConfig(target_delta=0.2).check_delta(10)
    assert UserDPConfig(target_delta=0.2, force_delta=True).check_delta(10) == 0.2


def test_enabled_and_from_dict():
    assert not DPConfig().enabled
    assert DPConfig(noise_multiplier=1.0).enabled
    cfg = DPConfig.from_dict({"dp-target-epsilon": "8", "dp-max-grad-norm": 0.5, "accountant": "rdp"})
    assert cfg.target_epsilon == 8.0 and cfg.max_grad_norm == 0.5 and cfg.accountant == "rdp"
    assert DPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key"):
        DPConfig.from_dict({"epsilon": 1.0})


def test_dp_metrics_keys_exact():
    m = dp_metrics(epsilon=1.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.01, steps=30, clip_norm=1.0)
    assert tuple(m) == DP_METRIC_KEYS
    assert set(m) == {"dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-sample-rate", "dp-steps", "dp-clip-norm"}
    assert isinstance(m["dp-steps"], int) and m["dp-epsilon"] == 1.5


def test_planning_helpers_and_calibration_args():
    assert poisson_sample_rate(100, 16) == 0.16
    assert poisson_sample_rate(10, 16) == 1.0
    assert local_steps(100, 16, epochs=2) == 14
    assert local_steps(100, 16, epochs=2, max_steps=5) == 5
    assert calibrate_noise(math.inf, 1e-5, 0.1, 10) == 0.0
    for kwargs, name in [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_delta": 1.0}, "target_delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"total_steps": 0}, "total_steps"),
        ({"accountant": "x"}, "accountant"),
    ]:
        args = {"target_epsilon": 1.0, "target_delta": 1e-5, "sample_rate": 0.1, "total_steps": 10} | kwargs
        with pytest.raises(ValueError, match=name):
            calibrate_noise(**args)


def test_accountant_state_validation_and_json():
    s = AccountantState(mechanism="rdp", history=[(1.1, 0.1, 5), [1.2, 0.1, 3]], noise_multiplier=1.2,
                        sample_rate=0.1, delta=1e-5, target_epsilon=math.inf)
    assert s.target_epsilon is None and s.steps == 8
    cfg = s.to_config()
    assert all(isinstance(v, str) for v in cfg.values())
    json.loads(next(iter(cfg.values())))
    assert AccountantState.from_config(cfg, mechanism="rdp") == s
    with pytest.raises(ValueError, match="another accountant"):
        AccountantState.from_config(cfg, mechanism="prv")
    assert AccountantState.from_config({}, mechanism="prv") == AccountantState(mechanism="prv")
    with pytest.raises(ValueError, match="mechanism"):
        AccountantState(mechanism="gdp")
    for bad in ([(-1.0, 0.1, 1)], [(1.0, 0.0, 1)], [(1.0, 0.1, 0)], [(1.0, 0.1)]):
        with pytest.raises(ValueError, match="history entry"):
            AccountantState(history=bad)


def test_one_default_accountant_everywhere():
    """DPConfig, AccountantState, the accounting functions and the run config share one default: rdp."""
    import inspect

    from fedlora.privacy import calibrate_noise as cal
    from fedlora.privacy import epsilon_of

    assert DEFAULT_ACCOUNTANT == "rdp"
    assert DPConfig().accountant == AccountantState().mechanism == DEFAULT_ACCOUNTANT
    assert AccountantState.from_config({}) == AccountantState(mechanism=DEFAULT_ACCOUNTANT)
    assert inspect.signature(cal).parameters["accountant"].default == DEFAULT_ACCOUNTANT
    assert inspect.signature(epsilon_of).parameters["mechanism"].default == DEFAULT_ACCOUNTANT
    from fedlora.run_config import RunConfig

    assert RunConfig().dp_accountant == DEFAULT_ACCOUNTANT


def test_privacy_configs_import_without_opacus():
    """The configs (and the accountant constants the run config uses) load without opacus (~1.5 s); the DP-SGD
    names load it on first use."""
    code = ("import sys\nimport fedlora.privacy.config\nfrom fedlora.privacy import DPConfig, DEFAULT_ACCOUNTANT\n"
            "print('opacus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]
