"""Outer factors: canonical truncated SVD (full, randomized, auto) and the on-disk cache.

Not tested here: that the randomized path's memory stays at the float64 weight plus O((d + k)·(r + p))
(a unit test cannot measure it reliably; fedlora/svd.py documents the working set)."""

from __future__ import annotations

import pytest
import torch

from fedlora.outer import OuterFactorCache, canonicalize_signs, truncated_svd, weight_hash
from fedlora.svd import AUTO_MIN_DIM, resolve_svd_method, subspace_sin


def _w(d=40, k=24, seed=0):
    return torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_canonical_orthonormal(f):
    """U (d, r) and Vh (r, k) orthonormal, S non-increasing, the largest |entry| of every U column positive."""
    r = f.S.numel()
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(f.U.T @ f.U, eye, atol=1e-12) and torch.allclose(f.Vh @ f.Vh.T, eye, atol=1e-12)
    assert (f.S[:-1] >= f.S[1:]).all()
    idx = f.U.abs().argmax(dim=0)
    assert (f.U[idx, torch.arange(r)] > 0).all()


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


def _gapped(d=300, k=200, r=6, seed=1):
    """A (d, k) matrix with a clear spectral gap after r: σ = 10..5 then 1e-3 (known singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = torch.cat([torch.linspace(10, 5, r), torch.full((k - r,), 1e-3)]).double()
    return (u * s) @ v.T


def test_randomized_svd_matches_full_on_a_spectral_gap():
    w = _gapped()
    full, rnd = truncated_svd(w, 6, method="full"), truncated_svd(w, 6, method="randomized", seed=0)
    # subspaces: largest principal angle (left and right) far below 1e-6
    assert subspace_sin(full.U, rnd.U) < 1e-9 and subspace_sin(full.Vh.T, rnd.Vh.T) < 1e-9
    assert torch.allclose(full.S, rnd.S, rtol=1e-12)
    # canonical signs make the factors themselves agree, not only their spans
    assert torch.allclose(full.U, rnd.U, atol=1e-9) and torch.allclose(full.Vh, rnd.Vh, atol=1e-9)
    _assert_canonical_orthonormal(rnd)


def test_randomized_without_power_iterations_is_worse_on_a_flat_tail():
    # the subspace iterations do something: on a slowly decaying spectrum niter=0 misses more energy
    g = torch.Generator().manual_seed(3)
    w = torch.randn(400, 300, generator=g, dtype=torch.float64) @ torch.diag(
        torch.linspace(1.0, 0.2, 300, dtype=torch.float64)) @ torch.linalg.qr(
        torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
    best = torch.linalg.svdvals(w)[8:].square().sum().sqrt()

    def err(f):
        return torch.linalg.matrix_norm(w - (f.U * f.S) @ f.Vh) / best

    e0 = err(truncated_svd(w, 8, "randomized", niter=0, oversample=4))
    e6 = err(truncated_svd(w, 8, "randomized"))
    assert 1.0 <= e6 < e0 and e6 < 1.01


def test_randomized_svd_seeded_and_deterministic():
    w = _w(120, 90, seed=4)
    a = truncated_svd(w, 8, method="randomized", seed=5)
    b = truncated_svd(w.clone(), 8, method="randomized", seed=5)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)
    # the seed, not the global RNG, drives it: another seed gives (slightly) other factors on a flat spectrum
    torch.manual_seed(123)
    c = truncated_svd(w, 8, method="randomized", seed=5, niter=1, oversample=2)
    torch.manual_seed(456)
    d = truncated_svd(w, 8, method="randomized", seed=5, niter=1, oversample=2)
    e = truncated_svd(w, 8, method="randomized", seed=6, niter=1, oversample=2)
    assert torch.equal(c.U, d.U) and not torch.equal(c.U, e.U)
    _assert_canonical_orthonormal(a)


def test_randomized_svd_keeps_torch_threads_and_global_rng():
    before_threads, before_rng = torch.get_num_threads(), torch.random.get_rng_state()
    truncated_svd(_w(64, 48), 4, method="randomized")
    truncated_svd(_w(64, 48), 4, method="full")
    assert torch.get_num_threads() == before_threads
    assert torch.equal(torch.random.get_rng_state(), before_rng)


def test_auto_resolves_by_layer_size():
    assert resolve_svd_method("auto", (384, 384), 16) == "full"
    assert resolve_svd_method("auto", (1023, 4096), 16) == "full"
    assert resolve_svd_method("auto", (AUTO_MIN_DIM, 4096), 16) == "randomized"
    assert resolve_svd_method("auto", (14336, 4096), 64) == "randomized"
    assert resolve_svd_method("auto", (4096, 14336), 32) == "randomized"
    # r too large a part of the rank: the full SVD
    assert resolve_svd_method("auto", (1024, 1024), 129) == "full"
    assert resolve_svd_method("auto", (1024, 1024), 128) == "randomized"
    for m in ("full", "randomized"):
        assert resolve_svd_method(m, (10, 10), 2) == m
    # auto on a small weight is exactly the full SVD
    w = _w(50, 30, seed=6)
    a, f = truncated_svd(w, 5), truncated_svd(w, 5, method="full")
    assert torch.equal(a.U, f.U) and torch.equal(a.Vh, f.Vh)


@pytest.mark.parametrize("call", [
    lambda: truncated_svd(_w(), 4, method="qr"),
    lambda: resolve_svd_method("Full", (10, 10), 2),
    lambda: OuterFactorCache("").get_or_compute(_w(), 4, method="lowrank"),
])
def test_bad_method_names_svd_method(call):
    with pytest.raises(ValueError, match="svd_method=.*must be one of"):
        call()


def test_cache_key_holds_the_resolved_method(tmp_path):
    w = _w(40, 24)
    c = OuterFactorCache(tmp_path)
    c.get_or_compute(w, 4, method="auto")
    c.get_or_compute(w, 4, method="full")  # the same entry: auto resolved to full for this small layer
    assert c.misses == 1 and c.hits == 1
    assert [p.name.split("-r4-")[1] for p in tmp_path.glob("*.safetensors")] == ["full.safetensors"]
    c.get_or_compute(w, 4, method="randomized")
    assert c.misses == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


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
