"""CUDA: training steps on the GPU (fp32, bf16 base + amp, fp16 + GradScaler), gradient checkpointing, and a
GPU-trained update aggregated exactly by a CPU server. Marked ``gpu``: they skip without CUDA (tests/conftest.py);
scripts/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TARGETS, make_tiny, tokens

import fedlora as fl
from fedlora.aggregation import apply_increment, exact_mean
from fedlora.experiment import ExperimentSpec, adapter_for, build_model, place_model
from fedlora.precision import PRECISION_ATTR, Precision, enable_gradient_checkpointing
from fedlora.training import evaluate, train_local

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        x = tokens(seed=seed + i, batch=8, length=16)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x[:, 0] % 2})
    return out


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("strategy", "dtype", "amp"), [
    ("fedsb", "float32", False), ("fedsb", "bfloat16", True), ("fedsb", "float16", True), ("fedit", "bfloat16", True),
])
def test_cuda_training_step(strategy, dtype, amp):
    model = build_model(ExperimentSpec(strategy=strategy, device="cuda", dtype=dtype, amp=amp))
    prec = getattr(model, PRECISION_ATTR)
    assert prec.device.type == "cuda" and prec.scale_loss == (dtype == "float16")
    assert all(p.device.type == "cuda" for p in model.parameters())
    # nested: every trainable tensor fp32; peft: its LoRA A/B (autocast_adapter_dtype), its head as the base
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad and (
        strategy == "fedsb" or "lora_" in n)} == {torch.float32}
    adapter = adapter_for(strategy)
    adapter.load_download(model, adapter.initial_global_state(model), {"seed": 1})
    before = _trainable(model)
    data = _batches(1) * 8
    first = evaluate(model, data[:1])["loss"]
    res = train_local(model, data, lr=2e-2 if strategy == "fedsb" else 1e-3)
    assert res.steps == 8 and np.isfinite(res.loss)
    assert evaluate(model, data[:1])["loss"] < first
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    up = adapter.upload(model)
    assert up and {a.dtype for a in up.values()} == {np.dtype(np.float32)}


def test_bf16_cuda_model_has_the_cpu_fp32_fingerprint():
    gpu = build_model(ExperimentSpec(strategy="fedsb", device="cuda", dtype="bfloat16", amp=True))
    cpu = build_model(ExperimentSpec(strategy="fedsb", device="cpu"))
    assert getattr(gpu, PRECISION_ATTR) == Precision(CUDA, torch.bfloat16)
    assert fl.outer_fingerprint(gpu) == fl.outer_fingerprint(cpu)


def test_gradient_checkpointing_on_cuda_gives_the_same_adapter_gradients():
    targets, _ = TINY_TARGETS["llama"]

    def build() -> torch.nn.Module:
        model = fl.apply_nested(make_tiny("llama"), fl.NestedLoraConfig(r=4, target_modules=targets,
                                                                        modules_to_save=[], cache_dir=""))
        for layer in fl.nested_layers(model).values():
            torch.nn.init.normal_(layer.R.weight, generator=torch.Generator().manual_seed(3), std=0.1)
        return place_model(model, CUDA, torch.bfloat16).train()

    x = tokens(batch=4).to(CUDA)
    plain, ckpt = build(), build()
    enable_gradient_checkpointing(ckpt)
    grads = []
    for model in (plain, ckpt):
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-3, atol=1e-6, msg=key)


def test_gpu_trained_updates_are_aggregated_exactly_by_a_cpu_server():
    """Two clients train on the GPU (bf16 base, amp); a float32 CPU server averages their uploads
    (exact_mean + apply_increment) and its model's ΔW is the weighted mean of the clients' ΔW."""
    gpu = build_model(ExperimentSpec(strategy="fedsb", device="cuda", dtype="bfloat16", amp=True))
    cpu = build_model(ExperimentSpec(strategy="fedsb", device="cpu"))
    adapter = adapter_for("fedsb")
    assert adapter.fingerprint(gpu) == adapter.fingerprint(cpu)
    glob = adapter.initial_global_state(cpu)
    uploads, deltas = [], []
    for seed in (1, 2):
        adapter.load_download(gpu, glob, {"seed": seed})
        train_local(gpu, _batches(4, seed=10 * seed), lr=2e-2, seed=seed)
        uploads.append(adapter.upload(gpu))
        deltas.append({k: v.double().cpu() for k, v in fl.delta_weights(gpu).items()})
    weights = [3.0, 1.0]
    new = apply_increment(glob, exact_mean(uploads, weights))
    adapter.load_for_eval(cpu, new)
    got = fl.delta_weights(cpu)
    assert got.keys() == deltas[0].keys()
    for key in got:
        want = 0.75 * deltas[0][key] + 0.25 * deltas[1][key]
        err = float((got[key].double() - want).norm() / want.norm())
        assert 0 < float(want.norm()) and err <= 1e-5, (key, err)
