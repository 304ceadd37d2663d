"""Exactness of every aggregation rule: relative error of the aggregated ΔW vs the true mean Σ pᵢΔWᵢ.

For each MiniLM-shaped layer (query 384×384, value 384×384, MLP ``intermediate.dense`` 1536×384,
W is d×k = out×in), n clients with unequal weights pᵢ (random example counts) and random updates:

nested (fedlora.aggregation), outer factors B = U_r, A = V_rᵀ from ``fedlora.outer.truncated_svd``:
  fedsb       Rᵢ (r×r)                         ΔWᵢ = s·B·Rᵢ·A             exact_mean
  hetero      Rᵢ (rᵢ×rᵢ), rᵢ ∈ {r, r/2, r/4}   ΔWᵢ = s·B·pad(Rᵢ)·A        hetero_mean
  flora       Pᵢ (rᵢ×qᵢ), Qᵢ (qᵢ×rᵢ), mixed     ΔWᵢ = s·B·pad(PᵢQᵢ)·A      stack_inner
peft LoRA baselines (fedlora.lora_math), ΔWᵢ = Bᵢ·Aᵢ (scaling folded in):
  fedit       equal ranks, mean A and mean B separately                   fedit_mean   (inexact)
  ffa         equal ranks, one shared frozen A, mean B                    ffa_mean
  flora-lora  ranks {r, r/2, r/4}, stacked factors                        flora_lora_stack
  flexlora    ranks {r, r/2, r/4}: the global dense Σ pᵢBᵢAᵢ, and each client's truncation
              back to its rank (what a client restarts from)           flexlora_aggregate

Client arrays are generated in the tested dtype (fp32 or fp64); the truth Σ pᵢΔWᵢ is computed in
float64 from exactly those arrays; the aggregated ΔW is reconstructed in the tested dtype (what a
model in that precision would apply). Reported: max (and median) relative Frobenius error over seeds.

    python -m bench.exactness            # full size
    python -m bench.exactness --quick    # smoke size
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np

from bench._common import bench_parser, format_table, start, write_csv

LAYERS: dict[str, tuple[int, int]] = {"query": (384, 384), "value": (384, 384), "mlp": (1536, 384)}
DTYPES = {"fp32": np.float32, "fp64": np.float64}
KEY = "bert.encoder.layer.0.attention.self.query"  # any layer name; one layer per aggregation call
EXACT = {"fedsb", "hetero", "flora", "ffa", "flora-lora", "flexlora-dense"}
FP64_TOL = 1e-10
FEDIT_MIN = 1e-2


def _rel(approx: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(approx.astype(np.float64) - truth) / np.linalg.norm(truth))


def _ranks(n: int, r: int) -> list[int]:
    return [(r, max(1, r // 2), max(1, r // 4))[i % 3] for i in range(n)]


def _inner_q(n: int, ranks: list[int], q: int) -> list[int]:
    """Mixed inner ranks: q, q-1, ..., 1 cycling, never above the client's rank."""
    return [min(rk, max(1, q - (i % q))) for i, rk in enumerate(ranks)]


