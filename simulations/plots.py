"""PNG plots of a run (or several runs side by side): accuracy vs round and vs cumulative bytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _metric_name(rows: Sequence[Mapping[str, Any]]) -> str:
    return "accuracy" if any(r.get("accuracy") is not None for r in rows) else "perplexity"


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, title: str = "") -> list[Path]:
    """Plot each run's central metric vs round and vs cumulative bytes (upload + download).

    ``runs``: label -> metrics.jsonl rows. Returns the written PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = _metric_name([r for rows in runs.values() for r in rows])
    paths = []
    for x_key, fname, xlabel in (
        ("round", "accuracy_vs_round.png", "round"),
        ("cumulative-bytes", "accuracy_vs_bytes.png", "cumulative bytes (upload + download, all clients)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for label, rows in runs.items():
            pts = [(r.get(x_key) or 0, r[metric]) for r in rows if r.get(metric) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=label)
        if x_key == "cumulative-bytes":
            ax.set_xscale("symlog", linthresh=1e3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"central test {metric}")
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
