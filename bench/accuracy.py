"""Accuracy against the baselines: every strategy, Dirichlet α ∈ {0.1, 1.0}, 3 seeds, equal local steps.

::

    python -m bench.accuracy                      # the grid of docs/results.md (about 75 min on 2 cores)
    python -m bench.accuracy --quick              # smoke size: fedsb + fedit, 1 α, 1 seed, 1 round
    python -m bench.accuracy --strategies fedsb,fedit --alphas 0.1 --seeds 0 --jobs 1 [--force]

Grid: MiniLM on Rotten Tomatoes, 10 clients (flwr-datasets Dirichlet partitions of the training pool),
``--rounds`` rounds, half the clients per round, ``--local-steps`` AdamW steps of batch 16 per client
(the same for every strategy), rank 16 (the heterogeneous-rank strategies ``hetero``, ``flora-lora`` and
``flexlora`` with client ranks 16, 8, 4 assigned round-robin), each strategy at its run-config learning
rate (``lr`` for nested adapters, ``lora-lr`` for peft LoRA), central evaluation of the global model on a
held-out test split (the same split for every cell of one seed; it also fixes the partitions and initialisation).

Upper bounds ("centralised"): one node holding the whole training pool, the same total number of
steps per round as a federated round (``clients per round × local steps``), for nested ``sb``
(run as ``fedsb``) and for peft LoRA (run as ``fedit``); with one node both aggregations are the
identity, so this is plain centralised fine-tuning with AdamW restarted each round. Centralised
cells do not depend on α.

Every cell is a whole fedlora job (:func:`simulations.inprocess.run_in_process`: the real ServerApp
loop and ClientApp, in one process, no Ray) in a fresh subprocess, ``--jobs`` cells side by side
with one thread each. Finished cells are skipped (``--force`` reruns); the machinery is the grid
runner's (:mod:`simulations.grid_runner`), shared with the privacy sweep.

Outputs under ``--out`` (default ``results/bench/accuracy``): ``runs/<cell>/`` (each run's
metrics.jsonl...), ``results.csv``, ``results.md`` (mean ± std over seeds), ``accuracy_vs_bytes.png``
and ``accuracy_vs_round.png``. Target: fedsb mean final accuracy ≥ FedIT's at α = 0.1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, machine_info, verdict
from simulations.console import format_bytes
from simulations.grid_runner import (
    Cell,
    GridError,
    list_item,
    markdown_table,
    mean_std,
    one_of,
    parse_list,
    run_cell_subprocess,
    skip_finished,
    write_rows_csv,
)

STRATEGIES = ("fedsb", "flora", "hetero", "fedit", "ffa", "flora-lora", "flexlora")
#: centralised upper bounds: label -> the strategy that runs it on one node
CENTRAL = {"central-nested": "fedsb", "central-lora": "fedit"}
CLIENTS = 10
#: the heterogeneous-rank strategies and baselines run with client ranks ``--ranks`` (the others at r = 16)
HETERO_RANKS = ("hetero", "flora-lora", "flexlora")
CSV_COLUMNS = ("kind", "strategy", "alpha", "seed", "status", "final_accuracy", "initial_accuracy", "rounds",
               "total_bytes", "up_bytes_per_client_round", "down_bytes_per_client_round", "seconds", "run_name",
               "error")


def common_overrides(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run-config keys shared by every cell (everything else is the app's default)."""
    return {
        "model": "minilm", "dataset": "rotten_tomatoes", "num-server-rounds": a.rounds, "local-steps": a.local_steps,
        "batch-size": 16, "max-length": a.max_length, "max-test-examples": a.test_examples,
        "checkpoint": False, "export-adapter": False, "results-dir": str(out / "runs"),
        **({"lr": a.lr} if a.lr else {}), **({"lora-lr": a.lora_lr} if a.lora_lr else {}),
    }


