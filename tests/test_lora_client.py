"""peft LoRA baseline adapter (fedlora.lora_client) driven through the real strategies, one round by hand.

Each variant: tiny BERT (float64 for exactness checks) wrapped with real peft → strategy built from
``adapter.initial_global_state`` → ``configure_train`` on a fake grid → per message ``load_download`` +
two optimizer steps + ``upload`` → ClientApp-style replies → ``aggregate_train`` (nothing rejected) →
``load_for_eval`` of the new global, whose dense ΔW is compared with what the strategy claims.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TARGETS, make_tiny, tokens
from flwr.app import ConfigRecord

from fedlora.experiment import ExperimentSpec, adapter_for
from fedlora.lora_client import LoraAdapter, LoraStateError
from fedlora.lora_math import A_SUFFIX, B_SUFFIX
from fedlora.lora_state import runtime_of
from fedlora.training import train_local
from strategies import build_strategy
from strategies._testing import FakeGrid, arrays_of, config_of, node_of, reply
from strategies.conftest import flower_task_identity  # noqa: F401  (autouse: Message() needs task ids)

R = 8
NODES = [11, 22, 33]
NUM_EXAMPLES = [10, 40, 25]
HETERO_RANKS = f"{R},{R // 2},{R // 4}"
VARIANTS = ["fedit", "ffa", "flora-lora", "flexlora"]
TARGETS, HEAD = TINY_TARGETS["bert"]


# ------------------------------------------------------------------------------------------ helpers
def spec_for(variant: str) -> ExperimentSpec:
    return ExperimentSpec(strategy=variant, r=R, target_modules=tuple(TARGETS), modules_to_save=tuple(HEAD))


def wrapped(variant: str, dtype: torch.dtype = torch.float64) -> tuple[LoraAdapter, torch.nn.Module]:
    adapter = LoraAdapter(variant)
    return adapter, adapter.wrap(make_tiny("bert", dtype=dtype), spec_for(variant))


def strategy_for(variant: str, initial: dict[str, np.ndarray], **kw):
    if variant in ("flora-lora", "flexlora"):
        kw.setdefault("ranks", HETERO_RANKS)
    return build_strategy(variant, rank=R, initial_state=initial, min_train_nodes=3, min_available_nodes=3,
                          seed=7, **kw)


def configure(strategy, rnd: int) -> list:
    msgs = strategy.configure_train(rnd, strategy.global_arrayrecord(), ConfigRecord({"lr": 0.02}),
                                    FakeGrid(NODES))
    return sorted(msgs, key=node_of)


def batches(seed: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids = tokens(seed * 10 + i, batch=4, length=7)
        labels = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(seed * 10 + i))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def train(model, seed: int, lr: float = 0.02) -> None:
    train_local(model, batches(seed), max_steps=2, lr=lr, seed=seed)


def pristine_weights(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    base = make_tiny("bert", dtype=dtype)
    return {n: m.weight.detach().double() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}


def effective_delta(model) -> dict[str, np.ndarray]:
    """Dense ΔW (float64) of every adapted layer: base weight + peft's active LoRA delta − pristine W."""
    rt = runtime_of(model)
    w0 = pristine_weights()
    out = {}
    for name, layer in rt.layers.items():
        eff = layer.get_base_layer().weight.detach().double() + lora_delta(model, name)
        out[name] = (eff - w0[name]).numpy()
    return out


def lora_delta(model, name: str) -> torch.Tensor:
    """sᵢ·Bᵢ·Aᵢ of the active adapter at layer ``name`` (peft's own get_delta_weight), float64."""
    rt = runtime_of(model)
    return rt.layers[name].get_delta_weight(rt.active.name).detach().double()


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def logits(model, seed: int = 99) -> torch.Tensor:
    ids = tokens(seed, batch=3, length=8)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.detach().clone()
    model.train(was)
    return out


