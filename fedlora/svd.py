"""Truncated SVD of one adapted weight with canonical signs: the outer factors B = U_r, A = V_rᵀ.

Two methods, one result type (:class:`OuterFactors`, float64, canonical signs):

* ``"full"``: LAPACK ``gesdd`` of the whole (d, k) matrix in float64, then the top r. Run with one
  BLAS thread (a process-wide lock serialises it), so every process on a machine gets the same bits
  whatever its torch thread setting; ``auto`` uses it only below 1024, where it costs ≤ 0.21 CPU-s.
  (Two threads would make it 1.4-1.9x faster on an idle 2-core box, 512-2048 square, measured here.)
* ``"randomized"``: the top r only, by a randomized range finder (Halko, Martinsson & Tropp 2011,
  Alg. 4.4 + 4.3): l = r + p seeded Gaussian test vectors, ``niter`` subspace (power) iterations with a
  QR re-orthonormalisation after every product, and an exact SVD of the small projected (l, k) matrix.
  Cost O(d·k·l·(2·niter + 2)) flops instead of O(d·k·min(d, k)). Float64 throughout: float32 working
  precision was measured only 1.45-1.7x faster here (1 thread, 14336×4096 and 4096², l = 40) because the
  thin products are memory-bound, and the float64 path already meets its target (Llama-3-8B at r = 32:
  3.6 min wall with 2 threads, 6.5 with one on the quiet 2-core box; docs/results.md). Uses torch's
  current thread count for layers of at least :data:`PARALLEL_MIN_ENTRIES` entries (one thread below),
  so the last bits depend on the thread count and machine: fine, since the server's factors are the
  truth across machines (:mod:`fedlora.outer_bundle`). Under other load one thread is faster (2 OpenMP
  threads spin at barriers: 2.3-3.1x slower at load 4.5-11 here).
* ``"auto"``: :func:`resolve_svd_method` picks ``randomized`` for large layers, ``full`` otherwise.

Defaults niter = 6, p = 32 (:data:`DEFAULT_NITER`, :data:`DEFAULT_OVERSAMPLE`): on real MiniLM and
SmolLM2-135M layers the rank-r reconstruction error is within 0.13% of the optimum at r = 16..64 (the
former 4 / 8: up to 1.1%, measured the same way during development). The largest principal angle to
the exact top-r subspace is not small on trained layers (σ_r/σ_{r+1} is 1.000-1.04 there, so the r-th
direction is barely determined); with a clear gap the subspaces agree to < 1e-9 (tests/test_outer.py).

Memory (one layer at a time): the float64 copy of W (d·k; none if W already is float64 on the CPU) plus
O((d + k)·l) for the randomized path (Ω (l, k), Q (d, l), Z (k, l), Qᵀ W (l, k)); the full path holds
LAPACK's economy U, S, Vh of the whole matrix. Not unit-tested (not measurable reliably in a test).

Signs are canonical: in every left singular vector the entry of largest magnitude (first one on ties) is
positive; the matching right singular vector is flipped with it, so U S Vᵀ is unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["AUTO_MIN_DIM", "AUTO_MAX_RANK_FRACTION", "DEFAULT_NITER", "DEFAULT_OVERSAMPLE", "PARALLEL_MIN_ENTRIES",
           "SVD_METHODS",
           "OuterFactors", "canonicalize_signs", "randomized_svd", "resolve_svd_method", "subspace_sin",
           "truncated_svd"]

#: accepted values of ``svd_method``
SVD_METHODS: tuple[str, ...] = ("auto", "full", "randomized")
#: ``auto`` uses the randomized SVD when min(d, k) >= AUTO_MIN_DIM ...
AUTO_MIN_DIM = 1024
#: ... and r <= AUTO_MAX_RANK_FRACTION · min(d, k) (a top-r SVD gains nothing when r is most of the rank)
AUTO_MAX_RANK_FRACTION = 0.125
#: the randomized SVD uses torch's thread count from this many entries (d·k) up, one thread below
PARALLEL_MIN_ENTRIES = 1 << 20
#: default subspace iterations and oversampling of the randomized SVD (bench/outer_setup.py measures them)
DEFAULT_NITER = 6
DEFAULT_OVERSAMPLE = 32

_LOCK = threading.Lock()


@dataclass(frozen=True)
class OuterFactors:
    """Truncated SVD W ≈ U S Vh in float64.

    Attributes:
        U: (d, r) orthonormal columns, canonical signs.  B = U.
        S: (r,) singular values, non-increasing.
        Vh: (r, k) orthonormal rows.  A = Vh.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


@contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_thread() -> contextlib.AbstractContextManager[None]:
    return _num_threads(1)


