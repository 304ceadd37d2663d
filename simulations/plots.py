"""PNG plots of a run (or several runs side by side): central metric vs round and vs cumulative bytes.

The bytes axis is logarithmic. Round 0 (the pretrained model) has sent 0 bytes, which a log axis cannot
show; it is drawn as a dotted horizontal line at its metric value ("round 0, 0 bytes"), in the run's
colour, not as a point at x = 0 (a symlog axis put its "0" tick on top of the 10² tick).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: (x key in metrics.jsonl, file name, x label)
PLOTS = (
    ("round", "accuracy_vs_round.png", "round"),
    ("cumulative-bytes", "accuracy_vs_bytes.png", "cumulative bytes (upload + download, all clients; log scale)"),
)


def _metric_name(rows: Sequence[Mapping[str, Any]]) -> str:
    return "accuracy" if any(r.get("accuracy") is not None for r in rows) else "perplexity"


def metric_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], x_key: str, xlabel: str,
                  title: str = "") -> Figure:
    """One panel: each run's central metric (accuracy, else perplexity) against ``x_key``.

    ``runs``: label -> metrics.jsonl rows. For ``x_key = "cumulative-bytes"`` the x axis is log-scaled and
    rows with 0 bytes (round 0) become a dotted horizontal line per run instead of points."""
    metric = _metric_name([r for rows in runs.values() for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    log_x = x_key == "cumulative-bytes"
    plotted = False
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        pts = [(float(r.get(x_key) or 0), r[metric]) for r in rows if r.get(metric) is not None]
        if log_x:
            zero = [y for x, y in pts if x <= 0]
            pts = [(x, y) for x, y in pts if x > 0]
            if zero:
                ax.axhline(zero[0], color=color, ls=":", lw=1.2, label=f"{label}: round 0 (0 bytes)")
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", color=color, label=label)
            plotted = True
    if log_x and plotted:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"central test {metric}")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png`` of ``runs`` (label -> metrics.jsonl
    rows) into ``out_dir``; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for x_key, fname, xlabel in PLOTS:
        fig = metric_figure(runs, x_key, xlabel, title)
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
