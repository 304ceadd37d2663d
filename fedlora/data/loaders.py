"""Tokenised ``DataLoader``s of a ``text``/``label`` dataset, padded per batch.

Every batch is ``{"input_ids", "attention_mask", "labels"}`` of long tensors: ``input_ids`` and
``attention_mask`` (B, T) with T the longest sequence of the batch (≤ the length limit); ``labels`` (B,)
class ids for sequence classification, or (B, T) = ``input_ids`` with padding positions set to -100 for
causal-LM fine-tuning. Batches are what :func:`fedlora.training.train_local` and
:func:`fedlora.privacy.run_dp_training` consume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from fedlora.tensors import seeded_generator

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class _ListDataset(torch.utils.data.Dataset):
    """Map-style dataset over a list of feature dicts (lists of ints / int label)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.items[idx]


def _pad_collate(pad_id: int, padding_side: str, lm: bool) -> Callable[[list[dict[str, Any]]], dict]:
    """Collate ``[{"input_ids": [...], ("label": int)}]`` into padded LongTensors of shape (B, T_max)."""

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        t_max = max((len(it["input_ids"]) for it in items), default=0)
        ids = torch.full((len(items), t_max), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), t_max), dtype=torch.long)
        for i, it in enumerate(items):
            seq = torch.as_tensor(it["input_ids"], dtype=torch.long)
            sl = slice(t_max - len(seq), t_max) if padding_side == "left" else slice(0, len(seq))
            ids[i, sl] = seq
            mask[i, sl] = 1
        if lm:
            labels = ids.masked_fill(mask == 0, -100)
        else:
            labels = torch.as_tensor([it["label"] for it in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad nor eos token (use fedlora.models.load_tokenizer)")
    return int(pad)


def _padded_loader(
    items: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, batch_size: int, shuffle: bool, seed: int,
    drop_last: bool, *, lm: bool,
) -> DataLoader:
    """DataLoader over tokenised ``items``, padded per batch with the tokenizer's pad (or eos) token on its
    padding side; shuffled by a generator seeded with ``seed`` when ``shuffle``."""
    return DataLoader(
        _ListDataset(items),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=seeded_generator(seed) if shuffle else None,
        collate_fn=_pad_collate(_pad_id(tokenizer), getattr(tokenizer, "padding_side", "right"), lm=lm),
        drop_last=drop_last,
    )


def make_classification_loader(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 64,
    batch_size: int = 16,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader of ``{"input_ids", "attention_mask", "labels"}`` for sequence classification.

    Texts are tokenised once (truncated to ``max_length`` tokens, special tokens included); each batch
    is padded to its longest sequence: ``input_ids``/``attention_mask`` (B, T≤max_length) long,
    ``labels`` (B,) long. With ``shuffle`` the order comes from a generator seeded with ``seed``
    (reproducible for a fresh loader; successive epochs differ).
    """
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    items = [{"input_ids": ids, "label": int(y)} for ids, y in zip(enc["input_ids"], ds["label"])]
    return _padded_loader(items, tokenizer, batch_size, shuffle, seed, drop_last, lm=False)


def make_lm_loader(
    texts: Sequence[str] | Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 128,
    batch_size: int = 8,
    shuffle: bool = False,
    seed: int = 0,
    add_eos: bool = True,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader of ``{"input_ids", "attention_mask", "labels"}`` for causal-LM fine-tuning.

    One sequence per text (``eos`` appended when ``add_eos``), truncated to ``block_size`` tokens and
    padded per batch: all tensors (B, T≤block_size) long; ``labels`` = ``input_ids`` with padding
    positions set to -100 (a real eos token stays a label even when pad == eos), unshifted: the loss
    shifts them (logits at t predict labels at t+1). ``texts`` may be a Dataset with a ``text`` column.
    """
    if isinstance(texts, Dataset):
        texts = texts["text"]
    texts = list(texts)
    eos = tokenizer.eos_token if add_eos else None
    if eos:
        texts = [t + eos for t in texts]
    enc = tokenizer(texts, truncation=True, max_length=block_size)
    items = [{"input_ids": ids} for ids in enc["input_ids"] if len(ids) > 0]
    return _padded_loader(items, tokenizer, batch_size, shuffle, seed, drop_last, lm=True)
