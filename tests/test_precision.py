"""Device and precision (fedlora/precision.py): the run-config keys ``device``, ``dtype``, ``amp`` and
``gradient-checkpointing``, the fp32-adapters-on-a-half-base policy, fingerprints and uploads independent of
the base dtype, DP-SGD on a bf16 base, and a bf16 + amp federated job that learns (CPU only; the CUDA side is
tests/test_gpu.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TARGETS, make_tiny, tokens

import fedlora as fl
from fedlora.experiment import ExperimentSpec, adapter_for, build_model, place_model
from fedlora.precision import (
    PRECISION_ATTR,
    Precision,
    amp_dtype,
    enable_gradient_checkpointing,
    precision_for,
    resolve_device,
)
from fedlora.run_config import ConfigError, parse_run_config
from fedlora.training import train_local

NO_CUDA = not torch.cuda.is_available()


# ------------------------------------------------------------------------------------- run config
@pytest.mark.parametrize(("override", "key", "text"), [
    ({"device": "gpu"}, "device", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "cuda:x"}, "device", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"dtype": "fp16"}, "dtype", "must be one of ['float32', 'bfloat16', 'float16']"),
    ({"amp": "maybe"}, "amp", "expected bool"),
    ({"gradient-checkpointing": "yes please"}, "gradient-checkpointing", "expected bool"),
    ({"dp-epsilon": 8.0, "weighting": "uniform", "gradient-checkpointing": True}, "gradient-checkpointing",
     "under DP-SGD"),
    ({"dp-noise": 1.0, "weighting": "uniform", "dtype": "float16"}, "dtype", "under DP-SGD"),
])
def test_precision_keys_are_validated_naming_the_key(override, key, text):
    with pytest.raises(ConfigError) as err:
        parse_run_config(override)
    assert err.value.key == key and text in str(err.value), str(err.value)
    assert str(err.value).startswith(f"run config '{key}'")


def test_bf16_amp_and_checkpointing_parse_and_reach_the_spec():
    cfg = parse_run_config({"device": "cpu", "dtype": "bfloat16", "amp": "true", "gradient-checkpointing": True})
    spec = cfg.spec()
    assert (spec.device, spec.dtype, spec.amp, spec.gradient_checkpointing) == ("cpu", "bfloat16", True, True)
    dp = parse_run_config({"dtype": "bfloat16", "amp": True, "dp-noise": 1.0, "weighting": "uniform"})
    assert dp.dp_enabled and dp.spec().dtype == "bfloat16"  # bf16 and amp are fine under DP-SGD


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the refusal is for machines without it")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_asked_for_and_absent_fails_at_start_naming_the_key(device, tmp_path):
    cfg = parse_run_config({"device": device})  # parses: the machine that runs it decides
    with pytest.raises(ConfigError) as err:
        cfg.spec()
    assert err.value.key == "device" and "CUDA is not available" in str(err.value)
    assert "client-resources-num-gpus" in str(err.value)  # the simulation recipe
    from simulations.inprocess import run_in_process

    with pytest.raises(ConfigError, match="run config 'device'"):
        run_in_process({"device": device, "results-dir": str(tmp_path), "run-name": "x"}, 2)
    assert not (tmp_path / "x").exists()  # refused before anything was written
    assert resolve_device("auto") == torch.device("cpu")


def test_float16_on_the_cpu_is_refused_naming_dtype():
    cfg = parse_run_config({"device": "cpu", "dtype": "float16"})
    with pytest.raises(ConfigError) as err:
        cfg.spec()
    assert err.value.key == "dtype" and "bfloat16" in str(err.value)


def test_amp_dtype_and_loss_scaling():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu) == torch.bfloat16
    assert precision_for(cpu, torch.float32, amp=True) == Precision(cpu, torch.bfloat16, scale_loss=False)
    assert precision_for(cpu, torch.bfloat16, amp=False) == Precision(cpu, None, scale_loss=False)
    assert Precision(cpu, None).grad_scaler() is None


# ------------------------------------------------------------------------------------- the policy
def _nested_bf16(kind: str = "bert", **kw) -> torch.nn.Module:
    targets, save = TINY_TARGETS[kind]
    model = fl.apply_nested(make_tiny(kind), fl.NestedLoraConfig(r=6, target_modules=targets, modules_to_save=save,
                                                                 cache_dir="", **kw))
    return place_model(model, torch.device("cpu"), torch.bfloat16)


def test_half_base_keeps_adapters_and_head_in_float32():
    model = _nested_bf16("bert")
    layers = fl.nested_layers(model)
    for layer in layers.values():
        assert layer.base.weight.dtype == torch.bfloat16
        assert {layer.A.dtype, layer.B.dtype, layer.S.dtype, layer.R0.dtype, layer.R.weight.dtype} == {torch.float32}
    assert model.classifier.weight.dtype == torch.float32
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    # the adapter path computes in float32, also under autocast; its result joins the bf16 stream
    seen = {}
    layer = next(iter(layers.values()))
    layer.R.register_forward_hook(lambda m, a, out: seen.update(R=(a[0].dtype, out.dtype)))
    with Precision(torch.device("cpu"), torch.bfloat16).autocast():
        logits = model(tokens()).logits
    assert seen["R"] == (torch.float32, torch.float32)
    assert logits.dtype == torch.bfloat16  # the head's output is cast back into the model's dtype
    up, down = fl.inner_state(model), fl.global_state(model)
    assert {a.dtype for a in (*up.values(), *down.values())} == {np.dtype(np.float32)}


def test_apply_nested_on_a_bf16_model_makes_float32_adapters():
    """The direct API: a model already in bf16 gets float32 A, B, S, R0, R (inner_state never crashes)."""
    targets, save = TINY_TARGETS["llama"]
    model = fl.apply_nested(make_tiny("llama", dtype=torch.bfloat16),
                            fl.NestedLoraConfig(r=4, mode="nora", inner_rank=2, target_modules=targets,
                                                modules_to_save=save, cache_dir=""))
    layer = next(iter(fl.nested_layers(model).values()))
    assert {layer.A.dtype, layer.B.dtype, layer.R0.dtype, layer.P.weight.dtype, layer.Q.weight.dtype} == {
        torch.float32}
    out = model(tokens()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert {a.dtype for a in fl.inner_state(model).values()} == {np.dtype(np.float32)}


def test_bf16_base_outputs_are_close_to_float32():
    ref = fl.apply_nested(make_tiny("bert"), fl.NestedLoraConfig(r=6, target_modules=TINY_TARGETS["bert"][0],
                                                                 modules_to_save=["classifier"], cache_dir=""))
    half = _nested_bf16("bert")
    for model in (ref, half):
        torch.manual_seed(1)
        for layer in fl.nested_layers(model).values():
            torch.nn.init.normal_(layer.R.weight, std=0.05)
    with torch.no_grad():
        a, b = ref.eval()(tokens()).logits, half.eval()(tokens()).logits.float()
    assert (a - b).abs().max() < 5e-2 * max(1.0, float(a.abs().max()))
    assert not torch.equal(a, b)  # the base really computes in bf16


def test_fingerprint_and_states_do_not_depend_on_the_base_dtype():
    """MiniLM through build_model: fp32 and bf16 bases have the same outer factors (fingerprint) and the
    same fp32 global state; uploads are float32 from a bf16 base, for nested and peft LoRA alike."""
    fp32 = build_model(ExperimentSpec(strategy="fedsb", device="cpu"))
    bf16 = build_model(ExperimentSpec(strategy="fedsb", device="cpu", dtype="bfloat16", amp=True))
    nested = adapter_for("fedsb")
    assert nested.fingerprint(fp32) == nested.fingerprint(bf16)
    assert fl.outer_fingerprint(fp32) == fl.outer_fingerprint(bf16)
    g32, g16 = nested.initial_global_state(fp32), nested.initial_global_state(bf16)
    assert g32.keys() == g16.keys()
    for key in g32:
        assert g16[key].dtype == np.float32
        np.testing.assert_array_equal(g32[key], g16[key], err_msg=key)
    assert getattr(bf16, PRECISION_ATTR) == Precision(torch.device("cpu"), torch.bfloat16)
    lora = build_model(ExperimentSpec(strategy="fedit", device="cpu", dtype="bfloat16"))
    lora_up = adapter_for("fedit").upload(lora)
    assert {a.dtype for a in lora_up.values()} == {np.dtype(np.float32)}
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" in n} == {torch.float32}  # peft's autocast
    assert lora.get_base_model().bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------- training
def _batches(n: int = 3, causal: bool = False) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        x = tokens(seed=i, batch=4)
        out.append({"input_ids": x, "labels": x.clone() if causal else x[:, 0] % 3})
    return out


@pytest.mark.parametrize("amp", [False, True])
def test_training_on_a_bf16_base_lowers_the_loss(amp):
    model = _nested_bf16("bert")
    setattr(model, PRECISION_ATTR, precision_for(torch.device("cpu"), torch.bfloat16, amp))
    data = _batches(1) * 12
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    res = train_local(model, data, lr=5e-2)
    assert res.steps == 12 and np.isfinite(res.loss)
    after = train_local(model, data[:1], lr=1e-12)  # the loss after training, same batch
    first = train_local(_nested_bf16("bert"), data[:1], lr=1e-12)
    assert after.loss < first.loss - 1e-3, (first.loss, after.loss)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def _grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", ["nested", "lora"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(adapter):
    """Non-reentrant checkpointing recomputes each block's forward (the adapters run twice) and the adapter
    gradients equal those without it."""
    targets, _ = TINY_TARGETS["llama"]

    def build() -> torch.nn.Module:
        base = make_tiny("llama")
        if adapter == "nested":
            model = fl.apply_nested(base, fl.NestedLoraConfig(r=4, target_modules=targets, modules_to_save=[],
                                                              cache_dir=""))
            for layer in fl.nested_layers(model).values():  # a non-zero inner part, so every factor matters
                torch.nn.init.normal_(layer.R.weight, generator=torch.Generator().manual_seed(3), std=0.1)
        else:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        return model.train()

    batch = _batches(1, causal=True)[0]
    plain, ckpt = build(), build()
    enable_gradient_checkpointing(ckpt)
    calls = {"plain": 0, "ckpt": 0}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        first = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        first.register_forward_hook(lambda *_, k=name: calls.__setitem__(k, calls[k] + 1))
    g_plain, g_ckpt = _grads(plain, batch), _grads(ckpt, batch)
    assert calls == {"plain": 1, "ckpt": 2}  # checkpointing is really on
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    for key in g_plain:
        assert g_plain[key].abs().max() > 0, key
        torch.testing.assert_close(g_ckpt[key], g_plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_gradient_checkpointing_refused_for_a_model_without_it():
    class NoCkpt(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ValueError, match="gradient-checkpointing=true: NoCkpt does not support"):
        enable_gradient_checkpointing(NoCkpt())


def test_dp_sgd_runs_on_a_bf16_base_with_amp():
    """opacus computes per-sample gradients of the float32 adapters and head of a bf16 base under bf16
    autocast (so DP allows dtype='bfloat16' and amp; float16 and checkpointing are refused at parse)."""
    from torch.utils.data import DataLoader

    from fedlora.privacy import DPConfig, run_dp_training

    model = _nested_bf16("bert")
    setattr(model, PRECISION_ATTR, precision_for(torch.device("cpu"), torch.bfloat16, amp=True))
    ds = [{"input_ids": x, "labels": x[0] % 3} for x in tokens(batch=32)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    res, _ = run_dp_training(model.train(), DataLoader(ds, batch_size=8), DPConfig(noise_multiplier=1.0),
                             None, num_rounds=1, steps=3, lr=0.01, dp_seed=0)
    assert res.steps == 3 and np.isfinite(res.epsilon)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert model.classifier.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------- a whole job
@pytest.mark.slow
def test_bf16_amp_job_completes_and_learns(tmp_path: Path):
    """The in-process federation (the ServerApp and ClientApp of `flwr run`) with dtype='bfloat16' amp=true:
    it completes, the held-out loss falls, and the checkpointed global state is float32."""
    from simulations.inprocess import run_in_process
    from simulations.results import RunOutputs

    run_dir = run_in_process({
        "dtype": "bfloat16", "amp": True, "device": "cpu", "partitioner": "iid", "num-server-rounds": 2,
        "num-partitions": 2, "fraction-train": 1.0, "max-client-examples": 48, "local-steps": 6,
        "max-test-examples": 128, "results-dir": str(tmp_path), "run-name": "bf16", "export-adapter": True,
    }, 2)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["loss"] < rows[0]["loss"] - 5e-3, [r["loss"] for r in rows]
    assert all(r["clients-used"] == 2 for r in rows[1:])
    state, _ = RunOutputs(run_dir).load_checkpoint()
    assert {a.dtype for a in state["global_state"].values()} == {np.dtype(np.float32)}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["amp"] is True
    assert config["fingerprint"] == adapter_for("fedsb").fingerprint(build_model(ExperimentSpec(device="cpu")))
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