def run_round(adapter, model, strategy, rnd: int) -> dict:
    """One round: all clients share ``model`` (one process), then aggregate and load the new global."""
    msgs = configure(strategy, rnd)
    replies, client_deltas, uploads, ranks = [], [], [], []
    for i, (m, n) in enumerate(zip(msgs, NUM_EXAMPLES)):
        cfg = config_of(m)
        adapter.load_download(model, arrays_of(m), cfg)
        start = effective_delta(model)
        train(model, seed=100 * rnd + i)
        up = adapter.upload(model)
        assert set(up) == set(strategy._tasks[node_of(m)].expected)
        uploads.append(up)
        ranks.append(cfg["rank"])
        client_deltas.append({name: lora_delta(model, name).numpy() for name in runtime_of(model).layers})
        replies.append(reply(m, up, num_examples=n, fingerprint=""))
        if adapter.variant == "flora-lora":  # training starts from W + merged ΔW with a zero LoRA pair
            down = arrays_of(m)
            for name, d in start.items():
                prefix = f"base_model.model.{name}"
                want = down[prefix + ".delta_B"] @ down[prefix + ".delta_A"]
                np.testing.assert_allclose(d, want, rtol=0, atol=1e-12)
    old = {k: v.copy() for k, v in strategy.global_state.items()}
    _, metrics = strategy.aggregate_train(rnd, replies)
    assert metrics["clients-used"] == 3 and metrics["clients-rejected"] == 0
    assert metrics["kept-previous"] == 0, strategy.history[-1]["kept-reason"]
    adapter.load_for_eval(model, strategy.global_state)
    p = np.array(NUM_EXAMPLES, dtype=np.float64) / sum(NUM_EXAMPLES)
    return {"msgs": msgs, "uploads": uploads, "deltas": client_deltas, "ranks": ranks, "p": p, "old": old}


# ------------------------------------------------------------------------------------------ tests
def test_adapter_for_returns_lora_adapter():
    for variant in VARIANTS:
        adapter = adapter_for(variant)
        assert isinstance(adapter, LoraAdapter) and adapter.variant == variant
    with pytest.raises(ValueError, match="variant"):
        LoraAdapter("fedsb")


