"""Server aggregation time vs number of clients: nested r×r rules vs dense FlexLoRA.

MiniLM's 12 adapted layers (query and value of 6 layers, 384×384), outer rank r ∈ {64, 16}, clients
n ∈ {10, 100, 1000}, unequal weights. Timed (whole call, validation included, outputs built):

  fedsb            fedlora.aggregation.exact_mean     Rᵢ r×r per layer
  hetero           fedlora.aggregation.hetero_mean    Rᵢ rᵢ×rᵢ, rᵢ ∈ {r, r/2, r/4}
  flora            fedlora.aggregation.stack_inner    Pᵢ r×q, Qᵢ q×r, q = r/4 (nested FLoRA)
  flexlora         fedlora.lora_math.flexlora_aggregate   Aᵢ r×384, Bᵢ 384×r: Σ pᵢBᵢAᵢ, SVD of
                   the stacked factors' core, truncation returned for every client
  flexlora-dense   reference written here: the dense Σ pᵢBᵢAᵢ (d×k, float64, one GEMM of the stacked
                   factors), full SVD of the d×k matrix, truncation once per distinct client rank
                   (the textbook FlexLoRA server step)

The speed-up of each nested rule is reported against the *faster* of the two FlexLoRA
implementations (the stronger baseline). Target: 1000 clients at r=64, fedsb and hetero ≥ 100×.

Memory: nested client states are distinct arrays (1000×12×64×64 fp32 = 197 MB); the LoRA factors of
a pool of ``--pool`` distinct clients are reused cyclically (client i holds pool[i mod pool]) —
the arithmetic is the same as with distinct factors, without 2.4 GB of inputs.

    python -m bench.server_aggregation            # full size
    python -m bench.server_aggregation --quick    # smoke size
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench._common import (
    bench_parser,
    format_table,
    interleaved_timings,
    set_blas_threads,
    start,
    summary,
    verdict,
    write_csv,
)

D = K = 384
LAYERS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")]
TARGET_SPEEDUP = 100.0
NESTED = ("fedsb", "hetero", "flora")
FLEX = ("flexlora", "flexlora-dense")


def _ranks(n: int, r: int) -> list[int]:
    return [(r, max(1, r // 2), max(1, r // 4))[i % 3] for i in range(n)]


class Clients:
    """Client states for one r, built once for the largest n and sliced for smaller n."""

    def __init__(self, r: int, n_max: int, pool: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        L = len(LAYERS)
        self.r = r
        self.counts = rng.integers(20, 1000, size=n_max).astype(np.float64)
        big = (0.01 * rng.standard_normal((n_max, L, r, r), dtype=np.float32))
        self.sb = [{f"{name}.R": big[i, j] for j, name in enumerate(LAYERS)} for i in range(n_max)]
        ranks = _ranks(n_max, r)
        self.hetero = [
            {f"{name}.R": np.ascontiguousarray(big[i, j, :ri, :ri]) for j, name in enumerate(LAYERS)}
            for i, ri in enumerate(ranks)
        ]
        q = max(1, r // 4)
        P = 0.1 * rng.standard_normal((n_max, L, r, q), dtype=np.float32)
        Q = 0.1 * rng.standard_normal((n_max, L, q, r), dtype=np.float32)
        self.pq = [
            {k: v for j, name in enumerate(LAYERS) for k, v in ((f"{name}.P", P[i, j]), (f"{name}.Q", Q[i, j]))}
            for i in range(n_max)
        ]
        pool = min(pool, n_max)
        A = rng.standard_normal((pool, L, r, K), dtype=np.float32) / np.sqrt(K)
        B = 0.01 * rng.standard_normal((pool, L, D, r), dtype=np.float32)
        pool_states = [
            {
                k: v
                for j, name in enumerate(LAYERS)
                for k, v in (
                    (f"base_model.model.{name}.lora_A.weight", A[c, j]),
                    (f"base_model.model.{name}.lora_B.weight", B[c, j]),
                )
            }
            for c in range(pool)
        ]
        self.lora = [pool_states[i % pool] for i in range(n_max)]
        self.pool = pool


def flexlora_dense_ref(
    states: Sequence[dict[str, np.ndarray]], weights: np.ndarray, ranks: Sequence[int]
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Textbook FlexLoRA server step: dense Σ pᵢBᵢAᵢ (float64), SVD, truncation per distinct rank."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    prefixes = [k[: -len(".lora_A.weight")] for k in states[0] if k.endswith(".lora_A.weight")]
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for prefix in prefixes:
        ka, kb = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        B_stack = np.concatenate([pi * s[kb].astype(np.float64) for pi, s in zip(p, states)], axis=1)
        A_stack = np.concatenate([s[ka].astype(np.float64) for s in states], axis=0)
        acc = B_stack @ A_stack  # Σ pᵢBᵢAᵢ as one GEMM (faster than n rank-r updates)
        del B_stack, A_stack
        U, S, Vt = np.linalg.svd(acc, full_matrices=False)
        trunc = {}
        for rk in sorted(set(ranks)):
            root = np.sqrt(S[:rk])
            trunc[rk] = ((U[:, :rk] * root).astype(np.float32), (root[:, None] * Vt[:rk]).astype(np.float32))
        out[prefix] = trunc
    return out


def make_fns(c: Clients, n: int, strategies: Sequence[str]) -> dict[str, Callable[[], Any]]:
    from fedlora.aggregation import exact_mean, hetero_mean, stack_inner
    from fedlora.lora_math import flexlora_aggregate

    w = c.counts[:n]
    r = c.r
    ranks = [r] * n
    all_fns: dict[str, Callable[[], Any]] = {
        "fedsb": lambda: exact_mean(c.sb[:n], w),
        "hetero": lambda: hetero_mean(c.hetero[:n], w, r),
        "flora": lambda: stack_inner(c.pq[:n], w, r=r),
        "flexlora": lambda: flexlora_aggregate(c.lora[:n], w, ranks),
        "flexlora-dense": lambda: flexlora_dense_ref(c.lora[:n], w, ranks),
    }

    def discard(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            fn()  # the result is dropped (refcount) inside the timed call; no gc.collect (~0.1 s here)

        return run

    return {s: discard(all_fns[s]) for s in strategies}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = bench_parser(__doc__, "smoke size: r=16, n in {5, 20}")
    ap.add_argument("--ranks", default=None, help="comma list of r (default 64,16)")
    ap.add_argument("--clients", default=None, help="comma list of n (default 10,100,1000)")
    ap.add_argument("--strategies", default=",".join(NESTED + FLEX))
    ap.add_argument("--pool", type=int, default=100, help="distinct LoRA clients reused cyclically")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7/5/3 by n; quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="numpy OpenBLAS threads (default 1: on this shared 2-core box multi-threaded LAPACK is "
                         "slowed several-fold by other load, which would flatter the nested speed-up); 0 = leave")
    a = ap.parse_args(argv)
    a.ranks = [int(x) for x in (a.ranks or ("16" if a.quick else "64,16")).split(",")]
    a.clients = [int(x) for x in (a.clients or ("5,20" if a.quick else "10,100,1000")).split(",")]
    a.strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    return a


def _repeats(a: argparse.Namespace, n: int) -> int:
    if a.repeats:
        return a.repeats
    if a.quick:
        return 2
    return 7 if n <= 10 else 5 if n <= 100 else 3


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.blas_threads > 0 and not set_blas_threads(a.blas_threads):
        print(f"warning: could not set the BLAS thread count to {a.blas_threads}")
    dest, info = start(a.out_dir)
    print(f"{len(LAYERS)} layers of {D}x{K}; strategies {a.strategies}; ranks {a.ranks}; clients {a.clients}")
    rows: list[dict[str, Any]] = []
    for r in a.ranks:
        c = Clients(r, max(a.clients), a.pool)
        for n in a.clients:
            reps = _repeats(a, n)
            times = interleaved_timings(make_fns(c, n, a.strategies), repeats=reps, warmup=a.warmup)
            med = {s: summary(t)[0] for s, t in times.items()}
            flex = {s: med[s] for s in FLEX if s in med}
            best_flex = min(flex.values()) if flex else float("nan")
            for s, t in times.items():
                m, mn = summary(t)
                row = {
                    "r": r, "n_clients": n, "strategy": s, "median_s": m, "min_s": mn, "rounds": reps,
                    "lora_pool": min(a.pool, n) if s in FLEX else "",
                    "speedup_vs_best_flexlora": best_flex / m,
                }
                for f in FLEX:
                    if f in med:
                        row[f"speedup_vs_{f}"] = med[f] / m
                rows.append(row)
                print(f"r={r:3d} n={n:5d} {s:15s} median {m:9.4f} s  min {mn:9.4f} s  ({reps} rounds)", flush=True)
        del c
        gc.collect()

    cols = ["r", "n_clients", "strategy", "median_s", "min_s", "speedup_vs_best_flexlora"]
    cols += [f"speedup_vs_{f}" for f in FLEX if f in a.strategies]
    print("\nmedian time per aggregation (s); speed-up = FlexLoRA median / strategy median (same rounds)")
    print(format_table(rows, cols))

    r_t, n_t = max(a.ranks), max(a.clients)
    print()
    target_note = "" if (r_t, n_t) == (64, 1000) else " [the target is defined at r=64, n=1000]"
    for s in ("fedsb", "hetero"):
        hit = [x for x in rows if x["r"] == r_t and x["n_clients"] == n_t and x["strategy"] == s]
        if not hit:
            continue
        for f, label in (("flexlora-dense", "textbook dense FlexLoRA (GEMM + SVD + truncation)"),
                         ("flexlora", "fedlora.lora_math.flexlora_aggregate")):
            if f"speedup_vs_{f}" in hit[0]:
                sp = hit[0][f"speedup_vs_{f}"]
                print(f"{verdict(sp, TARGET_SPEEDUP, higher_is_better=True)} {s} vs {label}: {sp:.0f}x at r={r_t}, "
                      f"n={n_t} (target >= {TARGET_SPEEDUP:.0f}x){target_note}")
    d_k_over_r2 = D * K / r_t**2
    print(f"note: per client and layer the dense sum costs 2·d·r·k flops vs 2·r² for the r×r mean, a ratio of "
          f"d·k/r² = {d_k_over_r2:.0f} at d=k={D}, r={r_t}; the r×r mean is memory/overhead-bound, the GEMM is not.")

    csv_path = write_csv(dest / "server_aggregation.csv", rows, info)
    print(f"\nCSV: {csv_path}")
    _plot(rows, a.ranks, dest / "server_aggregation.png")
    return {"rows": rows, "csv": csv_path}


def _plot(rows, ranks, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, axes = plt.subplots(1, len(ranks), figsize=(5 * len(ranks), 3.8), squeeze=False)
    for ax, r in zip(axes[0], ranks):
        for s in dict.fromkeys(x["strategy"] for x in rows):
            pts = sorted((x["n_clients"], x["median_s"]) for x in rows if x["r"] == r and x["strategy"] == s)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel("aggregation time, median (s)")
        ax.set_title(f"12 layers 384x384, r={r}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
