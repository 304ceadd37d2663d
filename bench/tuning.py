"""Learning-rate tuning for the accuracy grid, on a validation split held out from the training pool.

::

    python -m bench.tuning                 # every family of bench/methods.py (about 25 min on 2 cores)
    python -m bench.tuning --families lora --jobs 1
    python -m bench.tuning --quick         # smoke size: 2 learning rates of one family, 1 round
    python -m bench.tuning --dp-epsilon 3  # the DP grid's rule: learning rate × dp-clip under DP-SGD at ε = 3

The rule, fixed before the grid runs (docs/results.md repeats it):

- one setting: Rotten Tomatoes, MiniLM, 10 clients, Dirichlet α = 1.0, seed 0, the grid's cost knobs
  (:class:`bench.methods.Setting`) with ``--rounds`` rounds (default 5, a third of the grid's);
- ``validation-size = 1000``: 1,000 examples of the training pool are held out from every client and the
  central evaluation uses them; the test split is never evaluated (fedlora.data.load_validation_set);
- each family's sweep (``FAMILIES[...].grid``) runs on the family's own method; the learning rate with the
  highest final validation accuracy (whole validation split, after the last round) wins, ties to the
  smaller rate; a winner at the edge of the sweep adds the next rate beyond it (×2.5 or ÷2.5), up to
  ``--extend`` times (default 1), so the optimum is bracketed where the budget allows;
- under DP (``--dp-epsilon ε``, the families of ``DP_METHODS``): every (learning rate, ``dp-clip`` in
  ``--clips``) pair at that ε with σ calibrated, the best pair by the same rule (ties: smaller rate, then
  smaller clip), stored as ``<family>@dp``; no extension.

Cells are whole fedlora runs in fresh subprocesses, resumable (finished cells are skipped). Writes
``bench/tuned_lr.json`` (what the grid reads) and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, machine_info
from bench.accuracy_report import final_accuracy as last_accuracy
from bench.methods import (
    CLIENTS,
    DP_METHODS,
    DP_SUFFIX,
    FAMILIES,
    METHODS,
    TUNED_LR,
    Setting,
    cell_overrides,
    load_tuned,
)
from simulations.grid_runner import Cell, markdown_table, run_cell_subprocess, skip_finished

VALIDATION_SIZE = 1000
TUNING_ALPHA = 1.0
TUNING_SEED = 0
STEP = 2.5


def tuning_cell(family: str, lr: float, setting: Setting, out: Path, dp: tuple[float, float] | None = None) -> Cell:
    method = METHODS[FAMILIES[family].tuned_on]
    name = f"{family}-lr{lr:g}" + (f"-dp{dp[0]:g}-clip{dp[1]:g}" if dp else "")
    ov = {**cell_overrides(method, setting, TUNING_SEED, TUNING_ALPHA, lr, dp), "validation-size": VALIDATION_SIZE,
          "results-dir": str(out / "runs"), "run-name": name}
    return Cell(out / "runs" / name, ov, CLIENTS, {"family": family, "lr": lr, "dp": dp}, runner="in-process")


def final_accuracy(cell: Cell) -> float | None:
    """The finished cell's final validation accuracy (None when it did not finish)."""
    return last_accuracy(cell.rows()) if cell.status == "ok" else None


def choose(results: dict[Any, float | None]) -> Any:
    """The rate (or (rate, clip) pair) with the highest accuracy, ties to the smaller rate (then clip); None when
    no cell finished."""
    done = {k: acc for k, acc in results.items() if acc is not None}
    return min(done, key=lambda k: (-done[k], k)) if done else None


def beyond_edge(results: dict[float, float | None], best: float) -> float | None:
    """The next rate past the sweep's edge when ``best`` sits on it, else None."""
    lrs = sorted(results)
    if best == lrs[-1]:
        return float(f"{best * STEP:.3g}")
    if best == lrs[0]:
        return float(f"{best / STEP:.3g}")
    return None


def run_cells(cells: Sequence[Cell], jobs: int, timeout: float | None) -> None:
    todo = skip_finished(cells)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(cell: Cell) -> None:
        run_cell_subprocess(cell, timeout=timeout, env=env)
        print(f"[tuning] {cell.name}: {cell.status} validation accuracy={final_accuracy(cell)} in "
              f"{cell.seconds:.0f}s" + (f": {cell.error}" if cell.error else ""), flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, todo))


