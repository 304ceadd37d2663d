"""Privacy–utility sweep: one command runs the grid ε × strategy × seed of federated DP fine-tuning runs.

::

    python -m simulations.privacy_sweep --epsilons 1,3,8,inf --strategies fedsb,ffa,fedit --seeds 0,1,2 \\
        --out results/privacy_sweep [--num-supernodes 10] [--set num-server-rounds=3 --set ...] [--force]

Every cell is one Flower simulation (``flwr.simulation.run_simulation`` with the fedlora ServerApp/ClientApp)
run in a **fresh subprocess** by the grid runner (:mod:`simulations.grid_runner`), so Ray, torch threads and
model caches never leak between cells and a crashed cell does not end the grid.
Cell overrides: ``dp-epsilon`` (``inf`` → 0, i.e. DP off), ``strategy``, ``seed``,
``results-dir=<out>/runs``, ``run-name=<strategy>-eps<eps>-s<seed>``, ``export-adapter=false``, plus every
``--set key=value`` (run-config keys of ``fedlora/run_config.py``, applied to every cell).

Outputs under ``<out>/``: ``runs/<name>/`` (each run's own outputs plus the grid runner's cell.json,
cell.log and DONE/FAILED marker), ``results.csv``, ``results.md`` and ``privacy_utility.png``
(:mod:`simulations.privacy_report`).

Finished cells are skipped (``--force`` reruns them; see :mod:`simulations.grid_runner`). A cell that is
not finished is rerun from scratch: a DP run cannot be resumed mid-way in a new simulation, because the
clients' privacy accountants live in the SuperNodes' ``Context.state``.
Exit status: 0 if every cell is finished, 1 if any failed, 2 on invalid arguments.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.grid_runner import (
    Cell,
    GridError,
    cell_command,
    list_item,
    one_of,
    parse_list,
    run_cell_subprocess,
    skip_finished,
)
from simulations.privacy_report import cell_result, write_outputs

#: run-config keys the sweep sets itself (not allowed in ``--set``)
RESERVED = ("dp-epsilon", "strategy", "seed", "results-dir", "run-name")


class SweepError(GridError):
    """Invalid sweep arguments (the message says which and why)."""


# --------------------------------------------------------------------------------------------- arguments
def parse_epsilons(text: str) -> list[float]:
    """``"1,3,8,inf"`` → ``[1.0, 3.0, 8.0, inf]`` (order kept, duplicates dropped); every ε > 0 or ``inf``."""

    def check(eps: float, item: str) -> str | None:
        return None if eps > 0 else f"--epsilons: {item!r} must be > 0, or 'inf' for no DP"  # NaN fails too

    return parse_list(text, "--epsilons", list_item(float, "--epsilons: {item!r} is not a number (use e.g. 1,3,8,inf)",
                                                    check))


def parse_strategies(text: str) -> list[str]:
    from fedlora.experiment import STRATEGY_ADAPTERS

    return parse_list(text, "--strategies", one_of("--strategies", sorted(STRATEGY_ADAPTERS), "strategy"))


def parse_seeds(text: str) -> list[int]:
    def check(seed: int, _: str) -> str | None:
        return None if seed >= 0 else f"--seeds: {seed} must be >= 0"

    return parse_list(text, "--seeds", list_item(int, "--seeds: {item!r} is not an integer", check))


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``["num-server-rounds=3", ...]`` → typed run-config overrides (validated by ``parse_run_config``)."""
    from fedlora.run_config import ConfigError, parse_run_config

    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise SweepError(f"--set {pair!r}: expected key=value, e.g. --set num-server-rounds=3")
        if key in RESERVED:
            raise SweepError(f"--set {key}: set by the sweep itself (use --epsilons/--strategies/--seeds/--out)")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        raw[key] = value
    try:
        typed = parse_run_config(raw).to_dict()
    except ConfigError as err:
        raise SweepError(f"--set: {err}") from None
    return {k: typed[k] for k in raw}


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run_name(strategy: str, eps: float, seed: int) -> str:
    return f"{strategy}-eps{eps_label(eps)}-s{seed}"


