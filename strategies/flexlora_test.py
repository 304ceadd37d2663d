"""FlexLoRA: exact dense global Σ pᵢsᵢBᵢAᵢ, per-node SVD truncation to the node's rank."""

from __future__ import annotations

import numpy as np

from fedlora.lora_math import A_SUFFIX, B_SUFFIX, flexlora_aggregate
from strategies._testing import (
    HEAD,
    LAYERS,
    NODE_IDS,
    R,
    arrays_of,
    config_of,
    delta_dense,
    make,
    node_of,
    peft_global,
    rel_err,
    run_lora_round,
)

ALPHA = 16.0


def _scaled(up: dict, r_i: int) -> dict:
    return {k: (v * (ALPHA / r_i) if k.endswith(B_SUFFIX) else v) for k, v in up.items()}


def test_flexlora_global_is_exact_and_downloads_are_truncations():
    s = make("flexlora", lora_alpha=ALPHA, initial_state=peft_global(R, zero_b=True))
    rng = np.random.default_rng(0)
    out = run_lora_round(s, 1, rng)
    # round 1 from a zero adapter: B' = 0, A' non-zero (fresh rows), so sᵢB'A' = 0 and B still trains
    for m in out["msgs"]:
        for layer in LAYERS:
            assert not arrays_of(m)[layer + B_SUFFIX].any()
            assert arrays_of(m)[layer + A_SUFFIX].any()
    p, ups, new = out["p"], out["uploads"], s.global_state
    ref_dense, _ = flexlora_aggregate([_scaled(u, r) for u, r in ups], p, [r for _, r in ups])
    for layer in LAYERS:
        want = sum(
            pi * (ALPHA / r_i) * up[layer + B_SUFFIX] @ up[layer + A_SUFFIX] for pi, (up, r_i) in zip(p, ups)
        )
        assert rel_err(delta_dense(new, layer), want) <= 1e-10
        assert rel_err(ref_dense[layer], want) <= 1e-12
    for key in HEAD:
        assert rel_err(new[key], sum(pi * up[key] for pi, (up, _) in zip(p, ups))) <= 1e-12

    # next round: each node gets the best rank-rᵢ approximation, identical to lora_math's split
    out2 = run_lora_round(s, 2, rng)
    ranks = [r for _, r in out2["uploads"]]
    assert sorted(ranks) == [2, 4, 4, 8, 8]
    _, ref_clients = flexlora_aggregate([_scaled(u, r) for u, r in ups], p, ranks)
    for i, m in enumerate(out2["msgs"]):
        r_i = config_of(m)["rank"]
        arrays = arrays_of(m)
        for layer, (d, k) in LAYERS.items():
            B_, A_ = arrays[layer + B_SUFFIX], arrays[layer + A_SUFFIX]
            assert B_.shape == (d, r_i) and A_.shape == (r_i, k)
            B_ref, A_ref = ref_clients[i][layer]
            np.testing.assert_allclose((ALPHA / r_i) * B_ @ A_, B_ref @ A_ref, rtol=0, atol=1e-10)
            np.testing.assert_allclose(np.sqrt(ALPHA / r_i) * B_, B_ref, rtol=0, atol=1e-10)
            U, S, Vt = np.linalg.svd(want_dense := delta_dense(out2["old"], layer))
            best = (U[:, :r_i] * S[:r_i]) @ Vt[:r_i]
            assert rel_err((ALPHA / r_i) * B_ @ A_, best) <= 1e-10
            if r_i < R:
                assert rel_err(best, want_dense) > 1e-2  # truncation is lossy (FlexLoRA's inexactness)


def test_flexlora_download_bytes_depend_on_rank():
    s = make("flexlora", initial_state=peft_global(R))
    out = run_lora_round(s, 1, np.random.default_rng(2))
    head = 3 * 16 + 3
    per_rank = {r: 8 * (sum((d + k) * r for d, k in LAYERS.values()) + head) for r in (2, 4, 8)}
    want = sum(per_rank[s._tasks[nid].rank] for nid in NODE_IDS)
    assert out["metrics"]["download-bytes"] == want
    sizes = {
        config_of(m)["rank"]: sum(v.nbytes for v in arrays_of(m).values()) for m in out["msgs"]
    }
    assert sizes == per_rank
    assert {node_of(m) for m in out["msgs"]} == set(NODE_IDS)