def run_case(
    layer: str, d: int, k: int, r: int, n: int, q: int, dtype: type, seed: int, scaling: float = 1.0
) -> dict[str, float]:
    """All strategies on one layer / dtype / seed; returns strategy → relative error."""
    import torch

    from fedlora.aggregation import exact_mean, hetero_mean, stack_inner
    from fedlora.lora_math import fedit_mean, ffa_mean, flexlora_aggregate, flora_lora_stack
    from fedlora.outer import truncated_svd

    rng = np.random.default_rng([seed, list(LAYERS).index(layer) if layer in LAYERS else 99, d, k])
    counts = rng.integers(20, 1000, size=n).astype(np.float64)  # unequal client sizes
    p = counts / counts.sum()
    W = rng.standard_normal((d, k)) / np.sqrt(k)
    f = truncated_svd(torch.from_numpy(W), r)
    B64, A64 = f.U.numpy(), f.Vh.numpy()  # (d, r), (r, k) orthonormal, fp64
    Bd, Ad = B64.astype(dtype), A64.astype(dtype)
    B, A = Bd.astype(np.float64), Ad.astype(np.float64)  # the factors the clients actually hold
    s = scaling
    ranks = _ranks(n, r)
    out: dict[str, float] = {}

    def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(dtype)

    def nested_dw(R: np.ndarray) -> np.ndarray:
        """ΔW of the r×r aggregate in the tested dtype."""
        return s * Bd @ R.astype(dtype) @ Ad

    # fedsb: full r×r
    Rs = [rand(r, r, scale=0.01) for _ in range(n)]
    truth = sum(pi * s * B @ R.astype(np.float64) @ A for pi, R in zip(p, Rs))
    agg = exact_mean([{f"{KEY}.R": R} for R in Rs], counts)[f"{KEY}.R"]
    out["fedsb"] = _rel(nested_dw(agg), truth)

    # hetero: rᵢ×rᵢ blocks top-left
    Rh = [rand(ri, ri, scale=0.01) for ri in ranks]
    truth = sum(pi * s * B[:, :ri] @ R.astype(np.float64) @ A[:ri] for pi, R, ri in zip(p, Rh, ranks))
    agg = hetero_mean([{f"{KEY}.R": R} for R in Rh], counts, r)[f"{KEY}.R"]
    out["hetero"] = _rel(nested_dw(agg), truth)

    # flora (nested nora): Pᵢ (rᵢ×qᵢ), Qᵢ (qᵢ×rᵢ), mixed outer and inner ranks
    qs = _inner_q(n, ranks, q)
    Ps = [rand(ri, qi, scale=0.1) for ri, qi in zip(ranks, qs)]
    Qs = [rand(qi, ri, scale=0.1) for ri, qi in zip(ranks, qs)]
    truth = sum(
        pi * s * B[:, :ri] @ (P.astype(np.float64) @ Q.astype(np.float64)) @ A[:ri]
        for pi, P, Q, ri in zip(p, Ps, Qs, ranks)
    )
    agg = stack_inner([{f"{KEY}.P": P, f"{KEY}.Q": Q} for P, Q in zip(Ps, Qs)], counts, r=r)[f"{KEY}.R"]
    out["flora"] = _rel(nested_dw(agg), truth)

    # ---- peft LoRA baselines: keys as get_peft_model_state_dict gives them
    pre = f"base_model.model.{KEY}"
    ka, kb = f"{pre}.lora_A.weight", f"{pre}.lora_B.weight"

    def lora_truth(Bs: list[np.ndarray], As: list[np.ndarray]) -> np.ndarray:
        return sum(pi * Bi.astype(np.float64) @ Ai.astype(np.float64) for pi, Bi, Ai in zip(p, Bs, As))

    # fedit: equal ranks, independent A and B
    As = [rand(r, k, scale=1 / np.sqrt(k)) for _ in range(n)]
    Bs = [rand(d, r, scale=0.01) for _ in range(n)]
    agg = fedit_mean([{ka: a, kb: b} for a, b in zip(As, Bs)], counts)
    out["fedit"] = _rel(agg[kb] @ agg[ka], lora_truth(Bs, As))

    # ffa: one shared frozen A
    A_shared = rand(r, k, scale=1 / np.sqrt(k))
    agg = ffa_mean([{ka: A_shared, kb: b} for b in Bs], counts)
    out["ffa"] = _rel(agg[kb] @ agg[ka], lora_truth(Bs, [A_shared] * n))

    # flora-lora and flexlora: heterogeneous ranks
    Ah = [rand(ri, k, scale=1 / np.sqrt(k)) for ri in ranks]
    Bh = [rand(d, ri, scale=0.01) for ri in ranks]
    states = [{ka: a, kb: b} for a, b in zip(Ah, Bh)]
    truth = lora_truth(Bh, Ah)
    Bst, Ast = flora_lora_stack(states, counts)[pre]
    out["flora-lora"] = _rel(Bst @ Ast, truth)
    dense, clients = flexlora_aggregate(states, counts, ranks)
    out["flexlora-dense"] = _rel(dense[pre], truth)
    for rk in sorted(set(ranks), reverse=True):
        errs = [_rel(c[pre][0] @ c[pre][1], truth) for c, ri in zip(clients, ranks) if ri == rk]
        out[f"flexlora-trunc-r{rk}"] = max(errs)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = bench_parser(__doc__, "smoke size: 1 seed, 5 clients")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--q", type=int, default=4, help="largest inner rank of the flora clients")
    ap.add_argument("--clients", type=int, default=None, help="default 8 (quick: 5)")
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (quick: 1)")
    a = ap.parse_args(argv)
    a.clients = a.clients or (5 if a.quick else 8)
    a.seeds = a.seeds or (1 if a.quick else 5)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    dest, info = start(a.out_dir)
    ranks = _ranks(a.clients, a.r)
    print(f"{a.clients} clients, r={a.r}, ranks (hetero/flora-lora/flexlora) {ranks}, "
          f"flora inner ranks {_inner_q(a.clients, ranks, a.q)}, {a.seeds} seed(s), unequal weights")

    results: dict[tuple[str, str, str], list[float]] = {}
    for layer, (d, k) in LAYERS.items():
        for dname, dt in DTYPES.items():
            for seed in range(a.seeds):
                for strat, err in run_case(layer, d, k, a.r, a.clients, a.q, dt, seed).items():
                    results.setdefault((strat, layer, dname), []).append(err)

    strategies = list(dict.fromkeys(s for s, _, _ in results))
    rows = []
    for (strat, layer, dname), errs in results.items():
        d, k = LAYERS[layer]
        rows.append({
            "strategy": strat, "exact_expected": strat in EXACT, "layer": layer, "d": d, "k": k, "r": a.r,
            "n_clients": a.clients, "dtype": dname, "seeds": len(errs),
            "rel_err_max": max(errs), "rel_err_median": statistics.median(errs),
        })

    # wide table: strategy × (layer, dtype), max over seeds
    wide = []
    for strat in strategies:
        row: dict[str, Any] = {"strategy": strat, "exact": "yes" if strat in EXACT else "no"}
        for layer in LAYERS:
            for dname in DTYPES:
                row[f"{layer}/{dname}"] = max(results[(strat, layer, dname)])
        wide.append(row)
    print("\nrelative error ||ΔW_agg - Σ pᵢΔWᵢ||_F / ||Σ pᵢΔWᵢ||_F (max over seeds)")
    print(format_table(wide))

    checks: list[tuple[str, bool]] = []
    for strat in strategies:
        worst = max(max(results[(strat, layer, "fp64")]) for layer in LAYERS)
        if strat in EXACT:
            ok = worst <= FP64_TOL
            checks.append((f"{strat}: fp64 max rel err {worst:.2e} <= {FP64_TOL:g}", ok))
        elif strat == "fedit":
            best = min(min(results[(strat, layer, "fp64")]) for layer in LAYERS)
            checks.append((f"fedit: fp64 min rel err {best:.2e} > {FEDIT_MIN:g} (inexact as expected)",
                           best > FEDIT_MIN))
    print()
    for text, ok in checks:
        print(("PASS " if ok else "MISS ") + text)

    csv_path = write_csv(dest / "exactness.csv", rows, info)
    print(f"\nCSV: {csv_path}")
    return {"rows": rows, "csv": csv_path, "checks": checks}


if __name__ == "__main__":
    main()