def test_initial_state_keys_and_determinism():
    adapter, model = wrapped("fedit")
    g = adapter.initial_global_state(model)
    layers = runtime_of(model).layers
    assert len(layers) == 2 * 5  # query, value, intermediate.dense, attention.output.dense, output.dense
    for name, layer in layers.items():
        a, b = g[f"base_model.model.{name}{A_SUFFIX}"], g[f"base_model.model.{name}{B_SUFFIX}"]
        assert a.shape == (R, layer.in_features) and b.shape == (layer.out_features, R)
        assert not np.any(b) and np.any(a)
    assert g["base_model.model.classifier.weight"].shape == (3, 48)
    assert g["base_model.model.classifier.bias"].shape == (3,)
    assert adapter.fingerprint(model) is None
    # deterministic after use, and the same in a fresh process (model)
    train(model, seed=1)
    again = adapter.initial_global_state(model)
    fresh = LoraAdapter("fedit").initial_global_state(wrapped("fedit")[1])
    for key, value in g.items():
        np.testing.assert_array_equal(value, again[key])
        np.testing.assert_array_equal(value, fresh[key])


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_through_strategy_exact(variant, tmp_path):
    adapter, model = wrapped(variant)
    strategy = strategy_for(variant, adapter.initial_global_state(model))
    w0 = pristine_weights()
    res = None
    for rnd in (1, 2):
        res = run_round(adapter, model, strategy, rnd)
        p, deltas, ups = res["p"], res["deltas"], res["uploads"]
        gs = strategy.global_state
        got = effective_delta(model)
        head_want = sum(pi * u["base_model.model.classifier.weight"] for pi, u in zip(p, ups))
        assert rel(gs["base_model.model.classifier.weight"], head_want) <= 1e-12
        for name in runtime_of(model).layers:
            prefix = f"base_model.model.{name}"
            mean_delta = sum(pi * d[name] for pi, d in zip(p, deltas))
            if variant == "fedit":  # global = (Σ pᵢAᵢ, Σ pᵢBᵢ); the model evaluates s·B̄·Ā (not Σ pᵢΔWᵢ)
                A_bar = sum(pi * u[prefix + A_SUFFIX] for pi, u in zip(p, ups))
                B_bar = sum(pi * u[prefix + B_SUFFIX] for pi, u in zip(p, ups))
                assert rel(gs[prefix + A_SUFFIX], A_bar) <= 1e-12 and rel(gs[prefix + B_SUFFIX], B_bar) <= 1e-12
                assert rel(got[name], B_bar @ A_bar) <= 1e-10  # s = alpha / r = 1
                if rnd == 2:
                    assert rel(got[name], mean_delta) > 1e-8  # FedIT's inexactness is visible
            elif variant == "ffa":  # A unchanged and frozen; Σ pᵢ s·Bᵢ·A exactly
                np.testing.assert_array_equal(gs[prefix + A_SUFFIX], res["old"][prefix + A_SUFFIX])
                assert rel(got[name], mean_delta) <= 1e-10
            elif variant == "flora-lora":  # merged ΔW ← previous merged ΔW + Σ pᵢsᵢBᵢAᵢ
                old = res["old"][prefix + ".delta_B"] @ res["old"][prefix + ".delta_A"]
                assert rel(got[name], old + mean_delta) <= 1e-10
                assert rel(gs[prefix + ".delta_B"] @ gs[prefix + ".delta_A"], old + mean_delta) <= 1e-10
            else:  # flexlora: the global is the exact Σ pᵢsᵢBᵢAᵢ of this round
                assert rel(got[name], mean_delta) <= 1e-10
                assert rel(gs[prefix + ".delta_B"] @ gs[prefix + ".delta_A"], mean_delta) <= 1e-10
            # the global model's base weight is the pristine W (+ the merged delta for delta forms)
            base = runtime_of(model).layers[name].get_base_layer().weight.detach().double()
            if variant in ("fedit", "ffa"):
                assert torch.equal(base, w0[name])
    if variant in ("flora-lora", "flexlora"):
        assert sorted(res["ranks"]) == [R // 4, R // 2, R]  # heterogeneous ranks were trained
    if variant == "flexlora":  # next download: best rank-rᵢ approximation of the global ΔW (Eckart–Young)
        msgs = configure(strategy, 3)
        for m in msgs:
            rank = config_of(m)["rank"]
            adapter.load_download(model, arrays_of(m), config_of(m))
            for name in runtime_of(model).layers:
                prefix = f"base_model.model.{name}"
                dense = strategy.global_state[prefix + ".delta_B"] @ strategy.global_state[prefix + ".delta_A"]
                U, S, Vt = np.linalg.svd(dense, full_matrices=False)
                want = (U[:, :rank] * S[:rank]) @ Vt[:rank]
                assert rel(lora_delta(model, name).numpy(), want) <= 1e-8
    # export round trip: PeftModel.from_pretrained(original base, path) reproduces the global model
    adapter.load_for_eval(model, strategy.global_state)
    check_export(adapter, model, tmp_path / variant, torch.float64, tol=1e-10)


def check_export(adapter, model, path, dtype, tol):
    from peft import PeftModel

    want = logits(model)
    adapter.export(model, str(path))
    assert (path / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(make_tiny("bert", dtype=dtype), str(path))
    got = logits(loaded)
    assert float((got - want).abs().max()) <= tol
    # the export did not disturb the live model
    assert torch.equal(logits(model), want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_round_and_export(variant, tmp_path):
    adapter, model = wrapped(variant, torch.float32)
    strategy = strategy_for(variant, adapter.initial_global_state(model))
    msgs = configure(strategy, 1)
    replies = []
    for i, m in enumerate(msgs):
        adapter.load_download(model, arrays_of(m), config_of(m))
        train(model, seed=i)
        up = adapter.upload(model)
        assert all(v.dtype == np.float32 for v in up.values())
        replies.append(reply(m, up, num_examples=NUM_EXAMPLES[i], fingerprint=""))
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients-used"] == 3 and metrics["clients-rejected"] == 0 and metrics["kept-previous"] == 0
    adapter.load_for_eval(model, strategy.global_state)
    check_export(adapter, model, tmp_path / variant, torch.float32, tol=1e-4)


def test_ffa_freezes_a():
    adapter, model = wrapped("ffa")
    strategy = strategy_for("ffa", adapter.initial_global_state(model))
    m = configure(strategy, 1)[0]
    down = arrays_of(m)
    assert config_of(m)["freeze-a"] is True
    adapter.load_download(model, down, config_of(m))
    info = runtime_of(model).active
    trainable = {k for k, p in info.params.items() if p.requires_grad}
    assert trainable == {k for k in info.params if not k.endswith(A_SUFFIX)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if any(p is q for k, q in info.params.items() if k in trainable)
    }
    train(model, seed=3)
    up = adapter.upload(model)
    assert not any(k.endswith(A_SUFFIX) for k in up)
    for key, p in info.params.items():
        if key.endswith(A_SUFFIX):
            np.testing.assert_array_equal(p.detach().numpy(), down[key])
    assert any(np.any(v) for k, v in up.items() if k.endswith(B_SUFFIX))  # B trained


@pytest.mark.parametrize("variant", VARIANTS)
def test_shared_process_does_not_leak(variant):
    """Client 1 trains; client 2's load_download then gives exactly what a fresh process gives."""
    adapter, shared = wrapped(variant)
    strategy = strategy_for(variant, adapter.initial_global_state(shared))
    run_round(adapter, shared, strategy, 1)  # leaves merged deltas / trained heads / several adapters behind
    msgs = configure(strategy, 2)
    first, second = msgs[0], msgs[-1]
    adapter.load_download(shared, arrays_of(first), config_of(first))
    train(shared, seed=5, lr=0.5)
    adapter.load_download(shared, arrays_of(second), config_of(second))

    fresh_adapter, fresh = wrapped(variant)
    fresh_adapter.initial_global_state(fresh)
    fresh_adapter.load_download(fresh, arrays_of(second), config_of(second))

    assert torch.equal(logits(shared), logits(fresh))
    for name in runtime_of(fresh).layers:
        a = runtime_of(shared).layers[name].get_base_layer().weight
        b = runtime_of(fresh).layers[name].get_base_layer().weight
        assert torch.equal(a, b)
    up_s, up_f = adapter.upload(shared), fresh_adapter.upload(fresh)
    assert set(up_s) == set(up_f)
    for key in up_f:
        np.testing.assert_array_equal(up_s[key], up_f[key])
    n_s = sorted(tuple(p.shape) for p in shared.parameters() if p.requires_grad)
    n_f = sorted(tuple(p.shape) for p in fresh.parameters() if p.requires_grad)
    assert n_s == n_f
    train(shared, seed=6)
    train(fresh, seed=6)
    up_s, up_f = adapter.upload(shared), fresh_adapter.upload(fresh)
    for key in up_f:
        np.testing.assert_array_equal(up_s[key], up_f[key])


def test_flora_lora_restart_seeded_and_rank():
    adapter, model = wrapped("flora-lora")
    strategy = strategy_for("flora-lora", adapter.initial_global_state(model))
    msgs = configure(strategy, 1)
    ranks = []
    for m in msgs:
        cfg = config_of(m)
        assert cfg["lora-format"] == "delta" and cfg["restart-inner"] is True
        adapter.load_download(model, arrays_of(m), cfg)
        up = adapter.upload(model)
        ranks.append(cfg["rank"])
        for key, value in up.items():
            if key.endswith(A_SUFFIX):
                assert value.shape[0] == cfg["rank"] and np.any(value)
                assert np.all(np.abs(value) <= 1 / np.sqrt(value.shape[1]))
            elif key.endswith(B_SUFFIX):
                assert value.shape[1] == cfg["rank"] and not np.any(value)
        adapter.load_download(model, arrays_of(m), cfg)  # same seed → same A
        again = adapter.upload(model)
        for key in up:
            np.testing.assert_array_equal(up[key], again[key])
        scaling = runtime_of(model).layers["bert.encoder.layer.0.attention.self.query"].scaling
        assert scaling[runtime_of(model).active.name] == pytest.approx(cfg["lora-alpha"] / cfg["rank"])
    assert sorted(ranks) == [2, 4, 8]


def test_rslora_scaling_from_config():
    adapter, model = wrapped("flexlora")
    strategy = strategy_for("flexlora", adapter.initial_global_state(model), use_rslora=True, lora_alpha=4.0)
    for m in configure(strategy, 1):
        cfg = config_of(m)
        adapter.load_download(model, arrays_of(m), cfg)
        info = runtime_of(model).active
        layer = runtime_of(model).layers["bert.encoder.layer.0.attention.self.query"]
        assert info.use_rslora and layer.scaling[info.name] == pytest.approx(4.0 / np.sqrt(cfg["rank"]))


def test_bad_downloads_are_rejected():
    adapter, model = wrapped("fedit")
    strategy = strategy_for("fedit", adapter.initial_global_state(model))
    m = configure(strategy, 1)[0]
    down, cfg = arrays_of(m), config_of(m)
    key = next(k for k in down if k.endswith(A_SUFFIX))
    with pytest.raises(LoraStateError, match="shape"):
        adapter.load_download(model, {**down, key: down[key][:, :-1]}, cfg)
    with pytest.raises(LoraStateError, match="missing"):
        adapter.load_download(model, {k: v for k, v in down.items() if k != key}, cfg)
    with pytest.raises(LoraStateError, match="non-finite"):
        adapter.load_download(model, {**down, key: down[key] * np.nan}, cfg)
    with pytest.raises(ValueError, match="lora-format"):
        adapter.load_download(model, down, {**cfg, "lora-format": "delta"})
    flora = LoraAdapter("flora-lora")
    with pytest.raises(LoraStateError, match="delta state"):
        flora.load_download(model, down, {**cfg, "lora-format": "delta"})
    with pytest.raises(ValueError, match="not wrapped"):
        adapter.upload(make_tiny("bert"))


def _random_delta_state(adapter, model, rhos: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A delta-form global state with ρ per layer (0 allowed) + a random head."""
    rng = np.random.default_rng(seed)
    rt = runtime_of(model)
    out = {}
    for name, layer in rt.layers.items():
        rho = rhos.get(name, 3)
        prefix = f"base_model.model.{name}"
        out[prefix + ".delta_B"] = rng.standard_normal((layer.out_features, rho)) * 0.05
        out[prefix + ".delta_A"] = rng.standard_normal((rho, layer.in_features))
    for key, p in rt.active.params.items():
        if not key.endswith((A_SUFFIX, B_SUFFIX)):
            out[key] = rng.standard_normal(tuple(p.shape))
    return out


@pytest.mark.parametrize("variant", ["flora-lora", "flexlora"])
def test_delta_export_with_per_layer_ranks(variant, tmp_path):
    """ρ differs per layer (one layer ρ = 0): the export's rank_pattern gives each layer its own rank."""
    adapter, model = wrapped(variant)
    names = list(runtime_of(model).layers)
    rhos = {names[0]: 0, names[1]: 1, names[2]: 7, names[3]: 48}
    state = _random_delta_state(adapter, model, rhos)
    adapter.load_for_eval(model, state)
    w0 = pristine_weights()
    for name, layer in runtime_of(model).layers.items():
        prefix = f"base_model.model.{name}"
        want = w0[name].numpy() + state[prefix + ".delta_B"] @ state[prefix + ".delta_A"]
        np.testing.assert_allclose(layer.get_base_layer().weight.detach().numpy(), want, rtol=0, atol=1e-14)
    check_export(adapter, model, tmp_path / "x", torch.float64, tol=1e-10)
    from peft import PeftConfig

    cfg = PeftConfig.from_pretrained(str(tmp_path / "x"))
    assert sorted(set(cfg.rank_pattern.values())) == [1, 3, 7, 48]


def test_gpt2_conv1d_flora_lora_round_and_export(tmp_path):
    """transformers Conv1D layers (weight stored k×d): merged delta transposed, exact aggregate, export."""
    from peft import PeftModel

    targets, mts = TINY_TARGETS["gpt2"]
    spec = ExperimentSpec(strategy="flora-lora", task="causal-lm", r=4, target_modules=tuple(targets),
                          modules_to_save=tuple(mts))
    adapter = LoraAdapter("flora-lora")
    model = adapter.wrap(make_tiny("gpt2", dtype=torch.float64), spec)
    strategy = build_strategy("flora-lora", rank=4, ranks="4,2,1", initial_state=adapter.initial_global_state(model),
                              min_train_nodes=3, min_available_nodes=3)
    w0 = {n: m.weight.detach().double() for n, m in make_tiny("gpt2", dtype=torch.float64).named_modules()
          if type(m).__name__ == "Conv1D"}
    p = np.array(NUM_EXAMPLES, dtype=np.float64) / sum(NUM_EXAMPLES)
    for rnd in (1, 2):
        msgs = configure(strategy, rnd)
        replies, deltas = [], []
        for i, m in enumerate(msgs):
            adapter.load_download(model, arrays_of(m), config_of(m))
            ids = tokens(rnd * 10 + i, batch=4, length=7)
            train_local(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 2,
                        max_steps=2, lr=0.02, seed=i)
            deltas.append({n: lora_delta(model, n).numpy().T for n in runtime_of(model).layers})  # d×k
            replies.append(reply(m, adapter.upload(model), num_examples=NUM_EXAMPLES[i], fingerprint=""))
        old = {k: v.copy() for k, v in strategy.global_state.items()}
        _, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["clients-used"] == 3 and metrics["kept-previous"] == 0
        adapter.load_for_eval(model, strategy.global_state)
        for name, layer in runtime_of(model).layers.items():
            prefix = f"base_model.model.{name}"
            want = old[prefix + ".delta_B"] @ old[prefix + ".delta_A"] + sum(pi * d[name] for pi, d in zip(p, deltas))
            got = (layer.get_base_layer().weight.detach().double() - w0[name]).numpy().T
            assert rel(got, want) <= 1e-10
    ids = tokens(5, batch=2, length=8)
    model.eval()
    with torch.no_grad():
        want_logits = model(input_ids=ids).logits
    adapter.export(model, str(tmp_path / "gpt2"))
    loaded = PeftModel.from_pretrained(make_tiny("gpt2", dtype=torch.float64), str(tmp_path / "gpt2")).eval()
    with torch.no_grad():
        assert float((loaded(input_ids=ids).logits - want_logits).abs().max()) <= 1e-10
