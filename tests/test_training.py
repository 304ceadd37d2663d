"""Tests for fedlora.training: local training on real data, evaluation, determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedlora.data import load_client_data, make_classification_loader
from fedlora.models import load_model, load_tokenizer, tiny_model
from fedlora.training import (
    evaluate,
    make_optimizer,
    per_example_loss,
    run_steps,
    train_local,
    trainable_parameters,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine two threads were ~7x slower (spin contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rt64():
    """64 real Rotten Tomatoes training examples of client 0 (fixed test split removed)."""
    cd = load_client_data("rotten_tomatoes", 0, 10, "iid", seed=42, max_examples=64, val_fraction=0.0)
    assert len(cd.train) == 64 and len(cd.val) == 0
    return cd.train


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def _minilm_head_and_last_layer(seed: int) -> torch.nn.Module:
    model = load_model("minilm", "seq-cls", num_labels=2, seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("classifier", "bert.pooler")) or ".layer.5." in name
    return model


def _train_minilm(rt64, tokenizer, seed: int, epochs: int = 3, max_steps: int | None = None):
    model = _minilm_head_and_last_layer(seed=0)
    loader = make_classification_loader(
        rt64, tokenizer, max_length=48, batch_size=16, shuffle=True, seed=seed
    )
    result = train_local(model, loader, epochs=epochs, max_steps=max_steps, lr=1e-3, seed=seed)
    return model, result


def test_minilm_training_lowers_loss(rt64, tokenizer):
    eval_loader = make_classification_loader(rt64, tokenizer, max_length=48, batch_size=32)
    before = evaluate(_minilm_head_and_last_layer(seed=0), eval_loader, "seq-cls")
    model, r1 = _train_minilm(rt64, tokenizer, seed=0)
    after = evaluate(model, eval_loader, "seq-cls")
    assert r1.steps == 12 and r1.num_examples == 3 * 64 and r1.seconds > 0
    assert math.isfinite(r1.loss)
    assert after["loss"] < before["loss"] - 0.2, (before, after)
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.8
    for res in (before, after):
        assert 0.0 <= res["accuracy"] <= 1.0 and res["num_examples"] == 64
    # frozen parameters did not move, trainable ones did
    ref = _minilm_head_and_last_layer(seed=0)
    frozen = (m.bert.encoder.layer[0].output.dense.weight for m in (model, ref))
    assert torch.equal(*frozen)
    assert not torch.equal(model.classifier.weight, ref.classifier.weight)
    assert not torch.equal(
        model.bert.encoder.layer[5].output.dense.weight, ref.bert.encoder.layer[5].output.dense.weight
    )


def test_minilm_training_deterministic_for_seed(rt64, tokenizer):
    m1, r1 = _train_minilm(rt64, tokenizer, seed=0, max_steps=3)
    m2, r2 = _train_minilm(rt64, tokenizer, seed=0, max_steps=3)
    _, r3 = _train_minilm(rt64, tokenizer, seed=1, max_steps=3)
    assert r1.steps == r2.steps == 3
    assert r1.loss == r2.loss
    assert _same_params(m1, m2)
    assert r3.loss != r1.loss  # the seed drives loader order and dropout


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_evaluate_restores_mode_and_counts(rt64, tokenizer):
    model = tiny_model("bert", "seq-cls", vocab_size=len(tokenizer))
    loader = make_classification_loader(rt64, tokenizer, max_length=32, batch_size=20)
    model.train()
    res = evaluate(model, loader, "seq-cls")
    assert model.training
    assert res["num_examples"] == 64 and 0.0 <= res["accuracy"] <= 1.0 and res["loss"] > 0
    model.eval()
    evaluate(model, loader, "seq-cls", max_batches=1)
    assert not model.training
    with pytest.raises(ValueError, match="task"):
        evaluate(model, loader, "regression")


def _lm_batches(n_batches: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, 128, (4, 12), generator=g)
        ids[:, 1::2] = ids[:, ::2] % 7 + 3  # learnable structure: odd tokens follow even ones
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0  # one padded row
        ids[0, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def test_causal_lm_evaluate_matches_model_loss_and_training_helps():
    model = tiny_model("llama", "causal-lm", seed=0)
    batches = _lm_batches()
    res = evaluate(model, batches, "causal-lm")
    assert res["num_examples"] == 16 and res["num_tokens"] == 4 * (4 * 11 - 3)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    # token-weighted loss equals transformers' own loss on an unpadded batch
    single = [{k: v[1:] for k, v in batches[0].items()}]
    with torch.no_grad():
        model.eval()
        hf_loss = model(**single[0]).loss.item()
    assert evaluate(model, single, "causal-lm")["loss"] == pytest.approx(hf_loss, rel=1e-5)
    assert math.log(128) - 1.0 < res["loss"] < math.log(128) + 1.0  # untrained ≈ uniform
    r = train_local(model, batches, epochs=10, lr=1e-2, seed=0)
    assert r.steps == 40 and r.num_examples == 160
    assert evaluate(model, batches, "causal-lm")["loss"] < res["loss"] - 0.5


def test_max_steps_external_optimizer_and_no_trainable_params():
    batches = _lm_batches(n_batches=5)
    model = tiny_model("gpt2", "causal-lm", seed=0)
    r = train_local(model, batches, epochs=3, max_steps=7)
    assert r.steps == 7 and r.num_examples == 28

    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_lr = torch.optim.SGD(model.parameters(), lr=0.0)
    r = train_local(model, batches, optimizer=frozen_lr, lr=1.0)  # lr ignored: optimizer given
    assert r.steps == 5 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # run_steps is the bare loop: same losses as train_local for the same seed and optimizer
    m1, m2 = tiny_model("gpt2", "causal-lm", seed=3), tiny_model("gpt2", "causal-lm", seed=3)
    torch.manual_seed(0)
    m1.train()
    losses, n = run_steps(m1, make_optimizer(m1, lr=1e-2), batches, max_steps=3)
    r2 = train_local(m2, batches, max_steps=3, lr=1e-2, seed=0)
    assert n == 12 and r2.loss == pytest.approx(sum(losses) / 3)

    # empty (Poisson-sampled) batches: skipped by default, a counted step with a callback
    empty = {k: v[:0] for k, v in batches[0].items()}
    with_empty = [batches[0], empty, batches[1]]
    assert train_local(model, with_empty).steps == 2
    calls = []
    r = train_local(model, with_empty, on_empty_batch=lambda: calls.append(1))
    assert r.steps == 3 and calls == [1] and r.num_examples == 8 and math.isfinite(r.loss)

    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="trainable"):
        train_local(model, batches)


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_the_loop_optimises_the_mean_per_example_loss(task):
    """One SGD step of the loop records mean(per_example_loss) and moves the parameters by -lr times its gradient.
    For seq-cls that is transformers' own loss; for causal-LM with padding it is the mean of the examples' own
    token means, not transformers' batch token mean (which would couple examples: not allowed under DP)."""
    model = tiny_model("llama" if task == "causal-lm" else "bert", task, seed=1).eval()  # eval: no dropout
    batch = _lm_batches(n_batches=1, seed=2)[0]  # row 0 is padded: 8 targets, the others 11
    if task == "seq-cls":
        batch = {**batch, "labels": batch["input_ids"][:, 0] % 2}
    ref = copy.deepcopy(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    objective = per_example_loss(ref(**inputs).logits, batch["labels"]).mean()
    grads = torch.autograd.grad(objective, trainable_parameters(ref))
    value = float(objective.detach())
    lr = 0.5
    losses, n = run_steps(model, torch.optim.SGD(trainable_parameters(model), lr=lr), [batch], max_steps=1)
    assert n == 4 and losses == [pytest.approx(value, rel=1e-6)]
    for p, p0, g in zip(trainable_parameters(model), trainable_parameters(ref), grads):
        torch.testing.assert_close(p.detach(), p0.detach() - lr * g, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        hf_loss = float(ref(**batch).loss)
    if task == "seq-cls":
        assert value == pytest.approx(hf_loss, rel=1e-6)
    else:
        assert abs(value - hf_loss) > 1e-4  # example mean ≠ token mean when lengths differ
