"""Tensor and array helpers shared by the core: wire conversion, float-array screening, seeded generators.

- :func:`to_numpy`: what every state dictionary sends (``dict[str, np.ndarray]``) is made here.
- :func:`array_problem`: the one screening rule for an incoming array (real float dtype, shape, finite);
  each caller wraps the reason in its own error type (``AggregationError``, ``InnerStateError``,
  ``LoraStateError``) so the message names the client / layer / key it is about.
- :func:`seeded_generator`: a ``torch.Generator`` seeded explicitly, or from OS entropy.
- :func:`flat_norm`: the L2 norm of several arrays flattened together (the one copy: user-level DP clipping
  on the client, update-norm screening on the server).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

#: torch dtypes without a numpy counterpart of the same precision; they travel as float32
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached CPU copy of ``t`` as a numpy array (never aliases ``t``).

    Same shape; same dtype except bfloat16 / float16, which become float32 (numpy has no bfloat16, and
    the wire format is float32 for both half types: converting is exact).
    """
    t = t.detach()
    if t.dtype in HALF_DTYPES:
        t = t.float()
    return t.cpu().numpy().copy()


def array_problem(arr: np.ndarray, shape: Sequence[int | None] | None = None) -> str | None:
    """Why ``arr`` is not a finite, real floating-point array of ``shape``; None when it is.

    ``shape`` may hold ``None`` as a wildcard dimension; ``shape=None`` accepts any shape. Checked in this
    order, the first failure is reported: dtype (``"dtype … is not a real floating-point type"``), shape
    (``"shape … does not match expected …"``), finiteness (``"non-finite values (n NaN, m Inf)"``).
    """
    if not np.issubdtype(arr.dtype, np.floating):
        return f"dtype {arr.dtype} is not a real floating-point type"
    if shape is not None:
        want = tuple(shape)
        if arr.ndim != len(want) or any(e is not None and e != s for e, s in zip(want, arr.shape)):
            return f"shape {tuple(arr.shape)} does not match expected {want}"
    if not np.isfinite(arr).all():
        return f"non-finite values ({int(np.isnan(arr).sum())} NaN, {int(np.isinf(arr).sum())} Inf)"
    return None


def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``, or from OS entropy when ``seed`` is None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # non-deterministic (OS entropy)
    else:
        g.manual_seed(int(seed))
    return g


def flat_norm(arrays: Iterable[np.ndarray]) -> float:
    """‖(a₁, a₂, …)‖₂ of all arrays flattened together, computed in float64.

    A sum of squares that overflows is recomputed scaled by the largest entry, so no finite input gives
    ``inf``; ``inf`` only for an infinite entry, ``nan``-free inputs never give ``nan``."""
    parts = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    with np.errstate(over="ignore", invalid="ignore"):
        total = sum(float(np.sum(np.square(a))) for a in parts)
        if math.isfinite(total):
            return math.sqrt(total)
        scale = max((float(np.max(np.abs(a))) for a in parts if a.size), default=0.0)
        if not math.isfinite(scale):
            return math.inf
        return scale * math.sqrt(sum(float(np.sum(np.square(a / scale))) for a in parts))
