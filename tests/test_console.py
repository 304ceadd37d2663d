"""What a run prints (``simulations.console``): the byte formatter, the start / round / done lines, and the
logging setup (no duplicate records where the process already has log handlers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.run_config import parse_run_config
from simulations.console import done_line, format_bytes, format_seconds, round_line, start_line


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "1 kB"), (39_944, "39.9 kB"), (12_288, "12.3 kB"),
    (2.66e6, "2.66 MB"), (168e6, "168 MB"), (1.5e9, "1.5 GB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_seconds():
    assert [format_seconds(s) for s in (12.34, 404.2, 3 * 3600 + 65)] == ["12.3s", "6m44s", "3h01m05s"]


def test_lines_of_a_run(tmp_path):
    cfg = parse_run_config({"num-server-rounds": 5, "dp-epsilon": 3.0})
    run_dir = tmp_path / "main-x"
    start = start_line(cfg, run_dir)
    assert start.startswith("[fedlora] start main-x: fedsb rank=16 minilm on rotten_tomatoes (dirichlet), 5 rounds")
    assert "dp-epsilon=3" in start and start.endswith(f"results in {run_dir}")
    fixed = start_line(parse_run_config({"dp-noise": 1.1}), run_dir)  # a fixed σ, no target ε
    assert "dp-noise=1.1" in fixed and "dp-epsilon" not in fixed
    assert round_line(cfg, {"round": 0, "accuracy": 0.493, "loss": 0.69}) == (
        "[fedlora] round 0/5 accuracy=0.4930 loss=0.6900")
    rec = {"round": 1, "accuracy": 0.581, "loss": 0.66, "upload-bytes": 199_720, "download-bytes": 199_720,
           "clients-used": 5, "clients-rejected": 0, "clients-missing": 0, "round-seconds": 61.23, "dp-epsilon": 1.2}
    assert round_line(cfg, rec) == ("[fedlora] round 1/5 accuracy=0.5810 loss=0.6600 up=200 kB down=200 kB "
                                    "clients ok=5 rejected=0 missing=0 61.2s dp-epsilon(max)=1.200")
    rows = [{"round": 0, "accuracy": 0.49}, {**rec, "round": 5, "accuracy": 0.785, "elapsed-seconds": 404.2}]
    assert done_line(rows, run_dir) == (
        f"[fedlora] done: final accuracy=0.7850 after round 5 in 6m44s; results in {run_dir}")
    assert "no central evaluation after round 1" in done_line([{"round": 1}], run_dir)


LOGGING_PROBE = """
import logging, sys
{setup}
from simulations.console import setup_logging
setup_logging(); setup_logging()
logging.getLogger("fedlora.strategy").info("probe %d", 7)
"""


@pytest.mark.parametrize(("setup", "expected"), [
    ("", ["INFO fedlora.strategy: probe 7"]),  # a bare process: the fedlora handler, once
    ("logging.basicConfig(level=logging.DEBUG, format='root:%(message)s')", ["root:probe 7"]),  # like Flower's
])
def test_setup_logging_routes_fedlora_records_once(setup, expected):
    code = LOGGING_PROBE.format(setup=setup)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert [line for line in out.stderr.splitlines() if "probe" in line] == expected
