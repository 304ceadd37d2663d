"""Shared helpers of the benchmarks: command line, output paths, machine info, interleaved timing, tables,
CSV (the MiniLM training-step setup of the two step-time benchmarks is in :mod:`bench._minilm`).

Importing this module makes the process offline (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``,
``HF_DATASETS_OFFLINE`` default to 1): every benchmark imports it before transformers or datasets.

Timing protocol (this machine is small and noisy): every variant gets warm-up calls, then the
variants are timed *interleaved* (round k runs A, B, C, ...; the order is rotated every round so no
variant always runs first), and we report the median and the minimum of the N rounds. Ratios are
ratios of medians measured in the same process, side by side.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "results" / "bench"


def bench_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The argument parser of a benchmark (description: the first paragraph of ``doc``) with the flags
    every benchmark has: ``--quick`` (smoke size, ``quick_help`` says which) and ``--out-dir``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out-dir", default=None, help="default: <repo>/results/bench")
    return ap


def start(path: str | os.PathLike[str] | None) -> tuple[Path, dict[str, Any]]:
    """A benchmark's start: (its output directory :func:`out_dir`, :func:`machine_info`); prints the
    machine line."""
    dest = out_dir(path)
    info = machine_info()
    print(machine_line(info))
    return dest, info


def out_dir(path: str | os.PathLike[str] | None) -> Path:
    """Absolute output directory (created): ``path`` or ``<repo>/results/bench``."""
    p = Path(path).expanduser().resolve() if path else DEFAULT_OUT
    p.mkdir(parents=True, exist_ok=True)
    return p


def machine_info() -> dict[str, Any]:
    """CPU count, affinity, torch/numpy versions and thread counts (recorded in every CSV)."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        import numpy as np

        info["numpy"] = np.__version__
        info["numpy_blas_threads"] = blas_threads()
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


def _openblas_libs() -> list[Any]:
    """ctypes handles of the OpenBLAS libraries loaded in this process (numpy's, torch's)."""
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        return []
    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            pass
    return libs


_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
_BLAS_GETTERS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")


def blas_threads() -> int | None:
    """numpy's OpenBLAS thread count (None if it cannot be read)."""
    import numpy  # noqa: F401  (loads the library)

    for lib in _openblas_libs():
        for name in _BLAS_GETTERS:
            if hasattr(lib, name):
                return int(getattr(lib, name)())
    return None


def set_blas_threads(n: int) -> bool:
    """Set numpy's OpenBLAS thread count at run time; True if it was set."""
    import ctypes

    import numpy  # noqa: F401

    done = False
    for lib in _openblas_libs():
        for name in _BLAS_SETTERS:
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(int(n)))
                done = True
                break
    return done


def machine_line(info: Mapping[str, Any] | None = None) -> str:
    info = machine_info() if info is None else info
    return "machine: " + ", ".join(f"{k}={v}" for k, v in info.items())


def interleaved_timings(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` rounds in
    which every function runs once, in an order rotated every round (ABC, BCA, CAB, ...)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(repeats):
        order = names[k % len(names):] + names[: k % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_timings_cpu(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """:func:`interleaved_timings` recording both wall seconds and process CPU seconds per call.

    CPU time (all threads of this process) does not count time the process spent preempted by other
    load, so on a shared machine it is the steadier measure of work; wall time is what a user waits."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for k in range(repeats):
        order = names[k % len(names):] + names[: k % len(names)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def summary(values: Sequence[float]) -> tuple[float, float]:
    """(median, min)."""
    return statistics.median(values), min(values)


def timed(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """:func:`interleaved_timings_cpu` of ``fns``, summarised per function: ``median_s``, ``min_s`` (wall)
    and ``cpu_median_s``, ``cpu_min_s`` (process CPU time), each over the ``repeats`` rounds."""
    wall, cpu = interleaved_timings_cpu(fns, repeats, warmup)
    out = {}
    for name in fns:
        (med, mn), (cmed, cmn) = summary(wall[name]), summary(cpu[name])
        out[name] = {"median_s": med, "min_s": mn, "cpu_median_s": cmed, "cpu_min_s": cmn}
    return out


def verdict(value: float, target: float, *, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Plain-text table of ``rows`` (dicts); floats are printed with 4 significant digits."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v == 0.0:
                return "0"
            if abs(v) >= 1e5 or abs(v) < 1e-3:
                return f"{v:.3e}"
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], machine: Mapping[str, Any] | None = None) -> Path:
    """Write ``rows`` to ``path``; every row also carries the machine info columns (``m_*``)."""
    machine = machine_info() if machine is None else machine
    extra = {f"m_{k}": v for k, v in machine.items()}
    columns: list[str] = []
    for r in rows:
        for c in r:
            if c not in columns:
                columns.append(c)
    columns += list(extra)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **extra})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
