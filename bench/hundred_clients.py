"""A recipe that learns with 100 clients, 10 per round, chosen on a validation split (never the test set).

::

    nice -n 10 python -m bench.hundred_clients                        # every recipe of RECIPES, in order
    nice -n 10 python -m bench.hundred_clients --recipes r20-s10-lr0.05
    nice -n 10 python -m bench.hundred_clients --quick     # smoke: 10 clients, 1 round, to results/bench/

Setting (fixed): Rotten Tomatoes, MiniLM, fedsb r=16, 100 simulated SuperNodes (in process:
:func:`simulations.inprocess.run_in_process`, one fresh subprocess per recipe, ``OMP_NUM_THREADS=1``),
Dirichlet(α=0.5) over 100 partitions (min-partition-size auto = 1), 10 clients per round, batch 16, max
length 32, bf16 base + autocast. ``validation-size=1000`` holds 1,000 examples of the training pool out of
every client; the central evaluation uses 300 of them each round and the whole 1,000 after the last round
(``final-full-test``); the test split is never evaluated. The recipe with the highest final validation
accuracy wins (ties: fewer total local steps). Resumable: finished recipes are skipped.

Writes ``<out>/results.csv`` (one row per recipe and round) and ``<out>/results.md`` (default out:
``docs/grid/hundred_clients``; each run's own outputs under ``<out>/runs/<recipe>/``).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, bench_parser, machine_info, machine_line
from simulations.grid_runner import Cell, markdown_table, read_json, run_cell_subprocess, skip_finished, write_rows_csv

DEFAULT_OUT = REPO_ROOT / "docs" / "grid" / "hundred_clients"
CLIENTS = 100
BASE: dict[str, Any] = {
    "dataset": "rotten_tomatoes", "model": "minilm", "strategy": "fedsb", "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5, "num-partitions": CLIENTS, "fraction-train": 0.1, "min-train-nodes": 10,
    "min-available-nodes": CLIENTS, "batch-size": 16, "max-length": 32, "dtype": "bfloat16", "amp": True,
    "max-test-examples": 300, "validation-size": 1000, "final-full-test": True, "checkpoint": False,
    "export-adapter": False, "seed": 42,
}
#: name -> (rounds, local steps, lr); run in this order
RECIPES: dict[str, tuple[int, int, float]] = {
    "r20-s10-lr0.05": (20, 10, 0.05),
    "r20-s10-lr0.02": (20, 10, 0.02),
    "r20-s10-lr0.005": (20, 10, 0.005),
}
COLUMNS = ("recipe", "rounds", "local-steps", "lr", "round", "accuracy", "loss", "validation-examples",
           "train-loss", "clients-used", "clients-rejected", "round-seconds", "elapsed-seconds")


def recipe_overrides(rounds: int, steps: int, lr: float, clients: int = CLIENTS) -> dict[str, Any]:
    """The run config of one recipe (without ``results-dir``/``run-name``)."""
    return {**BASE, "num-server-rounds": rounds, "local-steps": steps, "lr": lr, "num-partitions": clients,
            "min-available-nodes": clients, "min-train-nodes": max(1, clients // 10)}


def make_cells(names: Sequence[str], out: Path, *, quick: bool = False) -> list[Cell]:
    cells = []
    for name in names:
        rounds, steps, lr = RECIPES[name]
        clients = CLIENTS
        if quick:
            rounds, steps, clients = 1, 2, 10
        ov = {**recipe_overrides(rounds, steps, lr, clients), "results-dir": str(out / "runs"), "run-name": name}
        cells.append(Cell(run_dir=out / "runs" / name, overrides=ov, num_supernodes=clients,
                          labels={"recipe": name}, runner="in-process"))
    return cells


def run_with_load(cell: Cell, timeout: float, interval: float = 5.0) -> None:
    """:func:`run_cell_subprocess` of ``cell`` while sampling the 1-minute load average every ``interval`` s;
    writes ``load.json`` (mean, max, samples) to the cell's directory."""
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            samples.append(os.getloadavg()[0])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run_cell_subprocess(cell, timeout=timeout, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    finally:
        done.set()
        thread.join()
    if samples:
        (cell.run_dir / "load.json").write_text(json.dumps(
            {"mean": round(statistics.fmean(samples), 2), "max": round(max(samples), 2), "samples": len(samples)}))


def cell_rows(cell: Cell) -> list[dict[str, Any]]:
    ov = cell.overrides
    return [{"recipe": cell.labels["recipe"], "rounds": ov["num-server-rounds"], "local-steps": ov["local-steps"],
             "lr": ov["lr"], **{k: r.get(k) for k in COLUMNS[4:]}} for r in cell.rows()]


def best(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The final row of the recipe with the highest final validation accuracy (ties: fewer total steps)."""
    finals: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if r["round"] == r["rounds"]:
            finals[r["recipe"]] = r
    if not finals:
        return None
    return dict(max(finals.values(), key=lambda r: (r["accuracy"], -r["rounds"] * r["local-steps"])))


def write_report(rows: Sequence[Mapping[str, Any]], out: Path, info: Mapping[str, Any],
                 cells: Sequence[Cell]) -> Path:
    write_rows_csv(rows, out / "results.csv", COLUMNS)
    lines = ["# 100 clients, 10 per round: a recipe that learns (validation split)", "",
             "Command: `nice -n 10 .venv/bin/python -m bench.hundred_clients` (see the module docstring).",
             "Accuracy is on the central validation split (300 examples per round, all 1,000 after the last "
             "round); the test split is never evaluated. Predicting one class scores 0.593 / 0.407 on the 300, "
             "0.578 on the 1,000.", "", machine_line(info), ""]
    for cell in cells:
        rs = [r for r in rows if r["recipe"] == cell.labels["recipe"]]
        marker, load = read_json(cell.run_dir / "DONE") or {}, read_json(cell.run_dir / "load.json")
        wall = cell.seconds or marker.get("seconds")
        load_text = f"{load['mean']} mean, {load['max']} max" if load else "not recorded"
        lines.append(f"## {cell.labels['recipe']} ({cell.status}{', ' + cell.error if cell.error else ''}"
                     f"{f', {wall:.0f} s wall' if wall else ''}, 1-min load average during the run: {load_text})")
        lines += ["", *markdown_table(["round", "accuracy", "loss", "examples", "s/round"], [
            [str(r["round"]), f"{r['accuracy']:.3f}", f"{r['loss']:.3f}", str(r["validation-examples"]),
             f"{r['round-seconds']:.1f}" if r["round-seconds"] else ""] for r in rs]), ""]
    win = best(rows)
    lines.append(f"**Best final validation accuracy**: {win['recipe']} ({win['accuracy']:.3f})" if win
                 else "No recipe finished.")
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__ or "", "10 clients, 1 round of 2 steps per recipe")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {list(RECIPES)}")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per recipe")
    ap.add_argument("--force", action="store_true", help="rerun finished recipes")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if unknown := [n for n in names if n not in RECIPES]:
        ap.error(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    out = Path(args.out_dir).resolve() if args.out_dir else DEFAULT_OUT
    if args.quick and not args.out_dir:  # never over the recorded runs
        out = REPO_ROOT / "results" / "bench" / "hundred_clients_quick"
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(machine_line(info), flush=True)
    cells = make_cells(names, out, quick=args.quick)
    for cell in skip_finished(cells, force=args.force):
        print(f"[hundred-clients] {cell.name}: running ({cell.run_dir / 'cell.log'})", flush=True)
        t0 = time.monotonic()
        run_with_load(cell, args.timeout)
        print(f"[hundred-clients] {cell.name}: {cell.status} in {time.monotonic() - t0:.0f} s {cell.error}",
              flush=True)
    rows = [r for cell in cells for r in cell_rows(cell)]
    path = write_report(rows, out, info, cells)
    print(path.read_text())
    return 0 if all(c.status == "ok" for c in cells) else 1


if __name__ == "__main__":
    raise SystemExit(main())
