"""Privacy–utility sweep: one command runs the grid ε × strategy × seed of federated DP fine-tuning runs.

::

    python -m simulations.privacy_sweep --epsilons 1,3,8,inf --strategies fedsb,ffa,fedit --seeds 0,1,2 \\
        --out results/privacy_sweep [--num-supernodes 10] [--set num-server-rounds=3 --set ...] [--force]

Every cell is one in-process Flower simulation (``flwr.simulation.run_simulation`` with the fedlora
ServerApp/ClientApp) run in a **fresh subprocess** (``python -m simulations.privacy_sweep --cell DIR``), so
Ray, torch threads and model caches never leak between cells and a crashed cell does not end the grid.
Cell overrides: ``dp-epsilon`` (``inf`` → 0, i.e. DP off), ``strategy``, ``seed``,
``results-dir=<out>/runs``, ``run-name=<strategy>-eps<eps>-s<seed>``, ``export-adapter=false``, plus every
``--set key=value`` (run-config keys of ``fedlora/run_config.py``, applied to every cell).

Outputs under ``<out>/``::

    runs/<name>/          the run's own outputs (metrics.jsonl, config.json, plots), plus
                          cell.json (the cell's spec), cell.log (its output), DONE or FAILED (JSON)
    results.csv           one row per cell of the requested grid
    results.md            Markdown tables strategy × ε: final metric mean ± std over seeds, ε spent
    privacy_utility.png   final metric vs ε per strategy, error bars over seeds, ε = ∞ at the right end

A cell is finished when ``runs/<name>/DONE`` exists, its spec matches the requested one and its
``metrics.jsonl`` reaches the final round; finished cells are skipped (``--force`` reruns them). A cell
that is not finished is rerun from scratch: a DP run cannot be resumed mid-way in a new simulation,
because the clients' privacy accountants live in the SuperNodes' ``Context.state``.
Exit status: 0 if every cell is finished, 1 if any failed, 2 on invalid arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: run-config keys the sweep sets itself (not allowed in ``--set``)
RESERVED = ("dp-epsilon", "strategy", "seed", "results-dir", "run-name")
CSV_COLUMNS = (
    "strategy", "epsilon_target", "seed", "status", "metric", "final_metric", "initial_metric",
    "dp_epsilon_spent", "dp_delta", "noise_multiplier", "rounds", "total_bytes", "seconds", "run_name", "error",
)
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


class SweepError(ValueError):
    """Invalid sweep arguments (the message says which and why)."""


# --------------------------------------------------------------------------------------------- arguments
def parse_epsilons(text: str) -> list[float]:
    """``"1,3,8,inf"`` → ``[1.0, 3.0, 8.0, inf]`` (order kept, duplicates dropped); every ε > 0 or ``inf``."""
    out: list[float] = []
    for item in _items(text, "--epsilons"):
        try:
            eps = float(item)
        except ValueError:
            raise SweepError(f"--epsilons: {item!r} is not a number (use e.g. 1,3,8,inf)") from None
        if math.isnan(eps) or eps <= 0:
            raise SweepError(f"--epsilons: {item!r} must be > 0, or 'inf' for no DP")
        if eps not in out:
            out.append(eps)
    return out


def parse_strategies(text: str) -> list[str]:
    from fedlora.experiment import STRATEGY_ADAPTERS

    out: list[str] = []
    for item in _items(text, "--strategies"):
        if item not in STRATEGY_ADAPTERS:
            raise SweepError(f"--strategies: unknown strategy {item!r}; must be one of {sorted(STRATEGY_ADAPTERS)}")
        if item not in out:
            out.append(item)
    return out


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for item in _items(text, "--seeds"):
        try:
            seed = int(item)
        except ValueError:
            raise SweepError(f"--seeds: {item!r} is not an integer") from None
        if seed < 0:
            raise SweepError(f"--seeds: {seed} must be >= 0")
        if seed not in out:
            out.append(seed)
    return out


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


def _items(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise SweepError(f"{flag}: empty list")
    return items


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run_name(strategy: str, eps: float, seed: int) -> str:
    return f"{strategy}-eps{eps_label(eps)}-s{seed}"


# --------------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    strategy: str
    epsilon: float
    seed: int
    overrides: dict[str, Any]
    num_supernodes: int
    run_dir: Path
    client_cpus: float = 1.0
    status: str = "pending"  # pending | ok | failed
    error: str = ""
    seconds: float | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name

    def spec(self) -> dict[str, Any]:
        """What determines the cell's result (``results-dir`` excluded: the grid may be moved)."""
        return {"overrides": {k: v for k, v in sorted(self.overrides.items()) if k != "results-dir"},
                "num-supernodes": self.num_supernodes}

    def child_spec(self) -> dict[str, Any]:
        """What the child process reads from ``cell.json`` (Ray resources do not change results)."""
        return {**self.spec(), "overrides": self.overrides, "client-cpus": self.client_cpus}

    def num_rounds(self) -> int:
        from fedlora.run_config import parse_run_config

        return parse_run_config(self.overrides).num_server_rounds

    def rows(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash
        return out

    def finished(self) -> bool:
        marker = _read_json(self.run_dir / "DONE")
        if marker is None or marker.get("spec") != self.spec():
            return False
        rows = self.rows()
        return bool(rows) and rows[-1].get("round") == self.num_rounds()


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
                cells.append(Cell(strategy, eps, seed, overrides, num_supernodes, out / "runs" / name, client_cpus))
    return cells


def run_cell_subprocess(cell: Cell, *, timeout: float | None = None, verbose: bool = False,
                        command: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> None:
    """Run one cell in a fresh Python process (``command``, default :func:`cell_command`; extra ``env``);
    sets ``cell.status``/``error``/``seconds`` and the DONE/FAILED marker."""
    import shutil

    if cell.run_dir.exists():
        shutil.rmtree(cell.run_dir)  # a rerun starts from scratch (see the module docstring)
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "cell.json").write_text(json.dumps(cell.child_spec(), indent=2))
    child_env = {**os.environ, **dict(env or {}),
                 "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    for key, value in ENV_DEFAULTS.items():
        child_env.setdefault(key, value)
    cmd = list(command) if command is not None else cell_command(cell.run_dir)
    t0 = time.perf_counter()
    rc: int | None = None
    with (cell.run_dir / "cell.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        copier = threading.Thread(target=_copy_output, args=(proc.stdout, log, verbose), daemon=True)
        copier.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_group(proc.pid)  # the cell's Ray processes, if any outlived it (or all of it on timeout/^C)
            proc.wait()
            copier.join(timeout=10)
    cell.seconds = time.perf_counter() - t0
    error = ""
    if rc is None:
        error = f"timed out after {timeout:g} s"
    elif rc != 0:
        error = (cell.run_dir / "ERROR").read_text().strip() if (cell.run_dir / "ERROR").exists() else ""
        error = error or f"exit status {rc}: {_last_line(cell.run_dir / 'cell.log')}"
    elif not (rows := cell.rows()) or rows[-1].get("round") != cell.num_rounds():
        error = f"metrics.jsonl ends before round {cell.num_rounds()}"
    marker = {"spec": cell.spec(), "seconds": cell.seconds, "finished-at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if error:
        cell.status, cell.error = "failed", error
        (cell.run_dir / "FAILED").write_text(json.dumps({**marker, "error": error}, indent=2))
    else:
        cell.status, cell.error = "ok", ""
        (cell.run_dir / "DONE").write_text(json.dumps(marker, indent=2))


def cell_command(run_dir: Path) -> list[str]:
    """The child process that runs one cell (reads ``run_dir/cell.json``)."""
    return [sys.executable, "-m", "simulations.privacy_sweep", "--cell", str(run_dir)]


def _copy_output(stream, log, verbose: bool) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        if verbose:
            print(f"    {line}", end="", flush=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(path: Path) -> str:
    lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()] if path.exists() else []
    return lines[-1][:500] if lines else "no output"


def run_simulation_cell(spec: Mapping[str, Any]) -> None:
    """Run a cell's spec as a Flower simulation (``flwr.simulation.run_simulation``, Ray backend)."""
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from simulations.server_app import make_server_app

    overrides = spec["overrides"]
    run_simulation(server_app=make_server_app(overrides), client_app=make_client_app(overrides),
                   num_supernodes=int(spec["num-supernodes"]),
                   backend_config={"client_resources": {"num_cpus": spec.get("client-cpus", 1), "num_gpus": 0.0}})


def cell_main(run_dir: Path, run: Any = run_simulation_cell) -> int:
    """Child process: run one cell (``--cell DIR``) with ``run(spec)``; on error write ``DIR/ERROR``, exit 1."""
    try:
        run(json.loads((run_dir / "cell.json").read_text()))
        return 0
    except BaseException as err:  # noqa: BLE001 - report anything, including SystemExit from inside Flower
        traceback.print_exc()
        chain, e = [], err
        while e is not None and len(chain) < 4:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        (run_dir / "ERROR").write_text(" <- ".join(reversed(chain))[:2000])
        return 1


# --------------------------------------------------------------------------------------------- results
def cell_result(cell: Cell) -> dict[str, Any]:
    """The cell's CSV row (from its metrics.jsonl and marker)."""
    rows = cell.rows()
    marker = _read_json(cell.run_dir / ("DONE" if cell.status == "ok" else "FAILED")) or {}
    metric = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "perplexity"
    final = rows[-1] if rows else {}
    spent = [r["dp-epsilon"] for r in rows if r.get("dp-epsilon") is not None]
    sigma = [r["dp-noise-multiplier"] for r in rows if r.get("dp-noise-multiplier") is not None]
    delta = [r["dp-delta"] for r in rows if r.get("dp-delta") is not None]
    seconds = cell.seconds if cell.seconds is not None else marker.get("seconds")
    return {
        "strategy": cell.strategy,
        "epsilon_target": eps_label(cell.epsilon),
        "seed": cell.seed,
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


def write_csv(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    os.replace(tmp, path)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _eps_order(results: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({r["epsilon_target"] for r in results}, key=float)


def _group(results: Sequence[Mapping[str, Any]], key: str) -> dict[tuple[str, str], list[float]]:
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
    lines += ["", f"## Final central test {metric} (mean ± std over seeds)", ""]
    lines += _table(strategies, epsilons, cols, _group(results, "final_metric"), n_total, "{:.4f}", std=True)
    lines += ["", "## ε spent (max over clients, mean over seeds; target ε in the column)", ""]
    lines += _table(strategies, epsilons, cols, _group(results, "dp_epsilon_spent"), n_total, "{:.3f}", std=False)
    lines += ["", "## Noise multiplier σ (max over clients, mean over seeds)", ""]
    lines += _table(strategies, epsilons, cols, _group(results, "noise_multiplier"), n_total, "{:.3f}", std=False)
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "## Cells not finished", ""]
        lines += [f"- `{r['run_name']}`: {r['status']}" + (f": {r['error']}" if r.get("error") else "") for r in failed]
    path.write_text("\n".join(lines) + "\n")


def _table(strategies, epsilons, cols, groups, n_total, fmt: str, *, std: bool) -> list[str]:
    out = ["| strategy | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for s in strategies:
        cells = []
        for e in epsilons:
            vals = groups.get((s, e), [])
            if not vals:
                no_dp = e == "inf" and not std and n_total[(s, e)] > 0
                cells.append("no DP" if no_dp else "–")
                continue
            mean, sd = _mean_std(vals)
            text = fmt.format(mean) + (" ± " + fmt.format(sd) if std else "")
            if len(vals) < n_total[(s, e)] or (std and len(vals) == 1):
                text += f" (n={len(vals)}/{n_total[(s, e)]})" if len(vals) < n_total[(s, e)] else " (n=1)"
            cells.append(text)
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out


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
        pts = [(xpos[e], *_mean_std(v)) for (st, e), v in groups.items() if st == s]
        pts.sort()
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
    results = [cell_result(c) for c in cells]
    write_csv(results, out / "results.csv")
    write_markdown(results, out / "results.md", header)
    plot_privacy_utility(results, out / "privacy_utility.png", title=str(header.get("title", "")))
    return results


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


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
    p.add_argument("--cell", metavar="RUN_DIR", help=argparse.SUPPRESS)  # internal: run one cell (child process)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cell:
        return cell_main(Path(args.cell))
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
    except SweepError as err:
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
    for i, cell in enumerate(cells, 1):
        tag = f"[sweep] ({i}/{len(cells)}) {cell.name}"
        if not args.force and cell.finished():
            cell.status = "ok"
            counts["skipped"] += 1
            print(f"{tag}: skipped (finished)", flush=True)
            continue
        print(f"{tag}: running", flush=True)
        run_cell_subprocess(cell, timeout=args.cell_timeout or None, verbose=args.verbose)
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
