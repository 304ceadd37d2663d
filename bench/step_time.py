"""Nested-core benchmark: training-step time and peak memory of nested adapters vs peft LoRA.

Variants, all on MiniLM (all-MiniLM-L6-v2) sequence classification, adapters on ``query`` and
``value`` of all 6 layers, the classifier head trainable in every variant:

* ``lora``        peft LoRA r=16 (alpha=r, no dropout), ``modules_to_save=["classifier"]``
* ``nested-sb``   ``apply_nested`` r=16, mode ``sb`` (trainable r×r R per layer)
* ``nested-nora`` ``apply_nested`` r=16, mode ``nora``, q=4 (trainable P r×q, Q q×r)

Step = ``zero_grad`` + forward (loss) + backward + ``AdamW.step``, batch 16 × seq 64 (real Rotten
Tomatoes text padded/truncated to exactly 64 tokens when the data package is installed; random token
ids otherwise — the run says which). Step time: all variants live in one process and are timed
interleaved (rotated order every round) after warm-up; median and min of N rounds.

Peak memory: each variant runs in its own fresh subprocess (so variants cannot pollute each other's
allocator). The child loads the base model and the batch, then resets the kernel's RSS high-water
mark (``/proc/self/clear_refs`` = 5), applies the adapter, builds AdamW and runs the steps; it reports
the process peak RSS (VmHWM) and the increment over the RSS just before the adapter was applied.

Targets: nested/LoRA step-time ratio ≤ 1.10 and peak-memory ratio ≤ 1.10.

    python -m bench.step_time            # full size
    python -m bench.step_time --quick    # smoke size
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, format_table, start, timed, verdict, write_csv
from bench._minilm import VARIANTS, adapt, load_base, make_batch
from fedlora.training import trainable_parameters

TARGET_RATIO = 1.10


# ------------------------------------------------------------------------------------- building
def make_step(model: Any, batch: dict[str, Any]) -> tuple[Callable[[], float], int]:
    """A zero-argument AdamW training step of ``model`` on ``batch`` and the number of trainable parameters."""
    import torch

    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------- memory child
def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(
    variant: str, r: int, q: int, batch: int, seq: int, steps: int, real: bool = True
) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS of building ``variant`` and running ``steps`` steps."""
    model = load_base()
    data, _ = make_batch(batch, seq, real=real)
    _trim()
    base_rss = _rss_kib("VmRSS")
    reset = _reset_peak()
    life_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = adapt(model, variant, r, q)
    step, _ = make_step(model, data)
    for _ in range(steps):
        step()
    peak = _rss_kib("VmHWM") if reset else None
    life_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak is None:  # no high-water reset possible: fall back to the lifetime maxrss
        peak = life_after
    return {
        "variant": variant,
        "base_rss_mib": base_rss / 1024 if base_rss else float("nan"),
        "peak_rss_mib": peak / 1024,
        "delta_rss_mib": (peak - base_rss) / 1024 if base_rss else float("nan"),
        "lifetime_maxrss_mib": life_after / 1024,
        "lifetime_maxrss_before_adapter_mib": life_before / 1024,
        "hwm_reset": reset,
    }


def measure_memory(
    variants: Sequence[str], r: int, q: int, batch: int, seq: int, steps: int, repeats: int, threads: int = 0,
    parallel: bool = False, real: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """One fresh subprocess per (variant, repeat), variants interleaved. Run one at a time, or all at
    once with ``parallel`` (smoke runs: RSS is per process, so only the wall time changes)."""
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    jobs = []
    for k in range(repeats):
        order = list(variants[k % len(variants):]) + list(variants[: k % len(variants)])
        jobs += [
            (v, [
                sys.executable, "-m", "bench.step_time", "--child-mem", v, "--r", str(r), "--q", str(q),
                "--batch", str(batch), "--seq", str(seq), "--mem-steps", str(steps), "--threads", str(threads),
                *([] if real else ["--random-data"]),
            ])
            for v in order
        ]

    def collect(v: str, rc: int, out: str, err: str) -> None:
        line = next((ln for ln in out.splitlines() if ln.startswith("MEMJSON ")), None)
        if rc != 0 or line is None:
            raise RuntimeError(f"memory child {v} failed (rc={rc}):\n{err[-3000:]}")
        results[v].append(json.loads(line[len("MEMJSON "):]))

    if parallel:
        procs = [
            (v, subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True))
            for v, cmd in jobs
        ]
        for v, proc in procs:
            out, err = proc.communicate()
            collect(v, proc.returncode, out, err)
    else:
        for v, cmd in jobs:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
            collect(v, proc.returncode, proc.stdout, proc.stderr)
    return results


