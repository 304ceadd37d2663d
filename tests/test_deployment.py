"""The Deployment Engine with the ``deploy/`` scripts: a SuperLink with TLS and SuperNode authentication and
two SuperNodes on 127.0.0.1 (free ports found at run time), a fedsb run submitted with ``flwr run`` through a
TLS connection, its status read back with ``flwr ls --format json``; a SuperNode with an unregistered key is
refused. Every process is started by the scripts, recorded by pid and stopped with ``deploy/stop_all.sh``.

Mixed hardware: one SuperNode runs on another numeric code path, Intel MKL's conditional numerical
reproducibility switch ``MKL_CBWR=AVX2`` (MKL runs the kernels an AVX2 machine would), and every process has its
own outer-factor cache. The test first shows that the path changes the SVD's last bits on this machine (the exact
fingerprint of the run's own model differs); the run must still use both nodes' updates in every round and each
aggregate must equal the explicit weighted mean of the clients' ΔW, recomputed from the server's aggregation
audit (``simulations/audit.py``) with the server's outer factors. ``tests/test_deployment_mixed.py`` puts the
server on the odd path."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora.outer_bundle import OuterBundleStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
TINY = "num-server-rounds=2 max-client-examples=32 max-test-examples=32 local-steps=2 round-timeout=120.0"


ODD = {"MKL_CBWR": "AVX2"}
FINGERPRINT = """
from fedlora.experiment import adapter_for, build_model
from fedlora.run_config import parse_run_config
spec = parse_run_config({"svd-method": "full"}).spec()
print(adapter_for("fedsb").fingerprint(build_model(spec)))
"""


def fingerprint_on(env: dict, cache: Path) -> str:
    """The exact outer-factor fingerprint a fresh process computes for the run's model on a code path."""
    proc = subprocess.run([sys.executable, "-c", FINGERPRINT], env={**os.environ, **env, "FEDLORA_CACHE": str(cache)},
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    return proc.stdout.strip().splitlines()[-1]


def check_exact_rounds(results: Path, audit: Path, used: int, sent: int, rounds: int = 2) -> list[dict]:
    """Every round: ``used`` updates aggregated, none missing; the factors sent to ``sent`` nodes in round 1 and
    to none after; ΔW of the aggregate = Σ pᵢ ΔWᵢ (recomputed from the audit with the server's outer factors;
    float32 state: ≤ 1e-6 relative). Returns the rounds' rows."""
    from safetensors.numpy import load_file

    rows = [json.loads(x) for x in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert [r["outer-nodes"] for r in rows[1:]] == [sent] + [0] * (rounds - 1)
    config = json.loads((results / "config.json").read_text())
    bundle = OuterBundleStore(results / "outer-factors").get(config["outer-digest"])
    assert bundle is not None
    for r in rows[1:]:
        assert r["clients-used"] == used and r["clients-missing"] == 0, r
        arrays = load_file(str(audit / f"round-{r['round']}.safetensors"))
        weights = json.loads((audit / f"round-{r['round']}.json").read_text())["weights"]
        assert len(weights) == used
        for name, f in bundle.factors.items():
            B, A = f.U.double().numpy(), f.Vh.double().numpy()
            got = B @ (arrays[f"after/{name}.R0"].astype(np.float64) - arrays[f"before/{name}.R0"]) @ A
            want = sum(p * (B @ arrays[f"node-{nid}/{name}.R"].astype(np.float64) @ A) for nid, p in weights.items())
            assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), name
    return rows[1:]


def free_ports(n: int) -> int:
    """A base port p such that p … p+n-1 are free on 127.0.0.1."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block on 127.0.0.1")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Deployment:
    """A SuperLink + SuperNodes on 127.0.0.1 started with the deploy/ scripts in ``state`` (a temp dir)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        ports = free_ports(8)
        self.port, self.node_port = ports, ports + 1
        env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "FEDLORA_CONNECTION")}
        env.update(FEDLORA_DEPLOY_STATE=str(state), PATH=f"{BIN}:{env.get('PATH', '')}",
                   FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", SUPERNODE_CHECK_SECONDS="3")
        self.env = env
        self.superlink = f"127.0.0.1:{self.port}"

    def sh(self, script: str, *args: str, timeout: float = 180, check: bool = True, extra_env=None):
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(["bash", str(DEPLOY / script), *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**self.env, "FLWR_HOME": str(self.state / "flwr-home")}
        return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, nodes: int = 2, node_args: list[list[str]] | None = None, unregistered: tuple[str, ...] = (),
              node_env: list[dict] | None = None, superlink_env: dict | None = None):
        """Certificates, SuperLink, registration of sn0 … sn<nodes-1>, then the SuperNodes (default: partition
        i of ``nodes``; ``node_args`` gives each start_supernodes.sh call its own arguments instead, and
        ``node_env`` its own extra environment; ``superlink_env``: the SuperLink's and so its ServerApp's)."""
        self.sh("make_certs.sh", "--nodes", str(nodes))
        for name in unregistered:
            self.sh("make_certs.sh", "--keys-only", "--node", name)
        self.sh("start_superlink.sh", "--port", str(self.port), extra_env=superlink_env)
        self.sh("register_nodes.sh", *[str(self.state / "keys" / f"sn{i}.pub") for i in range(nodes)])
        if node_args is None:
            self.sh("start_supernodes.sh", "--nodes", str(nodes), "--superlink", self.superlink,
                    "--first-port", str(self.node_port))
        else:
            for i, args in enumerate(node_args):
                self.sh("start_supernodes.sh", *args, "--superlink", self.superlink,
                        "--first-port", str(self.node_port + i), extra_env=(node_env or [{}] * len(node_args))[i])
        return self

    def pid(self, name: str) -> int:
        return int((self.state / "pids" / f"{name}.pid").read_text())

    def log(self, name: str) -> str:
        path = self.state / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def nodes(self) -> list[dict]:
        out = self.flwr("supernode", "list", "fedlora-deploy", "--format", "json")
        return json.loads(out.stdout).get("nodes", []) if out.returncode == 0 else []

    def wait_online(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for x in self.nodes() if x.get("status") == "online") >= n:
                return
            time.sleep(1)
        raise AssertionError(f"{n} SuperNodes not online after {timeout}s: {self.nodes()}")

    def submit(self, run_config: str, timeout: float = 600, background: bool = False):
        cmd = ["bash", str(DEPLOY / "submit.sh"), "--run-config", run_config]
        if background:
            return subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def runs(self) -> list[dict]:
        out = self.flwr("ls", "fedlora-deploy", "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        return sorted(json.loads(out.stdout)["runs"], key=lambda r: r["pending-at"])

    def crash(self, name: str) -> None:
        """SIGKILL a component and all its descendants (a machine that dies: no graceful shutdown)."""
        self.sh("stop_all.sh", name, extra_env={"STOP_SIGNAL": "KILL"})

    def stop(self) -> None:
        pids = [int(p.read_text()) for p in (self.state / "pids").glob("*.pid")]
        self.sh("stop_all.sh", check=False, timeout=120)
        # belt and braces: nothing the scripts started may survive (recorded pids only)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), f"processes survived stop_all.sh: {pids}"


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path / "state")
    try:
        yield dep
    finally:
        dep.stop()


def write_csv(path: Path, n: int = 40) -> Path:
    """A node's own local data: CSV with text,label (synthetic movie-review snippets)."""
    good = ["a warm, funny and moving film", "brilliant acting and a clever script", "i loved every minute"]
    bad = ["a dull, lifeless mess", "the plot makes no sense and drags", "i wanted my money back"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            label = i % 2
            w.writerow([(good if label else bad)[i % 3] + f" ({i})", label])
    return path


def test_deployment_tls_node_auth_two_rounds_mixed_code_paths(deployment, tmp_path):
    assert fingerprint_on({}, tmp_path / "fp-a") != fingerprint_on(ODD, tmp_path / "fp-b")  # the path differs here
    dep = deployment
    data = write_csv(tmp_path / "node1.csv")
    audit = tmp_path / "audit"
    # sn0 trains on partition 0 of 2 of the run's dataset, sn1 on its own local CSV (data-path) and on MKL's
    # AVX2 code path; every process has its own outer-factor cache
    dep.start(nodes=2, unregistered=("intruder",), node_args=[
        ["--node", "sn0", "--num-partitions", "2"],
        ["--node", "sn1", "--data-path", str(data)],
    ], node_env=[{"FEDLORA_CACHE": str(tmp_path / "cache-sn0")}, {"FEDLORA_CACHE": str(tmp_path / "cache-sn1"), **ODD}],
        superlink_env={"FEDLORA_CACHE": str(tmp_path / "cache-server"), "FEDLORA_AUDIT_DIR": str(audit)})
    dep.wait_online(2)
    # a SuperNode whose key was never registered is refused
    refused = dep.sh("start_supernodes.sh", "--node", "intruder", "--data-path", str(data), "--superlink",
                     dep.superlink, "--first-port", str(dep.node_port + 2), "--max-wait-time", "30", check=False)

    results = tmp_path / "results"
    t0 = time.perf_counter()
    proc = dep.submit(f"{TINY} svd-method='full' results-dir='{results}' run-name='deploy'")
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    runs = dep.runs()
    assert runs and runs[-1]["status"] == "finished:completed", out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    assert "[fedlora] round 2/2" in out
    rows = check_exact_rounds(results / "deploy", audit / "deploy", used=2, sent=2)
    for r in rows:
        assert r["clients-rejected"] == 0 and r["upload-bytes"] > 0 and 0.0 <= r["accuracy"] <= 1.0, r
    print(f"deployment run: 2 rounds in {seconds:.0f}s (round seconds {[round(r['round-seconds']) for r in rows]})")
    # each node keeps the server's factors in its own store
    assert all(list((tmp_path / f"cache-sn{i}" / "outer" / "bundles").glob("*.safetensors")) for i in (0, 1))

    # the intruder never became a node of the federation and its SuperNode gave up
    deadline = time.monotonic() + 60
    while _alive(dep.pid("supernode-intruder")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(dep.pid("supernode-intruder")), dep.log("supernode-intruder")[-2000:]
    assert "Failed to activate SuperNode" in dep.log("supernode-intruder"), dep.log("supernode-intruder")[-2000:]
    if refused.returncode != 0:  # start_supernodes.sh saw it exit during its start-up check
        assert "SuperNode intruder exited" in refused.stderr, refused.stderr
    nodes = dep.nodes()
    assert len(nodes) == 2 and {n["status"] for n in nodes} == {"online"}, nodes
