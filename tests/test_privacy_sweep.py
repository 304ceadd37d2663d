"""The privacy–utility sweep (``python -m simulations.privacy_sweep``): argument validation, failed cells,
resume without redoing finished cells, and a tiny real grid ε ∈ {3, ∞} × fedsb × seed 0."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from simulations import privacy_sweep as ps
from simulations.privacy_report import CSV_COLUMNS

# dp-release-metrics: the sweep reports each cell's ε spent (per-node figures, outside the DP guarantee)
TINY_SETS = ["max-client-examples=40", "max-test-examples=32", "local-steps=2", "num-server-rounds=1",
             "partitioner=iid", "fraction-train=1.0", "batch-size=8", "dp-release-metrics=true"]

# one Ray actor trains the 3 tiny clients in turn: one model load instead of two on a 2-core machine
CLIENT_CPUS = min(2, os.cpu_count() or 1)


def _sweep(out: Path, *extra: str, epsilons: str = "3,inf") -> list[str]:
    argv = ["--epsilons", epsilons, "--strategies", "fedsb", "--seeds", "0", "--out", str(out),
            "--num-supernodes", "3", "--client-cpus", str(CLIENT_CPUS)]
    for s in TINY_SETS:
        argv += ["--set", s]
    return argv + list(extra)


def _csv(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def _summary(text: str) -> str:
    return [line for line in text.splitlines() if line.startswith("[sweep]") and " ran, " in line][-1]


@pytest.mark.parametrize(("args", "message"), [
    (["--strategies", "fedavg"], "unknown strategy 'fedavg'"),
    (["--epsilons", "0,inf"], "'0' must be > 0"),
    (["--epsilons", "-1"], "'-1' must be > 0"),
    (["--epsilons", "nan"], "must be > 0"),
    (["--epsilons", "three"], "'three' is not a number"),
    (["--epsilons", ","], "--epsilons: empty list"),
    (["--seeds", "a"], "--seeds: 'a' is not an integer"),
    (["--seeds", "-2"], "--seeds: -2 must be >= 0"),
    (["--num-supernodes", "0"], "--num-supernodes: 0 must be >= 1"),
    (["--client-cpus", "0"], "--client-cpus: 0 must be in (0, "),
    (["--cell-timeout", "-1"], "--cell-timeout: -1 must be >= 0"),
    (["--set", "dp-epsilon=2"], "--set dp-epsilon: set by the sweep itself"),
    (["--set", "rounds=3"], "run config 'rounds': unknown key"),
    (["--set", "num-server-rounds=zero"], "run config 'num-server-rounds': expected int"),
    (["--set", "num-server-rounds"], "expected key=value"),
    (["--strategies", "fedit", "--set", "user-dp-clip=0.5", "--set", "user-dp-noise=1.0", "--set", "weighting=uniform"],
     "cell fedit-eps1-s0: run config 'user-dp-clip'"),
])
def test_invalid_arguments_fail_before_running_anything(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert ps.main(["--epsilons", "1", "--strategies", "fedsb", "--seeds", "0", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "privacy_sweep: error:" in err
    assert not out.exists()


def test_parsing_and_run_names():
    assert ps.parse_epsilons("1, 3,8,inf,3") == [1.0, 3.0, 8.0, float("inf")]
    assert ps.parse_epsilons("0.5,Infinity") == [0.5, float("inf")]
    assert ps.run_name("fedsb", 0.5, 2) == "fedsb-eps0.5-s2"
    assert ps.run_name("ffa", float("inf"), 0) == "ffa-epsinf-s0"
    assert ps.parse_sets(["num-server-rounds=3", "partitioner='iid'", "central-eval=false"]) == {
        "num-server-rounds": 3, "partitioner": "iid", "central-eval": False}


FAKE_CHILD = r"""
import json, sys, time
from pathlib import Path
run = Path(sys.argv[1])
spec = json.loads((run / "cell.json").read_text())
o = spec["overrides"]
if "epsinf" not in run.name and not (run.parent.parent / "heal").exists():
    print("Traceback ...\nRuntimeError: boom in " + run.name, flush=True)
    sys.exit(3)
