"""Outer factors: canonical deterministic SVD and the on-disk cache."""

from __future__ import annotations

import torch

from fedlora.outer import OuterFactorCache, canonicalize_signs, truncated_svd, weight_hash


def _w(d=40, k=24, seed=0):
    return torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_truncated_svd_reconstructs_and_is_canonical():
    w = _w()
    f = truncated_svd(w, 24)
    assert torch.allclose((f.U * f.S) @ f.Vh, w, atol=1e-12)
    idx = f.U.abs().argmax(dim=0)
    assert (f.U[idx, torch.arange(24)] > 0).all()
    # flipping signs by hand is undone by canonicalisation
    flip = torch.ones(24, dtype=torch.float64)
    flip[::3] = -1
    U2, V2 = canonicalize_signs(f.U * flip, f.Vh * flip[:, None])
    assert torch.equal(U2, f.U) and torch.equal(V2, f.Vh)


def test_truncated_svd_bitwise_deterministic():
    w = _w(64, 48, seed=2)
    a, b = truncated_svd(w, 8), truncated_svd(w.clone(), 8)
    assert torch.equal(a.U, b.U) and torch.equal(a.Vh, b.Vh) and torch.equal(a.S, b.S)


def test_randomized_svd_close_to_full_and_seeded():
    # a matrix with a clear spectral gap: randomized SVD recovers the top subspace
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    s = torch.cat([torch.linspace(10, 5, 6), torch.full((54,), 1e-3)]).double()
    w = (u[:, :60] * s) @ v.T
    full, rnd = truncated_svd(w, 6), truncated_svd(w, 6, method="randomized", seed=0)
    assert torch.allclose(full.S, rnd.S, rtol=1e-6)
    assert torch.allclose((full.U * full.S) @ full.Vh, (rnd.U * rnd.S) @ rnd.Vh, atol=1e-5)
    again = truncated_svd(w, 6, method="randomized", seed=0)
    assert torch.equal(again.U, rnd.U)


def test_cache_hits_and_disk_roundtrip(tmp_path):
    w = _w(30, 20)
    c1 = OuterFactorCache(tmp_path)
    f1 = c1.get_or_compute(w, 5)
    assert c1.misses == 1 and c1.hits == 0
    c1.get_or_compute(w, 5)
    assert c1.hits == 1
    c2 = OuterFactorCache(tmp_path)  # a new process reads the disk copy
    f2 = c2.get_or_compute(w, 5)
    assert c2.misses == 0 and c2.hits == 1
    assert torch.equal(f1.U, f2.U) and torch.equal(f1.Vh, f2.Vh)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    c2.get_or_compute(w, 4)  # another rank is another entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    w = _w(30, 20)
    c = OuterFactorCache(tmp_path)
    f = c.get_or_compute(w, 5)
    path = next(tmp_path.glob("*.safetensors"))
    path.write_bytes(b"garbage")
    c2 = OuterFactorCache(tmp_path)
    assert torch.equal(c2.get_or_compute(w, 5).U, f.U) and c2.misses == 1


def test_weight_hash_sensitive_to_one_value():
    w = _w()
    w2 = w.clone()
    w2[0, 0] += 1e-12
    assert weight_hash(w) != weight_hash(w2)
    assert weight_hash(w) == weight_hash(w.clone())
