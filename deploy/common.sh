# Sourced by every deploy/ script: paths of the state directory and the environment of flwr commands.
# Everything (certificates, node keys, pids, logs, SuperLink database, FLWR_HOMEs) lives under
# $FEDLORA_DEPLOY_STATE (default: deploy/.state next to this file).
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$DEPLOY_DIR/.." && pwd)"
STATE="${FEDLORA_DEPLOY_STATE:-$DEPLOY_DIR/.state}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
CERTS="$STATE/certs"          # ca.crt (public), ca.key (keep offline), server.pem, server.key
KEYS="$STATE/keys"            # SuperNode key pairs: <name> (private), <name>.pub (public)
PIDS="$STATE/pids"            # <component>.pid of every process the scripts started
LOGS="$STATE/logs"            # <component>.log
mkdir -p "$PIDS" "$LOGS"

# The environment of every flwr command: offline, no telemetry, the venv on PATH. The CLI side
# (register, submit, ls) gets its own FLWR_HOME under the state directory unless one is given.
export FLWR_HOME="${FLWR_HOME:-$STATE/flwr-home}"
# shellcheck source=../scripts/flwr_env.sh
source "$REPO_ROOT/scripts/flwr_env.sh"
mkdir -p "$FLWR_HOME"

# Name of the SuperLink connection written into $FLWR_HOME/config.toml by connect()
CONNECTION="${FEDLORA_CONNECTION:-fedlora-deploy}"

die() { echo "error: $*" >&2; exit 1; }

# Start a background process, record its pid in $PIDS/<name>.pid, log to $LOGS/<name>.log.
# Usage: start_bg NAME FLWR_HOME_DIR CMD...   (own session: detached from the caller's terminal; stop_all.sh
# ends it and its descendants by pid)
start_bg() {
  local name="$1" home="$2"; shift 2
  local pidfile="$PIDS/$name.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "$name already running (pid $(cat "$pidfile")); run deploy/stop_all.sh first"
  fi
  mkdir -p "$home"
  FLWR_HOME="$home" setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  echo "started $name (pid $!), log $LOGS/$name.log"
}

# Wait until HOST:PORT accepts TCP connections (or the process of PIDFILE died).
wait_port() {
  local host="$1" port="$2" pidfile="$3" name="$4" timeout="${5:-60}" i
  for ((i = 0; i < timeout * 5; i++)); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      tail -n 30 "$LOGS/$name.log" >&2 || true
      die "$name exited during start-up (log: $LOGS/$name.log)"
    fi
    sleep 0.2
  done
  die "$name does not listen on $host:$port after ${timeout}s (log: $LOGS/$name.log)"
}

# Write (or replace) the [superlink.$CONNECTION] entry of $FLWR_HOME/config.toml.
# Usage: connect ADDRESS CA_CERT
connect() {
  local address="$1" ca="$2"
  [ -f "$ca" ] || die "CA certificate $ca not found"
  python3 - "$FLWR_HOME/config.toml" "$CONNECTION" "$address" "$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")" <<'PY'
import re
import sys
from pathlib import Path

path, name, address, ca = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
text = path.read_text() if path.exists() else '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
# drop an existing [superlink.<name>] table (up to the next table header)
text = re.sub(rf"(?ms)^\[superlink\.{re.escape(name)}\]\n.*?(?=^\[|\Z)", "", text).rstrip() + "\n"
text += f'\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
path.write_text(text)
print(f"connection '{name}' -> {address} (CA {ca}) in {path}")
PY
}