if (run.parent.parent / "hang").exists():
    time.sleep(60)
rows = []
for r in range(o["num-server-rounds"] + 1):
    row = {"round": r, "accuracy": 0.5 + 0.1 * r, "cumulative-bytes": 1000 * r}
    if o["dp-epsilon"] and r:
        row.update({"dp-epsilon": o["dp-epsilon"] * r / 2, "dp-noise-multiplier": 1.5, "dp-delta": 1e-3})
    rows.append(row)
(run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
"""


@pytest.fixture
def fake_child(tmp_path, monkeypatch):
    """Cells run a tiny script instead of a Flower simulation (fast): non-inf cells fail unless ``<out>/heal``
    exists; every cell hangs if ``<out>/hang`` exists."""
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    monkeypatch.setattr(ps, "cell_command", lambda run_dir: [sys.executable, str(script), str(run_dir)])


def test_failed_cell_is_recorded_the_grid_goes_on_and_only_it_reruns(tmp_path, capsys, fake_child):
    out = tmp_path / "sweep"
    assert ps.main(_sweep(out, epsilons="3,8,inf")) == 1
    text = capsys.readouterr().out
    assert "3 ran, 0 skipped, 2 failed" in _summary(text)
    rows = {r["run_name"]: r for r in _csv(out)}
    assert list(rows) == ["fedsb-eps3-s0", "fedsb-eps8-s0", "fedsb-epsinf-s0"]
    for name in ("fedsb-eps3-s0", "fedsb-eps8-s0"):
        assert rows[name]["status"] == "failed" and f"boom in {name}" in rows[name]["error"]
        assert rows[name]["final_metric"] == ""
        assert "boom" in json.loads((out / "runs" / name / "FAILED").read_text())["error"]
        assert not (out / "runs" / name / "DONE").exists()
    assert rows["fedsb-epsinf-s0"]["status"] == "ok" and float(rows["fedsb-epsinf-s0"]["final_metric"]) == 0.6
    md = (out / "results.md").read_text()
    assert "## Cells not finished" in md and "`fedsb-eps3-s0`: failed: exit status 3" in md

    (out / "heal").touch()
    assert ps.main(_sweep(out, epsilons="3,8,inf")) == 0
    text = capsys.readouterr().out
    assert "2 ran, 1 skipped, 0 failed" in _summary(text)
    assert "fedsb-epsinf-s0: skipped" in text
    rows = {r["run_name"]: r for r in _csv(out)}
    assert [r["status"] for r in rows.values()] == ["ok"] * 3
    assert float(rows["fedsb-eps8-s0"]["dp_epsilon_spent"]) == 4.0
    assert not (out / "runs" / "fedsb-eps3-s0" / "FAILED").exists()
    md = (out / "results.md").read_text()
    assert "| fedsb | 0.6000 ± 0.0000 (n=1) | 0.6000 ± 0.0000 (n=1) | 0.6000 ± 0.0000 (n=1) |" in md

    # a changed --set changes the cells' spec: finished cells of another configuration are rerun
    assert ps.main([*_sweep(out, epsilons="inf"), "--set", "lr=0.01"]) == 0
    assert "1 ran, 0 skipped" in _summary(capsys.readouterr().out)


def test_cell_timeout_is_a_failure(tmp_path, capsys, fake_child):
    out = tmp_path / "sweep"
    (out).mkdir()
    (out / "hang").touch()
    assert ps.main(_sweep(out, "--cell-timeout", "1", epsilons="inf")) == 1
    row = _csv(out)[0]
    assert row["status"] == "failed" and row["error"] == "timed out after 1 s"
    assert float(row["seconds"]) < 30


def test_unfinished_metrics_are_not_finished(tmp_path, fake_child):
    out = tmp_path / "sweep"
    assert ps.main(_sweep(out, epsilons="inf")) == 0
    cell = ps.build_grid([float("inf")], ["fedsb"], [0], out, ps.parse_sets(TINY_SETS), 3)[0]
    assert cell.finished()
    metrics = cell.run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # the final round is missing
    assert not cell.finished()


@pytest.mark.slow
def test_tiny_real_grid_resumes_and_reruns_exactly_the_unmarked_cell(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDLORA_STATE_DIR", str(tmp_path / "ledgers"))  # the nodes' privacy ledgers
    out = tmp_path / "sweep"
    assert ps.main(_sweep(out)) == 0
    assert "2 ran, 0 skipped, 0 failed" in _summary(capsys.readouterr().out)

    rows = _csv(out)
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["strategy"], r["epsilon_target"], r["seed"], r["status"]) for r in rows] == [
        ("fedsb", "3", "0", "ok"), ("fedsb", "inf", "0", "ok")]
    dp, nodp = rows
    for r in rows:
        assert r["metric"] == "accuracy" and 0.0 <= float(r["final_metric"]) <= 1.0
        assert r["rounds"] == "1" and float(r["total_bytes"]) > 0 and float(r["seconds"]) > 0
    assert 0 < float(dp["dp_epsilon_spent"]) <= 3.0
    assert float(dp["noise_multiplier"]) > 0 and float(dp["dp_delta"]) > 0
    assert nodp["dp_epsilon_spent"] == "" and nodp["noise_multiplier"] == ""
    cfg = json.loads((out / "runs" / "fedsb-epsinf-s0" / "config.json").read_text())
    assert cfg["dp-epsilon"] == 0.0 and cfg["export-adapter"] is False and cfg["seed"] == 0
    assert json.loads((out / "runs" / "fedsb-eps3-s0" / "config.json").read_text())["dp-epsilon"] == 3.0
    md = (out / "results.md").read_text()
    assert "| strategy | ε=3 | ∞ (no DP) |" in md and "\n| fedsb | " in md
    png = (out / "privacy_utility.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    runs = {name: out / "runs" / name for name in ("fedsb-eps3-s0", "fedsb-epsinf-s0")}
    stamps = {name: ((d / "DONE").stat().st_mtime_ns, (d / "metrics.jsonl").stat().st_mtime_ns)
              for name, d in runs.items()}
    assert ps.main(_sweep(out)) == 0
    assert "0 ran, 2 skipped, 0 failed" in _summary(capsys.readouterr().out)
    assert {name: ((d / "DONE").stat().st_mtime_ns, (d / "metrics.jsonl").stat().st_mtime_ns)
            for name, d in runs.items()} == stamps
    assert len(_csv(out)) == 2

    (runs["fedsb-eps3-s0"] / "DONE").unlink()
    # the rerun is a new measurement: under the same run name the nodes' ledgers would (rightly) refuse to
    # spend the cell's budget twice, so it runs on fresh ledgers (as on other machines)
    monkeypatch.setenv("FEDLORA_STATE_DIR", str(tmp_path / "ledgers-rerun"))
    assert ps.main(_sweep(out)) == 0
    text = capsys.readouterr().out
    assert "1 ran, 1 skipped, 0 failed" in _summary(text)
    assert "fedsb-eps3-s0: running" in text and "fedsb-epsinf-s0: skipped" in text
    assert (runs["fedsb-eps3-s0"] / "DONE").exists()
    assert (runs["fedsb-eps3-s0"] / "metrics.jsonl").stat().st_mtime_ns > stamps["fedsb-eps3-s0"][1]
    assert (runs["fedsb-epsinf-s0"] / "metrics.jsonl").stat().st_mtime_ns == stamps["fedsb-epsinf-s0"][1]
    assert [r["status"] for r in _csv(out)] == ["ok", "ok"]