def canonicalize_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular vector pairs so the largest-magnitude entry of each column of U is positive.

    U: (d, r), Vh: (r, k); returns new tensors of the same shapes with U Vh's pairs flipped together.
    """
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, Vh * signs[:, None]


def resolve_svd_method(method: str, shape: tuple[int, ...] | torch.Size, r: int) -> str:
    """The method :func:`truncated_svd` runs for a (d, k) weight at rank r: ``"full"`` or ``"randomized"``.

    ``"auto"`` is ``"randomized"`` when min(d, k) >= :data:`AUTO_MIN_DIM` and
    r <= :data:`AUTO_MAX_RANK_FRACTION` · min(d, k), else ``"full"``. Measured here (2 cores, one thread
    for both methods, n×n random matrices, 2026-11-30, docs/results.md "Outer-factor setup time"): the
    randomized SVD is already 2.1-4.8x faster in CPU time at n = 512, but a full SVD costs at most
    0.21 CPU-s up to n = 768, so the exact factors are kept below 1024 (every MiniLM and SmolLM2-135M
    layer: unchanged); at n = 1024 the full SVD takes 0.59 CPU-s and the randomized one is 5-9x faster
    at r = 16..64 (16-28x at n = 2048).

    Raises ValueError naming ``svd_method`` for an unknown method.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd_method={method!r}: must be one of {SVD_METHODS}")
    if method != "auto":
        return method
    m = min(int(shape[-2]), int(shape[-1]))
    return "randomized" if m >= AUTO_MIN_DIM and r <= AUTO_MAX_RANK_FRACTION * m else "full"


def subspace_sin(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of two (n, r) orthonormal matrices.

    ‖U2 − U1 (U1ᵀ U2)‖₂: 0 for the same subspace, 1 when some direction of one is orthogonal to the other.
    Accurate for tiny angles (unlike arccos of the smallest singular value of U1ᵀ U2).
    """
    U1, U2 = U1.to(torch.float64), U2.to(torch.float64)
    return float(torch.linalg.matrix_norm(U2 - U1 @ (U1.T @ U2), ord=2))


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of a tall (n, l) matrix: (n, l) orthonormal columns spanning Y's columns."""
    return torch.linalg.qr(Y, mode="reduced").Q


def randomized_svd(
    W: torch.Tensor, r: int, niter: int = DEFAULT_NITER, oversample: int = DEFAULT_OVERSAMPLE, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of a float64 (d, k) matrix: (U (d, r), S (r,), Vh (r, k)), signs not canonicalised.

    l = min(r + oversample, d, k) Gaussian test vectors Ω (l, k) from ``torch.Generator().manual_seed(seed)``
    (never the global RNG); Q = orth(W Ωᵀ), then ``niter`` times Z = orth(Wᵀ Q), Q = orth(W Z); finally the
    exact SVD of the small (l, k) matrix Qᵀ W. Working memory besides W: Ω (l, k), Q (d, l), Z (k, l),
    Qᵀ W (l, k). Deterministic for a given seed, thread count and BLAS.

    Layout: LAPACK's QR returns column-major Q, so Qᵀ and Zᵀ are row-major and every product is taken as
    (thin row-major) @ W or @ Wᵀ; MKL's float64 GEMM of Wᵀ @ (thin) is about 3x slower here.
    """
    d, k = W.shape
    ell = min(r + oversample, d, k)
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(ell, k, generator=gen, dtype=W.dtype)
    Q = _orthonormal((omega @ W.T).T)  # (d, l)
    del omega
    for _ in range(niter):
        Z = _orthonormal((Q.T @ W).T)  # (k, l): orth(Wᵀ Q)
        Q = _orthonormal((Z.T @ W.T).T)  # (d, l): orth(W Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return Q @ Ub[:, :r], S[:r], Vh[:r, :]


def truncated_svd(
    weight: torch.Tensor, r: int, method: str = "auto", niter: int = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE, seed: int = 0,
) -> OuterFactors:
    """Rank-r truncated SVD of a (d, k) matrix in float64 with canonical signs.

    ``method``: ``"auto"`` | ``"full"`` | ``"randomized"`` (see the module docstring and
    :func:`resolve_svd_method`); ``niter``, ``oversample`` and ``seed`` only matter for ``randomized``.
    Raises ValueError if r exceeds min(d, k) or the method is unknown (the message names ``svd_method``).
    """
    d, k = weight.shape
    if r > min(d, k):
        raise ValueError(f"rank r={r} exceeds min(d, k)={min(d, k)} of a {d}x{k} weight")
    resolved = resolve_svd_method(method, (d, k), r)
    W = weight.detach().to("cpu", torch.float64)
    with _LOCK:
        if resolved == "full":
            with _single_thread():
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r, :]
        else:
            threads = torch.get_num_threads() if d * k >= PARALLEL_MIN_ENTRIES else 1
            with _num_threads(threads):
                U, S, Vh = randomized_svd(W, r, niter, oversample, seed)
    U, Vh = canonicalize_signs(U.contiguous(), Vh.contiguous())
    return OuterFactors(U=U.contiguous(), S=S.contiguous(), Vh=Vh.contiguous())
