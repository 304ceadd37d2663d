"""User-level DP on heterogeneous r×r updates: clipping bound, noise scale, RDP accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant

from fedlora.privacy import UserLevelAccountant, add_gaussian_noise, clip_update, update_norm


def _update(seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"l0.q.R": (8, 8), "l0.v.R": (4, 4), "l1.q.P": (8, 2), "l1.q.Q": (2, 8), "classifier.bias": (3,)}
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("clip", [0.05, 1.0, 3.7])
def test_clip_update_bounds_flat_norm(clip):
    upd = _update(0, scale=2.0)
    norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in upd.values()))
    clipped, pre = clip_update(upd, clip)
    assert pre == pytest.approx(norm, rel=1e-12)
    assert norm > clip  # the bound is actually exercised
    assert update_norm(clipped) <= clip
    assert update_norm(clipped) == pytest.approx(clip, rel=1e-5)
    for k, a in upd.items():  # same direction, shapes, dtypes; a single global scale
        assert clipped[k].shape == a.shape and clipped[k].dtype == a.dtype
        np.testing.assert_allclose(clipped[k], a * (clip / norm), rtol=1e-5, atol=1e-7)


def test_clip_update_leaves_small_update_unchanged():
    upd = _update(1, scale=1e-3)
    clipped, pre = clip_update(upd, 10.0)
    assert pre < 10.0
    for k in upd:
        np.testing.assert_array_equal(clipped[k], upd[k])
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(upd, 0.0)
    bad = dict(upd)
    bad["l0.v.R"] = np.full((4, 4), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="l0.v.R"):
        clip_update(bad, 1.0)


def test_noise_std_is_sigma_c_over_m():
    sigma, clip, m = 1.3, 0.7, 5
    agg = {"a.R": np.zeros((300, 300), np.float32), "b.R": np.zeros((200, 200), np.float32), "c": np.zeros(7)}
    noisy = add_gaussian_noise(agg, sigma, clip, m, np.random.default_rng(0))
    vals = np.concatenate([v.astype(np.float64).ravel() for v in noisy.values()])
    expected = sigma * clip / m
    assert vals.std() == pytest.approx(expected, rel=0.01)
    assert abs(vals.mean()) < 5 * expected / math.sqrt(vals.size)
    assert {k: v.shape for k, v in noisy.items()} == {k: v.shape for k, v in agg.items()}
    assert noisy["a.R"].dtype == np.float32
    # a different std would be detected: twice the clients, half the std
    half = add_gaussian_noise(agg, sigma, clip, 2 * m, np.random.default_rng(1))
    assert np.concatenate([v.ravel() for v in half.values()]).std() == pytest.approx(expected / 2, rel=0.01)


def test_user_level_accountant_matches_opacus_rdp():
    sigma, m, population, rounds, delta = 1.1, 10, 100, 6, 1e-3
    acc = UserLevelAccountant(sigma)
    store: dict[str, str] = {}
    for _ in range(rounds):  # persisted through a config dict between rounds
        acc = UserLevelAccountant.from_config(store, sigma)
        acc.step(m, population)
        store.update(acc.to_config())
    acc = UserLevelAccountant.from_config(store, sigma)
    assert acc.rounds == rounds
    eps = acc.epsilon(delta)
    # independent: opacus' RDP analysis functions directly
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=m / population, noise_multiplier=sigma, steps=rounds, orders=orders)
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert eps == pytest.approx(float(expected), rel=1e-12)
    # and a stock opacus accountant stepped round by round
    ref = RDPAccountant()
    for _ in range(rounds):
        ref.step(noise_multiplier=sigma, sample_rate=m / population)
    assert eps == pytest.approx(ref.get_epsilon(delta), rel=1e-12)
    assert 0 < eps < math.inf
    assert UserLevelAccountant(sigma).epsilon(delta) == 0.0
    zero = UserLevelAccountant(0.0)
    zero.step(m, population)
    assert zero.epsilon(delta) == math.inf
    with pytest.raises(ValueError, match="num_sampled"):
        acc.step(0, population)


# ------------------------------------------------------------------------------ run config → the wrapper
def _cfg(**kw):
    from fedlora.run_config import parse_run_config

    return parse_run_config({"strategy": "fedsb", "weighting": "uniform", "user-dp-clip": 0.5, **kw})


@pytest.mark.parametrize(("overrides", "key", "text"), [
    ({"user-dp-noise": 0.0}, "user-dp-clip", "without noise protects nothing"),
    ({"user-dp-clip": 0.0, "user-dp-epsilon": 2.0}, "user-dp-epsilon", "needs user-dp-clip > 0"),
    ({"user-dp-epsilon": 2.0, "population": 10, "user-dp-delta": 0.1}, "user-dp-delta", "must be < 1/population"),
    ({"user-dp-noise": 1.0, "user-dp-delta": 1.0}, "user-dp-delta", "must be in [0, 1)"),
    ({"user-dp-noise": 1.0, "max-update-norm-factor": 3.0}, "max-update-norm-factor", "must be 0 under user-level"),
])
def test_bad_user_dp_config_fails_at_start_naming_the_key(overrides, key, text):
    from fedlora.run_config import ConfigError

    with pytest.raises(ConfigError, match=key) as err:
        _cfg(**overrides)
    assert err.value.key == key and text in str(err.value)


def test_server_builds_the_wrapper_with_default_delta_calibrated_sigma_or_refusal():
    from fedlora.run_config import ConfigError
    from simulations.server_app import user_dp_wrapper
    from strategies._testing import make

    def strategy():
        return make("fedsb", weighting="uniform", fraction_train=0.5)

    cfg = _cfg(**{"user-dp-epsilon": 3.0, "num-server-rounds": 4})
    dp = user_dp_wrapper(strategy(), cfg, 20)
    assert dp.delta == pytest.approx(1 / 200) and dp.population == 20 and dp.target_epsilon == 3.0
    # σ calibrated for 4 rounds at q = 10/20: ε after them ≤ target (independent opacus accountant)
    ref = RDPAccountant()
    for _ in range(4):
        ref.step(noise_multiplier=dp.noise_multiplier, sample_rate=0.5)
    assert 3.0 - 0.05 <= ref.get_epsilon(dp.delta) <= 3.0
    fixed = user_dp_wrapper(strategy(), _cfg(**{"user-dp-noise": 1.3, "user-dp-epsilon": 3.0}), 20)
    assert fixed.noise_multiplier == 1.3 and fixed.target_epsilon == 3.0
    assert user_dp_wrapper(strategy(), _cfg(**{"user-dp-noise": 1.3}), 20).target_epsilon is None
    with pytest.raises(ConfigError, match="user-dp-delta") as err:  # population known only at start
        user_dp_wrapper(strategy(), _cfg(**{"user-dp-noise": 1.3, "user-dp-delta": 0.2}), 5)
    assert "1/population" in str(err.value)
    with pytest.raises(ConfigError, match="population"):
        user_dp_wrapper(strategy(), _cfg(**{"user-dp-noise": 1.3}), 0)
