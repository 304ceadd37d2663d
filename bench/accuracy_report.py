"""Tables and plots of the accuracy grid (:mod:`bench.accuracy`) from its finished cells.

Per cell (``results.csv``): the final accuracy (the whole test split, after the last round), the round-0
accuracy, the mean of the last three rounds' accuracies (on the per-round subset: how steady the end is),
bytes per client per round, the total bytes, and the first round, and the cumulative bytes at it, where the
per-round accuracy reaches 95% of the *centralised bound*: the higher of the two centralised
methods' mean final accuracies over the seeds that finished (empty when no bound finished or the cell never
reached it). ``results.md``: mean ± std over seeds per method and α, and those two costs as the mean over
the seeds that reached the bound ("k/n" says how many did). Plots: accuracy per round, accuracy against
cumulative bytes (log axis), and the accuracy–bytes frontier (final accuracy against the bytes a client
sends and receives per round, one point per method and α).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.console import format_bytes
from simulations.grid_runner import Cell, markdown_table, mean_std, write_rows_csv

CSV_COLUMNS = ("method", "family", "central", "alpha", "seed", "lr", "rank", "status", "final_accuracy",
               "initial_accuracy", "last3_mean", "rounds", "total_bytes", "up_bytes_per_client_round",
               "down_bytes_per_client_round", "bound", "round_to_95", "bytes_to_95", "seconds", "run_name", "error")
TARGET = 0.95


def final_accuracy(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The last round's accuracy of a run's metrics rows (None without one)."""
    return float(rows[-1]["accuracy"]) if rows and "accuracy" in rows[-1] else None


def centralised_bound(cells: Sequence[Cell]) -> float | None:
    """The higher mean final accuracy of the centralised methods (over their finished seeds)."""
    means = []
    for label in dict.fromkeys(c.labels["method"] for c in cells if c.labels["central"]):
        vals = [final_accuracy(c.rows()) for c in cells if c.labels["method"] == label and c.status == "ok"]
        vals = [v for v in vals if v is not None]
        if vals:
            means.append(statistics.fmean(vals))
    return max(means) if means else None


def cell_row(cell: Cell, bound: float | None) -> dict[str, Any]:
    rows = cell.rows() if cell.status == "ok" else []
    trained = [r for r in rows if r.get("round", 0) >= 1]
    used = [max(1, int(r.get("clients-used") or 0)) for r in trained]
    sampled = [max(1, int(r.get("clients-sampled") or 0)) for r in trained]
    reach = next((r for r in rows if bound and float(r.get("accuracy", 0)) >= TARGET * bound), None)
    lab = cell.labels
    return {
        "method": lab["method"], "family": lab["family"], "central": lab["central"],
        "alpha": "" if lab["alpha"] is None else lab["alpha"], "seed": lab["seed"], "lr": lab["lr"],
        "rank": lab["rank"], "status": cell.status, "final_accuracy": final_accuracy(rows),
        "initial_accuracy": float(rows[0]["accuracy"]) if rows and "accuracy" in rows[0] else None,
        "last3_mean": statistics.fmean(float(r["accuracy"]) for r in trained[-3:]) if trained else None,
        "rounds": rows[-1].get("round") if rows else None,
        "total_bytes": rows[-1].get("cumulative-bytes") if rows else None,
        "up_bytes_per_client_round": (statistics.fmean(r["upload-bytes"] / u for r, u in zip(trained, used))
                                      if trained else None),
        "down_bytes_per_client_round": (statistics.fmean(r["download-bytes"] / s for r, s in zip(trained, sampled))
                                        if trained else None),
        "bound": bound, "round_to_95": reach.get("round") if reach else None,
        "bytes_to_95": reach.get("cumulative-bytes") if reach else None,
        "seconds": round(cell.seconds, 1) if cell.seconds is not None else None,
        "run_name": cell.name, "error": cell.error,
    }


