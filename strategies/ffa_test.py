"""FFA-LoRA: frozen shared A, mean of B — exact."""

from __future__ import annotations

import numpy as np

from fedlora.lora_math import A_SUFFIX, B_SUFFIX
from strategies._testing import HEAD, LAYERS, NODE_IDS, R, config_of, make, rel_err, run_lora_round

ALPHA = 16.0


def test_ffa_dense_update_is_exact_and_a_frozen():
    s = make("ffa", lora_alpha=ALPHA)
    scale = ALPHA / R
    rng = np.random.default_rng(0)
    for rnd in (1, 2):
        out = run_lora_round(s, rnd, rng)
        p, ups, old, new = out["p"], out["uploads"], out["old"], s.global_state
        for layer in LAYERS:
            A = old[layer + A_SUFFIX]
            assert new[layer + A_SUFFIX].tobytes() == A.tobytes()  # bit-identical
            want = sum(pi * scale * up[layer + B_SUFFIX] @ A for pi, (up, _) in zip(p, ups))
            got = scale * new[layer + B_SUFFIX] @ new[layer + A_SUFFIX]
            assert rel_err(got, want) <= 1e-10
        for key in HEAD:
            assert rel_err(new[key], sum(pi * up[key] for pi, (up, _) in zip(p, ups))) <= 1e-12


def test_ffa_clients_upload_only_b():
    s = make("ffa")
    out = run_lora_round(s, 1, np.random.default_rng(1))
    for nid in NODE_IDS:
        exp = s._tasks[nid].expected
        assert not any(k.endswith(A_SUFFIX) for k in exp)
        for layer, (d, _) in LAYERS.items():
            assert exp[layer + B_SUFFIX] == (d, R)
    assert all(config_of(m)["freeze-a"] is True for m in out["msgs"])
    # upload = d·r per layer + head; download carries A and B
    head = 3 * 16 + 3
    per_up = sum(d * R for d, _ in LAYERS.values()) + head
    per_down = sum((d + k) * R for d, k in LAYERS.values()) + head
    assert out["metrics"]["upload-bytes"] == 5 * 8 * per_up
    assert out["metrics"]["download-bytes"] == 5 * 8 * per_down
