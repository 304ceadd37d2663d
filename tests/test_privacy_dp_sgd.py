"""DP-SGD on nested adapters with opacus: clipping, exact DP update, nn.Linear-only grad samplers, ghost
clipping, empty Poisson batches and the opacus#820 silent-corruption guard (nested and peft LoRA)."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_TARGETS, make_tiny
from opacus.accountants import create_accountant
from torch import nn
from torch.utils.data import DataLoader

import fedlora as fl
from fedlora.privacy import (
    AccountantState,
    DPConfig,
    PrivateSetup,
    check_grad_samplers,
    dp_step,
    make_private,
    per_example_loss,
    release,
    run_dp_training,
    update_state,
)
from fedlora.privacy import dp_sgd as dp_sgd_module
from fedlora.training import train_local

LENGTH = 8


def _dataset(n: int, seed: int = 0, causal: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, LENGTH), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
         "labels": ids[i].clone() if causal else torch.tensor(int(ids[i, 0]) % 3)}
        for i in range(n)
    ]


def _batch(n: int, seed: int = 1, causal: bool = False) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate(_dataset(n, seed, causal))


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _nested(kind: str = "bert", **kw) -> nn.Module:
    targets, save = TINY_TARGETS[kind]
    kw.setdefault("r", 6)
    model = _no_dropout(make_tiny(kind))
    fl.apply_nested(model, fl.NestedLoraConfig(target_modules=targets, modules_to_save=save, **kw))
    if kw.get("mode") == "nora":  # P starts at 0; give the per-sample gradient of Q something to see
        with torch.no_grad():
            for layer in fl.nested_layers(model).values():
                layer.P.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return model.train()


def _peft_lora() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    base = _no_dropout(make_tiny("bert"))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(base, cfg).train()


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _per_example_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """Reference per-example gradients by plain autograd, one example at a time (no opacus)."""
    params = list(_trainable(model).values())
    out = []
    for i in range(batch["input_ids"].shape[0]):
        inputs = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
        loss = per_example_loss(model(**inputs).logits, batch["labels"][i : i + 1]).sum()
        out.append([g.detach() for g in torch.autograd.grad(loss, params, allow_unused=False)])
    return out


def _setup(model, *, sigma=0.0, clip=1.0, mode="hooks", n=32, batch=8, causal=False, lr=1.0, seed=0):
    loader = DataLoader(_dataset(n, causal=causal), batch_size=batch)
    opt = torch.optim.SGD(list(_trainable(model).values()), lr=lr)
    return make_private(model, opt, loader, noise_multiplier=sigma, max_grad_norm=clip,
                        accountant_state=AccountantState(mechanism="rdp"), grad_sample_mode=mode, seed=seed)


# ------------------------------------------------------------------------------------ clipping
def test_per_sample_gradients_are_clipped_to_c():
    clip = 1e-3
    model = _nested("bert", mode="sb")
    setup = _setup(model, sigma=0.0, clip=clip)
    opt = setup.optimizer
    seen: dict[str, list[torch.Tensor]] = {}
    original = opt.clip_and_accumulate

    def spy() -> None:
        seen["grad_samples"] = [g.detach().clone() for g in opt.grad_samples]
        original()
        seen["summed"] = [p.summed_grad.detach().clone() for p in opt.params]

    opt.clip_and_accumulate = spy
    batch = _batch(7)
    dp_step(setup, batch)
    gs = seen["grad_samples"]
    assert all(g.shape[0] == 7 for g in gs)
    norms = torch.stack([g.reshape(7, -1).norm(dim=1) for g in gs], dim=1).norm(dim=1)
    assert (norms > clip).all()  # clipping actually binds
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # opacus' flat clipping rule
    clipped = [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in gs]
    clipped_norms = torch.stack([c.reshape(7, -1).norm(dim=1) for c in clipped], dim=1).norm(dim=1)
    assert (clipped_norms <= clip + 1e-6).all()
    for c, s in zip(clipped, seen["summed"]):  # the optimizer summed exactly these clipped gradients
        torch.testing.assert_close(c.sum(0), s, rtol=1e-5, atol=1e-9)
    release(setup)


@pytest.mark.parametrize(
    ("kind", "mode", "grad_mode", "nested_kw"),
    [
        ("bert", "sb", "hooks", {"client_rank": 4}),
        ("bert", "nora", "hooks", {"inner_rank": 2}),
        ("bert", "sb", "ghost", {}),
        ("gpt2", "sb", "hooks", {}),
        ("gpt2", "sb", "ghost", {}),
    ],
)
def test_dp_update_equals_manual_clipped_sum(kind, mode, grad_mode, nested_kw):
    """σ = 0, SGD(lr=1): Δθ = −Σᵢ min(1, C/‖gᵢ‖) gᵢ / (q·N), gᵢ from plain per-example autograd."""
    causal = kind == "gpt2"
    model = _nested(kind, mode=mode, **nested_kw)
    batch = _batch(6, causal=causal)
    ref = _per_example_grads(model, batch)
    norms = torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in gi)) for gi in ref])
    clip = float(norms.median())  # half the examples are clipped
    n, b = 30, 8  # q = 8/30: opacus' own 1/len(loader) convention would give 1/3 and divide by 10
    before = {k: v.detach().clone() for k, v in _trainable(model).items()}
    setup = _setup(model, clip=clip, mode=grad_mode, n=n, batch=b, causal=causal)
    if grad_mode == "hooks":
        assert all(gs is None for gs in (p.grad_sample for p in setup.optimizer.params))
    dp_step(setup, batch)
    assert update_state(setup, AccountantState(mechanism="rdp")).history == [(0.0, b / n, 1)]
    release(setup)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    for j, (name, p) in enumerate(_trainable(model).items()):
        expected = -sum(float(factor[i]) * ref[i][j] for i in range(len(ref))) / (b / n * n)
        torch.testing.assert_close(p.detach() - before[name], expected, rtol=2e-4, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------ grad samplers
@pytest.mark.parametrize("which", ["sb", "nora", "llama", "peft"])
def test_only_registered_linear_grad_samplers(which):
    if which == "peft":
        model = _peft_lora()
    elif which == "llama":
        model = _nested("llama", mode="sb")
    else:
        model = _nested("bert", mode=which)
    report = check_grad_samplers(model)
    assert report and set(report.values()) == {"compute_linear_grad_sample"}
    if which != "peft":
        pattern = r".*\.(R|P|Q)$|^classifier$"
        assert all(re.fullmatch(pattern, name) for name in report), report
        assert not any(name.endswith(".base") for name in report)
    else:
        assert all("lora_" in name or "modules_to_save" in name for name in report), report
    causal = which == "llama"
    setup = _setup(model, sigma=0.5, clip=1.0, causal=causal)
    # opacus attached one forward + one backward hook per trainable nn.Linear and nothing else
    assert len(model.autograd_grad_sample_hooks) == 2 * len(report)
    assert not any(hasattr(m, "ft_compute_sample_grad") for m in model.modules())
    check_grad_samplers(model)
    dp_step(setup, _batch(5, causal=causal))
    release(setup)
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_nested_r_grad_sample_is_r_by_r():
    model = _nested("bert", mode="sb", client_rank=3)
    setup = _setup(model, clip=1e9)
    shapes = {}
    original = setup.optimizer.clip_and_accumulate

    def spy() -> None:
        shapes.update({id(p): tuple(p.grad_sample.shape) for p in setup.optimizer.params})
        original()

    setup.optimizer.clip_and_accumulate = spy
    dp_step(setup, _batch(5))
    for layer in fl.nested_layers(model).values():
        assert shapes[id(layer.R.weight)] == (5, 3, 3)
    release(setup)


class _RawScale(nn.Module):
    """A trainable raw nn.Parameter: opacus has no grad sampler for it and would use functorch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