# --------------------------------------------------------------------------------------------- the grid
def build_grid(epsilons: Sequence[float], strategies: Sequence[str], seeds: Sequence[int], out: Path,
               sets: Mapping[str, Any], num_supernodes: int, client_cpus: float = 1.0) -> list[Cell]:
    """All cells, strategy-major; every cell's full run config is validated before anything runs."""
    from fedlora.run_config import ConfigError, parse_run_config

    cells = []
    for strategy in strategies:
        for eps in epsilons:
            for seed in seeds:
                name = run_name(strategy, eps, seed)
                overrides = {"export-adapter": False, **dict(sets), "dp-epsilon": 0.0 if math.isinf(eps) else eps,
                             "strategy": strategy, "seed": seed, "results-dir": str(out / "runs"), "run-name": name}
                try:
                    parse_run_config(overrides)
                except ConfigError as err:
                    raise SweepError(f"cell {name}: {err}") from None
                labels = {"strategy": strategy, "epsilon": eps_label(eps), "seed": seed}
                cells.append(Cell(out / "runs" / name, overrides, num_supernodes, labels, client_cpus=client_cpus))
    return cells


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulations.privacy_sweep", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", default="1,3,8,inf", help="target ε list, > 0, 'inf' = no DP (default %(default)s)")
    p.add_argument("--strategies", default="fedsb,ffa,fedit", help="strategies (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="seeds (default %(default)s)")
    p.add_argument("--out", default="results/privacy_sweep", help="output directory (default %(default)s)")
    p.add_argument("--num-supernodes", type=int, default=10, help="simulated SuperNodes per cell (default 10)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override for every cell (repeatable), e.g. --set num-server-rounds=3")
    p.add_argument("--client-cpus", type=float, default=1.0,
                   help="Ray CPUs per simulated client: cores // this clients train at once (default 1)")
    p.add_argument("--force", action="store_true", help="rerun finished cells too")
    p.add_argument("--cell-timeout", type=float, default=0.0, help="seconds per cell, 0 = no limit (default)")
    p.add_argument("--verbose", action="store_true", help="print the cells' own output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        epsilons = parse_epsilons(args.epsilons)
        strategies = parse_strategies(args.strategies)
        seeds = parse_seeds(args.seeds)
        if args.num_supernodes < 1:
            raise SweepError(f"--num-supernodes: {args.num_supernodes} must be >= 1")
        if not 0 < args.client_cpus <= (os.cpu_count() or 1):
            raise SweepError(f"--client-cpus: {args.client_cpus:g} must be in (0, {os.cpu_count() or 1}] "
                             "(the cores of this machine)")
        if args.cell_timeout < 0:
            raise SweepError(f"--cell-timeout: {args.cell_timeout:g} must be >= 0")
        sets = parse_sets(args.sets)
        out = Path(args.out).expanduser().resolve()
        cells = build_grid(epsilons, strategies, seeds, out, sets, args.num_supernodes, args.client_cpus)
    except GridError as err:
        parser.print_usage(sys.stderr)
        print(f"privacy_sweep: error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "grid": f"ε ∈ {{{', '.join(eps_label(e) for e in epsilons)}}} × {strategies} × seeds {seeds}",
        "supernodes": args.num_supernodes,
        "overrides": " ".join(f"{k}={v}" for k, v in sets.items()) or "(none)",
        "rounds": cells[0].num_rounds(),
        "note": "seeds fix data partitions and initialisation; DP-SGD sampling and noise use OS entropy, so a DP "
                "cell is not bit-reproducible (std over seeds includes that noise)",
        "title": f"{_plural(len(seeds), 'seed')}, {_plural(cells[0].num_rounds(), 'round')}, "
                 f"{_plural(args.num_supernodes, 'supernode')} (error bars: std over seeds)",
    }
    print(f"[sweep] {len(cells)} cells ({len(strategies)} strategies × {len(epsilons)} ε × {len(seeds)} seeds) "
          f"→ {out}", flush=True)
    t0 = time.perf_counter()
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    try:
        _run_grid(cells, counts, args, out, header)
    except KeyboardInterrupt:
        write_outputs(cells, out, header)
        print("[sweep] interrupted; unfinished cells rerun next time", file=sys.stderr, flush=True)
        return 130
    write_outputs(cells, out, header)
    print(f"[sweep] {len(cells)} cells: {counts['ran']} ran, {counts['skipped']} skipped, {counts['failed']} failed "
          f"in {time.perf_counter() - t0:.0f}s; results: {out / 'results.csv'}, {out / 'results.md'}, "
          f"{out / 'privacy_utility.png'}", flush=True)
    return 1 if counts["failed"] else 0


def _run_grid(cells: Sequence[Cell], counts: dict[str, int], args: argparse.Namespace, out: Path,
              header: Mapping[str, Any]) -> None:
    todo = {id(c) for c in skip_finished(cells, force=args.force)}
    for i, cell in enumerate(cells, 1):
        tag = f"[sweep] ({i}/{len(cells)}) {cell.name}"
        if id(cell) not in todo:
            counts["skipped"] += 1
            print(f"{tag}: skipped (finished)", flush=True)
            continue
        print(f"{tag}: running", flush=True)
        run_cell_subprocess(cell, timeout=args.cell_timeout or None, verbose=args.verbose,
                            command=cell_command(cell.run_dir))
        counts["ran"] += 1
        r = cell_result(cell)
        if cell.status == "ok":
            spent = "" if r["dp_epsilon_spent"] is None else f" ε spent={r['dp_epsilon_spent']:.3f}"
            print(f"{tag}: ok {r['metric']}={r['final_metric']:.4f}{spent} in {cell.seconds:.0f}s", flush=True)
        else:
            counts["failed"] += 1
            print(f"{tag}: FAILED after {cell.seconds:.0f}s: {cell.error} (log: {cell.run_dir / 'cell.log'})",
                  flush=True)
        write_outputs(cells, out, header)


if __name__ == "__main__":
    sys.exit(main())
