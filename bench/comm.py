"""Communication per client per round — ANALYTIC part (formulas on layer shapes, no messages sent).

Bytes measured from the real Flower messages of the app: ``python -m bench.comm_measured``; this file only
counts floats.
Writes ``comm_analytic.csv`` / ``comm_analytic.png``.

Per adapted d×k layer (W is out×in), client rank r, n clients, inner rank q (nested ``flora``):

  strategy    up (client → server)        down (server → client)
  fedit       r(d+k)  A and B             r(d+k)  mean A, mean B
  ffa         r·d     B only              r·d     mean B (A frozen, shared by seed: 0; else r·k once)
  flora-lora  r(d+k)                      n·r(d+k) the stacked factors of all n clients (Σrᵢ(d+k))
  flexlora    r(d+k)                      r(d+k)  the client's truncated pair
  fedsb       r²                          r²      the global R (r×r)
  hetero      rᵢ², rᵢ ∈ {r, r/2, r/4}      r²      the full global state (design condition 4)
              (mean over that mix)
  flora       2·r·q  P and Q, q = r/4     r²      R0 after stacking

Nested strategies also need the outer factors B, A once: r(d+k) per layer, or 0 when every client
recomputes them from the same pretrained weights (the fingerprint check makes that safe); shown in
column ``one_time_floats``. The task head (``modules_to_save``) travels in full both ways when
included. Bytes are fp32 (4 bytes per float; bf16 halves them).

Models (targets, shapes from their configs):
  MiniLM (all-MiniLM-L6-v2): query, value over 6 layers, 384×384; head classifier 384×2+2
  SmolLM2-135M: q_proj 576×576 (9 heads × 64), v_proj 192×576 (3 kv heads × 64) over 30 layers;
      seq-cls head ``score`` 576×2 (no bias)
  Llama-3-8B: 32 layers; q, o 4096×4096; k, v 1024×4096; gate, up 14336×4096; down 4096×14336;
      seq-cls head ``score`` 4096×2 (no bias)

    python -m bench.comm            # r ∈ {4, 16, 64}, n = 10
    python -m bench.comm --quick
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from bench._common import bench_parser, format_table, start, write_csv
from simulations.console import format_bytes

STRATEGIES = ("fedit", "ffa", "flora-lora", "flexlora", "fedsb", "hetero", "flora")
NESTED = {"fedsb", "hetero", "flora"}
BYTES_PER_FLOAT = 4


@dataclass(frozen=True)
class ModelShapes:
    name: str
    layers: list[tuple[str, int, int]]  # (module, d, k) for every adapted matrix
    head_floats: int
    head_desc: str


def _llama_like(name: str, n_layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                inter: int, targets: list[str], num_labels: int = 2) -> ModelShapes:
    shapes = {
        "q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }
    layers = [(f"model.layers.{i}.{t}", *shapes[t]) for i in range(n_layers) for t in targets]
    return ModelShapes(name, layers, hidden * num_labels, f"score {hidden}x{num_labels}")


def minilm() -> ModelShapes:
    layers = [(f"bert.encoder.layer.{i}.attention.self.{t}", 384, 384) for i in range(6) for t in ("query", "value")]
    return ModelShapes("MiniLM-L6 (q,v x6)", layers, 384 * 2 + 2, "classifier 384x2+2")


def smollm2() -> ModelShapes:
    # LlamaConfig of SmolLM2-135M: hidden 576, 9 heads, 3 kv heads, head_dim 64, 30 layers, MLP 1536
    return _llama_like("SmolLM2-135M (q,v x30)", 30, 576, 9, 3, 64, 1536, ["q_proj", "v_proj"])


def llama3_8b() -> ModelShapes:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return _llama_like("Llama-3-8B (all 7 x32)", 32, 4096, 32, 8, 128, 14336, targets)


def per_layer(strategy: str, d: int, k: int, r: int, n: int, q: int) -> tuple[float, float, float]:
    """(up, down, one-time) floats for one d×k layer and one client."""
    lora = r * (d + k)
    if strategy == "fedit":
        return lora, lora, 0
    if strategy == "ffa":
        return r * d, r * d, 0
    if strategy == "flora-lora":
        return lora, n * lora, 0
    if strategy == "flexlora":
        return lora, lora, 0
    if strategy == "fedsb":
        return r * r, r * r, lora
    if strategy == "hetero":
        mix = [r, max(1, r // 2), max(1, r // 4)]
        return sum(x * x for x in mix) / len(mix), r * r, lora
    if strategy == "flora":
        return 2 * r * q, r * r, lora
    raise ValueError(strategy)


def model_rows(m: ModelShapes, ranks: list[int], n: int, head: bool) -> list[dict[str, Any]]:
    rows = []
    for r in ranks:
        q = max(1, r // 4)
        if any(r > min(d, k) for _, d, k in m.layers):
            continue
        totals = {}
        for s in STRATEGIES:
            up = down = once = 0.0
            for _, d, k in m.layers:
                u, dn, o = per_layer(s, d, k, r, n, q)
                up, down, once = up + u, down + dn, once + o
            if head:
                up, down = up + m.head_floats, down + m.head_floats
            totals[s] = (up, down, once)
        f_up, f_down, _ = totals["fedit"]
        for s, (up, down, once) in totals.items():
            rows.append({
                "model": m.name, "head": "yes" if head else "no", "head_floats": m.head_floats if head else 0,
                "adapted_matrices": len(m.layers), "r": r, "q": q if s == "flora" else "",
                "n_clients": n if s == "flora-lora" else "", "strategy": s,
                "up_floats": up, "down_floats": down, "total_floats": up + down,
                "up_bytes": up * BYTES_PER_FLOAT, "down_bytes": down * BYTES_PER_FLOAT,
                "total_bytes": (up + down) * BYTES_PER_FLOAT,
                "one_time_floats": once,
                "fedit_over_up": f_up / up, "fedit_over_down": f_down / down,
                "fedit_over_total": (f_up + f_down) / (up + down),
            })
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = bench_parser(__doc__, "same formulas, r=16 only")
    ap.add_argument("--ranks", default=None, help="comma list of r (default 4,16,64)")
    ap.add_argument("--clients", type=int, default=10, help="n, for the FLoRA-LoRA download")
    a = ap.parse_args(argv)
    a.ranks = [int(x) for x in (a.ranks or ("16" if a.quick else "4,16,64")).split(",")]
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    dest, info = start(a.out_dir)
    print("ANALYTIC communication per client per round (floats from shapes; fp32 bytes); "
          f"flora-lora download assumes n={a.clients} clients\n")

    # sanity anchor from docs/design.md §2: d=k=4096, r=32: LoRA 262,144 vs nested 1,024 floats per layer (256x)
    lo, _, _ = per_layer("fedit", 4096, 4096, 32, 1, 8)
    ne, _, _ = per_layer("fedsb", 4096, 4096, 32, 1, 8)
    print(f"anchor d=k=4096 r=32: LoRA {lo:,.0f} vs nested {ne:,.0f} floats per layer per direction "
          f"({lo / ne:.0f}x; the design says 256x) {'PASS' if lo / ne == 256 else 'MISS'}\n")

    rows: list[dict[str, Any]] = []
    for m in (minilm(), smollm2(), llama3_8b()):
        for head in (False, True):
            mrows = model_rows(m, a.ranks, a.clients, head)
            rows += mrows
            wide = []
            for s in STRATEGIES:
                row: dict[str, Any] = {"strategy": s}
                for x in (x for x in mrows if x["strategy"] == s):
                    row[f"r={x['r']} up"] = format_bytes(x["up_bytes"])
                    row[f"r={x['r']} down"] = format_bytes(x["down_bytes"])
                    row[f"r={x['r']} fedit/x"] = x["fedit_over_total"]
                wide.append(row)
            print(f"{m.name}, {len(m.layers)} adapted matrices, head: "
                  f"{m.head_desc + ' (' + str(m.head_floats) + ' floats)' if head else 'none'}")
            print(format_table(wide))
            print()
    print("fedit/x = FedIT's (up+down) bytes divided by the strategy's: how many times less traffic than FedIT.")
    print("nested strategies add r(d+k) floats per layer once for the outer factors, or 0 if clients recompute "
          "them (fingerprint-checked); see one_time_floats in the CSV.")

    csv_path = write_csv(dest / "comm_analytic.csv", rows, info)
    print(f"\nCSV: {csv_path}")
    _plot(rows, dest / "comm_analytic.png")
    return {"rows": rows, "csv": csv_path}


def _plot(rows: list[dict[str, Any]], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    models = list(dict.fromkeys(x["model"] for x in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        sub = [x for x in rows if x["model"] == m and x["head"] == "no"]
        ranks = sorted({x["r"] for x in sub})
        width = 0.8 / max(1, len(ranks))
        for j, r in enumerate(ranks):
            vals = [next(x["total_bytes"] for x in sub if x["r"] == r and x["strategy"] == s) for s in STRATEGIES]
            ax.bar([i + j * width for i in range(len(STRATEGIES))], vals, width, label=f"r={r}")
        ax.set_xticks([i + width * (len(ranks) - 1) / 2 for i in range(len(STRATEGIES))])
        ax.set_xticklabels(STRATEGIES, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("bytes per client per round (up+down, fp32)")
        ax.set_title(m, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("ANALYTIC communication (no task head)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
