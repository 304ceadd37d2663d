"""Communication per client per round MEASURED from the app's real Flower messages.

For every (model, task head on/off, r, strategy) this runs a small federation in one process: the real
ServerApp loop (:func:`simulations.server_app.run_server`, stable-id grid, strategy screening and
accounting) and the real ClientApp (:func:`clients.client_app.make_client_app`, its query and train
handlers), joined by an in-process ``Grid`` that hands each instruction ``Message`` to the ClientApp
and returns its reply ``Message`` (no Ray, no network). The byte counts are the strategy's own
accounting of those messages, the same numbers every run writes to ``metrics.jsonl``:

- ``payload`` = Σ elements × item size of the ArrayRecord the message carries;
- ``serialized`` = what Flower 1.41+ transmits for those numbers: the deflated objects of the packed
  ArrayRecord (one Array per dtype: payload + npy header + keys + object headers) plus the ``layout``
  entry of the message's ConfigRecord (:mod:`strategies.wire`);
- ``*_overhead_pct`` = (serialized − payload) / payload, in %.

Per client = the round's total ÷ the clients that were sent an instruction (download) or replied
(upload); every client trains (``fraction-train=1``). Round 2 is reported: it is the steady state
(``flora-lora`` downloads the stacked factors of round 1's clients). Each client trains one step of
batch 2 (the values do not change the sizes). ``hetero`` uses ranks ``r,r/2,r/4`` over the nodes.

The analytic figure of :mod:`bench.comm` (formulas on layer shapes, fp32) is printed beside the measured
payload as a cross-check, using the ranks the strategy actually assigned.

Targets (query + value as in :mod:`bench.comm`): upload ≤ 1/40 of FedIT at r=16 on MiniLM; fedsb's wire
overhead ≤ 5% of its payload (up and down) at r=16 on MiniLM without head.

    python -m bench.comm_measured                 # MiniLM + SmolLM2, r ∈ {4, 16, 64}, head on/off
    python -m bench.comm_measured --quick         # MiniLM, r=4, fedsb + fedit, no head
    python -m bench.comm_measured --models minilm --ranks 16 --heads no    # the rows of both targets
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import bench_parser, format_table, start, verdict, write_csv
from bench.comm import STRATEGIES, per_layer

#: model alias -> (LoRA targets, head module, target description)
MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("query,value", "classifier"),
    "smollm2": ("q_proj,v_proj", "score"),
}
UPLOAD_TARGET = 40.0  # FedIT upload / fedsb upload at r=16 on MiniLM must be >= this
OVERHEAD_TARGET = 5.0  # fedsb's (serialized - payload) / payload in % at r=16 on MiniLM without head: <= this


def run_config(model: str, strategy: str, r: int, head: bool, clients: int, results_dir: str) -> dict[str, Any]:
    """The run-config overrides of one measured federation (2 rounds, 1 local step, no evaluation)."""
    targets, head_module = MODELS[model]
    cfg: dict[str, Any] = {
        "model": model, "task": "seq-cls", "dataset": "rotten_tomatoes", "strategy": strategy, "rank": r,
        "inner-rank": max(1, r // 4), "target-modules": targets, "modules-to-save": head_module if head else "none",
        "num-server-rounds": 2, "num-partitions": clients, "partitioner": "iid", "fraction-train": 1.0,
        "min-train-nodes": clients, "min-available-nodes": clients, "local-steps": 1, "batch-size": 2,
        "max-length": 16, "central-eval": False, "checkpoint": False, "export-adapter": False,
        "results-dir": results_dir, "run-name": f"{model}-{'head' if head else 'nohead'}-r{r}-{strategy}",
    }
    if strategy == "hetero":
        cfg["ranks"] = ",".join(str(max(1, r // f)) for f in (1, 2, 4))
    return cfg


def measure(overrides: dict[str, Any], clients: int) -> dict[str, Any]:
    """Run the federation of ``overrides`` in process; return round 2's record from ``metrics.jsonl``."""
    from simulations.inprocess import run_in_process
    from simulations.results import RunOutputs

    run_dir = run_in_process(overrides, clients)
    last = RunOutputs(run_dir).read_metrics()[-1]
    if last.get("round") != 2 or last.get("clients-used") != clients:
        raise RuntimeError(f"{run_dir.name}: round 2 used {last.get('clients-used')} of {clients} clients "
                           f"(rejected: {last.get('rejected')})")
    return last


