"""The run-config check before submission (``python -m simulations.check_config``) and its use by
``scripts/run.sh`` and ``deploy/submit.sh``: a bad override fails at once, naming the key, before Flower
starts (Flower itself answers an unknown key with "[code: 15] Invalid run configuration.")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedlora.run_config import ConfigError
from simulations.check_config import check, main, parse_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text", [
    "num-server-rounds=3 strategy='hetero' ranks='16,8,4'",
    "results-dir='/abs/dir with space' lr=1e-3 central-eval=false dp-epsilon=inf",
    "",
])
def test_valid_overrides_parse_as_flower_parses_them(text):
    assert parse_overrides(text) == (parse_config_args([text]) if text else {})
    check([text])


@pytest.mark.parametrize(("texts", "key", "message"), [
    (["num-server-round=3"], "num-server-round", "unknown key (did you mean 'num-server-rounds'?)"),
    (["rank=0"], "rank", "0 must be >= 1"),
    (["num-server-rounds=3", "strategy='fedavg'"], "strategy", "must be one of"),
    (["strategy=fedsb"], "strategy", "not a TOML value"),  # Flower: "invalid format", naming nothing
    (["rank=4 rank=8"], "rank", "given more than once"),
    (["rank 8"], "rank", "expected key=value"),  # Flower drops the stray word silently
    (["dp-clip=inf"], "dp-clip", "must be finite"),
])
def test_bad_overrides_name_the_key(texts, key, message):
    with pytest.raises(ConfigError) as exc:
        check(texts)
    assert exc.value.key == key and message in str(exc.value)


def test_later_strings_win_as_in_flower():
    assert check(["rank=8", "rank=4"]) == {"rank": 4}


def test_cli_exit_status_and_message(capsys):
    assert main(["num-server-rounds=2 lr=0.01"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["num-server-round=2"]) == 2
    assert "run config 'num-server-round': unknown key (did you mean 'num-server-rounds'?)" in capsys.readouterr().err


def _script_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(tmp_path / "flwr-home"), FEDLORA_DEPLOY_STATE=str(tmp_path / "state"),
               RESULTS_DIR=str(tmp_path / "results"), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return env


@pytest.mark.parametrize("script", [
    ["scripts/run.sh", "num-server-round=3"],
    ["deploy/submit.sh", "--address", "127.0.0.1:1", "--run-config", "num-server-round=3"],
])
def test_scripts_fail_fast_on_a_bad_key_without_starting_flower(tmp_path, script):
    t0 = time.monotonic()
    proc = subprocess.run(["bash", *script], cwd=REPO, env=_script_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "run config 'num-server-round': unknown key (did you mean 'num-server-rounds'?)" in proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "flwr-home" / "config.toml").exists()  # no flwr command ran
    assert not (tmp_path / "state" / "last_run_id").exists()
    assert not (tmp_path / "results").exists()


def test_run_sh_refuses_the_keys_it_sets(tmp_path):
    proc = subprocess.run(["bash", "scripts/run.sh", "lr=0.1 run-name='x'"], cwd=REPO, env=_script_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "use RUN_NAME=" in proc.stderr
