"""Results of the privacy–utility sweep: one CSV row per cell, Markdown tables strategy × ε, and the plot.

Outputs under the sweep's ``<out>/`` (written after every cell, so an interrupted sweep has them too)::

    results.csv           one row per cell of the requested grid (:data:`CSV_COLUMNS`)
    results.md            tables strategy × ε: final metric mean ± std over seeds, ε spent, noise multiplier
    privacy_utility.png   final metric vs ε per strategy, error bars over seeds, ε = ∞ at the right end

A cell's labels are ``strategy``, ``epsilon`` (its label: ``"3"``, ``"inf"``) and ``seed``
(:func:`simulations.privacy_sweep.build_grid`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.grid_runner import Cell, markdown_table, mean_std, write_rows_csv

CSV_COLUMNS = (
    "strategy", "epsilon_target", "seed", "status", "metric", "final_metric", "initial_metric",
    "dp_epsilon_spent", "dp_delta", "noise_multiplier", "rounds", "total_bytes", "seconds", "run_name", "error",
)


def cell_result(cell: Cell) -> dict[str, Any]:
    """The cell's CSV row (from its metrics.jsonl and marker)."""
    rows = cell.rows()
    marker = cell.marker()
    metric = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "perplexity"
    final = rows[-1] if rows else {}
    spent = [r["dp-epsilon"] for r in rows if r.get("dp-epsilon") is not None]
    sigma = [r["dp-noise-multiplier"] for r in rows if r.get("dp-noise-multiplier") is not None]
    delta = [r["dp-delta"] for r in rows if r.get("dp-delta") is not None]
    seconds = cell.seconds if cell.seconds is not None else marker.get("seconds")
    return {
        "strategy": cell.labels["strategy"],
        "epsilon_target": cell.labels["epsilon"],
        "seed": cell.labels["seed"],
        "status": cell.status,
        "metric": metric if rows else "",
        "final_metric": final.get(metric) if cell.status == "ok" else None,
        "initial_metric": rows[0].get(metric) if rows else None,
        # a client's ε only grows, so the max over all rounds is the max over clients of their final ε
        "dp_epsilon_spent": max(spent) if spent else None,
        "dp_delta": max(delta) if delta else None,
        "noise_multiplier": max(sigma) if sigma else None,
        "rounds": final.get("round"),
        "total_bytes": final.get("cumulative-bytes"),
        "seconds": round(seconds, 1) if seconds is not None else None,
        "run_name": cell.name,
        "error": cell.error or marker.get("error", ""),
    }


