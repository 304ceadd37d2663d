"""Outer factors on different numeric code paths: how much they differ, whether the checks tell, and what
aggregating with mixed factors would cost.

For a real model (MiniLM, every default target, r = 16, ``svd-method = full``) the outer factors are computed in
fresh processes on this machine's default MKL code path and on the paths ``MKL_CBWR=AVX2`` and
``MKL_CBWR=COMPATIBLE`` (Intel MKL's conditional numerical reproducibility branches: the kernels another CPU
would run). For each odd path it reports

* how many float32 values of B and A differ from the default path's, and the largest difference;
* whether the exact fingerprint differs (it does: bit equality cannot work on mixed hardware);
* the sketch check's largest difference (``outer-factors = "local"``; tolerance 1e-4) and the fit check's
  largest relative error (what a node checks against the server's factors; tolerance 1e-3);
* the aggregation error of nodes that compute their own factors: one node per path, each with a random update
  Rᵢ (entries ~ 1e-2, the size trained updates reach), aggregated in r×r space with the server's (default-path)
  factors, against the explicit mean of the nodes' true ΔWᵢ = s·Bᵢ·Rᵢ·Aᵢ; relative max error over the layers.
  With the server's factors (``outer-factors = "server"``, the default) this error is 0 by construction.

    python -m bench.outer_paths            # MiniLM, r = 16
    python -m bench.outer_paths --quick    # r = 4, first 4 layers
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench._common import bench_parser, start

PATHS = {"default": {}, "MKL_CBWR=AVX2": {"MKL_CBWR": "AVX2"}, "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"}}
CHILD = """
import sys
from fedlora.experiment import adapter_for, build_model
from fedlora.nested import outer_bundle_of
from fedlora.outer_bundle import OuterBundleStore
from fedlora.run_config import parse_run_config
model = build_model(parse_run_config({"svd-method": "full", "rank": int(sys.argv[2])}).spec())
bundle = outer_bundle_of(model)
OuterBundleStore(sys.argv[1]).put(bundle)
print(bundle.digest, adapter_for("fedsb").fingerprint(model))
"""


def factors_on(env: dict[str, str], r: int, work: Path) -> tuple[object, str]:
    """(the bundle a fresh process computes on this code path, its exact fingerprint)."""
    from fedlora.outer_bundle import OuterBundleStore

    cache, store = work / f"cache-{len(os.listdir(work))}", work / "bundles"
    out = subprocess.run([sys.executable, "-c", CHILD, str(store), str(r)], capture_output=True, text=True,
                         check=True, env={**os.environ, **env, "FEDLORA_CACHE": str(cache)}).stdout.split()
    return OuterBundleStore(store).get(out[-2]), out[-1]


def compare(server, node, weights: dict[str, torch.Tensor], layers: list[str], rng: np.random.Generator
            ) -> dict[str, float]:
    """Differences of ``node``'s factors from ``server``'s, the checks' verdicts (against the real base
    ``weights``) and the aggregation error."""
    from fedlora.outer_bundle import check_sketch, fit_error, sketch

    changed = total = 0
    worst = agg = 0.0
    for name in layers:
        s, n = server.factors[name], node.factors[name]
        for a, b in ((s.U, n.U), (s.Vh, n.Vh)):
            changed += int((a != b).sum())
            total += a.numel()
            worst = max(worst, float((a.double() - b.double()).abs().max()))
        R = [rng.normal(0, 1e-2, (s.S.numel(), s.S.numel())) for _ in range(2)]
        Bs, As = s.U.double().numpy(), s.Vh.double().numpy()
        Bn, An = n.U.double().numpy(), n.Vh.double().numpy()
        aggregated = Bs @ ((R[0] + R[1]) / 2) @ As  # what the server computes with its own factors
        truth = (Bs @ R[0] @ As + Bn @ R[1] @ An) / 2  # node 0 on the server's path, node 1 on its own
        agg = max(agg, float(np.abs(aggregated - truth).max() / np.abs(truth).max()))
    fit = max(float(fit_error(weights[x], node.factors[x]).abs().max()) for x in layers)
    return {"float32_values_changed": changed, "float32_values": total, "max_abs_diff": worst,
            "sketch_max_diff": check_sketch(node, sketch(server)), "fit_max_rel_error": fit,
            "aggregation_rel_error": agg}


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__ or "", "r = 4, first 4 layers").parse_args(argv)
    dest, info = start(args.out_dir)
    r = 4 if args.quick else 16
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        got = {label: factors_on(env, r, Path(tmp)) for label, env in PATHS.items()}
    server, server_fp = got["default"]
    layers = list(server.factors)[: 4 if args.quick else None]
    from fedlora.models import load_model

    base = load_model("minilm", task="seq-cls", num_labels=2)
    weights = {x: base.get_submodule(x).weight for x in layers}
    for label, (bundle, fp) in got.items():
        if label == "default":
            continue
        row = compare(server, bundle, weights, layers, np.random.default_rng(0))
        row["fingerprint_differs"] = fp != server_fp
        rows[label] = row
        print(f"{label:22s} changed {row['float32_values_changed']}/{row['float32_values']} float32 values "
              f"(max |diff| {row['max_abs_diff']:.2e}), fingerprint differs: {row['fingerprint_differs']}, "
              f"sketch {row['sketch_max_diff']:.2e} (tol 1e-4), fit {row['fit_max_rel_error']:.2e} (tol 1e-3), "
              f"aggregation error with own factors {row['aggregation_rel_error']:.2e}")
    (dest / "outer_paths.json").write_text(json.dumps({"machine": info, "r": r, "layers": len(layers),
                                                       "paths": rows}, indent=2))


if __name__ == "__main__":
    main()
