"""Secure aggregation (SecAgg+) against plain aggregation: bytes and seconds per round, and the quantisation error
of ΔW, measured on the same federation run both ways.

Each cell (strategy, clients) runs one round of an in-process federation (:mod:`simulations.inprocess`: the real
ServerApp loop and ClientApp, MiniLM, query/value + the classifier head, Rotten Tomatoes, iid, uniform weights)
twice with one run config but ``secure-aggregation`` false / true. The clients' training is seeded and does not
depend on the protocol, so both runs aggregate the same updates; the aggregation audit (``$FEDLORA_AUDIT_DIR``,
:mod:`simulations.audit`) keeps each run's global state before and after the round, and the run's outer factors
(``<run>/outer-factors``) give ΔW_L = B_L·(R0 after − R0 before)·A_L per adapted layer. Reported:

- ``dw_rel_err``: ‖ΔW_secure − ΔW_plain‖ / ‖ΔW_plain‖ over all layers (Frobenius, fp64), the scaling cancels;
- ``dw_max_abs``: max |R0 secure − R0 plain| (the r×r entries), against ``bound`` = 2c/T (uniform weights);
- ``head_rel_err``: the same relative error for the ``modules_to_save`` head's change;
- ``up_bytes`` / ``down_bytes`` per client per round, everything both ways (masked vectors, global state,
  protocol records), and ``round_s`` (wall time of the round, training included) and ``protocol_s`` (the
  SecAgg+ stages, client work included since clients run in the same process) for each mode, with ratios.

    python -m bench.secagg                         # fedsb, hetero, flora × 3, 5 clients, r=16
    python -m bench.secagg --quick                 # fedsb, 3 clients, r=4
    python -m bench.secagg --clipping-range 1 --quantization-range 1073741824   # tighter quantisation
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import bench_parser, format_table, start, write_csv


def parse_args(argv: list[str] | None):
    ap = bench_parser(__doc__, "fedsb, 3 clients, r=4")
    ap.add_argument("--strategies", nargs="+", default=["fedsb", "hetero", "flora"])
    ap.add_argument("--clients", nargs="+", type=int, default=[3, 5])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--clipping-range", type=float, default=8.0)
    ap.add_argument("--quantization-range", type=int, default=2**22)
    a = ap.parse_args(argv)
    if a.quick:
        a.strategies, a.clients, a.rank = ["fedsb"], [3], 4
    return a


def run_config(strategy: str, clients: int, r: int, secure: bool, results_dir: str, a: Any) -> dict[str, Any]:
    """One round, 2 local steps of batch 8, uniform weights; the secure run differs only in ``secure-aggregation``."""
    cfg: dict[str, Any] = {
        "model": "minilm", "strategy": strategy, "rank": r, "inner-rank": max(1, r // 4),
        "target-modules": "query,value", "num-server-rounds": 1, "num-partitions": clients, "partitioner": "iid",
        "fraction-train": 1.0, "min-available-nodes": clients, "local-steps": 2, "batch-size": 8,
        "max-client-examples": 64, "weighting": "uniform", "central-eval": False, "export-adapter": False,
        "results-dir": results_dir, "run-name": f"{strategy}-{clients}-{'secure' if secure else 'plain'}",
        "secure-aggregation": secure, "secagg-clipping-range": a.clipping_range,
        "secagg-quantization-range": a.quantization_range,
    }
    if strategy in ("hetero", "flora"):
        cfg["ranks"] = ",".join(str(max(1, r // f)) for f in (1, 2, 4))
    return cfg


def _run(cfg: dict[str, Any], clients: int, audit: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    """(round-1 record, the audit's before/after arrays, run dir)."""
    from safetensors.numpy import load_file

    from simulations.inprocess import run_in_process
    from simulations.results import RunOutputs

    os.environ["FEDLORA_AUDIT_DIR"] = str(audit)
    run_dir = run_in_process(cfg, clients)
    rec = RunOutputs(run_dir).read_metrics()[-1]
    if rec.get("clients-used") != clients or rec.get("kept-previous"):
        raise RuntimeError(f"{run_dir.name}: {rec.get('clients-used')} of {clients} used, {rec.get('kept-reason')}")
    return rec, load_file(str(audit / cfg["run-name"] / "round-1.safetensors")), run_dir


def _outer(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Layer → (B, A) of the run's outer factors."""
    from fedlora.outer_bundle import OuterBundleStore

    digest = json.loads((run_dir / "config.json").read_text())["outer-digest"]
    bundle = OuterBundleStore(run_dir / "outer-factors").get(digest)
    assert bundle is not None, f"{run_dir}: no outer factors {digest}"
    return {name: (f.U.double().numpy(), f.Vh.double().numpy()) for name, f in bundle.factors.items()}


def errors(plain: dict[str, np.ndarray], secure: dict[str, np.ndarray], outer: dict) -> dict[str, float]:
    """ΔW and head errors of the secure round against the plain one (same updates, same global before)."""
    num = den = hnum = hden = 0.0
    max_abs = 0.0
    for key in (k[len("after/"):] for k in plain if k.startswith("after/")):
        before = plain[f"before/{key}"].astype(np.float64)
        p_after, s_after = plain[f"after/{key}"].astype(np.float64), secure[f"after/{key}"].astype(np.float64)
        if key.endswith(".R0"):
            B, A = outer[key[: -len(".R0")]]
            num += float(np.sum((B @ (s_after - p_after) @ A) ** 2))
            den += float(np.sum((B @ (p_after - before) @ A) ** 2))
            max_abs = max(max_abs, float(np.max(np.abs(s_after - p_after))))
        else:
            hnum += float(np.sum((s_after - p_after) ** 2))
            hden += float(np.sum((p_after - before) ** 2))
    return {"dw_rel_err": (num / den) ** 0.5, "dw_max_abs": max_abs,
            "head_rel_err": (hnum / hden) ** 0.5 if hden else float("nan")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    dest, info = start(a.out_dir)
    bound = 2 * a.clipping_range / a.quantization_range
    print(f"SecAgg+ vs plain aggregation, one round of an in-process federation (MiniLM r={a.rank}, query/value + "
          f"head); c={a.clipping_range:g}, T={a.quantization_range} (bound 2c/T = {bound:.3g})\n")
    from fedlora.experiment import build_model, quiet_libraries

    quiet_libraries()
    rows: list[dict[str, Any]] = []
    saved_audit = os.environ.get("FEDLORA_AUDIT_DIR")
    try:
        with tempfile.TemporaryDirectory(prefix="fedlora-secagg-") as tmp:
            for strategy in a.strategies:
                for n in a.clients:
                    runs = {}
                    for secure in (False, True):
                        t0 = time.perf_counter()
                        cfg = run_config(strategy, n, a.rank, secure, tmp, a)
                        runs[secure] = (*_run(cfg, n, Path(tmp) / "audit"), time.perf_counter() - t0)
                        build_model.cache_clear()
                        gc.collect()
                    (p_rec, p_arr, _, _), (s_rec, s_arr, s_dir, _) = runs[False], runs[True]
                    row: dict[str, Any] = {"strategy": strategy, "clients": n, "r": a.rank, "bound": bound,
                                           **errors(p_arr, s_arr, _outer(s_dir))}
                    for mode, rec in (("plain", p_rec), ("secure", s_rec)):
                        row[f"{mode}_up_bytes"] = rec["upload-bytes"] / n
                        row[f"{mode}_down_bytes"] = rec["download-bytes"] / n
                        row[f"{mode}_round_s"] = rec["round-seconds"]
                    row["secure_protocol_s"] = s_rec["secagg-seconds"]
                    row["up_ratio"] = row["secure_up_bytes"] / row["plain_up_bytes"]
                    row["down_ratio"] = row["secure_down_bytes"] / row["plain_down_bytes"]
                    row["time_ratio"] = row["secure_round_s"] / row["plain_round_s"]
                    rows.append(row)
                    print(format_table([row], ["strategy", "clients", "dw_rel_err", "dw_max_abs", "bound",
                                               "head_rel_err", "plain_up_bytes", "secure_up_bytes", "up_ratio",
                                               "plain_down_bytes", "secure_down_bytes", "down_ratio",
                                               "plain_round_s", "secure_round_s", "secure_protocol_s"]))
    finally:
        if saved_audit is None:
            os.environ.pop("FEDLORA_AUDIT_DIR", None)
        else:
            os.environ["FEDLORA_AUDIT_DIR"] = saved_audit
    print("\nbytes per client per round (up: masked vector + public keys, ciphertexts, shares; down: global state + "
          "the protocol's messages); seconds: one run each, this machine's load applies")
    csv_path = write_csv(dest / "secagg.csv", rows, info)
    print(f"CSV: {csv_path}")
    return {"rows": rows, "csv": csv_path}


if __name__ == "__main__":
    main()