def build_cells(a: argparse.Namespace, out: Path) -> list[Cell]:
    """Seed-major (an interrupted grid has whole seeds): per seed the federated cells (α × strategy), then
    the centralised upper bounds."""
    base = common_overrides(a, out)
    per_round = max(1, round(a.fraction * CLIENTS)) * a.local_steps
    cells: list[Cell] = []
    for seed in a.seeds:
        for alpha in a.alphas:
            for strategy in a.strategies:
                name = f"{strategy}-a{alpha:g}-s{seed}"
                overrides = {**base, "strategy": strategy, "seed": seed, "partitioner": "dirichlet",
                             "dirichlet-alpha": alpha, "num-partitions": CLIENTS, "fraction-train": a.fraction,
                             "run-name": name, **({"ranks": a.ranks} if strategy in HETERO_RANKS else {})}
                labels = {"strategy": strategy, "alpha": alpha, "seed": seed}
                cells.append(Cell(out / "runs" / name, overrides, CLIENTS, labels, runner="in-process"))
        for label in a.central:
            name = f"{label}-s{seed}"
            overrides = {**base, "strategy": CENTRAL[label], "seed": seed, "partitioner": "iid", "num-partitions": 1,
                         "fraction-train": 1.0, "min-train-nodes": 1, "min-available-nodes": 1,
                         "local-steps": per_round, "run-name": name}
            cells.append(Cell(out / "runs" / name, overrides, 1, {"strategy": label, "alpha": None, "seed": seed},
                              runner="in-process"))
    from fedlora.run_config import ConfigError, parse_run_config

    for cell in cells:
        try:
            parse_run_config(cell.overrides)
        except ConfigError as err:
            raise SystemExit(f"bench.accuracy: cell {cell.name}: {err}") from None
    return cells


def cell_row(cell: Cell) -> dict[str, Any]:
    rows = cell.rows()
    final = rows[-1] if rows else {}
    trained = [r for r in rows if r.get("round", 0) >= 1]
    used = [max(1, int(r.get("clients-used") or 0)) for r in trained]
    sampled = [max(1, int(r.get("clients-sampled") or 0)) for r in trained]
    central = cell.labels["alpha"] is None
    return {
        "kind": "centralised" if central else "federated",
        "strategy": cell.labels["strategy"],
        "alpha": "" if central else cell.labels["alpha"],
        "seed": cell.labels["seed"],
        "status": cell.status,
        "final_accuracy": final.get("accuracy") if cell.status == "ok" else None,
        "initial_accuracy": rows[0].get("accuracy") if rows else None,
        "rounds": final.get("round"),
        "total_bytes": final.get("cumulative-bytes"),
        "up_bytes_per_client_round": (statistics.fmean(r["upload-bytes"] / u for r, u in zip(trained, used))
                                      if trained else None),
        "down_bytes_per_client_round": (statistics.fmean(r["download-bytes"] / s for r, s in zip(trained, sampled))
                                        if trained else None),
        "seconds": round(cell.seconds, 1) if cell.seconds is not None else None,
        "run_name": cell.name,
        "error": cell.error,
    }


# ------------------------------------------------------------------------------------------- outputs
def _final(rows: Sequence[Mapping[str, Any]], strategy: str, alpha: Any = None) -> list[float]:
    return [float(r["final_accuracy"]) for r in rows if r["strategy"] == strategy and r["status"] == "ok"
            and r["final_accuracy"] is not None and (alpha is None or r["alpha"] == alpha)]


def _mean_std_text(vals: Sequence[float]) -> str:
    return "{:.4f} ± {:.4f} (n={})".format(*mean_std(vals), len(vals)) if vals else "–"


