"""The federated split of a dataset: a fixed held-out test set, flwr-datasets partitions, train/val.

Pipeline (all deterministic for the seeds given):

    full dataset (de-duplicated) --split_test(test_size, seed)--> (pool, test)   test: no client ever sees it
    [pool --split_test(validation_size, seed + 1)--> (pool, validation)]     only when validation_size is set
    pool --flwr-datasets partitioner(seed)-->  partition_0 … partition_{N-1}   (disjoint, cover pool)
    partition_i --(seed, i)--> ClientData(train, val)

``validation_size`` holds out a central validation split from the training pool for tuning: clients never
see it and the test split is neither used nor changed by it.

Test splits and partitioners are cached per process (``clear_caches`` forgets them), so every partition
of one configuration comes from one draw. flwr-datasets is imported lazily inside functions so ``import
fedlora`` stays light; flwr never is.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from datasets import ClassLabel, Dataset

from fedlora.data.corpora import (
    DEFAULT_TEST_SIZE,
    clear_dataset_cache,
    dataset_key,
    label_counts,
    load_dataset_by_name,
    num_classes,
)

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "by-class")


def clear_caches() -> None:
    """Forget the per-process caches of loaded datasets, test splits and partitioners."""
    clear_dataset_cache()
    _split_cached.cache_clear()
    _pool_cached.cache_clear()
    _partitioner_cached.cache_clear()
    _FAILED_DRAWS.clear()


# ------------------------------------------------------------------------------------- test split
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
    return split_test(load_dataset_by_name(name), test_size, seed)


@functools.lru_cache(maxsize=16)
def _pool_cached(name: str, seed: int, test_size: int | float, validation_size: int | float | None
                 ) -> tuple[Dataset, Dataset | None]:
    """``(pool the clients partition, central validation split or None)``."""
    pool, _ = _split_cached(name, seed, test_size)
    if validation_size is None:
        return pool, None
    try:
        return split_test(pool, validation_size, seed + 1)
    except ValueError as err:
        raise ValueError(f"validation-size: {err}".replace("test-size", "the value")) from None


def load_validation_set(
    dataset_name: str, validation_size: int | float, seed: int = 42, test_size: int | float | None = None,
    max_examples: int | None = None,
) -> Dataset:
    """The central validation split: ``validation_size`` examples (int) or a fraction of the training pool,
    held out from every client (:func:`partition_pool` with the same ``validation_size``); disjoint from the
    test split. Optionally truncated to its first ``max_examples``."""
    name = dataset_key(dataset_name)
    _, val = _pool_cached(name, seed, _resolve_test_size(name, test_size), validation_size)
    return _truncate(val, max_examples)


def load_test_set(
    dataset_name: str, seed: int = 42, test_size: int | float | None = None, max_examples: int | None = None
) -> Dataset:
    """The fixed held-out test set (see ``split_test``), optionally truncated to its first ``max_examples``.

    ``test_size=None`` uses ``DEFAULT_TEST_SIZE`` (2000 for rotten tomatoes). The split itself never
    depends on ``max_examples``, so a truncated test set is a subset of the full one.
    """
    name = dataset_key(dataset_name)
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
) -> Partitioner:
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
    validation_size: int | float | None = None,
    reseed: int = 0,
):
    pool, _ = _pool_cached(name, seed, test_size, validation_size)
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
    dataset_name: str, partition_id: int, num_partitions: int, partitioner: str = "dirichlet", alpha: float = 0.5,
    seed: int = 42, test_size: int | float | None = None, classes_per_partition: int = 2,
    min_partition_size: int | None = None, validation_size: int | float | None = None,
) -> Dataset:
    """Partition ``partition_id`` of the train pool (dataset minus test split, minus the central validation
    split when ``validation_size`` is set), before the client's own train/val split.

    Partitioners are cached per process, so all partitions of one configuration come from one draw.
    ``min_partition_size=None`` uses ``max(1, min(10, pool_size // (100 * num_partitions)))`` (Dirichlet only).
    """
    name = dataset_key(dataset_name)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must lie in [0, {num_partitions - 1}], got {partition_id}")
    tries = DIRICHLET_RESEEDS if partitioner == "dirichlet" else 1
    key = (name, seed, _resolve_test_size(name, test_size), partitioner, num_partitions, alpha,
           classes_per_partition, min_partition_size, validation_size)
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
    dataset_name: str, partition_id: int, num_partitions: int, partitioner: str = "dirichlet", alpha: float = 0.5,
    seed: int = 42, test_size: int | float | None = None, val_fraction: float = 0.1, max_examples: int | None = None,
    classes_per_partition: int = 2, min_partition_size: int | None = None, validation_size: int | float | None = None,
) -> ClientData:
    """Client ``partition_id``'s train/val data: :func:`partition_pool` then :func:`split_train_val`.

    The dataset is loaded once per process, the fixed test split (``load_test_set`` with the same
    ``seed``/``test_size``) is removed, the rest is partitioned with a flwr-datasets partitioner
    (``make_partitioner``), and the partition is truncated and split into train/val.
    """
    _check_val_fraction(val_fraction)
    part = partition_pool(dataset_name, partition_id, num_partitions, partitioner, alpha, seed, test_size,
                          classes_per_partition, min_partition_size, validation_size)
    return split_train_val(part, seed, partition_id, val_fraction=val_fraction, max_examples=max_examples)


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val-fraction must lie in [0, 1), got {val_fraction}")


def split_train_val(
    part: Dataset, seed: int, partition_id: int, *, val_fraction: float = 0.1, max_examples: int | None = None
) -> ClientData:
    """A partition's train/val split: ``part`` is truncated to its first ``max_examples`` rows (if given), then
    ``round(val_fraction * n)`` rows (at least 1 when ``val_fraction > 0`` and n >= 2, never all) go to val, by
    a permutation seeded with ``(seed, partition_id)``; both parts keep the partition's row order."""
    _check_val_fraction(val_fraction)
    part = _truncate(part, max_examples)
    n = len(part)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng([seed, partition_id]).permutation(n)
    return ClientData(train=part.select(np.sort(perm[n_val:])), val=part.select(np.sort(perm[:n_val])))
