"""The converged accuracy grid: every method of bench/methods.py, Dirichlet α, seeds, tuned learning rates.

::

    python -m bench.tuning                                            # once: the learning rates (validation)
    python -m bench.accuracy                                          # Rotten Tomatoes, α ∈ {0.1, 1.0}, seeds 0,1,2
    python -m bench.accuracy --dataset bbc --alphas 0.1 --max-length 64
    python -m bench.accuracy --methods fedsb,fedit --alphas 0.1 --seeds 0 --jobs 1 [--force]
    python -m bench.accuracy --device cuda --jobs 4                   # the same grid on a GPU
    python -m bench.accuracy --quick                                  # smoke size: fedsb + fedit, 1 round
    python -m bench.tuning --dp-epsilon 3 --out docs/grid/tuning-dp   # once: rate and clip under DP-SGD
    python -m bench.accuracy --epsilons 1,3,8 --alphas 1.0            # the DP grid: fedsb, ffa, fedit

Grid: MiniLM, 10 clients (flwr-datasets Dirichlet partitions of the de-duplicated training pool), the
shared cost knobs of :class:`bench.methods.Setting` (15 rounds × 10 local AdamW steps of batch 16, every
client in every round, bf16 base + autocast, max-length 32, 500 test examples per round and the whole test
split after the last round), each method at its family's learning rate from ``bench/tuned_lr.json``
(:mod:`bench.tuning`: chosen on a validation split, never the test set).
The centralised upper bounds run on one node holding the
whole training pool with the same total steps per round as a federated round; they do not depend on α.

Every cell is a whole fedlora job (:func:`simulations.inprocess.run_in_process`: the real ServerApp loop
and ClientApp, in one process) in a fresh subprocess, ``--jobs`` cells side by side with one thread each.
Seed-major order, so an interrupted grid has whole seeds. Finished cells are skipped (``--force`` reruns):
the grid can be stopped and continued at any time, and the cells' directories are small enough to commit.

Outputs under ``--out`` (default ``docs/grid/<dataset>``): ``runs/<cell>/``, ``results.csv``, ``results.md``
(mean ± std over seeds, rounds and bytes to reach 95% of the centralised bound) and the plots of
:mod:`bench.accuracy_report`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from bench._common import REPO_ROOT, machine_info
from bench.accuracy_report import write_outputs
from bench.methods import (
    CLIENTS,
    DEFAULT_METHODS,
    DP_METHODS,
    FAMILIES,
    METHODS,
    Method,
    Setting,
    cell_overrides,
    load_tuned,
    tuned_clip,
    tuned_lr,
)
from simulations.grid_runner import Cell, GridError, list_item, one_of, parse_list, run_cell_subprocess, skip_finished

SHORT = {"rotten_tomatoes": "rt", "bbc": "bbc", "twitter": "tw", "dialogues": "dlg"}


def method_lr(method: Method, a: argparse.Namespace, tuned: dict) -> float:
    """``--lr``/``--lora-lr`` when given for the method's key, else the tuned rate of its family (the ``@dp`` one
    in the DP grid)."""
    given = a.lr if FAMILIES[method.family].lr_key == "lr" else a.lora_lr
    return given if given else tuned_lr(method, tuned, dp=bool(a.epsilons))


def build_cells(a: argparse.Namespace, setting: Setting, out: Path) -> list[Cell]:
    """Seed-major (an interrupted grid has whole seeds), then in the order of ``--methods`` (the default runs the
    bounds and the published orderings first), then α."""
    tuned = load_tuned()
    cells: list[Cell] = []
    prefix = SHORT.get(setting.dataset, setting.dataset)
    for seed in a.seeds:
        for m in (METHODS[x] for x in a.methods):
            if m.central:
                cells.append(_cell(m, setting, seed, None, method_lr(m, a, tuned), out, f"{prefix}-{m.label}-s{seed}",
                                   a.device))
                continue
            for eps in a.epsilons or [None]:
                dp = None if eps is None else (eps, a.dp_clip or tuned_clip(m, tuned))
                for alpha in a.alphas:
                    name = f"{prefix}-{m.label}-a{alpha:g}" + (f"-eps{eps:g}" if dp else "") + f"-s{seed}"
                    cells.append(_cell(m, setting, seed, alpha, method_lr(m, a, tuned), out, name, a.device, dp))
    from fedlora.run_config import ConfigError, parse_run_config

    for cell in cells:
        try:
            parse_run_config({k: v for k, v in cell.overrides.items() if k != "device"})
        except ConfigError as err:
            raise SystemExit(f"bench.accuracy: cell {cell.name}: {err}") from None
    return cells


def _cell(m: Method, setting: Setting, seed: int, alpha: float | None, lr: float, out: Path, name: str,
          device: str, dp: tuple[float, float] | None = None) -> Cell:
    ov = {**cell_overrides(m, setting, seed, alpha, lr, dp), "results-dir": str(out / "runs"), "run-name": name,
          **({"device": device} if device != "auto" else {})}
    labels = {"method": m.label if dp is None else f"{m.label} ε={dp[0]:g}", "family": m.family, "alpha": alpha,
              "seed": seed, "lr": lr, "central": m.central, "rank": m.rank()}
    return Cell(out / "runs" / name, ov, 1 if m.central else CLIENTS, labels, runner="in-process")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fedsb + fedit, α=1.0, seed 0, 1 round of 2 steps")
    ap.add_argument("--dataset", default="rotten_tomatoes")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--alphas", default="0.1,1.0")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=Setting.rounds)
    ap.add_argument("--local-steps", type=int, default=Setting.local_steps)
    ap.add_argument("--fraction", type=float, default=Setting.fraction, help="fraction of the clients per round")
    ap.add_argument("--max-length", type=int, default=Setting.max_length)
    ap.add_argument("--test-examples", type=int, default=Setting.eval_examples, help="test examples per round")
    ap.add_argument("--dtype", default=Setting.dtype)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--device", default="auto", help="run-config device of every cell (cuda: the GPU run)")
    ap.add_argument("--epsilons", default="", help="the DP grid: sample-level DP-SGD at each ε (methods: "
                    f"{', '.join(DP_METHODS)} unless --methods is given)")
    ap.add_argument("--dp-clip", type=float, default=None, help="DP grid: dp-clip instead of the tuned one")
    ap.add_argument("--lr", type=float, default=None, help="nested learning rate instead of the tuned one")
    ap.add_argument("--lora-lr", type=float, default=None, help="peft LoRA learning rate instead of the tuned one")
    ap.add_argument("--jobs", type=int, default=2, help="cells run side by side (one thread each)")
    ap.add_argument("--out", default=None, help="default: docs/grid/<dataset> (the DP grid: docs/grid/<dataset>-dp)")
    ap.add_argument("--force", action="store_true", help="rerun finished cells")
    ap.add_argument("--report", action="store_true", help="only write the outputs from the cells finished so far")
    ap.add_argument("--cell-timeout", type=float, default=0, help="seconds per cell (0 = none)")
    a = ap.parse_args(argv)
    if a.quick:
        a.methods, a.alphas, a.seeds = "fedsb,fedit", "1.0", "0"
        a.rounds, a.local_steps, a.test_examples = 1, 2, 64
        a.lr, a.lora_lr = a.lr or 2e-2, a.lora_lr or 1e-3
    if a.epsilons and a.methods == ap.get_default("methods"):
        a.methods = ",".join(DP_METHODS)
    try:
        a.epsilons = parse_list(a.epsilons, "--epsilons", list_item(
            float, "--epsilons: {item!r} is not a number", lambda x, _: None if x > 0 else "--epsilons: ε must be > 0")
        ) if a.epsilons else []
        a.methods = parse_list(a.methods, "--methods", one_of("--methods", tuple(METHODS), "method"))
        a.alphas = parse_list(a.alphas, "--alphas", list_item(
            float, "--alphas: {item!r} is not a number", lambda x, _: None if x > 0 else "--alphas: α must be > 0"))
        a.seeds = parse_list(a.seeds, "--seeds", list_item(int, "--seeds: {item!r} is not an integer"))
    except GridError as err:
        ap.error(str(err))
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    if a.epsilons and any(METHODS[m].central for m in a.methods):
        ap.error("--epsilons: the DP grid has no centralised methods")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    setting = replace(Setting(), dataset=a.dataset, rounds=a.rounds, local_steps=a.local_steps, fraction=a.fraction,
                      max_length=a.max_length, eval_examples=a.test_examples, dtype=a.dtype, amp=not a.no_amp)
    default_out = REPO_ROOT / "docs" / "grid" / (a.dataset + ("-dp" if a.epsilons else ""))
    out = Path(a.out or default_out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = build_cells(a, setting, out)
    info = machine_info()
    header = {
        "command": "python -m bench.accuracy " + " ".join(x for x in (sys.argv[1:] if argv is None else argv)
                                                          if x != "--report"),
        "machine": f"{info.get('cpu_count')} CPUs ({info.get('machine')}), torch {info.get('torch')}, "
                   f"{a.jobs} cells side by side, one thread each, device {a.device}",
        "setting": setting.describe(),
        "learning rates": ", ".join(sorted({f"{c.labels['method']} {c.labels['lr']:g}" for c in cells})),
    }
    todo = skip_finished(cells, force=a.force and not a.report)  # finished cells are marked ok
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
    write_outputs(cells, out, header)
    print(f"[accuracy] done in {time.perf_counter() - t0:.0f}s; {out / 'results.md'}", flush=True)
    print((out / "results.md").read_text())
    return 1 if any(c.status != "ok" for c in cells) and not a.report else 0


if __name__ == "__main__":
    sys.exit(main())
