"""FLoRA (peft LoRA): stacked factors merged into an exact low-rank global delta."""

from __future__ import annotations

import numpy as np

from fedlora.lora_math import A_SUFFIX, B_SUFFIX, DELTA_A, DELTA_B
from strategies._testing import (
    HEAD,
    LAYERS,
    R,
    arrays_of,
    config_of,
    delta_dense,
    make,
    peft_global,
    rel_err,
    run_lora_round,
)

ALPHA = 16.0


def test_flora_lora_merged_update_is_exact_over_rounds():
    init = peft_global(R)
    s = make("flora-lora", lora_alpha=ALPHA, initial_state=init)
    # the initial peft adapter (s·B·A) is converted exactly to the delta form
    for layer in LAYERS:
        want0 = ALPHA / R * init[layer + B_SUFFIX] @ init[layer + A_SUFFIX]
        assert rel_err(delta_dense(s.global_state, layer), want0) <= 1e-12
    rng = np.random.default_rng(0)
    for rnd in (1, 2, 3):
        out = run_lora_round(s, rnd, rng)
        p, ups, old, new = out["p"], out["uploads"], out["old"], s.global_state
        for layer, (d, k) in LAYERS.items():
            want = delta_dense(old, layer) + sum(
                pi * (ALPHA / r_i) * up[layer + B_SUFFIX] @ up[layer + A_SUFFIX]
                for pi, (up, r_i) in zip(p, ups)
            )
            assert rel_err(delta_dense(new, layer), want) <= 1e-10
            rho = new[layer + DELTA_A].shape[0]
            assert rho <= min(d, k)
            assert new[layer + DELTA_B].shape == (d, rho)
        for key in HEAD:
            assert rel_err(new[key], sum(pi * up[key] for pi, (up, _) in zip(p, ups))) <= 1e-12


def test_flora_lora_download_carries_the_merged_delta_and_bytes_are_its_payload():
    s = make("flora-lora", initial_state=peft_global(R, zero_b=True))
    for layer, (d, k) in LAYERS.items():  # zero initial adapter → ρ = 0
        assert s.global_state[layer + DELTA_B].shape == (d, 0)
        assert s.global_state[layer + DELTA_A].shape == (0, k)
    rng = np.random.default_rng(1)
    run_lora_round(s, 1, rng)
    out = run_lora_round(s, 2, rng)
    sent = arrays_of(out["msgs"][0])
    for layer in LAYERS:
        got = sent[layer + DELTA_B] @ sent[layer + DELTA_A]
        assert rel_err(got, delta_dense(out["old"], layer)) <= 1e-12
    payload = sum(v.nbytes for v in out["old"].values())
    assert out["metrics"]["download-bytes"] == 5 * payload
    cfg = config_of(out["msgs"][0])
    assert cfg["restart-inner"] is True and cfg["lora-format"] == "delta"
    # heterogeneous uploads: A (rᵢ×k), B (d×rᵢ)
    assert sorted(r for _, r in out["uploads"]) == [2, 4, 4, 8, 8]
    for up, r_i in out["uploads"]:
        for layer, (d, k) in LAYERS.items():
            assert up[layer + A_SUFFIX].shape == (r_i, k) and up[layer + B_SUFFIX].shape == (d, r_i)