# ------------------------------------------------------------------------------------- profiling
def profile_variants(models_steps: dict[str, Any], steps: int, path: Path) -> str:
    """torch.profiler over ``steps`` steps per variant; writes and returns the op tables."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    chunks = []
    totals: dict[str, dict[str, float]] = {}
    for name, step in models_steps.items():
        step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(steps):
                step()
        ka = prof.key_averages()
        totals[name] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in ka}
        chunks.append(f"===== {name}: self CPU time summed over {steps} steps, top 20 =====")
        chunks.append(ka.table(sort_by="self_cpu_time_total", row_limit=20))
    if "lora" in totals:
        for name in totals:
            if name == "lora":
                continue
            keys = set(totals[name]) | set(totals["lora"])
            diff = sorted(
                ((totals[name].get(k, 0.0) - totals["lora"].get(k, 0.0), k) for k in keys), reverse=True
            )
            chunks.append(f"===== {name} minus lora: self CPU ms per step, largest differences =====")
            chunks += [f"{d:+9.3f}  {k}" for d, k in diff[:10]]
            chunks.append("   ...")
            chunks += [f"{d:+9.3f}  {k}" for d, k in diff[-5:]]
    text = "\n".join(chunks)
    path.write_text(text + "\n")
    del torch
    return text


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke size: batch 4 x seq 16, few steps")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--q", type=int, default=4, help="inner rank of nested-nora")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant")
    ap.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds")
    ap.add_argument("--mem-steps", type=int, default=None, help="steps per memory child")
    ap.add_argument("--mem-repeats", type=int, default=None, help="memory children per variant")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--random-data", action="store_true",
                    help="random token ids instead of Rotten Tomatoes text (--quick uses them in the memory children)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="always run torch.profiler (default: only if MISS)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out-dir", default=None, help="default: <repo>/results/bench")
    ap.add_argument("--child-mem", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    quick = a.quick
    a.batch = a.batch or (4 if quick else 16)
    a.seq = a.seq or (16 if quick else 64)
    a.warmup = a.warmup if a.warmup is not None else (1 if quick else 3)
    a.repeats = a.repeats or (3 if quick else 20)
    a.mem_steps = a.mem_steps or (2 if quick else 5)
    a.mem_repeats = a.mem_repeats or (1 if quick else 2)
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.child_mem:
        print("MEMJSON " + json.dumps(
            memory_child(a.child_mem, a.r, a.q, a.batch, a.seq, a.mem_steps, real=not a.random_data)
        ), flush=True)
        return {}

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    dest, info = start(a.out_dir)
    torch.manual_seed(0)

    batch, source = make_batch(a.batch, a.seq, real=not a.random_data)
    print(f"data: {source}; batch {a.batch} x seq {a.seq}")
    steps, params = {}, {}
    for v in variants:
        t0 = time.perf_counter()
        model = adapt(load_base(), v, a.r, a.q)
        steps[v], params[v] = make_step(model, batch)
        print(f"built {v}: {params[v]:,} trainable parameters ({time.perf_counter() - t0:.1f} s)")

    times = timed(steps, repeats=a.repeats, warmup=a.warmup)
    mem = {} if a.no_memory else measure_memory(
        variants, a.r, a.q, a.batch, a.seq, a.mem_steps, a.mem_repeats, a.threads, parallel=a.quick,
        real=not (a.random_data or a.quick),
    )

    import statistics

    rows = []
    base = times.get("lora", {})
    base_t, base_tmin, base_c = base.get("median_s"), base.get("min_s"), base.get("cpu_median_s")
    base_m = statistics.median(m["peak_rss_mib"] for m in mem["lora"]) if "lora" in mem else None
    base_d = statistics.median(m["delta_rss_mib"] for m in mem["lora"]) if "lora" in mem else None
    for v in variants:
        med, mn, cpu = times[v]["median_s"], times[v]["min_s"], times[v]["cpu_median_s"]
        row: dict[str, Any] = {
            "variant": v, "r": a.r, "q": a.q if v == "nested-nora" else "", "batch": a.batch, "seq": a.seq,
            "data": "rotten-tomatoes" if source.startswith("rotten") else "random-ids",
            "trainable_params": params[v], "rounds": a.repeats, "warmup": a.warmup,
            "step_median_s": med, "step_min_s": mn,
            "step_ratio_vs_lora": med / base_t if base_t else float("nan"),
            "step_min_ratio_vs_lora": mn / base_tmin if base_tmin else float("nan"),
            "cpu_median_s": cpu, "cpu_min_s": times[v]["cpu_min_s"],
            "cpu_ratio_vs_lora": cpu / base_c if base_c else float("nan"),
            "torch_threads": torch.get_num_threads(),
        }
        if mem:
            peak = statistics.median(m["peak_rss_mib"] for m in mem[v])
            delta = statistics.median(m["delta_rss_mib"] for m in mem[v])
            row.update({
                "peak_rss_mib": peak, "delta_rss_mib": delta,
                "base_rss_mib": statistics.median(m["base_rss_mib"] for m in mem[v]),
                "peak_ratio_vs_lora": peak / base_m if base_m else float("nan"),
                "delta_ratio_vs_lora": delta / base_d if base_d else float("nan"),
                "mem_children": len(mem[v]), "mem_steps": a.mem_steps,
                "hwm_reset": all(m["hwm_reset"] for m in mem[v]),
            })
        rows.append(row)

    cols = ["variant", "trainable_params", "step_median_s", "step_min_s", "step_ratio_vs_lora",
            "step_min_ratio_vs_lora", "cpu_median_s", "cpu_ratio_vs_lora"]
    if mem:
        cols += ["peak_rss_mib", "delta_rss_mib", "peak_ratio_vs_lora", "delta_ratio_vs_lora"]
    print(f"\nstep = forward+backward+AdamW, {a.repeats} interleaved rounds after {a.warmup} warm-up steps; "
          f"wall and process-CPU seconds, torch threads {torch.get_num_threads()}")
    if mem:
        kind = "random ids" if (a.random_data or a.quick) else "the same text batch"
        print(f"memory: {a.mem_repeats} fresh subprocess(es) per variant, {a.mem_steps} steps each on {kind}; "
              "delta = peak RSS - RSS before the adapter was applied")
    print(format_table(rows, cols))
    print()
    misses = False
    for row in rows:
        if row["variant"] == "lora":
            continue
        t_ratio = row["step_ratio_vs_lora"]
        vt = verdict(t_ratio, TARGET_RATIO)
        misses |= vt == "MISS"
        c_ratio = row["cpu_ratio_vs_lora"]
        vc = verdict(c_ratio, TARGET_RATIO)
        misses |= vc == "MISS"
        line = (f"{row['variant']}/lora step-time ratio {t_ratio:.3f} wall {vt}, {c_ratio:.3f} CPU {vc} "
                f"(medians; target <= {TARGET_RATIO}; ratio of wall mins {row['step_min_ratio_vs_lora']:.3f})")
        if mem:
            vm = verdict(row["peak_ratio_vs_lora"], TARGET_RATIO)
            misses |= vm == "MISS"
            line += (f"; peak-memory ratio {row['peak_ratio_vs_lora']:.3f} {vm}"
                     f" (increment ratio {row['delta_ratio_vs_lora']:.3f})")
        print(line)

    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} (at the start: {info.get('loadavg_1m')})")
    csv_path = write_csv(dest / "step_time.csv", rows, info)
    print(f"\nCSV: {csv_path}")
    _plot(rows, dest / "step_time.png", bool(mem))
    if a.profile or (misses and not a.quick):
        text = profile_variants(steps, 3 if not a.quick else 1, dest / "step_time_profile.txt")
        print("\n" + text)
        print(f"profile: {dest / 'step_time_profile.txt'}")
    return {"rows": rows, "csv": csv_path, "data": source}


def _plot(rows, path: Path, with_mem: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2 if with_mem else 1, figsize=(9 if with_mem else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.bar(names, [r["step_median_s"] for r in rows], color="tab:blue")
    ax.set_ylabel("step time, median (s)")
    ax.set_title("forward+backward+AdamW")
    if with_mem:
        ax = axes[0][1]
        ax.bar(names, [r["peak_rss_mib"] for r in rows], color="tab:orange")
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title("peak memory (fresh process)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