def write_markdown(rows: Sequence[Mapping[str, Any]], path: Path, header: Mapping[str, Any]) -> None:
    alphas = sorted({r["alpha"] for r in rows if r["kind"] == "federated"})
    strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["kind"] == "federated"))
    table = []
    for s in strategies:
        sub = [r for r in rows if r["strategy"] == s and r["up_bytes_per_client_round"] is not None]
        traffic = ["–", "–"]
        if sub:
            up = statistics.fmean(r["up_bytes_per_client_round"] for r in sub)
            down = statistics.fmean(r["down_bytes_per_client_round"] for r in sub)
            total = [r["total_bytes"] for r in sub if r["total_bytes"] is not None]
            traffic = [f"{format_bytes(up)} / {format_bytes(down)}",
                       format_bytes(statistics.fmean(total)) if total else "–"]
        table.append([s, *(_mean_std_text(_final(rows, s, a)) for a in alphas), *traffic])
    for label in dict.fromkeys(r["strategy"] for r in rows if r["kind"] == "centralised"):
        table.append([f"{label} (upper bound, any α)", *[_mean_std_text(_final(rows, label))] * len(alphas), "–", "–"])
    lines = ["# Accuracy benchmark", ""] + [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += markdown_table(["strategy", *(f"α={a:g} final accuracy" for a in alphas),
                             "up / down per client per round", "total bytes (all rounds, all clients)"], table)
    initial = [float(r["initial_accuracy"]) for r in rows if r["initial_accuracy"] is not None]
    if initial:
        lines += ["", f"Round-0 accuracy (before training): {min(initial):.4f} – {max(initial):.4f}."]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "Cells not finished:"] + [f"- `{r['run_name']}`: {r['status']} {r['error']}" for r in failed]
    path.write_text("\n".join(lines) + "\n")


def mean_curves(cells: Sequence[Cell], key: str) -> dict[tuple[str, Any], tuple[list[float], list[float]]]:
    """(strategy, α) -> (mean x per round, mean accuracy per round) over the finished seeds."""
    groups: dict[tuple[str, Any], list[list[Mapping[str, Any]]]] = {}
    for c in cells:
        if c.status == "ok":
            groups.setdefault((c.labels["strategy"], c.labels["alpha"]), []).append(c.rows())
    out = {}
    for k, runs in groups.items():
        n = min(len(r) for r in runs)
        xs = [statistics.fmean(float(r[i].get(key) or 0) for r in runs) for i in range(n)]
        ys = [statistics.fmean(float(r[i]["accuracy"]) for r in runs) for i in range(n)]
        out[k] = (xs, ys)
    return out


