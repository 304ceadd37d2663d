"""Scale of the federation: peak memory and round time of a `flwr run .` simulation with 1,000 (and 100)
simulated SuperNodes, 10 clients per round.

::

    nice -n 10 .venv/bin/python -m bench.many_clients                  # 1000 and 100 SuperNodes, 3 rounds each
    nice -n 10 .venv/bin/python -m bench.many_clients --clients 1000 --rounds 3
    nice -n 10 .venv/bin/python -m bench.many_clients --quick     # smoke: 20 SuperNodes, 1 round, to results/bench/

Each size is the real deployment path of the main job: ``bash scripts/run.sh`` (``flwr run .`` on the local
simulation SuperLink, Ray) with ``NUM_SUPERNODES=N``, ``RESULTS_DIR=<out>/runs``, ``RUN_NAME=clients-N`` and
the run config of :func:`run_config` (fraction-train = 10/N, min-available-nodes = N, 10 local steps, bf16 +
autocast, max length 32, no checkpoint/adapter; Dirichlet α = 2.0: at α ≤ 1.0 no draw over 1,000 partitions
of Rotten Tomatoes gives every partition an example). Memory: every 0.5 s the PSS and RSS
(``/proc/<pid>/smaps_rollup``) of the whole process tree are summed: run.sh and its descendants plus the
detached local SuperLink of this FLWR_HOME and its descendants (ServerApp, Ray, the ClientApp actors). PSS
splits shared pages among the processes that share them, so the sum does not double-count them. The
machine's used memory (MemTotal − MemAvailable, other users' processes included) is sampled too. Round
seconds and clients per round come from the run's ``metrics.jsonl``. Target: peak PSS ≤ 8 GiB at 1,000.

Writes ``<out>/many_clients.csv`` and ``<out>/many_clients.md`` (default out: ``docs/grid/many_clients``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, bench_parser, format_table, machine_line, read_csv, start, verdict, write_csv

DEFAULT_OUT = REPO_ROOT / "docs" / "grid" / "many_clients"
GIB = 1024**3
TARGET_GIB = 8.0
PER_ROUND = 10


def run_config(clients: int, rounds: int, *, local_steps: int = 10) -> str:
    """The ``--run-config`` overrides of one size (scripts/run.sh adds results-dir, run-name, num-partitions)."""
    per_round = min(PER_ROUND, clients)
    return (f"num-server-rounds={rounds} fraction-train={per_round / clients:g} min-available-nodes={clients} "
            f"min-train-nodes={per_round} local-steps={local_steps} max-test-examples=500 dtype='bfloat16' "
            "amp=true max-length=32 checkpoint=false export-adapter=false partitioner='dirichlet' "
            "dirichlet-alpha=2.0")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_tree(roots: Sequence[int], markers: Sequence[str] = ()) -> set[int]:
    """``roots`` and their descendants, plus every process whose command line contains all ``markers`` and
    its descendants (a detached daemon, e.g. the local SuperLink, is not a descendant of who started it)."""
    kids = _children()
    todo = list(roots)
    if markers:
        todo += [p for ps in kids.values() for p in ps if all(m in _cmdline(p) for m in markers)]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += kids.get(pid, [])
    return seen


def memory_of(pids: Sequence[int] | set[int]) -> tuple[int, int]:
    """(summed PSS, summed RSS) in bytes of ``pids`` from /proc/<pid>/smaps_rollup (vanished ones count 0)."""
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return pss, rss


def machine_used() -> int:
    """MemTotal − MemAvailable in bytes (the whole machine, other users included)."""
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


class MemorySampler(threading.Thread):
    """Samples the tree of ``root`` (plus ``markers`` processes) every ``interval`` s until :meth:`stop`."""

    def __init__(self, root: int, markers: Sequence[str] = (), interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.markers, self.interval = root, tuple(markers), interval
        self.peak_pss = self.peak_rss = self.peak_machine = self.peak_procs = self.samples = 0
        self.load: list[float] = []
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pids = process_tree([self.root], self.markers)
        pss, rss = memory_of(pids)
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.peak_machine = max(self.peak_machine, machine_used())
        self.load.append(os.getloadavg()[0])
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(clients: int, rows: Sequence[Mapping[str, Any]], sampler: MemorySampler, *, rc: int,
              wall: float, used_before: int, used_after: int) -> dict[str, Any]:
    """One result row of one size."""
    rounds = [r for r in rows if r.get("round", 0) >= 1]
    secs = [float(r["round-seconds"]) for r in rounds if r.get("round-seconds") is not None]
    return {
        "clients": clients, "rc": rc, "rounds": len(rounds),
        "clients_used": " ".join(str(r.get("clients-used")) for r in rounds),
        "round_s": " ".join(f"{s:.1f}" for s in secs), "round_s_median": statistics.median(secs) if secs else None,
        "accuracy": " ".join(f"{r['accuracy']:.3f}" for r in rows if r.get("accuracy") is not None),
        "peak_pss_gib": sampler.peak_pss / GIB, "peak_rss_gib": sampler.peak_rss / GIB,
        "peak_procs": sampler.peak_procs, "samples": sampler.samples,
        "machine_used_before_gib": used_before / GIB, "machine_used_peak_gib": sampler.peak_machine / GIB,
        "machine_used_after_gib": used_after / GIB, "wall_s": wall,
        "load_mean": statistics.fmean(sampler.load) if sampler.load else None,
        "load_max": max(sampler.load) if sampler.load else None,
    }


def run_size(clients: int, rounds: int, out: Path, *, local_steps: int = 10, interval: float = 0.5) -> dict[str, Any]:
    """Run ``scripts/run.sh`` at ``clients`` SuperNodes while sampling memory; its result row."""
    run_name = f"clients-{clients}"
    env = {**os.environ, "NUM_SUPERNODES": str(clients), "RESULTS_DIR": str(out / "runs"), "RUN_NAME": run_name}
    flwr_home = os.environ.get("FLWR_HOME", str(REPO_ROOT / ".flwr-home"))
    metrics = out / "runs" / run_name / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    used_before = machine_used()
    cmd = ["bash", "scripts/run.sh", run_config(clients, rounds, local_steps=local_steps)]
    print(f"[many-clients] {clients} SuperNodes: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
    sampler = MemorySampler(proc.pid, ("flower-superlink", f"--log-file {flwr_home}/"), interval)
    sampler.start()
    rc = proc.wait()
    sampler.stop()
    wall = time.monotonic() - t0
    time.sleep(2)
    return summarize(clients, read_metrics(metrics), sampler, rc=rc, wall=wall, used_before=used_before,
                     used_after=machine_used())


def _num(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def write_report(rows: Sequence[Mapping[str, Any]], out: Path, info: Mapping[str, Any]) -> Path:
    write_csv(out / "many_clients.csv", rows, info)
    cols = ["clients", "rc", "clients_used", "round_s", "peak_pss_gib", "peak_rss_gib", "peak_procs",
            "machine_used_before_gib", "machine_used_peak_gib", "load_mean", "accuracy"]
    lines = ["# Scale of the federation: `flwr run .` with many simulated SuperNodes, 10 per round", "",
             "Command: `nice -n 10 .venv/bin/python -m bench.many_clients` (see the module docstring). "
             "Peak PSS/RSS: summed over the run's whole process tree every 0.5 s; machine used memory "
             "includes other users' processes. Partitioner: Dirichlet α = 2.0 over N partitions (α = 0.5 and 1.0 "
             "find no draw over 1,000 partitions with ≥ 1 example each). Round 1 includes the start of the Ray "
             "ClientApp actors (model load); round seconds move with the machine's load (load_mean: 1-minute "
             "load average, mean over the samples).", "", machine_line(info), "", "```",
             format_table(rows, cols), "```", ""]
    for r in rows:
        lines.append(f"- {r['clients']} SuperNodes: peak PSS {r['peak_pss_gib']:.2f} GiB "
                     f"({verdict(r['peak_pss_gib'], TARGET_GIB)} target ≤ {TARGET_GIB:g} GiB), round seconds "
                     f"{r['round_s'] or '-'}, clients used per round {r['clients_used'] or '-'}")
    path = out / "many_clients.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = bench_parser(__doc__ or "", "20 SuperNodes, 1 round of 2 local steps")
    ap.add_argument("--clients", default="1000,100", help="comma list of SuperNode counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.5, help="memory sampling period, seconds")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from <out>/many_clients.csv")
    args = ap.parse_args(argv)
    if args.report_only:
        out = Path(args.out_dir or DEFAULT_OUT)
        saved = read_csv(out / "many_clients.csv")
        rows = [{k: _num(v) for k, v in r.items() if not k.startswith("m_")} for r in saved]
        info = {k[2:]: v for k, v in saved[0].items() if k.startswith("m_")}
        print(write_report(rows, out, info).read_text())
        return 0
    sizes = [20] if args.quick else [int(c) for c in args.clients.split(",") if c.strip()]
    rounds, steps = (1, 2) if args.quick else (args.rounds, 10)
    quick_out = REPO_ROOT / "results" / "bench" / "many_clients_quick"  # never over the recorded runs
    out, info = start(args.out_dir or (quick_out if args.quick else DEFAULT_OUT))
    rows = [run_size(n, rounds, out, local_steps=steps, interval=args.interval) for n in sizes]
    print(write_report(rows, out, info).read_text())
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
