"""``scripts/run.sh`` (what ``make run`` runs) with a stand-in for the flwr command (``FLWR``): the console
shows only the run's ``[fedlora]`` lines and where the full log is, the whole stream goes to
``<results>/<run>/run.log``, and the script fails unless the run's status is ``finished:completed``.
The real CLI end to end: tests/test_flwr_run.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE_FLWR = """#!/usr/bin/env bash
case "$1" in
  run)
    printf '%s\\n' "$@" > "$FAKE_DIR/args"
    echo "Starting local SuperLink on 127.0.0.1:39091..."
    echo "INFO :      Starting Flower Simulation" >&2
    echo "[fedlora] start t: fedsb rank=16"
    echo "Map: 100%|##########| 32/32"
    echo "INFO :      [fedlora] round 1/1 accuracy=0.5000"
    echo "11/30/2026 10:07:57:DEBUG:ServerApp finished running."
    echo "[fedlora] done: final accuracy=0.5000 after round 1"
    ;;
  ls) echo "{\\"runs\\": [{\\"status\\": \\"$(cat "$FAKE_DIR/status")\\", \\"pending-at\\": \\"2026\\"}]}" ;;
esac
"""


def _run(tmp_path: Path, status: str, overrides: str = "num-server-rounds=1",
         **extra_env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "flwr"
    fake.write_text(FAKE_FLWR)
    fake.chmod(0o755)
    (tmp_path / "status").write_text(status)
    env = dict(os.environ)
    env.update(FLWR=str(fake), FAKE_DIR=str(tmp_path), FLWR_HOME=str(tmp_path / "flwr-home"), RUN_NAME="t",
               RESULTS_DIR=str(tmp_path / "results"), NUM_SUPERNODES="2",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", **extra_env)
    return subprocess.run(["bash", "scripts/run.sh", overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_console_shows_the_fedlora_lines_and_the_log_has_everything(tmp_path):
    proc = _run(tmp_path, "finished:completed")
    log = tmp_path / "results" / "t" / "run.log"
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[fedlora] start t: fedsb rank=16", "[fedlora] round 1/1 accuracy=0.5000",
        "[fedlora] done: final accuracy=0.5000 after round 1", f"[fedlora] full log: {log}"]
    assert proc.stderr == ""
    text = log.read_text()
    for line in ("Starting local SuperLink", "INFO :      Starting Flower Simulation", "Map: 100%",
                 "ServerApp finished running.", "flwr run status: finished:completed"):
        assert line in text, line
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["run", ".", "--stream"]
    assert args[args.index("--run-config") + 1] == (
        f"results-dir='{tmp_path / 'results'}' run-name='t' num-partitions=2 num-server-rounds=1")
    assert args[args.index("--federation-config") + 1] == "num-supernodes=2 client-resources-num-cpus=1"


def test_client_gpus_give_each_clientapp_a_gpu_share(tmp_path):
    proc = _run(tmp_path, "finished:completed", "device='cuda' dtype='bfloat16' amp=true", CLIENT_GPUS="0.25")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[args.index("--federation-config") + 1] == (
        "num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus=0.25")


def test_a_run_that_did_not_complete_fails_and_names_the_log(tmp_path):
    assert _run(tmp_path, "finished:completed").returncode == 0
    proc = _run(tmp_path, "finished:failed", "num-server-rounds=1 resume=true")
    log = tmp_path / "results" / "t" / "run.log"
    assert proc.returncode == 1
    assert "the run did not complete (flwr run status: finished:failed)" in proc.stderr
    assert "ServerApp finished running." in proc.stderr  # the last lines of the log
    assert f"full log: {log}" in proc.stderr
    assert log.read_text().count("=== ") == 2  # the second run appended to the first one's log


FAKE_SUBMIT_FLWR = """#!/usr/bin/env bash
case "$1" in
  run) printf '%s\\n' "$@" > "$FAKE_DIR/args"; echo "[fedlora] round 1/1 FAILED: the round aggregated nothing" ;;
  ls) printf '{"runs": [{"run-id": 7, "status": "%s", "pending-at": "2026"}]}\\n' "$(cat "$FAKE_DIR/status")" ;;
esac
"""


def _submit(tmp_path: Path, status: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "flwr"
    fake.write_text(FAKE_SUBMIT_FLWR)
    fake.chmod(0o755)
    (tmp_path / "status").write_text(status)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text('[superlink.fedlora-deploy]\naddress = "127.0.0.1:1"\n')
    env = dict(os.environ)
    env.update(FLWR=str(fake), FAKE_DIR=str(tmp_path), FLWR_HOME=str(home), FEDLORA_DEPLOY_STATE=str(tmp_path / "st"),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return subprocess.run(["bash", "deploy/submit.sh", "--run-config", "num-server-rounds=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_submit_exits_1_unless_the_run_completed(tmp_path):
    """deploy/submit.sh reads the run's status back (flwr run exits 0 for a failed run, e.g. one whose
    rounds aggregated nothing): exit 1 with the run id for finished:failed, 0 for finished:completed."""
    failed = _submit(tmp_path, "finished:failed")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "run 7 (submitted after" in failed.stdout and "finished:failed" in failed.stdout
    assert "run 7 did not complete" in failed.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[0] == "run" and args[2] == "fedlora-deploy" and args[args.index("--run-config") + 1] == \
        "num-server-rounds=1"
    assert (tmp_path / "st" / "last_run_id").read_text().strip() == "7"
    done = _submit(tmp_path, "finished:completed")
    assert done.returncode == 0, done.stdout + done.stderr
