"""DP-SGD overhead: DP step time / non-DP step time, nested ``sb`` r=16 vs peft LoRA r=16, side by side.

Model: MiniLM (all-MiniLM-L6-v2) sequence classification, adapters on ``query`` and ``value`` of all 6
layers, the classifier head trainable in every variant (``bench._minilm.adapt``). Batch 16 × seq 64:
real Rotten Tomatoes text padded/truncated to 64 tokens when ``fedlora.data`` and its data package are
installed, random token ids otherwise (the run prints which: ``bench._minilm.make_batch``).

Variants (one model instance each, all in one process, timed interleaved with rotated order after
warm-up; median and min of N rounds — ``bench._common.timed``):

* ``<adapter>/none``  : zero_grad + forward + per-example CE (mean) + backward + AdamW.step
* ``<adapter>/hooks`` : ``fedlora.privacy.dp_step`` — opacus per-sample gradients (hooks), flat clipping
  at C = 1, Gaussian noise σ = 1, AdamW.step, accountant step
* ``<adapter>/ghost`` : the same with opacus ghost clipping (per-sample norms, two backward passes)

The DP variants use the same fixed batch as the non-DP ones (no Poisson sampling inside the timed step),
so the ratio isolates the per-step DP overhead. Both wall time and process CPU time are recorded (CPU time
is the robust one on a shared machine). Target: nested DP(hooks)/non-DP ≤ 2.0.

    python -m bench.dp_step_time            # full size (N = 20)
    python -m bench.dp_step_time --quick    # smoke size
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench._common import format_table, start, timed, verdict, write_csv
from bench._minilm import adapt, load_base, make_batch
from fedlora.training import trainable_parameters

ADAPTERS = ("nested-sb", "lora")
DP_MODES = ("none", "hooks", "ghost")
TARGET_RATIO = 2.0


def _step_fn(model: Any, batch: dict[str, Any], dp_mode: str, sigma: float, clip: float, seed: int):
    """A zero-argument training step for ``model`` in ``dp_mode`` (builds the optimizer / DP setup once)."""
    import torch
    from torch.utils.data import DataLoader

    from fedlora.privacy import AccountantState, dp_step, make_private, per_example_loss

    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    if dp_mode == "none":
        inputs = {k: v for k, v in batch.items() if k != "labels"}

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = per_example_loss(model(**inputs).logits, batch["labels"]).mean()
            loss.backward()
            opt.step()
            return float(loss.detach())

        return step
    n = int(batch["input_ids"].shape[0])
    examples = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    loader = DataLoader(examples, batch_size=n)  # only defines q = 1 and the collate; the step uses `batch`
    setup = make_private(
        model, opt, loader, noise_multiplier=sigma, max_grad_norm=clip,
        accountant_state=AccountantState(mechanism="rdp"), grad_sample_mode=dp_mode, seed=seed,
    )

    def dp() -> float:
        return dp_step(setup, batch)

    return dp


def run(r: int, batch_size: int, seq: int, repeats: int, warmup: int, dp_modes: tuple[str, ...]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    batch, source = make_batch(batch_size, seq)
    fns = {}
    params: dict[str, int] = {}
    for adapter in ADAPTERS:
        for mode in dp_modes:
            model = adapt(load_base(), adapter, r, max(1, r // 4))
            name = f"{adapter}/{mode}"
            params[name] = sum(p.numel() for p in trainable_parameters(model))
            fns[name] = _step_fn(model, batch, mode, sigma=1.0, clip=1.0, seed=0)
    times = timed(fns, repeats=repeats, warmup=warmup)
    rows = []
    for adapter in ADAPTERS:
        base = times[f"{adapter}/none"]
        for mode in dp_modes:
            t = times[f"{adapter}/{mode}"]
            rows.append({
                "adapter": adapter, "dp": mode, "r": r, "batch": batch_size, "seq": seq,
                "trainable_params": params[f"{adapter}/{mode}"], **t,
                "ratio_vs_nondp": t["median_s"] / base["median_s"],
                "cpu_ratio_vs_nondp": t["cpu_median_s"] / base["cpu_median_s"], "rounds": repeats, "data": source,
            })
    return {"rows": rows, "source": source}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds N (median of N)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="none,hooks,ghost", help="comma list of none,hooks,ghost")
    ap.add_argument("--quick", action="store_true", help="smoke size: batch 4, seq 16, N = 3")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 makes CPU time robust to other load")
    ap.add_argument("--out-dir", default=None, help="default <repo>/results/bench")
    args = ap.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.seq, args.repeats, args.warmup = 4, 16, 3, 1
    modes = tuple(m for m in args.modes.split(",") if m)
    if "none" not in modes or any(m not in DP_MODES for m in modes):
        ap.error(f"--modes must include 'none' and use only {DP_MODES}")
    dest, info = start(args.out_dir)
    res = run(args.r, args.batch, args.seq, args.repeats, args.warmup, modes)
    rows = res["rows"]
    print(f"data: {res['source']}")
    cols = ["adapter", "dp", "trainable_params", "median_s", "min_s", "ratio_vs_nondp", "cpu_median_s",
            "cpu_ratio_vs_nondp"]
    print(format_table(rows, cols))
    ratios = {(r["adapter"], r["dp"]): r["ratio_vs_nondp"] for r in rows}
    cpu_ratios = {(r["adapter"], r["dp"]): r["cpu_ratio_vs_nondp"] for r in rows}
    checks = []
    for mode in modes:
        if mode == "none":
            continue
        nested, lora = ratios[("nested-sb", mode)], ratios[("lora", mode)]
        c_nested, c_lora = cpu_ratios[("nested-sb", mode)], cpu_ratios[("lora", mode)]
        line = (f"DP({mode})/non-DP median wall: nested-sb {nested:.2f}x, LoRA {lora:.2f}x | "
                f"CPU time: nested-sb {c_nested:.2f}x, LoRA {c_lora:.2f}x")
        if mode == "hooks":
            ok = verdict(nested, TARGET_RATIO)
            checks.append(("nested hooks ratio <= 2.0", ok == "PASS"))
            line += f"   target nested <= {TARGET_RATIO:.1f} (wall): {ok}"
        print(line)
    path = write_csv(dest / "dp_step_time.csv", rows, info)
    print(f"wrote {path}")
    return {"csv": Path(path), "rows": rows, "ratios": ratios, "cpu_ratios": cpu_ratios, "checks": checks}


if __name__ == "__main__":
    main(sys.argv[1:])
