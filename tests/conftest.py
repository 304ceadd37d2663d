"""Shared fixtures: tiny random transformers models built from configs (no download), offline env."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def make_tiny(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Tiny random models: BERT (seq-cls, 3 labels), Llama (causal LM, non-square MLP, grouped KV heads),
    GPT-2 (causal LM, Conv1D layers)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=80, num_labels=3, max_position_embeddings=64)
        model = BertForSequenceClassification(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=120, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


# (kind, target modules, modules_to_save): every kind has non-square adapted layers
TINY_TARGETS = {
    "bert": (["query", "value", "intermediate.dense", "output.dense"], ["classifier"]),
    "llama": (["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"], []),
    "gpt2": (["c_attn", "c_fc", "c_proj"], []),
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``gpu`` need CUDA: without it they skip (CI is CPU-only; scripts/gpu_check.sh runs them)."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False); scripts/gpu_check.sh runs it on a GPU")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own outer-factor / model cache root."""
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path_factory.getbasetemp() / "fedlora-cache"))


@pytest.fixture(autouse=True)
def _isolated_privacy_ledger(tmp_path, monkeypatch):
    """Every test gets its own node privacy ledgers (``fedlora.privacy.ledger``), never ``~/.fedlora``."""
    monkeypatch.setenv("FEDLORA_STATE_DIR", str(tmp_path / "privacy-ledger"))


def tokens(seed: int = 0, batch: int = 2, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 120, (batch, length), generator=g)


def save_other_minilm(path):
    """Another base model of MiniLM's architecture (every weight matrix redrawn at its own scale), saved with
    MiniLM's tokenizer as a node's local copy of "the" base model: what a node with the wrong checkpoint has."""
    from fedlora.models import load_model, load_tokenizer

    model = load_model("minilm", task="seq-cls", num_labels=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    load_tokenizer("minilm").save_pretrained(path)
    return path
