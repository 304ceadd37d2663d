"""Soak test: many rounds of a small fedlora run, with the server process's memory (RSS) recorded per round.

    .venv/bin/python deploy/soak.py --rounds 50 [--nodes 2] [--bound-mb 64] [--out soak.json]

Runs the real ServerApp (``simulations.server_app``) and ClientApp (``clients.client_app``) in an in-process
Flower simulation (``run_simulation`` runs the ServerApp in this process, the ClientApps in Ray actors on
127.0.0.1). A background thread samples this process's VmRSS (``/proc/self/status``) every 0.1 s and
records it when each round's line lands in ``metrics.jsonl`` (after aggregation, central evaluation and the
round's checkpoint started). Prints one line per round and a summary; exits 1 if the RSS after the last
round exceeds the RSS after round ``--warmup`` (default 5) by more than ``--bound-mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# offline; Ray on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes it use the loopback address as its
# node address instead of the machine's first interface; read when ray is imported)
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("FLWR_TELEMETRY_ENABLED", "0"), ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
                     ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")):
    os.environ.setdefault(_key, _value)

SMALL = {"max-client-examples": 16, "local-steps": 1, "max-test-examples": 16, "eval-batch-size": 16,
         "central-eval": True, "export-adapter": False, "checkpoint": True, "fraction-train": 1.0,
         "round-timeout": 120.0}
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
           "init_args": {"include_dashboard": False}}


def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


class RoundRSS(threading.Thread):
    """Samples RSS; records it (and the time) as each new metrics.jsonl line appears."""

    def __init__(self, metrics: Path, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.metrics, self.interval = metrics, interval
        self.per_round: dict[int, float] = {}
        self.at: dict[int, float] = {}
        self.peak = 0.0
        self.stop = threading.Event()

    def _rounds(self) -> int:
        try:
            return sum(1 for line in self.metrics.read_text().splitlines() if line.strip())
        except OSError:
            return 0

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.is_set():
            rss = rss_mb()
            self.peak = max(self.peak, rss)
            for rnd in range(self._rounds()):
                if rnd not in self.per_round:
                    self.per_round[rnd] = rss
                    self.at[rnd] = time.perf_counter() - t0
                    print(f"[soak] round {rnd}: rss={rss:.1f} MiB t={self.at[rnd]:.1f}s", flush=True)
            self.stop.wait(self.interval)


def soak(rounds: int, nodes: int, warmup: int, results_dir: Path) -> dict:
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from simulations.server_app import make_server_app

    overrides = {**SMALL, "num-server-rounds": rounds, "num-partitions": nodes, "min-train-nodes": nodes,
                 "min-available-nodes": nodes, "results-dir": str(results_dir), "run-name": "soak"}
    sampler = RoundRSS(results_dir / "soak" / "metrics.jsonl")
    start_rss = rss_mb()
    t0 = time.perf_counter()
    sampler.start()
    try:
        run_simulation(server_app=make_server_app(overrides), client_app=make_client_app(overrides),
                       num_supernodes=nodes, backend_config={**BACKEND, "init_args": {**BACKEND["init_args"],
                                                                                     "num_cpus": os.cpu_count()}})
    finally:
        time.sleep(0.5)
        sampler.stop.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    per_round = sampler.per_round
    if rounds not in per_round:
        raise RuntimeError(f"the run ended after round {max(per_round, default=-1)} of {rounds}")
    base = per_round[min(warmup, rounds)]
    after = [per_round[r] for r in range(min(warmup, rounds), rounds + 1)]
    # least-squares slope over the post-warm-up rounds (MiB per round)
    xs = list(range(min(warmup, rounds), rounds + 1))
    mx, my = sum(xs) / len(xs), sum(after) / len(after)
    den = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, after)) / den if den else 0.0
    return {
        "rounds": rounds, "nodes": nodes, "warmup": warmup, "seconds": seconds,
        "seconds-per-round": (sampler.at[rounds] - sampler.at[0]) / rounds,
        "rss-start-mb": start_rss, "rss-round-0-mb": per_round[0], f"rss-round-{warmup}-mb": base,
        f"rss-round-{rounds}-mb": per_round[rounds], "rss-growth-mb": per_round[rounds] - base,
        "rss-max-after-warmup-mb": max(after), "rss-peak-mb": sampler.peak, "rss-slope-mb-per-round": slope,
        "rss-per-round-mb": {str(k): round(v, 1) for k, v in sorted(per_round.items())},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5, help="rounds before the reference RSS is taken")
    ap.add_argument("--bound-mb", type=float, default=64.0, help="allowed RSS growth after the warm-up")
    ap.add_argument("--results-dir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedlora-soak-") as tmp:
        summary = soak(args.rounds, args.nodes, args.warmup, (args.results_dir or Path(tmp)).resolve())
    summary["bound-mb"] = args.bound_mb
    summary["ok"] = summary["rss-growth-mb"] <= args.bound_mb
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.write_text(text)
    print("[soak] summary " + json.dumps({k: v for k, v in summary.items() if k != "rss-per-round-mb"}), flush=True)
    print(f"[soak] RSS after round {args.warmup}: {summary[f'rss-round-{args.warmup}-mb']:.1f} MiB, after round "
          f"{args.rounds}: {summary[f'rss-round-{args.rounds}-mb']:.1f} MiB (growth {summary['rss-growth-mb']:+.1f} "
          f"MiB, bound {args.bound_mb:g}); {summary['seconds-per-round']:.2f} s/round", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
