"""Which data a node trains on.

Simulation: Flower sets ``partition-id`` and ``num-partitions`` in ``context.node_config``; the node
takes that partition of the run's dataset (flwr-datasets partitioner from the run config).

Deployment: a SuperNode started with ``--node-config "data-path=/path/to/local.csv"`` trains on its
own local file (CSV with ``text`` and ``label`` columns, or a directory of ``<label>/<file>.txt``);
``partition-id`` / ``num-partitions`` still work for trials on one machine.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset
from flwr.app import Context

from fedlora import data as fdata
from fedlora.run_config import RunConfig


@dataclass(frozen=True)
class NodeData:
    train: Dataset
    val: Dataset
    partition_id: int

    @property
    def num_examples(self) -> int:
        return len(self.train)


def _node_int(context: Context, key: str) -> int | None:
    value = context.node_config.get(key)
    return None if value is None or value == "" else int(value)


def node_client_data(cfg: RunConfig, context: Context) -> NodeData:
    """The node's train/val split (cached per process)."""
    data_path = str(context.node_config.get("data-path", "") or "")
    if data_path:
        train, val = _local_file_data(data_path, cfg.seed, cfg.val_fraction, cfg.max_client_examples)
        return NodeData(train, val, _node_int(context, "partition-id") or 0)
    pid = _node_int(context, "partition-id")
    nparts = _node_int(context, "num-partitions") or cfg.num_partitions
    if pid is None or not nparts:
        raise ValueError(
            "node config has neither 'data-path' nor 'partition-id'/'num-partitions': start the SuperNode "
            "with --node-config \"partition-id=0 num-partitions=2\" or \"data-path=/path/data.csv\""
        )
    if not 0 <= pid < nparts:
        raise ValueError(f"node config 'partition-id'={pid} must be in [0, num-partitions={nparts})")
    cd = fdata.load_client_data(
        cfg.dataset, pid, nparts, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha, seed=cfg.seed,
        test_size=cfg.test_split_size, val_fraction=cfg.val_fraction, max_examples=cfg.max_client_examples or None,
        classes_per_partition=cfg.classes_per_partition, min_partition_size=cfg.min_partition_size or None,
        validation_size=cfg.validation_split_size,
    )
    return NodeData(cd.train, cd.val, pid)


def check_partitioning(cfg: RunConfig, num_partitions: int) -> None:
    """Partition the run's dataset once on the server so a partitioning that cannot work fails at start
    with a clear message (ValueError naming the keys) instead of as an error reply from every client."""
    if num_partitions > 0:
        fdata.partition_pool(cfg.dataset, 0, num_partitions, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
                             seed=cfg.seed, test_size=cfg.test_split_size,
                             classes_per_partition=cfg.classes_per_partition,
                             min_partition_size=cfg.min_partition_size or None,
                             validation_size=cfg.validation_split_size)


@functools.lru_cache(maxsize=4)
def _local_file_data(path: str, seed: int, val_fraction: float, max_examples: int) -> tuple[Dataset, Dataset]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"node config 'data-path'={path!r} does not exist")
    texts: list[str] = []
    labels: list[int] = []
    if p.is_dir():
        classes = sorted(d.name for d in p.iterdir() if d.is_dir())
        for i, c in enumerate(classes):
            for f in sorted((p / c).glob("*.txt")):
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
                labels.append(i)
    else:
        with p.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if "text" not in row or "label" not in row:
                    raise ValueError(f"node config 'data-path'={path!r}: CSV needs 'text' and 'label' columns")
                texts.append(row["text"])
                labels.append(int(row["label"]))
    if not texts:
        raise ValueError(f"node config 'data-path'={path!r}: no examples found")
    ds = Dataset.from_dict({"text": texts, "label": labels})
    if max_examples:
        ds = ds.select(range(min(max_examples, len(ds))))
    perm = np.random.default_rng(seed).permutation(len(ds))
    n_val = int(round(val_fraction * len(ds)))
    return ds.select(np.sort(perm[n_val:])), ds.select(np.sort(perm[:n_val]))
