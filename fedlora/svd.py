"""Truncated SVD of one adapted weight with canonical signs: the outer factors B = U_r, A = V_rᵀ.

Signs are canonical: in every left singular vector the entry of largest magnitude (first one on ties) is
positive; the matching right singular vector is flipped with it, so U S Vᵀ is unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

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
def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def canonicalize_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular vector pairs so the largest-magnitude entry of each column of U is positive."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, Vh * signs[:, None]


def truncated_svd(
    weight: torch.Tensor, r: int, method: str = "full", niter: int = 4, oversample: int = 8, seed: int = 0
) -> OuterFactors:
    """Rank-r truncated SVD of a (d, k) matrix in float64 with canonical signs.

    Raises ValueError if r exceeds min(d, k).
    """
    W = weight.detach().to("cpu", torch.float64)
    d, k = W.shape
    if r > min(d, k):
        raise ValueError(f"rank r={r} exceeds min(d, k)={min(d, k)} of a {d}x{k} weight")
    with _LOCK, _single_thread():
        if method == "full":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r, :]
        elif method == "randomized":
            q = min(r + oversample, min(d, k))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
            U, S, Vh = U[:, :r], S[:r], V[:, :r].T
        else:
            raise ValueError(f"svd_method={method!r}: must be 'full' or 'randomized'")
    U, Vh = canonicalize_signs(U.contiguous(), Vh.contiguous())
    return OuterFactors(U=U.contiguous(), S=S.contiguous(), Vh=Vh.contiguous())
