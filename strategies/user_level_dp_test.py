"""User-level DP as a wrapper strategy (strategies.user_level_dp): noise of std σC/m on the change of the
global state, opacus RDP accounting, OS-entropy noise, bit-identical resume from a checkpoint."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord
from opacus.accountants.rdp import RDPAccountant

from strategies import UserLevelDP, load_strategy_state, save_strategy_state
from strategies._testing import (
    NODE_IDS,
    FakeGrid,
    R,
    arrays_of,
    bad_reply,
    clipped_upload,
    config_of,
    make,
    nested_global,
    node_of,
    random_upload,
    reply,
    snapshot,
)
from strategies.user_level_dp import UserBudgetExhausted
from strategies.wire import state_to_arrayrecord

SIGMA, CLIP, DELTA, POPULATION = 0.8, 0.5, 1e-5, 10
M = len(NODE_IDS)  # every node is sampled and used each round


def _strategy(name: str = "fedsb", **kw):
    return make(name, weighting="uniform", fraction_evaluate=0.0, min_available_nodes=M, **kw)


def _wrapped(name: str = "fedsb", **kw) -> UserLevelDP:
    return UserLevelDP(_strategy(name, **kw), SIGMA, CLIP, DELTA, POPULATION)


def _grid(dp: UserLevelDP | object) -> FakeGrid:
    """Clients whose uploads depend only on their per-round config seed (same replies in every run);
    ``dp``: the wrapper or the plain strategy whose tasks say what to upload."""
    strategy = getattr(dp, "strategy", dp)

    def client(msg):
        rng = np.random.default_rng(config_of(msg)["seed"])
        task = strategy._tasks[node_of(msg)]
        return reply(msg, clipped_upload(random_upload(task.expected, rng), task.download, CLIP), num_examples=10)

    return FakeGrid(NODE_IDS, client)


def _noise_free(sent: dict[str, np.ndarray], uploads: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """FedSB with uniform weights: R0 + mean(Rᵢ); modules_to_save: mean of the uploaded values."""
    out = {}
    for key, value in sent.items():
        mean = np.mean([u[key[:-1] if key.endswith(".R0") else key] for u in uploads], axis=0)
        out[key] = value + mean if key.endswith(".R0") else mean
    return out


def test_flower_start_gets_noised_updates_and_accounting():
    dp = _wrapped()
    grid = _grid(dp)
    uploads: list[list[dict[str, np.ndarray]]] = []
    inner_client = grid.client_fn

    def recording(msg):
        out = inner_client(msg)
        if len(uploads) < dp.strategy.round + 1:
            uploads.append([])
        uploads[-1].append(arrays_of(out))
        return out

    grid.client_fn = recording
    result = dp.start(grid, state_to_arrayrecord(nested_global(R)), num_rounds=3, timeout=1)
    sent = [arrays_of(batch[0]) for batch in grid.sent if batch]
    states = sent[1:] + [{k: v.numpy() for k, v in result.arrays.items()}]
    residuals = []
    acc = RDPAccountant()
    for rnd in (1, 2, 3):
        expected = _noise_free(sent[rnd - 1], uploads[rnd - 1])
        residuals += [(states[rnd - 1][k] - expected[k]).ravel() for k in expected]
        acc.step(noise_multiplier=SIGMA, sample_rate=M / POPULATION)
        metrics = result.train_metrics_clientapp[rnd]
        assert metrics["user-dp-epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
        assert metrics["user-dp-noise-std"] == pytest.approx(SIGMA * CLIP / M)
        assert metrics["user-dp-sample-rate"] == pytest.approx(M / POPULATION)
        assert dp.history[rnd - 1]["user-dp-epsilon"] == metrics["user-dp-epsilon"]
    noise = np.concatenate(residuals)
    assert noise.size > 500 and noise.std() == pytest.approx(SIGMA * CLIP / M, rel=0.15)
    assert abs(noise.mean()) < 5 * SIGMA * CLIP / M / np.sqrt(noise.size)
    # the noised state is written back into the wrapped strategy
    assert snapshot(dp.strategy.global_state) == snapshot(states[-1])
    assert 0 < dp.epsilon() == result.train_metrics_clientapp[3]["user-dp-epsilon"]


def _one_round(dp) -> dict[str, np.ndarray]:
    """One round of ``dp`` (wrapper or plain strategy) with the seed-determined replies; the new state."""
    grid = _grid(dp)
    msgs = list(dp.configure_train(1, dp.global_arrayrecord(), ConfigRecord(), grid))
    arrays, _ = dp.aggregate_train(1, grid.send_and_receive(msgs))
    return {k: v.numpy() for k, v in arrays.items()}


def test_noise_differs_between_fresh_runs_with_the_same_seed():
    """The noise generator is seeded from OS entropy, not from the run seed a client knows."""
    a, b = _one_round(_wrapped(seed=3)), _one_round(_wrapped(seed=3))
    plain = _one_round(_strategy(seed=3))
    for key in a:
        assert not np.array_equal(a[key], b[key]), key
        assert not np.array_equal(a[key], plain[key]), key
        # both are the same noise-free aggregate plus noise of std σC/m
        assert np.abs(a[key] - plain[key]).max() < 6 * SIGMA * CLIP / M


@pytest.mark.parametrize("name", ["fedsb", "hetero", "flora"])
def test_resume_from_checkpoint_is_bit_identical(name, tmp_path):
    full = _wrapped(name)
    full.start(_grid(full), full.global_arrayrecord(), num_rounds=1, timeout=1)
    save_strategy_state(full.state_dict(), tmp_path / "ckpt")
    full.start(_grid(full), full.global_arrayrecord(), num_rounds=2, timeout=1)  # rounds 2 and 3

    resumed = _wrapped(name)
    resumed.load_state_dict(load_strategy_state(tmp_path / "ckpt"))
    assert resumed.round == 1 and resumed.accountant.rounds == 1
    resumed.start(_grid(resumed), resumed.global_arrayrecord(), num_rounds=2, timeout=1)
    assert resumed.round == full.round == 3
    assert snapshot(resumed.global_state) == snapshot(full.global_state)
    timeless = [[{k: v for k, v in h.items() if k != "aggregation-seconds"} for h in dp.history]
                for dp in (resumed, full)]
    assert timeless[0] == timeless[1] and timeless[0][2]["user-dp-noise-std"] > 0
    assert resumed.epsilon() == full.epsilon() > 0


def test_round_that_keeps_the_global_state_releases_nothing():
    dp = _wrapped()
    before = snapshot(dp.global_state)
    msgs = list(dp.configure_train(1, dp.global_arrayrecord(), ConfigRecord(), FakeGrid(NODE_IDS)))
    rng = np.random.default_rng(0)
    arrays, metrics = dp.aggregate_train(1, [bad_reply("nan", dp.strategy, m, rng) for m in msgs])
    assert snapshot({k: v.numpy() for k, v in arrays.items()}) == before == snapshot(dp.global_state)
    assert metrics["kept-previous"] == 1 and metrics["user-dp-epsilon"] == 0.0
    assert "user-dp-noise-std" not in metrics and dp.accountant.rounds == 0


def test_wrapper_refuses_what_it_cannot_protect():
    with pytest.raises(ValueError, match="weighting"):
        UserLevelDP(make("fedsb"), SIGMA, CLIP, DELTA, POPULATION)
    with pytest.raises(ValueError, match="fedsb, hetero or flora"):
        UserLevelDP(make("fedit", weighting="uniform"), SIGMA, CLIP, DELTA, POPULATION)
    for args, key in [((-1.0, CLIP, DELTA, 5), "noise_multiplier"), ((SIGMA, 0.0, DELTA, 5), "clip_norm"),
                      ((SIGMA, CLIP, 1.0, 5), "delta"), ((SIGMA, CLIP, DELTA, 0), "population")]:
        with pytest.raises(ValueError, match=key):
            UserLevelDP(_strategy(), *args)
    with pytest.raises(ValueError, match="user-dp"):
        _wrapped().load_state_dict(_strategy().state_dict())


# ------------------------------------------------------------------------------ the server trusts no clip
def test_unclipped_update_is_rejected_and_the_round_goes_on(caplog):
    """A client that skipped clipping is rejected [clip] and logged; the rest are aggregated and noised."""
    dp = _wrapped()
    grid = _grid(dp)
    msgs = list(dp.configure_train(1, dp.global_arrayrecord(), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    cheat = msgs[0]
    task = dp.strategy._tasks[node_of(cheat)]
    raw = random_upload(task.expected, np.random.default_rng(7))  # norm ≈ 10 > C = 0.5
    replies[0] = reply(cheat, raw, num_examples=10)
    with caplog.at_level(logging.WARNING, logger="fedlora.strategy"):
        _, metrics = dp.aggregate_train(1, replies)
    (rej,) = dp.history[-1]["rejected"]
    assert rej["node"] == node_of(cheat) and rej["category"] == "clip" and "did not clip" in rej["reason"]
    assert any(f"node {node_of(cheat)}: reply rejected [clip]" in r.message for r in caplog.records)
    assert metrics["clients-used"] == M - 1 and metrics["kept-previous"] == 0
    # noise for the m = 4 used updates; accounting at q = sampled / population = 5 / 10
    assert metrics["user-dp-noise-std"] == pytest.approx(SIGMA * CLIP / (M - 1))
    assert metrics["user-dp-sample-rate"] == pytest.approx(M / POPULATION)


@pytest.mark.parametrize("seed", range(5))
def test_honest_float32_clients_at_the_clip_bound_pass(seed):
    """float32 uploads whose head is sent as clipped change + download (rounded to float32) are measured
    back within the tolerance: an honest client at exactly ‖Δ‖ = C is never rejected."""
    state = {k: (30.0 * v).astype(np.float32) for k, v in nested_global(R, seed=seed).items()}
    s = make("fedsb", weighting="uniform", fraction_evaluate=0.0, min_available_nodes=M, initial_state=state)
    dp = UserLevelDP(s, SIGMA, CLIP, DELTA, POPULATION)
    msgs = list(dp.configure_train(1, dp.global_arrayrecord(), ConfigRecord(), FakeGrid(NODE_IDS)))
    rng = np.random.default_rng(seed)
    replies = []
    for m in msgs:
        task = s._tasks[node_of(m)]
        up = {k: v.astype(np.float32) for k, v in random_upload(task.expected, rng).items()}
        sent = clipped_upload(up, task.download, CLIP)
        replies.append(reply(m, {k: v.astype(np.float32) for k, v in sent.items()}))
    _, metrics = dp.aggregate_train(1, replies)
    assert metrics["clients-used"] == M, dp.history[-1]["rejected"]


# ------------------------------------------------------------------------------ target ε
def test_calibrated_sigma_meets_the_target_after_all_rounds():
    target, rounds = 2.0, 4
    s = _strategy(fraction_train=0.5)  # 10 · 0.5 = 5 of the population of 10 planned per round: q = 0.5
    dp = UserLevelDP.calibrated(s, target, CLIP, DELTA, POPULATION, rounds)
    assert dp.target_epsilon == target and dp.noise_multiplier > 0
    grid = FakeGrid(list(range(1, POPULATION + 1)), _grid(dp).client_fn)
    dp.start(grid, dp.global_arrayrecord(), num_rounds=rounds, timeout=1)
    assert dp.accountant.rounds == rounds and all(h["clients-sampled"] == 5 for h in dp.history)
    ref = RDPAccountant()  # independent: a stock opacus accountant at the sampled rate
    for _ in range(rounds):
        ref.step(noise_multiplier=dp.noise_multiplier, sample_rate=5 / POPULATION)
    assert dp.epsilon() == pytest.approx(ref.get_epsilon(DELTA), rel=1e-9)
    assert target - 0.05 <= dp.epsilon() <= target  # calibrated, not over-noised
    assert dp.strategy.history[-1]["user-dp-sample-rate"] == pytest.approx(0.5)


def test_fixed_sigma_stops_before_the_round_that_would_exceed_the_target():
    acc = RDPAccountant()
    eps = []
    for _ in range(3):
        acc.step(noise_multiplier=SIGMA, sample_rate=M / POPULATION)
        eps.append(acc.get_epsilon(DELTA))
    target = (eps[1] + eps[2]) / 2  # two rounds fit, the third does not
    dp = UserLevelDP(_strategy(), SIGMA, CLIP, DELTA, POPULATION, target_epsilon=target)
    grid = _grid(dp)
    with pytest.raises(UserBudgetExhausted, match=r"round 3 would raise epsilon .* > user-dp-epsilon") as err:
        dp.start(grid, dp.global_arrayrecord(), num_rounds=5, timeout=1)
    assert "checkpoint keeps round 2" in str(err.value)
    assert dp.round == 2 and dp.accountant.rounds == 2 and len([b for b in grid.sent if b]) == 2  # round 3 unsent
    assert dp.epsilon() == pytest.approx(eps[1], rel=1e-9) and dp.epsilon() <= target


def test_delta_must_be_below_one_over_population():
    with pytest.raises(ValueError, match=r"delta=0.1: must be < 1/population = 0.1"):
        UserLevelDP(_strategy(), SIGMA, CLIP, 0.1, POPULATION)
    with pytest.raises(ValueError, match="target_epsilon"):
        UserLevelDP(_strategy(), SIGMA, CLIP, DELTA, POPULATION, target_epsilon=0.0)
    with pytest.raises(ValueError, match="norm_factor"):
        UserLevelDP(_strategy(norm_factor=3.0), SIGMA, CLIP, DELTA, POPULATION)
