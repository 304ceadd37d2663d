"""Nested adapters: identity at init, parameter counts, strict state loading, ranks, fingerprints."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY_TARGETS, make_tiny, tokens

import fedlora as fl
from fedlora.nested.layer import NestedLinear


def _cfg(kind: str, **kw) -> fl.NestedLoraConfig:
    targets, save = TINY_TARGETS[kind]
    kw.setdefault("r", 8)
    return fl.NestedLoraConfig(target_modules=targets, modules_to_save=save, **kw)


def _out(model, x):
    with torch.no_grad():
        return model(x).logits


def _randomize_inner(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


# ------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("init", ["zero", "principal"])
@pytest.mark.parametrize("mode", ["sb", "nora"])
def test_identity_at_init(kind, init, mode):
    model = make_tiny(kind)
    x = tokens()
    before = _out(model, x)
    fl.apply_nested(model, _cfg(kind, init=init, mode=mode, inner_rank=2))
    after = _out(model, x)
    assert len(fl.nested_layers(model)) >= 4
    tol = 0.0 if init == "zero" else 1e-5
    assert (after - before).abs().max().item() <= tol
    # and the adapter is live: perturbing the inner part changes the output
    _randomize_inner(model)
    assert (_out(model, x) - before).abs().max().item() > 1e-4


def test_adapted_layers_are_non_square_and_conv1d_supported():
    model = fl.apply_nested(make_tiny("gpt2"), _cfg("gpt2"))
    layers = fl.nested_layers(model)
    assert all(layer.fan_in_fan_out for layer in layers.values())  # GPT-2 Conv1D
    shapes = {tuple(layer.B.shape[:1]) + tuple(layer.A.shape[1:]) for layer in layers.values()}
    assert any(d != k for d, k in shapes)
    llama = fl.apply_nested(make_tiny("llama"), _cfg("llama"))
    kv = fl.nested_layers(llama)["model.layers.0.self_attn.k_proj"]
    assert kv.B.shape[0] == 24 and kv.A.shape[1] == 48  # grouped KV heads: 2 of 4 heads x 12


def test_minilm_identity_at_init():
    from fedlora.models import load_model

    model = load_model("minilm", task="seq-cls", num_labels=2, seed=0).eval()
    x = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _out(model, x)
    fl.apply_nested(model, fl.NestedLoraConfig(r=16, target_modules=["query", "value"],
                                               modules_to_save=["classifier"], init="principal"))
    assert len(fl.nested_layers(model)) == 12
    assert (_out(model, x) - before).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_trainable_parameter_counts(kind):
    r, q = 8, 3
    sb = fl.apply_nested(make_tiny(kind), _cfg(kind, r=r))
    head = sum(p.numel() for n, p in make_tiny(kind).named_parameters() if n.startswith("classifier"))
    n_layers = len(fl.nested_layers(sb))
    assert fl.trainable_parameter_count(sb) == n_layers * r * r + head
    nora = fl.apply_nested(make_tiny(kind), _cfg(kind, r=r, mode="nora", inner_rank=q))
    assert fl.trainable_parameter_count(nora) == n_layers * 2 * r * q + head
    # everything that is not inner or modules_to_save is frozen
    for name, p in sb.named_parameters():
        if p.requires_grad:
            assert name.endswith(".R.weight") or name.startswith("classifier"), name


def test_outer_factors_orthonormal_and_canonical():
    model = fl.apply_nested(make_tiny("bert", dtype=torch.float64), _cfg("bert", r=8))
    for layer in fl.nested_layers(model).values():
        B, A = layer.B, layer.A
        eye = torch.eye(8, dtype=torch.float64)
        assert torch.allclose(B.T @ B, eye, atol=1e-12)
        assert torch.allclose(A @ A.T, eye, atol=1e-12)
        idx = B.abs().argmax(dim=0)
        assert (B[idx, torch.arange(8)] > 0).all()
        assert (layer.S[:-1] >= layer.S[1:]).all()


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw, field",
    [({"r": 0}, "r"), ({"mode": "xx"}, "mode"), ({"init": "pissa"}, "init"), ({"r": 4, "inner_rank": 5}, "inner_rank"),
     ({"alpha": -1.0}, "alpha"), ({"r": 4, "client_rank": 8}, "client_rank"), ({"dropout": 1.5}, "dropout"),
     ({"svd_method": "qr"}, "svd_method"), ({"target_modules": []}, "target_modules")],
)
def test_config_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=rf"NestedLoraConfig\.{field}="):
        fl.NestedLoraConfig(**kw)


def test_apply_rejects_bad_targets_and_rank():
    with pytest.raises(ValueError, match="target_modules"):
        fl.apply_nested(make_tiny("bert"), fl.NestedLoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        fl.apply_nested(make_tiny("bert"), fl.NestedLoraConfig(target_modules=["query"], modules_to_save=["x"]))
    with pytest.raises(ValueError, match="r=64 exceeds"):
        fl.apply_nested(make_tiny("bert"), fl.NestedLoraConfig(r=64, target_modules=["query"]))
    model = fl.apply_nested(make_tiny("bert"), _cfg("bert"))
    with pytest.raises(ValueError, match="already"):
        fl.apply_nested(model, _cfg("bert"))


# ------------------------------------------------------------------------------------- states
def test_inner_state_roundtrip_and_keys():
    model = fl.apply_nested(make_tiny("bert"), _cfg("bert", mode="nora", inner_rank=2))
    _randomize_inner(model)
    state = fl.inner_state(model)
    layer = "bert.encoder.layer.0.attention.self.query"
    assert state[f"{layer}.P"].shape == (8, 2) and state[f"{layer}.Q"].shape == (2, 8)
    assert "classifier.weight" in state and "classifier.bias" in state
    other = fl.apply_nested(make_tiny("bert"), _cfg("bert", mode="nora", inner_rank=2))
    x = tokens()
    fl.load_inner_state(other, state)
    assert torch.equal(_out(other, x), _out(model, x))
    state[f"{layer}.P"][0, 0] += 1.0  # a copy: the model is not aliased
    assert not np.array_equal(fl.inner_state(model)[f"{layer}.P"], state[f"{layer}.P"])


def _corrupt(kind_of_error: str, state: dict, key: str) -> dict:
    bad = {k: v.copy() for k, v in state.items()}
    if kind_of_error == "shape":
        bad[key] = np.zeros((3, 3), dtype=np.float32)
    elif kind_of_error == "nan":
        bad[key][0, 0] = np.nan
    elif kind_of_error == "inf":
        bad[key][1, 1] = np.inf
    elif kind_of_error == "missing":
        del bad[key]
    elif kind_of_error == "extra":
        bad[key.replace("query", "key")] = bad[key]
    elif kind_of_error == "dtype":
        bad[key] = bad[key].astype(np.int64)
    return bad


@pytest.mark.parametrize("error", ["shape", "nan", "inf", "missing", "extra", "dtype"])
def test_load_inner_state_rejects_and_leaves_model_unchanged(error):
    model = fl.apply_nested(make_tiny("bert"), _cfg("bert"))
    _randomize_inner(model)
    good = fl.inner_state(model)
    x = tokens()
    y_before = _out(model, x)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = "bert.encoder.layer.1.attention.self.query.R"
    # a valid update to other keys comes first in iteration order: none of it may be written
    bad = _corrupt(error, {k: v + 1.0 if k != key else v for k, v in good.items()}, key)
    with pytest.raises(fl.InnerStateError) as exc:
        fl.load_inner_state(model, bad)
    expected_key = key.replace("query", "key") if error == "extra" else key
    assert expected_key in str(exc.value)
    assert exc.value.key == expected_key
    assert torch.equal(_out(model, x), y_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_global_state_roundtrip_and_merge():
    model = fl.apply_nested(make_tiny("bert", dtype=torch.float64), _cfg("bert", mode="nora", inner_rank=2))
    _randomize_inner(model)
    x = tokens()
    y = _out(model, x)
    dw = fl.delta_weights(model)
    fl.merge_inner(model)  # R0 <- R0 + PQ, restart P, Q with PQ = 0
    assert torch.allclose(_out(model, x), y, atol=1e-12)
    for name, t in fl.delta_weights(model).items():
        assert torch.allclose(t, dw[name], atol=1e-12)
    g = fl.global_state(model)
    assert all(v.shape == (8, 8) for k, v in g.items() if k.endswith(".R0"))
    other = fl.apply_nested(make_tiny("bert", dtype=torch.float64), _cfg("bert", mode="nora", inner_rank=2))
    fl.load_global_state(other, g)
    assert torch.allclose(_out(other, x), y, atol=1e-12)
    with pytest.raises(fl.InnerStateError, match="R0"):
        fl.load_global_state(other, {k: (v * np.nan if k.endswith("R0") else v) for k, v in g.items()})


# ------------------------------------------------------------------------------------- ranks
def test_rank_ri_changes_only_top_left_block():
    r, ri = 8, 3
    model = make_tiny("llama", dtype=torch.float64)
    fl.apply_nested(model, _cfg("llama", r=r, client_rank=ri))
    # a non-zero global state is applied in full
    g = fl.global_state(model)
    rng = np.random.default_rng(0)
    g = {k: rng.normal(size=v.shape) * 0.1 for k, v in g.items()}
    fl.load_global_state(model, g)
    layers = fl.nested_layers(model)
    assert all(layer.R.weight.shape == (ri, ri) for layer in layers.values())
    x = tokens()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, layer in layers.items():
        eff = layer.effective_inner().detach().numpy()
        change = eff - g[f"{name}.R0"]
        assert np.abs(change[:ri, :ri]).max() > 0  # the block trained
        outside = change.copy()
        outside[:ri, :ri] = 0
        assert np.abs(outside).max() == 0.0  # nothing outside the block moved
    # its upload is the r_i x r_i block
    assert all(v.shape == (ri, ri) for v in fl.inner_state(model).values())


def test_reset_inner_changes_rank_and_zeroes_update():
    model = fl.apply_nested(make_tiny("bert"), _cfg("bert", r=8))
    _randomize_inner(model)
    fl.reset_inner(model, rank=4)
    for layer in fl.nested_layers(model).values():
        assert isinstance(layer, NestedLinear) and layer.R.weight.shape == (4, 4)
        assert layer.R.weight.abs().max() == 0
    with pytest.raises(ValueError, match="rank"):
        fl.reset_inner(model, rank=9)


def test_delta_weights_match_dense_difference():
    model = make_tiny("gpt2", dtype=torch.float64)
    original = {n: m.weight.detach().T.clone() for n, m in model.named_modules() if n.endswith("c_fc")}
    fl.apply_nested(model, _cfg("gpt2", init="principal"))
    _randomize_inner(model)
    dw = fl.delta_weights(model)
    for name, w0 in original.items():
        layer = fl.nested_layers(model)[name]
        w_eff = layer.base.weight.T + layer.scaling * layer.B @ layer.effective_inner() @ layer.A
        assert torch.allclose(w_eff - w0, dw[name], atol=1e-12)


# ------------------------------------------------------------------------------------- fingerprint
_FP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny, TINY_TARGETS
    import fedlora as fl
    t, s = TINY_TARGETS["llama"]
    m = fl.apply_nested(make_tiny("llama", seed=3), fl.NestedLoraConfig(r=8, target_modules=t, cache_dir=""))
    print(fl.outer_fingerprint(m))
    """
)


