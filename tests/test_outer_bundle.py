"""The server's outer factors as a bundle (fedlora.outer_bundle): nodes that would compute other SVD bits still
train with exactly the server's factors, and aggregate exactly; the checks a node runs name the cause of a
mismatch (another base model, other targets, another r, a flipped singular vector); a node's store detects
and replaces a corrupt entry; the tolerance (sketch) check of nodes that compute their own factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TARGETS, make_tiny

import fedlora as fl
from fedlora.aggregation import exact_mean
from fedlora.nested import outer_bundle_of, outer_fingerprint
from fedlora.outer import OuterFactorCache, OuterFactors, weight_hash
from fedlora.outer_bundle import OuterBundle, OuterBundleStore, OuterMismatch, check_fits, check_sketch, sketch
from fedlora.svd import resolve_svd_method


def _cfg(r: int = 8, targets=None, cache_dir: str = "") -> fl.NestedLoraConfig:
    t, save = TINY_TARGETS["llama"]
    return fl.NestedLoraConfig(r=r, target_modules=targets or t, modules_to_save=save, cache_dir=cache_dir)


def _server(dtype=torch.float32):
    model = fl.apply_nested(make_tiny("llama", dtype=dtype), _cfg())
    return model, outer_bundle_of(model)


def _odd_path_cache(tmp_path, dtype=torch.float32) -> str:
    """A node cache whose factors differ from the server's in the last bits (what another math-library code
    path produces): every entry of U and Vh moved by a relative 1e-9 (below float32's resolution of 6e-8,
    so about 2% of the float32 values the layers use change by one ulp)."""
    cache = OuterFactorCache(tmp_path / "odd")
    cfg = _cfg()
    for name, mod in make_tiny("llama", dtype=dtype).named_modules():
        if name and fl.models.matches_target(name, cfg.target_modules) and isinstance(mod, torch.nn.Linear):
            f = fl.truncated_svd(mod.weight, cfg.r)
            gen = torch.Generator().manual_seed(len(name))
            odd = OuterFactors(U=f.U * (1 + 1e-9 * torch.randn(f.U.shape, generator=gen, dtype=f.U.dtype)), S=f.S,
                               Vh=f.Vh * (1 + 1e-9 * torch.randn(f.Vh.shape, generator=gen, dtype=f.Vh.dtype)))
            method = resolve_svd_method(cfg.svd_method, mod.weight.shape, cfg.r)  # the key holds the resolved one
            key = cache.key(weight_hash(mod.weight), cfg.r, method, cfg.svd_niter, cfg.svd_oversample, cfg.seed)
            cache._store(key, odd)
    return str(tmp_path / "odd")


def test_bundle_round_trip_and_digest():
    _, bundle = _server()
    state = bundle.to_state()
    assert all(a.dtype == np.float32 for a in state.values())
    again = OuterBundle.from_state(dict(reversed(list(state.items()))), expected_digest=bundle.digest)
    assert again == bundle and again.digest == bundle.digest
    r = bundle.rank
    assert bundle.nbytes() == sum(4 * r * (f.U.shape[0] + f.Vh.shape[1] + 1) for f in bundle.factors.values())
    key = next(k for k in state if k.endswith(".B"))
    tampered = {**state, key: state[key].copy()}
    tampered[key].flat[0] = np.nextafter(tampered[key].flat[0], np.float32(2))
    with pytest.raises(OuterMismatch, match="differs from the announced"):
        OuterBundle.from_state(tampered, expected_digest=bundle.digest)


@pytest.mark.parametrize("damage, match", [
    (lambda s, k: s.pop(k), "parts"),
    (lambda s, k: s.__setitem__(k, np.full_like(s[k], np.nan)), "non-finite"),
    (lambda s, k: s.__setitem__(k, s[k][:, :-1]), "shapes"),
    (lambda s, k: s.__setitem__(k, s[k].astype(np.float16)), "dtypes"),
    (lambda s, k: s.__setitem__("junk", s[k]), "unexpected key"),
])
def test_malformed_bundle_is_refused(damage, match):
    state = _server()[1].to_state()
    damage(state, next(k for k in state if k.endswith(".B")))
    with pytest.raises(OuterMismatch, match=match) as err:
        OuterBundle.from_state(state)
    assert err.value.cause == "corrupt"


def test_node_on_another_code_path_trains_with_the_servers_factors(tmp_path):
    server, bundle = _server()
    odd = _odd_path_cache(tmp_path)
    local = fl.apply_nested(make_tiny("llama"), _cfg(cache_dir=odd))
    assert outer_fingerprint(local) != outer_fingerprint(server)  # the odd path really changes the factors' bits
    node = fl.apply_nested(make_tiny("llama"), _cfg(cache_dir=odd), outer=bundle)
    assert outer_fingerprint(node) == outer_fingerprint(server)
    for (_, a), (_, b) in zip(fl.nested_layers(node).items(), fl.nested_layers(server).items(), strict=True):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.S, b.S)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_aggregate_is_the_mean_of_the_clients_delta_w_across_code_paths(tmp_path, dtype, tol):
    server, bundle = _server(dtype)
    odd = _odd_path_cache(tmp_path, dtype)
    nodes = [fl.apply_nested(make_tiny("llama", dtype=dtype), _cfg(cache_dir=c), outer=bundle) for c in ("", odd)]
    gen = torch.Generator().manual_seed(3)
    for node in nodes:
        for layer in fl.nested_layers(node).values():
            with torch.no_grad():
                layer.R.weight.copy_(0.1 * torch.randn(layer.R.weight.shape, generator=gen, dtype=torch.float64))
    weights = np.array([0.3, 0.7])
    uploads = [fl.inner_state(n) for n in nodes]
    mean = exact_mean(uploads, weights)
    fl.load_global_state(server, {f"{k[:-2]}.R0": v for k, v in mean.items() if k.endswith(".R")})
    for name, layer in fl.nested_layers(server).items():
        with torch.no_grad():
            got = layer.delta_weight().double()
            want = sum(w * fl.nested_layers(n)[name].delta_weight().double() for w, n in zip(weights, nodes))
        assert float((got - want).abs().max() / want.abs().max()) <= tol, name


def test_another_base_model_is_refused_and_the_model_is_untouched():
    _, bundle = _server()
    other = make_tiny("llama", seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(OuterMismatch, match="another base model") as err:
        fl.apply_nested(other, _cfg(), outer=bundle)
    assert err.value.cause == "weights" and err.value.layer
    assert getattr(other, "fedlora_config", None) is None
    assert not any(isinstance(m, fl.NestedLinear) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_flipped_singular_vector_other_r_and_targets_name_the_cause():
    server, bundle = _server()
    name = next(iter(bundle.factors))
    f = bundle.factors[name]
    flip = torch.ones(f.S.shape[0], dtype=f.U.dtype)
    flip[2] = -1
    flipped = OuterBundle.from_factors({**bundle.factors, name: OuterFactors(U=f.U * flip, S=f.S, Vh=f.Vh)})
    with pytest.raises(OuterMismatch, match="flipped") as err:
        fl.apply_nested(make_tiny("llama"), _cfg(), outer=flipped)
    assert err.value.layer == name
    with pytest.raises(OuterMismatch, match="r=8, this node's config r=4") as err:
        fl.apply_nested(make_tiny("llama"), _cfg(r=4), outer=bundle)
    with pytest.raises(OuterMismatch, match="other layers") as err:
        fl.apply_nested(make_tiny("llama"), _cfg(targets=["q_proj"]), outer=bundle)
    assert err.value.cause == "targets"


def test_a_bf16_copy_of_the_weights_fits_the_fp32_factors():
    _, bundle = _server()
    weights = {n: m.weight.to(torch.bfloat16) for n, m in make_tiny("llama").named_modules() if n in bundle.factors}
    check_fits(weights, bundle, bundle.rank)
    with pytest.raises(OuterMismatch):
        check_fits(weights, bundle, bundle.rank, tol=1e-9)


def test_store_detects_and_replaces_a_corrupt_entry(tmp_path, caplog):
    _, bundle = _server()
    store = OuterBundleStore(tmp_path)
    path = store.put(bundle)
    assert OuterBundleStore(tmp_path).get(bundle.digest) == bundle
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit in the data
    path.write_bytes(bytes(raw))
    fresh = OuterBundleStore(tmp_path)
    assert fresh.get(bundle.digest) is None and not path.exists()
    assert "corrupt" in caplog.text
    fresh.put(bundle)
    assert OuterBundleStore(tmp_path).get(bundle.digest) == bundle
    with pytest.raises(OuterMismatch, match="not a sha256"):
        store.get("../../etc/passwd")


def test_sketch_tolerates_last_bits_and_names_flips_and_other_models(tmp_path):
    server, bundle = _server()
    theirs = sketch(bundle)
    odd = outer_bundle_of(fl.apply_nested(make_tiny("llama"), _cfg(cache_dir=_odd_path_cache(tmp_path))))
    assert odd.digest != bundle.digest
    assert 0 <= check_sketch(odd, theirs) < 1e-5
    name = next(iter(bundle.factors))
    f = bundle.factors[name]
    flip = torch.ones(f.S.shape[0], dtype=f.U.dtype)
    flip[1] = -1
    pair = OuterFactors(U=f.U * flip, S=f.S, Vh=f.Vh * flip[:, None])  # a consistent flip of one singular pair
    flipped = OuterBundle.from_factors({**bundle.factors, name: pair})
    with pytest.raises(OuterMismatch, match="flipped") as err:
        check_sketch(flipped, theirs)
    assert err.value.layer == name
    other = outer_bundle_of(fl.apply_nested(make_tiny("llama", seed=1), _cfg()))
    with pytest.raises(OuterMismatch, match="another base model"):
        check_sketch(other, theirs)
    small = outer_bundle_of(fl.apply_nested(make_tiny("llama"), _cfg(r=4)))
    with pytest.raises(OuterMismatch, match="layers or r differ"):
        check_sketch(small, theirs)
