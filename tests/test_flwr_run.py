"""End to end through the real CLI: `flwr run .` on a local simulation SuperLink in an isolated FLWR_HOME,
directly and through `scripts/run.sh` (what `make run` runs: its console shows only the run's [fedlora]
lines, the whole stream goes to <results>/<run>/run.log).

`flwr run` exits 0 even when the run fails, so the status is read with `flwr ls --format json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ("num-server-rounds=2 max-client-examples=32 max-test-examples=32 local-steps=2 "
        "round-timeout=120.0 eval-batch-size=32")

pytestmark = pytest.mark.slow


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PATH=f"{BIN}:{env.get('PATH', '')}")
    return env


def _foreign_superlink(flwr_home: Path) -> str:
    out = subprocess.run(["pgrep", "-af", "flower-superlink.*--port 39091"], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if f"--log-file {flwr_home}/" not in line)


def _runs(env) -> list[dict]:
    out = subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    runs = json.loads(out.stdout)["runs"]
    return sorted(runs, key=lambda r: r["pending-at"])


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    other = _foreign_superlink(home)
    assert not other, f"another local SuperLink holds 127.0.0.1:39091; stop it first:\n{other}"
    yield home
    subprocess.run(["pkill", "-f", f"flower-superlink.*--log-file {home}/"], check=False)


def _flwr_run(env, run_config: str, num_supernodes: int = 2) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "flwr"), "run", ".", "--stream", "--federation-config",
           f"num-supernodes={num_supernodes} client-resources-num-cpus=1", "--run-config", run_config]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _run_sh(env, results: Path, run_name: str, run_config: str, num_supernodes: int = 2):
    env = {**env, "NUM_SUPERNODES": str(num_supernodes), "RESULTS_DIR": str(results), "RUN_NAME": run_name}
    return subprocess.run(["bash", str(REPO / "scripts" / "run.sh"), run_config], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_flwr_run_completes_and_writes_metrics(flwr_home, tmp_path):
    env = _env(flwr_home)
    results = tmp_path / "results"

    # a bad config fails at start: the run is marked failed and the log names the key (flwr run directly:
    # scripts/run.sh refuses it before submitting, tests/test_check_config.py)
    bad = _flwr_run(env, f"{TINY} results-dir='{results}' run-name='bad' rank=0")
    runs = _runs(env)
    assert runs[-1]["status"] == "finished:failed"
    assert "run config 'rank'" in bad.stdout + bad.stderr
    assert not (results / "bad" / "metrics.jsonl").exists()

    # the main job's script (on the SuperLink the bad run started, which it leaves running), on a bf16 base with
    # bf16 autocast (tests/test_precision.py: the same in process learns and keeps float32 states)
    proc = _run_sh(env, results, "e2e", f"{TINY} dtype='bfloat16' amp=true")
    runs = _runs(env)
    assert runs and runs[-1]["status"] == "finished:completed", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[fedlora] round 2/2" in proc.stdout
    # the console: a start line, one line per round, the done line and where the full log is; nothing else
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0].split(" round ")[0] for line in lines] == [
        "[fedlora] start e2e", "[fedlora]", "[fedlora]", "[fedlora]", "[fedlora] done", "[fedlora] full log"], lines
    assert [line.split()[2] for line in lines[1:4]] == ["0/2", "1/2", "2/2"]
    assert lines[-1] == f"[fedlora] full log: {results / 'e2e' / 'run.log'}"
    log = (results / "e2e" / "run.log").read_text()
    # Flower's own lines (INFO ...) are kept in the log; which of them arrive before the stream closes varies
    for text in ("INFO", "[fedlora] round 2/2", "[fedlora] done", "flwr run status: finished:completed"):
        assert text in log, text
    rows = [json.loads(x) for x in (results / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("accuracy", "loss", "upload-bytes", "download-bytes", "cumulative-bytes", "clients-used",
                    "clients-rejected", "round-seconds"):
            assert r[key] is not None, key
        assert r["clients-used"] == 2 and r["clients-rejected"] == 0 and r["upload-bytes"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0
    run_dir = results / "e2e"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "accuracy_vs_round.png").exists() and (run_dir / "accuracy_vs_bytes.png").exists()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["strategy"] == "fedsb" and len(cfg["fingerprint"]) == 64
    assert cfg["dtype"] == "bfloat16" and cfg["amp"] is True
