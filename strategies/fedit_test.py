"""FedIT: mean of A and B separately — the inexact baseline."""

from __future__ import annotations

import numpy as np

from fedlora.lora_math import A_SUFFIX, B_SUFFIX
from strategies._testing import HEAD, LAYERS, R, arrays_of, make, rel_err, run_lora_round

ALPHA = 16.0


def test_fedit_means_factors_and_is_inexact():
    s = make("fedit", lora_alpha=ALPHA)
    scale = ALPHA / R
    out = run_lora_round(s, 1, np.random.default_rng(0))
    p, ups, new = out["p"], out["uploads"], s.global_state
    for layer in LAYERS:
        A_mean = sum(pi * up[layer + A_SUFFIX] for pi, (up, _) in zip(p, ups))
        B_mean = sum(pi * up[layer + B_SUFFIX] for pi, (up, _) in zip(p, ups))
        assert rel_err(new[layer + A_SUFFIX], A_mean) <= 1e-12
        assert rel_err(new[layer + B_SUFFIX], B_mean) <= 1e-12
        want = sum(pi * scale * up[layer + B_SUFFIX] @ up[layer + A_SUFFIX] for pi, (up, _) in zip(p, ups))
        got = scale * new[layer + B_SUFFIX] @ new[layer + A_SUFFIX]
        assert rel_err(got, want) > 1e-2, "FedIT should not be exact"
    for key in HEAD:
        assert rel_err(new[key], sum(pi * up[key] for pi, (up, _) in zip(p, ups))) <= 1e-12


def test_fedit_round_trip_shapes_and_download():
    s = make("fedit")
    out = run_lora_round(s, 1, np.random.default_rng(1))
    for m in out["msgs"]:
        arrays = arrays_of(m)
        for layer, (d, k) in LAYERS.items():
            assert arrays[layer + A_SUFFIX].shape == (R, k)
            assert arrays[layer + B_SUFFIX].shape == (d, R)
    assert {k: v.shape for k, v in s.global_state.items()} == {k: v.shape for k, v in out["old"].items()}