def test_functorch_fallback_and_scope_violations_are_refused():
    model = _nested("bert", mode="sb")
    model.classifier = _RawScale(model.classifier)  # still inside modules_to_save "classifier"
    with pytest.raises(ValueError, match=r"module classifier \(_RawScale\).*functorch"):
        check_grad_samplers(model)
    with pytest.raises(ValueError, match="functorch"):
        _setup(model)
    model = _nested("bert", mode="sb")
    base = "bert.encoder.layer.0.attention.self.query.base.weight"
    model.get_parameter(base).requires_grad_(True)
    with pytest.raises(ValueError, match=re.escape(base)):
        _setup(model)


def test_stale_optimizer_parameters_are_refused():
    """opacus#820's failure mode: the optimizer holds parameters the model no longer uses."""
    model = _nested("bert", mode="sb")
    stale = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in stale.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(_dataset(16), batch_size=4)
    with pytest.raises(ValueError):
        make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0,
                     accountant_state=AccountantState())
    partial = torch.optim.SGD([model.classifier.weight], lr=0.1)
    with pytest.raises(ValueError, match="optimizer parameters differ"):
        make_private(model, partial, loader, noise_multiplier=1.0, max_grad_norm=1.0,
                     accountant_state=AccountantState())


# ------------------------------------------------------------------------------------ empty batches
@pytest.mark.parametrize("grad_mode", ["hooks", "ghost"])
def test_empty_poisson_batch_is_a_noise_only_accounted_step(grad_mode):
    model = _nested("bert", mode="sb")
    before = {k: v.detach().clone() for k, v in _trainable(model).items()}
    setup = _setup(model, sigma=1.0, clip=0.1, lr=0.1, mode=grad_mode)
    empty = {"input_ids": torch.empty(0, LENGTH, dtype=torch.long),
             "attention_mask": torch.empty(0, LENGTH, dtype=torch.long), "labels": torch.empty(0, dtype=torch.long)}
    dp_step(setup, empty)
    state = update_state(setup, AccountantState(mechanism="rdp"))
    release(setup)
    assert state.history == [(1.0, 8 / 32, 1)]
    for k, p in _trainable(model).items():
        delta = p.detach() - before[k]
        assert torch.isfinite(delta).all() and delta.abs().max() > 0, k  # pure noise, lr·σC/(qN) scale
        assert delta.abs().max() < 0.1 * 1.0 * 0.1 / 8 * 8, k


