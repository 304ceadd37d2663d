"""The activation-memory measurement of ``bench.memory`` counts what it claims: on one adapted linear layer
LoRA keeps the layer input and nested adapters do not, storages count once, parameters are excluded, and
freed temporaries are not mistaken for each other."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from bench.memory import SavedTensorCounter, adapted_layers

K, D, R, Q = 32, 24, 4, 2  # layer in/out features, rank, nora inner rank
SHAPE = (3, 5)  # batch, seq
N = SHAPE[0] * SHAPE[1]  # tokens
F32 = 4  # bytes


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(K, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _adapted(variant: str) -> nn.Module:
    torch.manual_seed(0)
    model = OneLinear()
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=["lin"]))
    else:
        from fedlora.nested import NestedLoraConfig, apply_nested

        apply_nested(model, NestedLoraConfig(r=R, mode=variant, inner_rank=Q, target_modules=["lin"], cache_dir=""))
    return model.train()


# LoRA keeps x (k per token) for lora_A's gradient and h = A·x (r) for lora_B's; sb keeps only h for R's
# gradient; nora keeps h for Q's and Q·h (q) for P's. Frozen weights and buffers are not activations.
EXPECTED = {"lora": (K + R) * N * F32, "sb": R * N * F32, "nora": (R + Q) * N * F32}


@pytest.mark.parametrize("variant", ["lora", "sb", "nora"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_one_layer_saved_bytes(variant, input_grad):
    """Whether or not the input needs a gradient (first layer or a later one), the input gradient of the
    frozen paths needs only weights: the activation bytes are EXPECTED, all of them inside the adapter."""
    model = _adapted(variant)
    x = torch.randn(*SHAPE, K, requires_grad=input_grad)
    with SavedTensorCounter(model, adapted_layers(model)) as counter:
        y = model(x).sum()
    got = counter.result
    assert got["act_bytes"] == got["adapter_bytes"] == EXPECTED[variant]
    assert got["base_bytes"] == got["other_bytes"] == 0
    assert got["param_saved_bytes"] > 0  # lora_B's weight / the nested B buffer, for the gradient of h
    if variant == "lora":
        assert got["act_bytes"] - EXPECTED["sb"] == K * N * F32  # the layer input: what nested does not keep
    y.backward()  # the counted graph still trains


def test_storage_counted_once():
    x = torch.randn(100, requires_grad=True)
    with SavedTensorCounter() as counter:
        a = x * x  # saves x twice
        b = x[:50] * x[50:]  # saves two views of x's storage
        c = x.exp()  # saves its result: a second storage
    got = counter.result
    assert got["saved_tensors"] == 5
    assert got["storages"] == 2
    assert got["act_bytes"] == 2 * 100 * F32
    (a.sum() + b.sum() + c.sum()).backward()


def test_parameters_and_buffers_excluded():
    model = nn.Linear(8, 8, bias=False)
    model.register_buffer("scale", torch.ones(8))
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter(model) as counter:
        y = model(x) * model.scale  # linear saves x and the weight; the mul saves only the buffer (no grad)
    got = counter.result
    assert got["act_bytes"] == 4 * 8 * F32  # x
    assert got["param_saved_bytes"] == 8 * 8 * F32 + 8 * F32
    del y


def test_freed_temporaries_are_distinct():
    """A saved storage freed during the forward could hand its address to the next one; the counter keeps
    saved storages alive until it exits, so three discarded results count three times."""
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorCounter() as counter:
        for _ in range(3):
            (x * 2.0).exp()  # exp saves its result; the result and its graph are dropped at once
    assert counter.result["storages"] == 3
    assert counter.result["act_bytes"] == 3 * 1000 * F32


def test_graph_freed_and_gradients_unchanged():
    """The counter leaves no reference cycle behind (a saved output is freed with its graph) and backward
    through a counted forward gives the gradients of an uncounted one."""
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorCounter():
        y = x.exp()  # exp saves its own output
    ref = weakref.ref(y)
    del y
    gc.collect()
    assert ref() is None

    grads = []
    for counted in (False, True):
        model = _adapted("sb")
        with torch.no_grad():
            model.lin.R.weight.normal_()
        x = torch.randn(*SHAPE, K, requires_grad=True)
        if counted:
            with SavedTensorCounter(model, adapted_layers(model)):
                loss = model(x).square().sum()
        else:
            loss = model(x).square().sum()
        loss.backward()
        grads.append(model.lin.R.weight.grad)
    assert torch.equal(grads[0], grads[1])
