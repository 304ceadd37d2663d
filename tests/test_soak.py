"""Soak (short CI version): many rounds of a small run; the ServerApp process's RSS must not grow beyond a
bound after the warm-up. ``deploy/soak.py`` runs the in-process simulation (the ServerApp runs in that
process) and samples its VmRSS per round; 50 rounds: ``.venv/bin/python deploy/soak.py --rounds 50``
(figures in deploy/README.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 10
WARMUP = 5
BOUND_MB = 48.0


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def test_server_memory_does_not_grow_over_rounds(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "deploy" / "soak.py"), "--rounds", str(ROUNDS), "--warmup", str(WARMUP),
           "--bound-mb", str(BOUND_MB), "--results-dir", str(tmp_path), "--out", str(out)]
    log = (tmp_path / "soak.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 480
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _descendants(proc.pid)  # Ray processes, to end them by pid whatever happens
            time.sleep(1.0)
    finally:
        if proc.poll() is None:
            seen |= _descendants(proc.pid)
            proc.kill()
        proc.wait(timeout=30)
        log.close()
        for pid in seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = (tmp_path / "soak.log").read_text()
    assert out.exists(), text[-4000:]
    summary = json.loads(out.read_text())
    print(f"soak: RSS after round {WARMUP} {summary[f'rss-round-{WARMUP}-mb']:.1f} MiB, after round {ROUNDS} "
          f"{summary[f'rss-round-{ROUNDS}-mb']:.1f} MiB, {summary['seconds-per-round']:.2f} s/round")
    rows = [json.loads(x) for x in (tmp_path / "soak" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(r["clients-used"] == 2 for r in rows[1:])
    assert summary["rss-growth-mb"] <= BOUND_MB, summary["rss-per-round-mb"]
    assert proc.returncode == 0, text[-4000:]