def _eps_order(results: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({r["epsilon_target"] for r in results}, key=float)


def _group(results: Sequence[Mapping[str, Any]], key: str) -> dict[tuple[str, str], list[float]]:
    """(strategy, ε label) -> the values of ``key`` over the finished seeds."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r["status"] == "ok" and r.get(key) is not None:
            out.setdefault((r["strategy"], r["epsilon_target"]), []).append(float(r[key]))
    return out


def write_markdown(results: Sequence[Mapping[str, Any]], path: Path, header: Mapping[str, Any]) -> None:
    """Strategy × ε tables: final metric mean ± std over seeds, ε spent, noise multiplier; failures listed."""
    strategies = list(dict.fromkeys(r["strategy"] for r in results))
    epsilons = _eps_order(results)
    metric = next((r["metric"] for r in results if r.get("metric")), "accuracy")
    cols = ["∞ (no DP)" if e == "inf" else f"ε={e}" for e in epsilons]
    n_total = {(s, e): sum(1 for r in results if r["strategy"] == s and r["epsilon_target"] == e)
               for s in strategies for e in epsilons}
    lines = ["# Privacy–utility sweep", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "title"]
    for title, key, fmt, std in (
        (f"Final central test {metric} (mean ± std over seeds)", "final_metric", "{:.4f}", True),
        ("ε spent (max over clients, mean over seeds; target ε in the column)", "dp_epsilon_spent", "{:.3f}", False),
        ("Noise multiplier σ (max over clients, mean over seeds)", "noise_multiplier", "{:.3f}", False),
    ):
        groups = _group(results, key)
        table = [[s] + [_table_cell(groups.get((s, e), []), n_total[(s, e)], e, fmt, std) for e in epsilons]
                 for s in strategies]
        lines += ["", f"## {title}", ""] + markdown_table(["strategy", *cols], table)
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "## Cells not finished", ""]
        lines += [f"- `{r['run_name']}`: {r['status']}" + (f": {r['error']}" if r.get("error") else "") for r in failed]
    path.write_text("\n".join(lines) + "\n")


def _table_cell(vals: Sequence[float], n_total: int, eps: str, fmt: str, std: bool) -> str:
    """``mean ± std`` (or the mean) of a table cell, with ``(n=k/N)`` when seeds are missing."""
    if not vals:
        return "no DP" if eps == "inf" and not std and n_total > 0 else "–"
    mean, sd = mean_std(vals)
    text = fmt.format(mean) + (" ± " + fmt.format(sd) if std else "")
    if len(vals) < n_total:
        text += f" (n={len(vals)}/{n_total})"
    elif std and len(vals) == 1:
        text += " (n=1)"
    return text


def plot_privacy_utility(results: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path | None:
    """Final metric vs ε (log scale) per strategy with error bars (std over seeds); ε = ∞ at the right end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(results, "final_metric")
    if not groups:
        return None
    metric = next((r["metric"] for r in results if r.get("metric")), "accuracy")
    finite = sorted({float(e) for (_, e) in groups if e != "inf"})
    logs = [math.log10(e) for e in finite]
    span = (max(logs) - min(logs)) if len(logs) > 1 else 1.0
    x_inf = (max(logs) if logs else 0.0) + max(0.25 * span, 0.3)
    xpos = {f"{e:g}": math.log10(e) for e in finite} | {"inf": x_inf}
    strategies = list(dict.fromkeys(s for (s, _) in groups))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    jitter = 0.012 * (span + x_inf - (max(logs) if logs else 0.0))
    for i, s in enumerate(strategies):
        dx = (i - (len(strategies) - 1) / 2) * jitter
        pts = sorted((xpos[e], *mean_std(v)) for (st, e), v in groups.items() if st == s)
        fin = [p for p in pts if p[0] != x_inf]
        inf = [p for p in pts if p[0] == x_inf]
        color = f"C{i}"
        if fin:
            xs, ys, es = zip(*fin)
            ax.errorbar([x + dx for x in xs], ys, yerr=es, marker="o", capsize=3, color=color, label=s)
        if inf:
            x, y, e = inf[0]
            ax.errorbar([x + dx], [y], yerr=[e], marker="s", capsize=3, color=color, label=None if fin else s)
            if fin:
                ax.plot([fin[-1][0] + dx, x + dx], [fin[-1][1], y], ls=":", color=color, alpha=0.7)
    if logs:
        ax.axvline((max(logs) + x_inf) / 2, color="grey", lw=0.8, ls="--", alpha=0.6)
    ticks = [xpos[f"{e:g}"] for e in finite] + [x_inf]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{e:g}" for e in finite] + ["∞\n(no DP)"])
    ax.set_xlim(min(ticks) - 0.15 * (x_inf - min(ticks) or 1), x_inf + 0.15 * (x_inf - min(ticks) or 1))
    ax.set_xlabel("target ε (sample-level DP-SGD, log scale)")
    ax.set_ylabel(f"final central test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(cells: Sequence[Cell], out: Path, header: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Write results.csv, results.md and privacy_utility.png of ``cells`` into ``out``; returns the rows."""
    results = [cell_result(c) for c in cells]
    write_rows_csv(results, out / "results.csv", CSV_COLUMNS)
    write_markdown(results, out / "results.md", header)
    plot_privacy_utility(results, out / "privacy_utility.png", title=str(header.get("title", "")))
    return results
