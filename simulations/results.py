"""Run outputs under ``<results-dir>/<run-name>/``: config, per-round metrics, checkpoints, plots.

Layout::

    config.json          the validated run config (+ fingerprint, versions)
    metrics.jsonl        one JSON object per round (round 0 = the initial model): every JSON-serialisable
                         entry of the round record, keys sorted; the ``columns`` given to
                         :class:`RunOutputs` are on every line (null where a round has no value)
    checkpoint/          latest round: strategy state (global state npz + json) and RNG states
    adapter/             final peft LoRA adapter (export_peft_adapter)
    accuracy_vs_round.png, accuracy_vs_bytes.png
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strategies import load_strategy_state, save_strategy_state


def resolve_results_dir(results_dir: str) -> Path:
    """Absolute results root: the ``results-dir`` key, else ``$FEDLORA_RESULTS_DIR``, else ``~/fedlora-results``.

    The ServerApp's working directory is the SuperLink's, so relative paths are refused."""
    root = results_dir or os.environ.get("FEDLORA_RESULTS_DIR") or str(Path.home() / "fedlora-results")
    path = Path(root).expanduser()
    if not path.is_absolute():
        raise ValueError(
            f"results directory {root!r} (run config 'results-dir' or $FEDLORA_RESULTS_DIR): must be an absolute "
            "path (the ServerApp runs in the "
            "SuperLink's working directory)"
        )
    return path


class RunOutputs:
    """Writes one run's outputs; every file write is atomic (temp + rename).

    ``columns``: keys every metrics.jsonl line carries, null where a record has none (so that every line
    has the same columns whatever the round, task or options); other keys are written as they come.
    """

    def __init__(self, run_dir: Path, columns: Iterable[str] = ()) -> None:
        self.dir = run_dir
        self.columns = tuple(columns)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.checkpoint_dir = self.dir / "checkpoint"

    # -------------------------------------------------------------- config and metrics
    def write_config(self, config: dict[str, Any]) -> None:
        _atomic_text(self.dir / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str))

    def reset_metrics(self) -> None:
        _atomic_text(self.metrics_path, "")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line: the :attr:`columns` (null if absent) and every JSON-serialisable entry of ``record``."""
        line = dict.fromkeys(self.columns)
        line.update({k: v for k, v in record.items() if k in line or _jsonable(v)})
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(line, sort_keys=True, default=_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self, up_to_round: int | None = None) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
        return [r for r in rows if up_to_round is None or r["round"] <= up_to_round]

    def truncate_metrics(self, up_to_round: int) -> list[dict[str, Any]]:
        """Keep rounds ≤ ``up_to_round`` (lines a killed run wrote after its last checkpoint go)."""
        rows = self.read_metrics(up_to_round)
        _atomic_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return rows

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, strategy_state: dict[str, Any], extra: dict[str, Any]) -> None:
        """Replace the checkpoint with the given strategy state + extras (RNG states are added here)."""
        tmp = self.dir / f".checkpoint.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_strategy_state(strategy_state, tmp)
        payload = dict(extra)
        payload["rng"] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        with (tmp / "server.pkl").open("wb") as fh:
            pickle.dump(payload, fh)
        old = self.dir / f".checkpoint.old{os.getpid()}"
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(tmp, self.checkpoint_dir)
        if old.exists():
            shutil.rmtree(old)

    def has_checkpoint(self) -> bool:
        return (self.checkpoint_dir / "strategy.json").exists()

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        state = load_strategy_state(self.checkpoint_dir)
        with (self.checkpoint_dir / "server.pkl").open("rb") as fh:
            extra = pickle.load(fh)
        rng = extra.pop("rng", None)
        if rng:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
        return state, extra


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), list, dict))


def _default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return str(v)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
