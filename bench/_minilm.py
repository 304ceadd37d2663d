"""The MiniLM training-step setup of the step-time benchmarks (``bench.step_time``, ``bench.dp_step_time``):
the base model, a fixed batch and the adapter variants compared side by side.

MiniLM (all-MiniLM-L6-v2) sequence classification with 2 labels; adapters on ``query`` and ``value`` of
all 6 layers (12 matrices of 384×384), the classifier head (384×2 + 2) trainable in every variant.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import bench._common  # noqa: F401  (offline environment before transformers is imported)

if TYPE_CHECKING:
    from torch import nn

#: adapted modules and trainable head of the step-time benchmarks (all 6 layers of MiniLM)
TARGETS = ["query", "value"]
HEAD = ["classifier"]
#: adapter variants: peft LoRA, nested ``sb`` (r×r per layer), nested ``nora`` (r×q and q×r)
VARIANTS = ("lora", "nested-sb", "nested-nora")


def make_batch(batch: int, seq: int, seed: int = 0, real: bool = True) -> tuple[dict[str, Any], str]:
    """A fixed batch of ``batch`` × ``seq`` tokens (``input_ids``, ``attention_mask``, ``labels``) and a
    description of its source: real Rotten Tomatoes text padded/truncated to ``seq`` if the data package
    is installed (and ``real``), random token ids with full attention otherwise."""
    import torch

    from fedlora.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    try:
        if not real:
            raise LookupError("random ids requested")
        from fedlora.data import load_rotten_tomatoes

        ds = load_rotten_tomatoes()
        ds = ds.shuffle(seed=seed).select(range(batch))
        enc = tokenizer(
            list(ds["text"]), padding="max_length", truncation=True, max_length=seq, return_tensors="pt"
        )
        labels = torch.as_tensor(list(ds["label"]), dtype=torch.long)
        real_tokens = int(enc["attention_mask"].sum())
        source = f"rotten-tomatoes text padded/truncated to {seq} ({real_tokens / batch:.1f} real tokens/row)"
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}, source
    except Exception as exc:  # data package missing: random ids, full attention
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, tokenizer.vocab_size, (batch, seq), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        mask = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}, f"random token ids ({exc})"


def load_base(seed: int = 0) -> nn.Module:
    """MiniLM (all-MiniLM-L6-v2) as a 2-label ``BertForSequenceClassification``, transformers quiet."""
    import transformers

    from fedlora.models import load_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    return load_model("minilm", task="seq-cls", num_labels=2, seed=seed)


def adapt(model: nn.Module, variant: str, r: int, q: int) -> nn.Module:
    """Apply ``variant`` (one of :data:`VARIANTS`) at rank ``r`` (inner rank ``q`` for ``nested-nora``) to
    :data:`TARGETS`, :data:`HEAD` trainable; returns the model to train (peft wraps it), in train mode."""
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=HEAD)
        with warnings.catch_warnings():  # peft calls a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, cfg)
    elif variant in ("nested-sb", "nested-nora"):
        from fedlora.nested import NestedLoraConfig, apply_nested

        mode = "sb" if variant == "nested-sb" else "nora"
        cfg = NestedLoraConfig(
            r=r, mode=mode, inner_rank=q if mode == "nora" else None, target_modules=TARGETS,
            modules_to_save=HEAD, cache_dir="",
        )
        apply_nested(model, cfg)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return model.train()