def tune_family_dp(family: str, setting: Setting, out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Every (rate, clip) pair of the family's sweep at ε = ``--dp-epsilon``; the best pair."""
    lrs = FAMILIES[family].grid[: 2 if a.quick else None]
    cells = {(lr, c): tuning_cell(family, lr, setting, out, (a.dp_epsilon, c)) for lr in lrs for c in a.clips}
    run_cells(list(cells.values()), a.jobs, a.cell_timeout or None)
    results = {k: final_accuracy(c) for k, c in cells.items()}
    best = choose(results)
    return {"lr": best[0] if best else None, "dp_clip": best[1] if best else None, "epsilon": a.dp_epsilon,
            "lr_key": FAMILIES[family].lr_key, "tuned_on": FAMILIES[family].tuned_on,
            "validation_accuracy": {f"{lr:g} clip {c:g}": acc for (lr, c), acc in sorted(results.items())}}


def tune_family(family: str, setting: Setting, out: Path, a: argparse.Namespace) -> dict[str, Any]:
    grid = list(FAMILIES[family].grid[: 2 if a.quick else None])
    cells: dict[float, Cell] = {}
    for attempt in range(a.extend + 1):
        for lr in grid:
            cells.setdefault(lr, tuning_cell(family, lr, setting, out))
        run_cells(list(cells.values()), a.jobs, a.cell_timeout or None)
        results = {lr: final_accuracy(c) for lr, c in cells.items()}
        best = choose(results)
        nxt = beyond_edge(results, best) if best is not None and attempt < a.extend and not a.quick else None
        if nxt is None:
            break
        grid.append(nxt)
    return {"lr": best, "lr_key": FAMILIES[family].lr_key, "tuned_on": FAMILIES[family].tuned_on,
            "validation_accuracy": {f"{lr:g}": acc for lr, acc in sorted(results.items())}}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eval-examples", type=int, default=300, help="validation examples per round")
    ap.add_argument("--extend", type=int, default=1, help="rates added past an edge winner, at most")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cell-timeout", type=float, default=0)
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "bench" / "tuning"))
    ap.add_argument("--tuned", default=str(TUNED_LR), help="where the chosen rates are written")
    ap.add_argument("--dp-epsilon", type=float, default=0.0, help="tune under DP-SGD at this ε (lr × clip)")
    ap.add_argument("--clips", default="0.5,1,2", help="dp-clip values of the DP sweep")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    a.clips = [float(c) for c in a.clips.split(",") if c.strip()][: 1 if a.quick else None]
    if a.dp_epsilon and a.families == ap.get_default("families"):
        a.families = ",".join(dict.fromkeys(METHODS[m].family for m in DP_METHODS))
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"--families: unknown {unknown}; choose from {list(FAMILIES)}")
    setting = replace(Setting(), rounds=1 if a.quick else a.rounds, eval_examples=a.eval_examples,
                      local_steps=2 if a.quick else Setting().local_steps)
    out = Path(a.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tuned_path = Path(a.tuned)
    tuned = load_tuned(tuned_path)
    info = machine_info()
    for family in families:
        entry = tune_family_dp(family, setting, out, a) if a.dp_epsilon else tune_family(family, setting, out, a)
        entry.update({"setting": setting.describe(), "alpha": TUNING_ALPHA, "seed": TUNING_SEED,
                      "validation_size": VALIDATION_SIZE, "date": dt.date.today().isoformat(),
                      "machine": f"{info.get('cpu_count')} CPUs, torch {info.get('torch')}"})
        tuned[family + (DP_SUFFIX if a.dp_epsilon else "")] = entry
        tuned_path.write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")
        print(f"[tuning] {family}: lr={entry['lr']} {entry['validation_accuracy']}", flush=True)
    write_markdown(tuned, out / "results.md")
    print((out / "results.md").read_text())
    return 0 if all(tuned[f]["lr"] is not None for f in families) else 1


def write_markdown(tuned: dict[str, Any], path: Path) -> None:
    rows = []
    for family, e in tuned.items():
        accs = ", ".join(f"{lr}: {acc:.4f}" if acc is not None else f"{lr}: –"
                         for lr, acc in e["validation_accuracy"].items())
        chosen = f"{e['lr']:g}" if e["lr"] else "–"
        if "dp_clip" in e:
            chosen += f", dp-clip {e['dp_clip']:g} at ε = {e['epsilon']:g}" if e["dp_clip"] else ""
        rows.append([family, e["tuned_on"], e["lr_key"], chosen, accs])
    lines = ["# Learning-rate tuning (validation split, never the test set)", ""]
    lines += markdown_table(["family", "tuned on", "key", "chosen", "final validation accuracy by rate"], rows)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