def test_first_poisson_batch_empty_is_handled():
    """opacus' empty-batch collate fails on dict examples before a non-empty batch: ours yields {}."""
    model = _nested("bert", mode="sb")
    loader = DataLoader(_dataset(16), batch_size=4)
    opt = torch.optim.SGD(list(_trainable(model).values()), lr=0.1)
    setup = make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0,
                         accountant_state=AccountantState(mechanism="rdp"), sample_rate=1e-9, seed=0)
    batch = next(iter(setup.loader))
    assert batch == {}
    dp_step(setup, batch)
    assert update_state(setup, AccountantState(mechanism="rdp")).history == [(1.0, 1e-9, 1)]
    release(setup)


# ------------------------------------------------------------------------------------ opacus#820 guard
def _eval_loss(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    batch = torch.utils.data.default_collate(data)
    was = model.training
    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = float(per_example_loss(model(**inputs).logits, batch["labels"]).mean())
    model.train(was)
    return loss


@pytest.mark.parametrize(("which", "grad_mode"), [("nested-sb", "hooks"), ("nested-nora", "ghost"),
                                                   ("peft", "hooks")])
def test_opacus_820_guard_frozen_identical_trainable_bounded(which, grad_mode):
    lr, steps = 2e-3, 5
    model = _peft_lora() if which == "peft" else _nested("bert", mode=which.split("-")[1])
    held_out = _dataset(48, seed=9)
    start_loss = _eval_loss(model, held_out)
    frozen = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    frozen |= {f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()}
    if which != "peft":  # the outer factors and offsets are buffers: they must be covered
        assert any(k.endswith(".A") for k in frozen) and any(k.endswith(".R0") for k in frozen)
    else:
        assert any("base_layer" in k for k in frozen)
    assert any("embeddings" in k for k in frozen)
    trainable_before = {k: v.detach().clone() for k, v in _trainable(model).items()}
    loader = DataLoader(_dataset(40), batch_size=8)
    cfg = DPConfig(target_epsilon=8.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode=grad_mode)
    result, state = run_dp_training(model, loader, cfg, None, num_rounds=2, steps=steps, lr=lr, dp_seed=5)
    assert result.steps == steps and state.steps == steps
    for key, value in frozen.items():
        kind, name = key.split(":", 1)
        now = model.get_parameter(name) if kind == "param" else model.get_buffer(name)
        assert torch.equal(now, value), f"frozen {key} changed"
    for name, p in _trainable(model).items():
        change = (p.detach() - trainable_before[name]).abs().max()
        assert torch.isfinite(p).all(), name
        # AdamW moves each entry by ≲ lr per step
        assert 0 < change <= 3 * lr * steps, (name, float(change))
    assert set(_trainable(model)) == set(trainable_before)
    end_loss = _eval_loss(model, held_out)
    assert end_loss == end_loss and abs(end_loss) != float("inf")
    assert end_loss <= start_loss + 0.25


# ------------------------------------------------------------------------------------ one loop, DP or not
def _padded_dataset(n: int, causal: bool) -> list[dict[str, torch.Tensor]]:
    """Examples of different lengths (padding, labels -100 on it): the causal-LM objective is per example."""
    data = _dataset(n, seed=4, causal=causal)
    for i, ex in enumerate(data):
        pad = i % 3
        if pad:
            ex["attention_mask"][-pad:] = 0
            if causal:
                ex["labels"][-pad:] = -100
    return data


def _identity_engine(model, optimizer, loader, *, noise_multiplier, max_grad_norm, accountant_state,
                     grad_sample_mode="hooks", seed=None, sample_rate=None) -> PrivateSetup:
    """``make_private`` with the privacy engine replaced by the identity: the plain model, optimizer and loader
    (no per-sample gradients, clipping, noise or Poisson sampling), an accountant that never steps."""
    engine = SimpleNamespace(accountant=create_accountant(accountant_state.mechanism))
    return PrivateSetup(model, optimizer, loader, None, engine, SimpleNamespace(cleanup=lambda: None),
                        float(sample_rate), float(noise_multiplier), float(max_grad_norm), grad_sample_mode)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_dp_training_is_the_non_dp_loop_over_the_private_engine(monkeypatch, kind):
    """With the privacy engine replaced by the identity, the DP entry point (``run_dp_training``) and the non-DP
    one (``train_local``) give bit-identical parameters, loss and counts from the same seed: the engine is the
    only difference between DP and non-DP training (same loop, objective, optimizer, steps and seeding)."""
    causal = kind == "gpt2"
    data = _padded_dataset(20, causal)
    epochs, steps, lr = 2, 6, 1e-2  # 4 batches of 6 a pass: the DP loop makes a second pass, as the plain one does
    m_dp, m_plain = _nested(kind, mode="sb"), _nested(kind, mode="sb")
    for m in (m_dp, m_plain):
        m.train()
        for module in m.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.1  # dropout on: both entry points must seed it the same way
    before = {name: p.detach().clone() for name, p in _trainable(m_dp).items()}
    monkeypatch.setattr(dp_sgd_module, "make_private", _identity_engine)
    cfg = DPConfig(noise_multiplier=1.0, accountant="rdp")
    result, state = run_dp_training(m_dp, DataLoader(data, batch_size=6), cfg, None, num_rounds=1, epochs=epochs,
                                    steps=steps, lr=lr, seed=3)
    plain = train_local(m_plain, DataLoader(data, batch_size=6), epochs=epochs, max_steps=steps, lr=lr, seed=3)
    assert result.steps == plain.steps == steps and result.num_examples == plain.num_examples == 32
    assert result.loss == plain.loss and state.steps == 0  # the identity engine accounts nothing
    for (name, p), (_, q) in zip(m_dp.named_parameters(), m_plain.named_parameters()):
        assert torch.equal(p, q), name
    assert all(not torch.equal(p, before[name]) for name, p in _trainable(m_dp).items())  # and they trained


def test_dp_disabled_is_exactly_the_non_dp_loop():
    """The privacy sweep's ε = ∞ cell: ``run_dp_training`` without DP is ``train_local`` on the same loader."""
    data = _padded_dataset(20, causal=False)

    def shuffled() -> DataLoader:
        return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))

    m_off, m_plain = _nested("bert", mode="sb"), _nested("bert", mode="sb")
    result, state = run_dp_training(m_off, shuffled(), DPConfig(), None, num_rounds=3, epochs=2, lr=1e-2, seed=5)
    plain = train_local(m_plain, shuffled(), epochs=2, lr=1e-2, seed=5)
    assert result.steps == plain.steps == 6 and result.loss == plain.loss and result.epsilon == float("inf")
    assert state == AccountantState(mechanism="rdp")
    for (name, p), (_, q) in zip(m_off.named_parameters(), m_plain.named_parameters()):
        assert torch.equal(p, q), name
