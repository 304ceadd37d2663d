"""Honest exit status, end to end through the in-process federation (``simulations.inprocess``: the real
ServerApp loop and ClientApp, no Ray): a run whose round aggregated nothing because every reply was
rejected fails, naming the reasons, after writing that round's metrics and keeping the checkpoint at the
last good round; with ``allow-empty-rounds=true`` the same run completes. The fault is injected through the
bounded-claims screening: with ``max-num-examples=1`` every node's declared example count is over the cap.
(``scripts/run.sh`` / ``deploy/submit.sh`` turn the failed run into exit 1: tests/test_run_script.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ALL_REJECTED = {"num-server-rounds": 2, "num-partitions": 2, "fraction-train": 1.0, "min-train-nodes": 1,
                "max-client-examples": 16, "max-test-examples": 16, "local-steps": 1, "central-eval": False,
                "export-adapter": False, "max-num-examples": 1}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_loop_fails_on_a_round_that_aggregated_nothing_unless_allowed():
    """run_rounds with synthetic clients: every reply of round 2 is rejected → the record, with ``failed``,
    reaches ``on_round_end`` (no evaluation) and RoundAggregatedNothing names the reasons; allowed, the run
    goes on."""
    from simulations.inprocess import server_task_identity
    from simulations.loop import RoundAggregatedNothing, run_rounds
    from strategies import _testing as t

    def grid(strategy):
        def client(msg):
            rnd = int(t.config_of(msg)["server-round"])
            return t.bad_reply("nan", strategy, msg, np.random.default_rng(rnd)) if rnd == 2 else \
                t.good_replies(strategy, [msg])[0]
        return t.FakeGrid(t.NODE_IDS, client)

    evaluated: list[int] = []
    for allow in (False, True):
        s = t.make("fedsb", fraction_evaluate=0.0)
        records: list[dict] = []
        run = dict(num_rounds=3, timeout=1, on_round_end=lambda r, rec, out=records: out.append(rec),
                   evaluate_fn=lambda r, state: evaluated.append(r) or {}, allow_empty_rounds=allow)
        with server_task_identity(run_id=1):
            if allow:
                run_rounds(grid(s), s, **run)
            else:
                with pytest.raises(RoundAggregatedNothing, match=r"round 2 aggregated nothing: 0 valid") as err:
                    run_rounds(grid(s), s, **run)
                assert str(err.value).count("[non-finite]") == len(t.NODE_IDS)
                assert records[-1]["failed"] == str(err.value) and evaluated == [1]
        assert [r["round"] for r in records] == ([1, 2, 3] if allow else [1, 2])
        assert records[1]["kept-previous"] and ("failed" in records[1]) is not allow
    assert evaluated == [1, 1, 2, 3]


@pytest.mark.slow
def test_all_rejected_run_fails_naming_the_reasons_unless_empty_rounds_are_allowed(tmp_path):
    from simulations.inprocess import run_in_process
    from simulations.loop import RoundAggregatedNothing
    from simulations.results import RunOutputs

    with pytest.raises(RoundAggregatedNothing) as err:
        run_in_process({**ALL_REJECTED, "results-dir": str(tmp_path), "run-name": "rejected"}, 2)
    text = str(err.value)
    assert text.startswith("round 1 aggregated nothing: 0 valid replies < min_train_nodes=1"), text
    assert text.count("[num-examples]: declared num-examples=") == 2 and "max_num_examples=1" in text, text
    assert "allow-empty-rounds=true" in text and "checkpoint keeps round 0" in text, text
    run_dir = tmp_path / "rejected"
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1]  # the failed round's metrics are written ...
    assert rows[1]["failed"] == text and rows[1]["kept-previous"] and rows[1]["clients-rejected"] == 2
    assert rows[1]["clients-missing"] == 0 and rows[1]["clients-used"] == 0
    assert RunOutputs(run_dir).read_checkpoint().state["round"] == 0  # ... the checkpoint keeps the last good one

    done = run_in_process({**ALL_REJECTED, "results-dir": str(tmp_path), "run-name": "allowed",
                           "allow-empty-rounds": True}, 2)
    rows = _rows(done)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["kept-previous"] and r["clients-rejected"] == 2 and "failed" not in r for r in rows[1:])
    assert RunOutputs(done).read_checkpoint().state["round"] == 2


def test_claim_bounds_and_empty_round_keys_fail_at_start_and_reach_the_strategy():
    from fedlora.run_config import ConfigError, parse_run_config
    from simulations.server_app import strategy_kwargs

    for key, value in [("max-update-norm-factor", 0.5), ("max-update-norm", -1.0), ("max-num-examples", -1),
                       ("allow-empty-rounds", "maybe"), ("max-num-examples-factor", 0.5),
                       ("max-num-examples-factor", 1.0)]:
        with pytest.raises(ConfigError, match=key):
            parse_run_config({key: value})
    default = strategy_kwargs(parse_run_config({}), "f" * 64, {})
    assert (default["max_num_examples"], default["max_update_norm"], default["norm_factor"]) == (10**7, 1e4, None)
    assert default["num_examples_factor"] == 10.0  # the median rule: on by default
    off = strategy_kwargs(parse_run_config({"max-num-examples": 0, "max-update-norm": 0.0,
                                            "max-update-norm-factor": 4.0, "max-num-examples-factor": 0}),
                          "f" * 64, {})
    assert (off["max_num_examples"], off["max_update_norm"], off["norm_factor"]) == (None, None, 4.0)
    assert off["num_examples_factor"] is None
