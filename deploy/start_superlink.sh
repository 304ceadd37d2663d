#!/usr/bin/env bash
# Start the SuperLink (server machine): TLS, SuperNode authentication, persistent state database.
#
#   deploy/start_superlink.sh [--host ADDR] [--port PORT]
#
#   --host ADDR   interface to listen on (default 127.0.0.1; on a real server 0.0.0.0 or its LAN address)
#   --port PORT   the SuperLink's one HTTPS port: Fleet API (SuperNodes), Control API (flwr run/ls/
#                 supernode register) and the ServerApp's Runtime API (default 9092; env SUPERLINK_PORT)
#
# Needs certs/ca.crt, certs/server.pem, certs/server.key (deploy/make_certs.sh). Writes pids/superlink.pid,
# logs/superlink.log, superlink/state.db and, for `flwr` on this machine, the connection
# [superlink.$FEDLORA_CONNECTION] (default fedlora-deploy) -> 127.0.0.1:PORT in $FLWR_HOME/config.toml.
# The ServerApp runs as a child of the SuperLink: its working directory is superlink/ under the state
# directory, so give absolute paths for results-dir.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOST="${SUPERLINK_HOST:-127.0.0.1}"
PORT="${SUPERLINK_PORT:-9092}"
while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
for f in ca.crt server.pem server.key; do
  [ -f "$CERTS/$f" ] || die "$CERTS/$f missing: run deploy/make_certs.sh first"
done

mkdir -p "$STATE/superlink"
cd "$STATE/superlink"
start_bg superlink "$STATE/superlink/flwr-home" flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth --database "$STATE/superlink/state.db" \
  --host "$HOST" --port "$PORT"
probe="$HOST"
[ "$probe" = "0.0.0.0" ] && probe=127.0.0.1
wait_port "$probe" "$PORT" "$PIDS/superlink.pid" superlink 90
connect "127.0.0.1:$PORT" "$CERTS/ca.crt"
echo "SuperLink listening on $HOST:$PORT (TLS, SuperNode authentication on)"
