"""Smoke test of ``python -m bench.secagg --quick``: it runs the same federation plain and secure and measures an
error within the quantisation bound (plus the float32 rounding of the global state) and a larger upload."""

from __future__ import annotations

import pytest

from bench._common import read_csv

pytestmark = pytest.mark.slow


def test_secagg_quick(tmp_path):
    from bench import secagg

    out = secagg.main(["--quick", "--out-dir", str(tmp_path)])
    (row,) = out["rows"]
    assert row["strategy"] == "fedsb" and row["clients"] == 3
    assert 0 < row["dw_max_abs"] <= row["bound"] * 1.01 + 1e-7
    assert 0 < row["dw_rel_err"] < 1e-3 and 0 < row["head_rel_err"] < 1e-3
    assert row["secure_up_bytes"] > row["plain_up_bytes"] and row["secure_protocol_s"] > 0
    assert {"dw_rel_err", "up_ratio", "time_ratio", "m_cpu_count"} <= set(read_csv(out["csv"])[0])