def test_fingerprint_identical_across_fresh_processes(tmp_path):
    import os

    script = _FP_SCRIPT.format(tests=os.path.dirname(__file__))
    outs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    ]
    assert outs[0] == outs[1] and len(outs[0]) == 64
    here = fl.apply_nested(make_tiny("llama", seed=3),
                           fl.NestedLoraConfig(r=8, target_modules=TINY_TARGETS["llama"][0], cache_dir=""))
    assert fl.outer_fingerprint(here) == outs[0]


def test_fingerprint_changes_with_one_base_value_and_ignores_client_rank():
    targets = TINY_TARGETS["bert"][0]
    a = fl.apply_nested(make_tiny("bert"), fl.NestedLoraConfig(r=8, target_modules=targets))
    b_model = make_tiny("bert")
    with torch.no_grad():
        b_model.bert.encoder.layer[1].attention.self.value.weight[3, 5] += 1e-3
    b = fl.apply_nested(b_model, fl.NestedLoraConfig(r=8, target_modules=targets))
    assert fl.outer_fingerprint(a) != fl.outer_fingerprint(b)
    c = fl.apply_nested(make_tiny("bert"), fl.NestedLoraConfig(r=8, target_modules=targets, client_rank=2))
    assert fl.outer_fingerprint(a) == fl.outer_fingerprint(c)
    d = fl.apply_nested(make_tiny("bert"), fl.NestedLoraConfig(r=4, target_modules=targets))
    assert fl.outer_fingerprint(a) != fl.outer_fingerprint(d)
