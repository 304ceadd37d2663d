"""The accuracy grid's pieces without running it: methods and their run configs, the tuning rule, the
report's bound and 95%-of-bound columns, and the refusal to run an untuned method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import accuracy, tuning
from bench.accuracy_report import cell_row, centralised_bound, write_outputs
from bench.methods import CLIENTS, FAMILIES, METHODS, Setting, cell_overrides, tuned_lr
from fedlora.run_config import parse_run_config
from simulations.grid_runner import Cell


def test_every_method_is_a_valid_run_config():
    s = Setting()
    for m in METHODS.values():
        ov = cell_overrides(m, s, seed=1, alpha=None if m.central else 0.1, lr=1e-3)
        cfg = parse_run_config(ov)
        assert cfg.strategy == m.strategy and cfg.final_full_test and cfg.max_test_examples == s.eval_examples
        assert getattr(cfg, FAMILIES[m.family].lr_key.replace("-", "_")) == 1e-3
        if m.central:  # one node with the pool, the same steps per round as a whole federated round
            assert cfg.num_partitions == 1 and cfg.local_steps == round(s.fraction * CLIENTS) * s.local_steps
        else:
            assert cfg.num_partitions == CLIENTS and cfg.dirichlet_alpha == 0.1
    assert parse_run_config(cell_overrides(METHODS["fedsb-uniform"], s, 0, 1.0, 1e-2)).weighting == "uniform"
    assert parse_run_config(cell_overrides(METHODS["fedsb-r64"], s, 0, 1.0, 1e-2)).rank == 64
    assert parse_run_config(cell_overrides(METHODS["hetero"], s, 0, 1.0, 1e-2)).ranks == "16,8,4"


def test_tuning_rule():
    assert tuning.choose({1e-2: 0.7, 2e-2: 0.8, 5e-2: 0.8}) == 2e-2  # ties go to the smaller rate
    assert tuning.choose({1e-2: None, 2e-2: None}) is None
    assert tuning.beyond_edge({1e-2: 0.6, 2e-2: 0.7, 5e-2: 0.8}, 5e-2) == 0.125
    assert tuning.beyond_edge({1e-2: 0.9, 2e-2: 0.7, 5e-2: 0.8}, 1e-2) == 0.004
    assert tuning.beyond_edge({1e-2: 0.6, 2e-2: 0.9, 5e-2: 0.8}, 2e-2) is None


def test_tuning_cells_evaluate_on_validation_never_test(tmp_path):
    cell = tuning.tuning_cell("lora", 1e-3, Setting(), tmp_path)
    cfg = parse_run_config(cell.overrides)
    assert cfg.validation_size == tuning.VALIDATION_SIZE and cfg.strategy == "fedit" and cfg.lora_lr == 1e-3
    assert cfg.seed == tuning.TUNING_SEED and cfg.dirichlet_alpha == tuning.TUNING_ALPHA


def test_untuned_family_refused_with_the_command():
    with pytest.raises(SystemExit, match="python -m bench.tuning"):
        tuned_lr(METHODS["ffa"], {"lora": {"lr": 1e-3}})
    assert tuned_lr(METHODS["flexlora"], {"lora": {"lr": 1e-3}}) == 1e-3


def _fake_cell(tmp_path: Path, name: str, labels: dict, accs: list[float]) -> Cell:
    run = tmp_path / name
    run.mkdir()
    rows = [{"round": i, "accuracy": a, "cumulative-bytes": 100 * i, "upload-bytes": 50, "download-bytes": 50,
             "clients-used": 1, "clients-sampled": 1} for i, a in enumerate(accs)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cell = Cell(run, {"num-server-rounds": len(accs) - 1}, 1, labels)
    cell.status, cell.seconds = "ok", 1.0
    return cell


def test_report_bound_and_rounds_to_95(tmp_path):
    lab = {"family": "nested-avg", "lr": 0.02, "rank": 16}
    cells = [
        _fake_cell(tmp_path, "c1", {**lab, "method": "central-nested", "alpha": None, "seed": 0, "central": True},
                   [0.5, 0.7, 0.80]),
        _fake_cell(tmp_path, "c2", {**lab, "method": "central-lora", "alpha": None, "seed": 0, "central": True},
                   [0.5, 0.7, 0.84]),
        _fake_cell(tmp_path, "f1", {**lab, "method": "fedsb", "alpha": 0.1, "seed": 0, "central": False},
                   [0.5, 0.6, 0.79, 0.81]),
        _fake_cell(tmp_path, "f2", {**lab, "method": "fedit", "alpha": 0.1, "seed": 0, "central": False},
                   [0.5, 0.6, 0.7, 0.75]),
    ]
    assert centralised_bound(cells) == pytest.approx(0.84)
    row = cell_row(cells[2], 0.84)
    assert row["round_to_95"] == 3 and row["bytes_to_95"] == 300 and row["final_accuracy"] == 0.81  # 0.95·0.84=0.798
    assert cell_row(cells[3], 0.84)["round_to_95"] is None
    write_outputs(cells, tmp_path, {"command": "test"})
    md = (tmp_path / "results.md").read_text()
    assert "0.8400" in md and "not reached (0/1)" in md and "| 0.1 | fedsb |" in md


def test_grid_refuses_untuned_methods(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "load_tuned", lambda: {})
    with pytest.raises(SystemExit, match="bench.tuning"):
        accuracy.main(["--methods", "fedsb", "--seeds", "0", "--alphas", "1.0", "--out", str(tmp_path)])


def test_dp_grid_cells_use_the_dp_tuned_rate_and_clip(tmp_path, monkeypatch):
    tuned = {"nested-avg@dp": {"lr": 0.03, "dp_clip": 2.0}, "lora@dp": {"lr": 2e-3, "dp_clip": 0.5},
             "lora-ffa@dp": {"lr": 5e-3, "dp_clip": 1.0}, "nested-avg": {"lr": 0.02}}
    monkeypatch.setattr(accuracy, "load_tuned", lambda: tuned)
    a = accuracy.parse_args(["--epsilons", "1,8", "--alphas", "1.0", "--seeds", "0"])
    assert a.methods == ["fedsb", "ffa", "fedit"]
    cells = accuracy.build_cells(a, Setting(), tmp_path)
    assert [c.name for c in cells] == [f"rt-{m}-a1-eps{e}-s0" for m in ("fedsb", "ffa", "fedit") for e in (1, 8)]
    cfgs = {c.name: parse_run_config(c.overrides) for c in cells}
    fedsb = cfgs["rt-fedsb-a1-eps8-s0"]
    assert fedsb.dp_epsilon == 8 and fedsb.dp_clip == 2.0 and fedsb.lr == 0.03 and fedsb.dp_enabled
    assert cfgs["rt-ffa-a1-eps1-s0"].lora_lr == 5e-3 and cfgs["rt-ffa-a1-eps1-s0"].dp_clip == 1.0
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--epsilons", "1", "--methods", "central-nested"])
    monkeypatch.setattr(accuracy, "load_tuned", lambda: {"nested-avg": {"lr": 0.02}})
    with pytest.raises(SystemExit, match="bench.tuning --dp-epsilon 3"):
        accuracy.build_cells(accuracy.parse_args(["--epsilons", "3", "--methods", "fedsb"]), Setting(), tmp_path)


def test_dp_tuning_cells_sweep_rate_and_clip_on_validation(tmp_path):
    cell = tuning.tuning_cell("lora-ffa", 3e-3, Setting(), tmp_path, (3.0, 0.5))
    cfg = parse_run_config(cell.overrides)
    assert cfg.strategy == "ffa" and cfg.dp_epsilon == 3.0 and cfg.dp_clip == 0.5 and cfg.validation_size > 0
    assert tuning.choose({(1e-3, 1.0): 0.7, (1e-3, 0.5): 0.7, (3e-3, 0.5): 0.6}) == (1e-3, 0.5)