def analytic_payload(model_shapes, strategy: str, r: int, ranks: list[int], clients: int, head_floats: int,
                     ) -> tuple[float, float]:
    """Analytic fp32 (up, down) bytes per client from :func:`bench.comm.per_layer`, with the actual ranks."""
    q = max(1, r // 4)
    up = down = 0.0
    for _, d, k in model_shapes.layers:
        if strategy == "hetero":
            up += sum(x * x for x in ranks) / len(ranks)
            down += r * r
        else:
            u, dn, _ = per_layer(strategy, d, k, r, clients, q)
            up, down = up + u, down + dn
    return 4 * (up + head_floats), 4 * (down + head_floats)


def _shapes(model: str):
    from bench.comm import minilm, smollm2

    return {"minilm": minilm, "smollm2": smollm2}[model]()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    dest, info = start(a.out_dir)
    print(f"MEASURED communication per client per round (round 2 of an in-process federation of {a.clients} "
          "clients; payload = elements x itemsize of the messages' ArrayRecords)\n")
    from fedlora.experiment import build_model, quiet_libraries

    quiet_libraries()
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedlora-comm-") as tmp:
        for model in a.models:
            shapes = _shapes(model)
            for head in a.heads:
                block: list[dict[str, Any]] = []
                for r in a.ranks:
                    for strategy in a.strategies:
                        t0 = time.perf_counter()
                        rec = measure(run_config(model, strategy, r, head, a.clients, tmp), a.clients)
                        n_down, n_up = rec["clients-sampled"], rec["clients-replied"]
                        ranks = sorted(int(x) for x in rec["ranks"].values())
                        head_floats = shapes.head_floats if head else 0
                        an_up, an_down = analytic_payload(shapes, strategy, r, ranks, n_up, head_floats)
                        block.append({
                            "model": model, "head": "yes" if head else "no", "r": r, "strategy": strategy,
                            "clients": n_up, "ranks": "/".join(str(x) for x in sorted(set(ranks), reverse=True)),
                            "up_bytes": rec["upload-bytes"] / n_up, "down_bytes": rec["download-bytes"] / n_down,
                            "up_serialized": rec["upload-serialized-bytes"] / n_up,
                            "down_serialized": rec["download-serialized-bytes"] / n_down,
                            "analytic_up": an_up, "analytic_down": an_down,
                            "seconds": round(time.perf_counter() - t0, 1),
                        })
                        build_model.cache_clear()
                        gc.collect()
                _add_ratios(block)
                rows += block
                print(f"{model}, head: {'yes (' + MODELS[model][1] + ')' if head else 'no'}")
                print(format_table(block, ["r", "strategy", "ranks", "up_bytes", "down_bytes", "up_serialized",
                                           "down_serialized", "up_overhead_pct", "down_overhead_pct",
                                           "fedit_over_up", "fedit_over_total", "analytic_up", "analytic_down"]))
                print()
    print("bytes per client per round; fedit_over_* = FedIT's bytes / the strategy's (same model, head, r);")
    print("*_overhead_pct = (serialized - payload) / payload in %.")
    print("analytic_* = bench.comm formulas (fp32) with the ranks actually assigned.")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    target = [x for x in rows if x["model"] == "minilm" and x["r"] == 16 and x["strategy"] == "fedsb"]
    for x in target:
        print(f"target: MiniLM r=16 head={x['head']}: FedIT/fedsb upload = {x['fedit_over_up']:.1f}x "
              f"(>= {UPLOAD_TARGET:.0f}x) {verdict(x['fedit_over_up'], UPLOAD_TARGET, higher_is_better=True)}")
    for x in (x for x in target if x["head"] == "no"):
        worst = max(x["up_overhead_pct"], x["down_overhead_pct"])
        print(f"target: MiniLM r=16 head=no: fedsb wire overhead up {x['up_serialized'] - x['up_bytes']:.0f} B "
              f"({x['up_overhead_pct']:.2f}%), down {x['down_serialized'] - x['down_bytes']:.0f} B "
              f"({x['down_overhead_pct']:.2f}%) (<= {OVERHEAD_TARGET:.0f}%) {verdict(worst, OVERHEAD_TARGET)}")
    csv_path = write_csv(dest / "comm_measured.csv", rows, info)
    print(f"\nCSV: {csv_path}")
    if rows:
        _plot(rows, dest / "comm_measured.png")
    return {"rows": rows, "csv": csv_path}


def _add_ratios(block: list[dict[str, Any]]) -> None:
    """Add ``fedit_over_*`` (FedIT's bytes / the row's, same model, head, r) and ``*_overhead_pct``."""
    for x in block:
        for way in ("up", "down"):
            x[f"{way}_overhead_pct"] = 100 * (x[f"{way}_serialized"] / x[f"{way}_bytes"] - 1)
        ref = next((y for y in block if y["r"] == x["r"] and y["strategy"] == "fedit"), None)
        x["fedit_over_up"] = ref["up_bytes"] / x["up_bytes"] if ref else None
        x["fedit_over_total"] = ((ref["up_bytes"] + ref["down_bytes"]) / (x["up_bytes"] + x["down_bytes"])
                                 if ref else None)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((x["model"], x["head"]) for x in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (model, head) in zip(axes[0], panels):
        sub = [x for x in rows if x["model"] == model and x["head"] == head]
        strategies = list(dict.fromkeys(x["strategy"] for x in sub))
        ranks = sorted({x["r"] for x in sub})
        width = 0.8 / len(ranks)
        for j, r in enumerate(ranks):
            vals = [next((x["up_bytes"] + x["down_bytes"] for x in sub if x["r"] == r and x["strategy"] == s), 0)
                    for s in strategies]
            ax.bar([i + j * width for i in range(len(strategies))], vals, width, label=f"r={r}")
        ax.set_xticks([i + width * (len(ranks) - 1) / 2 for i in range(len(strategies))])
        ax.set_xticklabels(strategies, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("bytes / client / round (up + down)")
        ax.set_title(f"{model}, head {head}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("MEASURED communication (payload of the app's messages)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = bench_parser(__doc__, "MiniLM, r=4, fedsb and fedit, no head (smoke test)")
    ap.add_argument("--models", default=None, help="comma list of minilm,smollm2 (default both)")
    ap.add_argument("--ranks", default=None, help="comma list of r (default 4,16,64)")
    ap.add_argument("--strategies", default=None, help=f"comma list (default {','.join(STRATEGIES)})")
    ap.add_argument("--heads", default=None, help="comma list of no,yes: without / with the task head "
                                                  "(default both)")
    ap.add_argument("--clients", type=int, default=10, help="SuperNodes in the federation (default 10)")
    a = ap.parse_args(argv)
    a.models = _csv(a.models or ("minilm" if a.quick else "minilm,smollm2"))
    a.ranks = [int(x) for x in _csv(a.ranks or ("4" if a.quick else "4,16,64"))]
    a.strategies = _csv(a.strategies or ("fedit,fedsb" if a.quick else ",".join(STRATEGIES)))
    heads = _csv(a.heads or ("no" if a.quick else "no,yes"))
    if set(heads) - {"no", "yes"}:
        ap.error(f"--heads: {a.heads!r}: a comma list of no, yes")
    a.heads = [h == "yes" for h in dict.fromkeys(heads)]
    if a.quick:
        a.clients = min(a.clients, 3)
    for m in a.models:
        if m not in MODELS:
            ap.error(f"--models: unknown model {m!r}; choose from {sorted(MODELS)}")
    for s in a.strategies:
        if s not in STRATEGIES:
            ap.error(f"--strategies: unknown strategy {s!r}; choose from {list(STRATEGIES)}")
    if a.clients < 2:
        ap.error("--clients must be >= 2")
    return a


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    main()
