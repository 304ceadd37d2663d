# Source me: the environment every flwr command of this project runs in (offline, isolated state).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$REPO_ROOT/.venv/bin:$PATH"
export FLWR_HOME="${FLWR_HOME:-$REPO_ROOT/.flwr-home}"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 RAY_DEDUP_LOGS=1 PYTHONWARNINGS="ignore::FutureWarning"

# Stop the detached local SuperLink that `flwr run` started for this FLWR_HOME (it outlives the command).
stop_local_superlink() {
  local pids
  pids=$(pgrep -f "flower-superlink.*--log-file $FLWR_HOME/" || true)
  if [ -n "$pids" ]; then kill $pids 2>/dev/null || true; sleep 1; kill -9 $pids 2>/dev/null || true; fi
}

# Refuse to run when a local SuperLink of ANOTHER FLWR_HOME holds the port: flwr would reuse it,
# with that process's environment and state.
check_local_superlink_port() {
  local other
  other=$(pgrep -af "flower-superlink.*--port 39091" | grep -v -- "--log-file $FLWR_HOME/" || true)
  if [ -n "$other" ]; then
    echo "A local Flower SuperLink of another FLWR_HOME is running on 127.0.0.1:39091:" >&2
    echo "$other" >&2
    echo "stop it first (kill its pid)." >&2
    return 1
  fi
}

# Status of the newest run in this FLWR_HOME, e.g. finished:completed
latest_run_status() {
  "${FLWR:-flwr}" ls --format json 2>/dev/null | python3 -c '
import json, sys
runs = json.load(sys.stdin).get("runs", [])
runs.sort(key=lambda r: r.get("pending-at", ""))
print(runs[-1]["status"] if runs else "none")'
}
