"""Offline labelled data, fixed test splits, federated partitions and tokenised loaders.

- :mod:`fedlora.data.corpora`: the datasets (``rotten_tomatoes``, ``bbc``, ``twitter``, ``dialogues``) read
  from installed asset packages, as ``datasets.Dataset`` with ``text`` and ``label`` (``ClassLabel``) columns;
- :mod:`fedlora.data.partitions`: the fixed held-out test set, flwr-datasets partitions of the rest and each
  client's train/val split (``load_client_data``), and for tuning a central validation split held out
  from the training pool (``load_validation_set``);
- :mod:`fedlora.data.loaders`: tokenised, per-batch padded DataLoaders for seq-cls and causal-LM.
"""

from fedlora.data.corpora import (
    BBC_CLASSES,
    DATASETS,
    DEFAULT_TEST_SIZE,
    dedup_dataset,
    format_dialogue,
    label_counts,
    label_names,
    load_bbc,
    load_dataset_by_name,
    load_dialogues,
    load_rotten_tomatoes,
    load_twitter,
    normalise_text,
    num_classes,
    synthetic_dataset,
)
from fedlora.data.loaders import make_classification_loader, make_lm_loader
from fedlora.data.partitions import (
    DIRICHLET_RESEEDS,
    PARTITIONERS,
    RESEED_STRIDE,
    ClientData,
    clear_caches,
    load_client_data,
    load_test_set,
    load_validation_set,
    make_partitioner,
    partition_pool,
    split_test,
    split_train_val,
)

__all__ = [
    "BBC_CLASSES",
    "DATASETS",
    "DEFAULT_TEST_SIZE",
    "DIRICHLET_RESEEDS",
    "PARTITIONERS",
    "RESEED_STRIDE",
    "ClientData",
    "clear_caches",
    "dedup_dataset",
    "format_dialogue",
    "label_counts",
    "label_names",
    "load_bbc",
    "load_client_data",
    "load_dataset_by_name",
    "load_dialogues",
    "load_rotten_tomatoes",
    "load_test_set",
    "load_twitter",
    "load_validation_set",
    "make_classification_loader",
    "make_lm_loader",
    "make_partitioner",
    "normalise_text",
    "num_classes",
    "partition_pool",
    "split_test",
    "split_train_val",
    "synthetic_dataset",
]
