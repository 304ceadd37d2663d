"""The local on-disk cache of outer factors: the truncated SVD (:mod:`fedlora.svd`) of a weight, keyed by the
weight's hash, r and the SVD method, in memory and on disk (safetensors), so a process does not redo SVDs.

The cache is a speed-up on one machine, not a source of truth: another machine (CPU code path, math library,
thread count, GPU) computes other last bits. Exactness across machines comes from the server's factors, which
every node receives and uses as they are (:mod:`fedlora.outer_bundle`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from fedlora.assets import cache_root
from fedlora.svd import (
    DEFAULT_NITER,
    DEFAULT_OVERSAMPLE,
    OuterFactors,
    canonicalize_signs,
    resolve_svd_method,
    truncated_svd,
)

__all__ = ["OuterFactorCache", "OuterFactors", "canonicalize_signs", "default_cache_dir", "get_cache",
           "truncated_svd", "weight_hash"]


def weight_hash(weight: torch.Tensor) -> str:
    """sha256 of a weight's shape, dtype and bytes (hex)."""
    w = weight.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(w.shape)}|{w.dtype}|".encode())
    h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``<fedlora cache root>/outer`` (:func:`fedlora.assets.cache_root`)."""
    return cache_root() / "outer"


class OuterFactorCache:
    """Outer factors keyed by (base-weight hash, r, method), in memory and on disk (safetensors).

    ``directory=None`` uses :func:`default_cache_dir`; ``directory=""`` keeps the cache in memory only.
    Disk writes are atomic (temporary file + rename), so concurrent processes never read a partial file.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        if directory is None:
            self.directory: Path | None = default_cache_dir()
        elif str(directory) == "":
            self.directory = None
        else:
            self.directory = Path(directory)
        self._memory: dict[str, OuterFactors] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(w_hash: str, r: int, method: str, niter: int, oversample: int, seed: int) -> str:
        extra = f"-n{niter}-o{oversample}-s{seed}" if method == "randomized" else ""
        return f"{w_hash[:32]}-r{r}-{method}{extra}"

    def get_or_compute(
        self, weight: torch.Tensor, r: int, method: str = "auto", niter: int = DEFAULT_NITER,
        oversample: int = DEFAULT_OVERSAMPLE, seed: int = 0,
    ) -> OuterFactors:
        """Return the canonical rank-r factors of ``weight`` (d×k), computing them at most once.

        The key holds the resolved method: ``auto`` becomes ``full`` or ``randomized``
        (:func:`fedlora.svd.resolve_svd_method`)."""
        method = resolve_svd_method(method, weight.shape, r)
        key = self.key(weight_hash(weight), r, method, niter, oversample, seed)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        factors = self._load(key)
        if factors is None:
            self.misses += 1
            factors = truncated_svd(weight, r, method, niter, oversample, seed)
            self._store(key, factors)
        else:
            self.hits += 1
        self._memory[key] = factors
        return factors

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.safetensors"

    def _load(self, key: str) -> OuterFactors | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            return OuterFactors(U=t["U"], S=t["S"], Vh=t["Vh"])
        except Exception:  # a corrupt cache entry is recomputed, never trusted
            return None

    def _store(self, key: str, f: OuterFactors) -> None:
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"U": f.U, "S": f.S, "Vh": f.Vh}, str(tmp))
        os.replace(tmp, path)


_DEFAULT_CACHES: dict[str, OuterFactorCache] = {}


def get_cache(directory: str | None = None) -> OuterFactorCache:
    """A process-wide cache per directory (``None``: the default directory)."""
    key = str(default_cache_dir()) if directory is None else str(directory)
    if key not in _DEFAULT_CACHES:
        _DEFAULT_CACHES[key] = OuterFactorCache(key if directory is None else directory)
    return _DEFAULT_CACHES[key]