def _mean_std_text(vals: Sequence[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.4f} (n=1)"
    return "{:.4f} ± {:.4f} (n={})".format(*mean_std(vals), len(vals)) if vals else "–"


def _reach_text(rows: Sequence[Mapping[str, Any]], key: str, fmt) -> str:
    done = [r for r in rows if r["status"] == "ok"]
    hit = [r[key] for r in done if r[key] is not None]
    if not done:
        return "–"
    return f"{fmt(statistics.fmean(hit))} ({len(hit)}/{len(done)})" if hit else f"not reached (0/{len(done)})"


def write_markdown(rows: Sequence[Mapping[str, Any]], path: Path, header: Mapping[str, Any]) -> None:
    alphas = sorted({r["alpha"] for r in rows if not r["central"]})
    lines = ["# Accuracy grid", ""] + [f"- {k}: {v}" for k, v in header.items()]
    bound = next((r["bound"] for r in rows if r["bound"]), None)
    lines += [f"- centralised bound (higher centralised mean): {bound:.4f}; target {TARGET:.0%} of it = "
              f"{TARGET * bound:.4f}" if bound else "- centralised bound: not measured yet", ""]
    table = []
    for alpha in alphas:
        for m in dict.fromkeys(r["method"] for r in rows if not r["central"]):
            sub = [r for r in rows if r["method"] == m and r["alpha"] == alpha]
            ok = [r for r in sub if r["status"] == "ok"]
            up = statistics.fmean(r["up_bytes_per_client_round"] for r in ok) if ok else None
            down = statistics.fmean(r["down_bytes_per_client_round"] for r in ok) if ok else None
            table.append([f"{alpha:g}", m, f"{sub[0]['lr']:g}",
                          _mean_std_text([r["final_accuracy"] for r in ok if r["final_accuracy"] is not None]),
                          _mean_std_text([r["last3_mean"] for r in ok if r["last3_mean"] is not None]),
                          f"{format_bytes(up)} / {format_bytes(down)}" if ok else "–",
                          _reach_text(sub, "round_to_95", lambda x: f"{x:.1f}"),
                          _reach_text(sub, "bytes_to_95", format_bytes)])
    for m in dict.fromkeys(r["method"] for r in rows if r["central"]):
        sub = [r for r in rows if r["method"] == m]
        ok = [r for r in sub if r["status"] == "ok"]
        table.append(["any", f"{m} (bound)", f"{sub[0]['lr']:g}",
                      _mean_std_text([r["final_accuracy"] for r in ok if r["final_accuracy"] is not None]),
                      _mean_std_text([r["last3_mean"] for r in ok if r["last3_mean"] is not None]),
                      "–", _reach_text(sub, "round_to_95", lambda x: f"{x:.1f}"), "–"])
    lines += markdown_table(["α", "method", "lr", "final test accuracy (mean ± std)",
                             "mean of the last 3 rounds (per-round subset)", "up / down per client per round",
                             f"rounds to {TARGET:.0%} of bound (seeds)", f"bytes to {TARGET:.0%} of bound"], table)
    initial = [float(r["initial_accuracy"]) for r in rows if r["initial_accuracy"] is not None]
    if initial:
        lines += ["", f"Round-0 accuracy (before training, per-round subset): {min(initial):.4f} – {max(initial):.4f}."]
    pending = [r for r in rows if r["status"] != "ok"]
    if pending:
        lines += ["", f"Cells not finished ({len(pending)}):"] + [
            f"- `{r['run_name']}`: {r['status']} {r['error']}".rstrip() for r in pending]
    path.write_text("\n".join(lines) + "\n")


def mean_curves(cells: Sequence[Cell], key: str) -> dict[tuple[str, Any], tuple[list[float], list[float]]]:
    """(method, α) -> (mean x per round, mean accuracy per round) over the finished seeds."""
    groups: dict[tuple[str, Any], list[list[Mapping[str, Any]]]] = {}
    for c in cells:
        if c.status == "ok":
            groups.setdefault((c.labels["method"], c.labels["alpha"]), []).append(c.rows())
    out = {}
    for k, runs in groups.items():
        n = min(len(r) for r in runs)
        xs = [statistics.fmean(float(r[i].get(key) or 0) for r in runs) for i in range(n)]
        ys = [statistics.fmean(float(r[i]["accuracy"]) for r in runs) for i in range(n)]
        out[k] = (xs, ys)
    return out


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, n, figsize=(5.5 * n + 2, 4.2), squeeze=False, sharey=True)


def plot_curves(cells: Sequence[Cell], path: Path, key: str, xlabel: str, logx: bool, title: str) -> None:
    curves = mean_curves(cells, key)
    alphas = sorted({a for (_, a) in curves if a is not None})
    if not alphas:
        return
    plt, fig, axes = _figure(len(alphas))
    for ax, alpha in zip(axes[0], alphas):
        for (m, a), (xs, ys) in curves.items():
            if a == alpha:
                ax.plot(xs[1:] if logx else xs, ys[1:] if logx else ys, marker="o", ms=2, label=m)
        for (m, a), (_, ys) in curves.items():
            if a is None:
                ax.axhline(ys[-1], ls="--", lw=1, color="grey" if "nested" in m else "black", label=f"{m} (final)")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"Dirichlet α={alpha:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("central test accuracy (mean over seeds)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_frontier(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Final accuracy (mean over seeds) against bytes per client per round (up + down), per method and α."""
    alphas = sorted({r["alpha"] for r in rows if not r["central"] and r["status"] == "ok"})
    if not alphas:
        return
    plt, fig, axes = _figure(len(alphas))
    for ax, alpha in zip(axes[0], alphas):
        for m in dict.fromkeys(r["method"] for r in rows if not r["central"]):
            ok = [r for r in rows if r["method"] == m and r["alpha"] == alpha and r["status"] == "ok"]
            if ok:
                x = statistics.fmean(r["up_bytes_per_client_round"] + r["down_bytes_per_client_round"] for r in ok)
                y = statistics.fmean(r["final_accuracy"] for r in ok)
                ax.scatter([x], [y])
                ax.annotate(m, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per client per round (up + down)")
        ax.set_title(f"Dirichlet α={alpha:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final test accuracy (mean over seeds)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(cells: Sequence[Cell], out: Path, header: Mapping[str, Any]) -> list[dict[str, Any]]:
    bound = centralised_bound(cells)
    rows = [cell_row(c, bound) for c in cells]
    write_rows_csv(rows, out / "results.csv", CSV_COLUMNS)
    write_markdown(rows, out / "results.md", header)
    title = str(header.get("setting", ""))[:110]
    plot_curves(cells, out / "accuracy_vs_bytes.png", "cumulative-bytes", "cumulative bytes (up + down, all clients)",
                True, title)
    plot_curves(cells, out / "accuracy_vs_round.png", "round", "round", False, title)
    plot_frontier(rows, out / "accuracy_vs_bytes_frontier.png", title)
    return rows
