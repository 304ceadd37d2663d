"""Fast checks of bench.many_clients (memory sampler, run config, report) and bench.hundred_clients (recipes,
cells, report), without starting Flower: under a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import hundred_clients as hc
from bench import many_clients as mc
from fedlora.run_config import parse_run_config
from simulations.check_config import parse_overrides


def test_run_config_is_valid_and_selects_ten_per_round() -> None:
    for n in (1000, 100, 20):
        cfg = parse_run_config({**parse_overrides(mc.run_config(n, 3)), "num-partitions": n})
        assert round(cfg.fraction_train * n) == 10 and cfg.min_train_nodes == 10
        assert cfg.min_available_nodes == n and cfg.num_server_rounds == 3


def test_sampler_sees_children_and_marked_processes() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "fedlora-test-marker-xyz"],
                              start_new_session=True)
    try:
        time.sleep(1.0)
        tree = mc.process_tree([os.getpid()], ("fedlora-test-marker-xyz",))
        assert {os.getpid(), child.pid, marked.pid} <= tree
        pss, rss = mc.memory_of([child.pid])
        assert rss >= 64 << 20 and 0 < pss <= rss
        sampler = mc.MemorySampler(os.getpid(), ("fedlora-test-marker-xyz",), interval=0.05)
        sampler.start()
        time.sleep(0.3)
        sampler.stop()
        assert sampler.samples >= 2 and sampler.peak_procs >= 3
        assert sampler.peak_pss >= 64 << 20 and sampler.peak_rss >= sampler.peak_pss
        assert 0 < mc.machine_used() < sampler.peak_machine + (1 << 30)
    finally:
        for p in (child, marked):
            p.kill()
            p.wait()


def test_summary_and_report(tmp_path: Path) -> None:
    rows = [{"round": 0, "accuracy": 0.5}] + [
        {"round": k, "accuracy": 0.5 + k / 100, "round-seconds": 10.0 * k, "clients-used": 10} for k in (1, 2)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sampler = mc.MemorySampler(os.getpid())
    sampler.sample()
    row = mc.summarize(20, mc.read_metrics(path), sampler, rc=0, wall=1.0, used_before=1 << 30, used_after=1 << 30)
    assert row["clients_used"] == "10 10" and row["round_s"] == "10.0 20.0" and row["round_s_median"] == 15.0
    assert row["accuracy"] == "0.500 0.510 0.520" and row["peak_pss_gib"] > 0
    md = mc.write_report([row], tmp_path, {"cpu_count": 2}).read_text()
    assert "PASS" in md and (tmp_path / "many_clients.csv").exists()


def test_hundred_clients_recipes_and_report(tmp_path: Path) -> None:
    cells = hc.make_cells(list(hc.RECIPES), tmp_path)
    for cell in cells:
        cfg = parse_run_config(cell.overrides)
        assert cfg.validation_size == 1000 and cfg.final_full_test and cell.num_supernodes == 100
        assert cfg.num_partitions == 100 and round(cfg.fraction_train * 100) == 10
    quick = hc.make_cells(["r20-s10-lr0.02"], tmp_path, quick=True)[0]
    assert quick.num_supernodes == 10 and quick.overrides["num-server-rounds"] == 1
    for cell, accs in zip(cells[:2], ([0.5, 0.6, 0.7], [0.5, 0.8, 0.75])):
        cell.run_dir.mkdir(parents=True)
        n = cell.overrides["num-server-rounds"]
        lines = [{"round": r, "accuracy": a, "loss": 0.6, "validation-examples": 300, "round-seconds": 1.0}
                 for r, a in zip((0, n - 1, n), accs)]
        (cell.run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
        cell.status = "ok"
    (cells[0].run_dir / "load.json").write_text(json.dumps({"mean": 3.5, "max": 7.25, "samples": 9}))
    rows = [r for cell in cells for r in hc.cell_rows(cell)]
    assert hc.best(rows)["recipe"] == "r20-s10-lr0.02"
    md = hc.write_report(rows, tmp_path, {"cpu_count": 2}, cells).read_text()
    assert "Best final validation accuracy**: r20-s10-lr0.02 (0.750)" in md
    assert "load average during the run: 3.5 mean, 7.25 max" in md and "not recorded" in md
    assert (tmp_path / "results.csv").read_text().count("\n") == 7


def test_hundred_clients_rejects_unknown_recipe() -> None:
    with pytest.raises(SystemExit):
        hc.main(["--recipes", "nope"])
