"""Export through peft: a standard LoRA adapter that reproduces the nested model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TARGETS, make_tiny, tokens

import fedlora as fl


def _random_inner(model, seed=7, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("init,mode", [("zero", "sb"), ("principal", "sb"), ("principal", "nora")])
def test_peft_roundtrip(tmp_path, kind, init, mode):
    from peft import PeftModel

    targets, save = TINY_TARGETS[kind]
    model = fl.apply_nested(
        make_tiny(kind, seed=1),
        fl.NestedLoraConfig(r=8, mode=mode, inner_rank=3, init=init, alpha=16.0, target_modules=targets,
                            modules_to_save=save),
    )
    _random_inner(model)
    # a non-zero global offset too, as after some federated rounds
    g = fl.global_state(model)
    fl.load_global_state(model, {k: v + 0.01 if k.endswith(".R0") else v for k, v in g.items()})
    x = tokens(3)
    with torch.no_grad():
        expected = model(x).logits
    path = fl.export_peft_adapter(model, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16.0
    # a fresh copy of the ORIGINAL pretrained model, loaded with peft only
    base = make_tiny(kind, seed=1)
    loaded = PeftModel.from_pretrained(base, path).eval()
    with torch.no_grad():
        got = loaded(x).logits
    assert (got - expected).abs().max().item() <= 1e-4
    # the adapter really does something (the comparison could fail)
    with torch.no_grad():
        plain = make_tiny(kind, seed=1)(x).logits
    assert (plain - expected).abs().max().item() > 1e-3


def test_export_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    targets, _ = TINY_TARGETS["llama"]
    model = fl.apply_nested(make_tiny("llama", seed=2), fl.NestedLoraConfig(r=8, init="principal",
                                                                            target_modules=targets))
    _random_inner(model)
    x = tokens(4)
    with torch.no_grad():
        expected = model(x).logits
    fl.export_merged(model, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(x).logits - expected).abs().max().item() <= 1e-4


def test_export_does_not_modify_model(tmp_path):
    targets, save = TINY_TARGETS["bert"]
    model = fl.apply_nested(make_tiny("bert"), fl.NestedLoraConfig(r=8, init="principal", target_modules=targets,
                                                                   modules_to_save=save))
    _random_inner(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fl.export_peft_adapter(model, tmp_path / "a")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert fl.nested_layers(model)
