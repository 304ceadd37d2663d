"""Grids of whole fedlora runs: one :class:`Cell` per run, each in a fresh subprocess, resumable.

Used by the privacy sweep (:mod:`simulations.privacy_sweep`) and the accuracy benchmark
(``bench.accuracy``). A cell is a run-config override dict, a number of simulated SuperNodes and a run
directory ``<out>/runs/<name>/`` that holds the run's own outputs (``metrics.jsonl``, ``config.json``, ...)
plus:

- ``cell.json``: what the child process runs (:meth:`Cell.child_spec`);
- ``cell.log``: the child's whole output;
- ``DONE`` or ``FAILED``: JSON markers with the cell's :meth:`Cell.spec`, seconds, and the error.

A cell is *finished* when ``DONE`` exists, its spec equals the requested one and ``metrics.jsonl`` reaches
the final round; :func:`skip_finished` marks those ``ok`` so a rerun of the grid redoes only the others.
A cell that is not finished is rerun from scratch (``run_cell_subprocess`` deletes its directory first).

The child is ``python -m simulations.grid_runner RUN_DIR`` (:func:`cell_command`), which runs the cell
with one of :data:`RUNNERS`: ``"simulation"`` (Flower's simulation engine, Ray) or ``"in-process"``
(:func:`simulations.inprocess.run_in_process`: no Ray; the two compute the same, tests/test_inprocess.py).
Fresh processes keep Ray, torch threads and model caches from leaking between cells, and a crashed cell
does not end the grid.

Results helpers: :func:`mean_std`, :func:`write_rows_csv` (atomic), :func:`markdown_table`,
:func:`parse_list` (comma lists of grid arguments).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
#: environment defaults of every child process (offline, no telemetry)
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}

T = TypeVar("T")


class GridError(ValueError):
    """Invalid grid arguments (the message says which and why)."""


# --------------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One run of a grid.

    ``labels``: what the grid varies, for the results rows (e.g. strategy, ε, seed); ``overrides``: the
    run config (validated by ``parse_run_config``); ``runner``: a key of :data:`RUNNERS`; ``client_cpus``:
    Ray CPUs per simulated client (does not change results). ``status`` is ``pending``, ``ok`` or
    ``failed``; ``error`` and ``seconds`` are set by :func:`run_cell_subprocess`."""

    run_dir: Path
    overrides: dict[str, Any]
    num_supernodes: int
    labels: dict[str, Any] = field(default_factory=dict)
    runner: str = "simulation"
    client_cpus: float = 1.0
    status: str = "pending"
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
        """What the child process reads from ``cell.json`` (the runner and Ray resources do not change results)."""
        return {**self.spec(), "overrides": self.overrides, "runner": self.runner, "client-cpus": self.client_cpus}

    def num_rounds(self) -> int:
        from fedlora.run_config import parse_run_config

        return parse_run_config(self.overrides).num_server_rounds

    def rows(self) -> list[dict[str, Any]]:
        """The run's ``metrics.jsonl`` rows (up to a line cut short by a crash)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    def marker(self) -> dict[str, Any]:
        """The ``DONE`` marker if the cell is ok, else ``FAILED`` (empty if absent)."""
        return read_json(self.run_dir / ("DONE" if self.status == "ok" else "FAILED")) or {}

    def finished(self) -> bool:
        marker = read_json(self.run_dir / "DONE")
        if marker is None or marker.get("spec") != self.spec():
            return False
        rows = self.rows()
        return bool(rows) and rows[-1].get("round") == self.num_rounds()


def skip_finished(cells: Sequence[Cell], *, force: bool = False) -> list[Cell]:
    """Mark finished cells ``ok`` (none with ``force``) and return the others, in order: the cells to run."""
    todo = []
    for cell in cells:
        if not force and cell.finished():
            cell.status = "ok"
        else:
            todo.append(cell)
    return todo


# --------------------------------------------------------------------------------------------- running
def cell_command(run_dir: Path) -> list[str]:
    """The child process that runs one cell (reads ``run_dir/cell.json``)."""
    return [sys.executable, "-m", "simulations.grid_runner", str(run_dir)]


def run_cell_subprocess(cell: Cell, *, timeout: float | None = None, verbose: bool = False,
                        command: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> None:
    """Run one cell from scratch in a fresh Python process (``command``, default :func:`cell_command`;
    extra ``env``); sets ``cell.status``/``error``/``seconds`` and writes the DONE or FAILED marker."""
    if cell.run_dir.exists():
        shutil.rmtree(cell.run_dir)
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "cell.json").write_text(json.dumps(cell.child_spec(), indent=2))
    # Each cell is its own simulated study: its nodes' privacy ledgers live in the cell's directory and are
    # cleared with it when the cell reruns from scratch (a real deployment keeps one ledger per node).
    child_env = {**os.environ, "FEDLORA_STATE_DIR": str(cell.run_dir / "privacy-ledger"), **dict(env or {}),
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


def simulate_cell(spec: Mapping[str, Any]) -> None:
    """Runner ``"simulation"``: the cell as a Flower simulation (``flwr.simulation.run_simulation``, Ray)."""
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from simulations.server_app import make_server_app

    overrides = spec["overrides"]
    run_simulation(server_app=make_server_app(overrides), client_app=make_client_app(overrides),
                   num_supernodes=int(spec["num-supernodes"]),
                   backend_config={"client_resources": {"num_cpus": spec.get("client-cpus", 1), "num_gpus": 0.0}})


def run_cell_in_process(spec: Mapping[str, Any]) -> None:
    """Runner ``"in-process"``: the cell as an in-process federation (no Ray, clients one after the other)."""
    from simulations.inprocess import run_in_process

    run_in_process(spec["overrides"], int(spec["num-supernodes"]))


#: how a child process runs a cell's spec
RUNNERS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "simulation": simulate_cell, "in-process": run_cell_in_process}


def cell_main(run_dir: Path) -> int:
    """Child process: run ``run_dir/cell.json`` with its runner; on error write ``run_dir/ERROR``, return 1."""
    try:
        spec = json.loads((run_dir / "cell.json").read_text())
        RUNNERS[spec.get("runner", "simulation")](spec)
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
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: Path, columns: Sequence[str]) -> None:
    """Write ``rows`` with ``columns`` (None as empty) to ``path`` atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    os.replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table (first column left-aligned, the others right-aligned), one string per line."""
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def list_item(convert: Callable[[str], T], not_converted: str,
              check: Callable[[T, str], str | None] | None = None) -> Callable[[str], T]:
    """An entry parser for :func:`parse_list`: ``convert(entry)``, whose ValueError becomes a
    :class:`GridError` with ``not_converted.format(item=entry)``; then ``check(value, entry)``, whose message
    (if any) is raised as a :class:`GridError`."""

    def parse(entry: str) -> T:
        try:
            value = convert(entry)
        except ValueError:
            raise GridError(not_converted.format(item=entry)) from None
        problem = check(value, entry) if check is not None else None
        if problem:
            raise GridError(problem)
        return value

    return parse


def one_of(flag: str, allowed: Sequence[str], what: str = "") -> Callable[[str], str]:
    """An entry parser for :func:`parse_list` accepting only ``allowed``, e.g.
    ``--strategies: unknown strategy 'fedavg'; must be one of [...]``."""
    kind = f"{what} " if what else ""
    return list_item(str, "", lambda v, _: None if v in allowed else
                     f"{flag}: unknown {kind}{v!r}; must be one of {list(allowed)}")


def parse_list(text: str, flag: str, item: Callable[[str], T]) -> list[T]:
    """A comma list argument: ``item`` converts (and checks) each entry, raising :class:`GridError`
    (e.g. a :func:`list_item`); order kept, duplicates dropped; an empty list is an error."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise GridError(f"{flag}: empty list")
    out: list[T] = []
    for raw in items:
        value = item(raw)
        if value not in out:
            out.append(value)
    return out


if __name__ == "__main__":
    sys.exit(cell_main(Path(sys.argv[1])))
