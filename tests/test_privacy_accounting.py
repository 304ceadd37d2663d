"""Accounting across simulated Flower rounds: ε after the last round equals opacus computed independently and
is ≤ the target; a round beyond the calibrated plan is refused before any training."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_TARGETS, make_tiny
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader

import fedlora as fl
from fedlora.privacy import STATE_KEY, AccountantState, BudgetExhausted, DPConfig, run_dp_training


def _dataset(n: int, seed: int = 0, length: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, length), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
         "labels": torch.tensor(int(ids[i, 0]) % 3)}
        for i in range(n)
    ]


def _nested_bert(r: int = 4) -> torch.nn.Module:
    model = make_tiny("bert")
    targets, save = TINY_TARGETS["bert"]
    return fl.apply_nested(model, fl.NestedLoraConfig(r=r, target_modules=targets, modules_to_save=save))


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_across_rounds_matches_opacus_and_budget_refuses(mechanism):
    n, batch, steps, rounds, target = 40, 8, 2, 3, 4.0
    model = _nested_bert()
    loader = DataLoader(_dataset(n), batch_size=batch)
    cfg = DPConfig(target_epsilon=target, accountant=mechanism, max_grad_norm=0.5)
    context_state: dict[str, str] = {}  # stands in for Flower's Context.state ConfigRecord
    metrics = {}
    for rnd in range(rounds):
        state = AccountantState.from_config(context_state, mechanism=mechanism)
        assert state.steps == rnd * steps
        result, state = run_dp_training(
            model, loader, cfg, state, num_rounds=rounds, steps=steps, lr=1e-3, seed=rnd, dp_seed=100 + rnd
        )
        assert result.steps == steps
        context_state.update(state.to_config())
        assert isinstance(context_state[STATE_KEY], str)
        metrics = result.metrics()

    delta = cfg.check_delta(n)
    q = batch / n
    sigma = metrics["dp-noise-multiplier"]
    if mechanism == "rdp":  # σ calibrated once for all rounds' steps (the PRV search is the same code, slower)
        assert sigma == get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q,
                                             steps=rounds * steps, accountant=mechanism)
    assert metrics["dp-sample-rate"] == q
    assert metrics["dp-steps"] == rounds * steps
    assert metrics["dp-delta"] == delta
    # independent opacus accountant, stepped as one uninterrupted run would
    ref = create_accountant(mechanism)
    for _ in range(rounds * steps):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    expected = ref.get_epsilon(delta)
    assert metrics["dp-epsilon"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert metrics["dp-epsilon"] <= target
    final = AccountantState.from_config(context_state, mechanism=mechanism)
    assert final.epsilon(delta) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert final.history == [(sigma, q, rounds * steps)]

    # round K+1: refused before training, nothing changes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExhausted, match="budget exhausted") as info:
        run_dp_training(model, loader, cfg, final, num_rounds=rounds, steps=steps, lr=1e-3, dp_seed=0)
    err = info.value
    assert err.epsilon_spent == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert err.epsilon_after > target == err.target_epsilon
    assert f"{target:.4g}" in str(err)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert AccountantState.from_config(context_state, mechanism=mechanism) == final


def test_would_exceed_uses_planned_sigma_and_rate():
    state = AccountantState(mechanism="rdp", history=[(1.0, 0.1, 10)], noise_multiplier=1.0, sample_rate=0.1,
                            delta=1e-5, target_epsilon=None)
    assert not state.would_exceed(10**6)  # no target: never refused
    eps_20 = state.epsilon_after(10)
    ref = create_accountant("rdp")
    ref.history = [(1.0, 0.1, 20)]
    assert eps_20 == ref.get_epsilon(1e-5)
    assert state.would_exceed(10, target_epsilon=eps_20 * 0.999)
    assert not state.would_exceed(10, target_epsilon=eps_20 * 1.001)
    # a different sigma appends a separate entry, as opacus would
    other = state.epsilon_after(5, noise_multiplier=2.0)
    ref.history = [(1.0, 0.1, 10), (2.0, 0.1, 5)]
    assert other == ref.get_epsilon(1e-5)
    assert math.isinf(AccountantState(history=[(0.0, 0.1, 1)]).epsilon(1e-5))
