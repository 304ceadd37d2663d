"""Real model, real data: nested adapters on MiniLM learn on Rotten Tomatoes."""

from __future__ import annotations

import torch

import fedlora as fl
from fedlora import data as fdata
from fedlora.experiment import ExperimentSpec, NestedAdapter, build_model, make_loader
from fedlora.training import evaluate, train_local


def test_few_steps_lower_training_loss_on_real_data():
    torch.set_num_threads(1)
    spec = ExperimentSpec(strategy="fedsb", r=16)
    model = build_model(spec)  # cached per process: start from the pristine global state
    NestedAdapter().load_for_eval(model, NestedAdapter().initial_global_state(model))
    ds = fdata.load_rotten_tomatoes().shuffle(seed=0).select(range(64))
    loader = make_loader(spec, ds, batch_size=16, shuffle=False)
    before = evaluate(model, loader)["loss"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_local(model, make_loader(spec, ds, batch_size=16, shuffle=True, seed=0), epochs=3, lr=2e-2, seed=0)
    after = evaluate(model, loader)["loss"]
    assert after < before - 0.02, (before, after)
    # only the inner matrices and the head moved
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert all(v.shape == (16, 16) for k, v in fl.inner_state(model).items() if k.endswith(".R"))