def plot(cells: Sequence[Cell], path: Path, key: str, xlabel: str, logx: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(cells, key)
    alphas = sorted({a for (_, a) in curves if a is not None})
    if not alphas:
        return
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas) + 2, 4.2), squeeze=False, sharey=True)
    for ax, alpha in zip(axes[0], alphas):
        for (s, a), (xs, ys) in curves.items():
            if a != alpha:
                continue
            if logx:
                xs, ys = xs[1:], ys[1:]  # round 0 has 0 bytes
            ax.plot(xs, ys, marker="o", ms=3, label=s)
        for (s, a), (_, ys) in curves.items():
            if a is None:
                ax.axhline(ys[-1], ls="--", lw=1, color="grey" if "nested" in s else "black", label=f"{s} (final)")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"Dirichlet α={alpha:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("central test accuracy (mean over seeds)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle("MiniLM on Rotten Tomatoes, 10 clients", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(cells: Sequence[Cell], out: Path, header: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = [cell_row(c) for c in cells]
    write_rows_csv(rows, out / "results.csv", CSV_COLUMNS)
    write_markdown(rows, out / "results.md", header)
    plot(cells, out / "accuracy_vs_bytes.png", "cumulative-bytes", "cumulative bytes (up + down, all clients)", True)
    plot(cells, out / "accuracy_vs_round.png", "round", "round", False)
    return rows


# ------------------------------------------------------------------------------------------- driver
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fedsb + fedit, α=1.0, seed 0, 1 round of 2 steps")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--central", default=",".join(CENTRAL), help="upper bounds to run ('none' for none)")
    ap.add_argument("--alphas", default="0.1,1.0")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=40)
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction of the 10 clients trained per round")
    ap.add_argument("--max-length", type=int, default=32, help="tokens per example (run-config max-length)")
    ap.add_argument("--test-examples", type=int, default=1000, help="central test examples (max-test-examples)")
    ap.add_argument("--ranks", default="16,8,4", help=f"client ranks of {', '.join(HETERO_RANKS)} (run-config ranks)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of nested adapters (default: run config)")
    ap.add_argument("--lora-lr", type=float, default=None, help="learning rate of peft LoRA (default: run config)")
    ap.add_argument("--jobs", type=int, default=2, help="cells run side by side (one thread each)")
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "bench" / "accuracy"))
    ap.add_argument("--force", action="store_true", help="rerun finished cells")
    ap.add_argument("--report", action="store_true", help="only write the outputs from the cells finished so far")
    ap.add_argument("--cell-timeout", type=float, default=0, help="seconds per cell (0 = none)")
    a = ap.parse_args(argv)
    if a.quick:
        a.strategies, a.central, a.alphas, a.seeds = "fedsb,fedit", "none", "1.0", "0"
        a.rounds, a.local_steps, a.test_examples = 1, 2, 64
    try:
        a.strategies = parse_list(a.strategies, "--strategies", one_of("--strategies", STRATEGIES, "strategy"))
        a.central = [] if a.central == "none" else parse_list(a.central, "--central", one_of("--central", CENTRAL))
        a.alphas = parse_list(a.alphas, "--alphas", list_item(
            float, "--alphas: {item!r} is not a number", lambda x, _: None if x > 0 else "--alphas: α must be > 0"))
        a.seeds = parse_list(a.seeds, "--seeds", list_item(int, "--seeds: {item!r} is not an integer"))
    except GridError as err:
        ap.error(str(err))
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = build_cells(a, out)
    info = machine_info()
    header = {
        "command": "python -m bench.accuracy " + " ".join(x for x in (sys.argv[1:] if argv is None else argv)
                                                          if x != "--report"),
        "machine": f"{info.get('cpu_count')} CPUs, torch {info.get('torch')}, Python {info.get('python')}, "
                   f"{a.jobs} cells side by side, one thread each, load average at start {info.get('loadavg_1m')}",
        "setting": f"MiniLM, Rotten Tomatoes, {CLIENTS} clients, {a.rounds} rounds, fraction-train {a.fraction}, "
                   f"{a.local_steps} local steps of batch 16, max-length {a.max_length}, "
                   f"{a.test_examples} central test examples; mean ± std over seeds {a.seeds}",
    }
    todo = skip_finished(cells, force=a.force)  # finished cells are marked ok
    if a.report:
        todo = []
    print(f"[accuracy] {len(cells)} cells, {len(todo)} to run, {a.jobs} at a time -> {out}", flush=True)
    t0 = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(cell: Cell) -> None:
        run_cell_subprocess(cell, timeout=a.cell_timeout or None, env=env)
        final = cell.rows()[-1].get("accuracy") if cell.rows() else None
        print(f"[accuracy] {cell.name}: {cell.status} final accuracy={final} in {cell.seconds:.0f}s"
              + (f": {cell.error}" if cell.error else ""), flush=True)

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        list(pool.map(run, todo))
    rows = write_outputs(cells, out, header)
    print(f"[accuracy] done in {time.perf_counter() - t0:.0f}s; {out / 'results.md'}", flush=True)
    print((out / "results.md").read_text())
    fedsb, fedit = _final(rows, "fedsb", 0.1), _final(rows, "fedit", 0.1)
    if fedsb and fedit:
        m_sb, m_it = statistics.fmean(fedsb), statistics.fmean(fedit)
        print(f"target: fedsb mean accuracy at α=0.1 ({m_sb:.4f}) >= FedIT's ({m_it:.4f}) "
              f"{verdict(m_sb, m_it, higher_is_better=True)}")
    return 1 if any(c.status != "ok" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
