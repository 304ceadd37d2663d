#!/usr/bin/env bash
# Start SuperNodes (client machines), each with its own authentication key and data.
#
# Trial on one machine: N SuperNodes sn0 … sn<N-1>, node i trains on partition i of N of the run's dataset:
#   deploy/start_supernodes.sh --nodes 2 [--superlink 127.0.0.1:9092] [--first-port 9094]
# A real client machine: one SuperNode with its own key (keys/NAME) and its own local data:
#   deploy/start_supernodes.sh --node NAME --data-path /data/my_texts.csv --superlink superlink.example.org:9092
#
#   --superlink HOST:PORT  the SuperLink's address as the server certificate names it (default
#                          127.0.0.1:$SUPERLINK_PORT, SUPERLINK_PORT default 9092)
#   --nodes N              start sn0 … sn<N-1> with --node-config "partition-id=i num-partitions=N"
#   --num-partitions M     partitions to split the dataset into (default N; M > N leaves some unused)
#   --node NAME            start only the SuperNode NAME (key keys/NAME); repeatable
#   --data-path PATH       node config data-path=PATH: a CSV with text,label columns or a directory of
#                          <label>/*.txt (applies to the --node given before it, or to all if none)
#   --node-config "K=V …"  extra node config for every SuperNode started by this call
#   --first-port P         local port of the first SuperNode's ClientApp API (127.0.0.1 only; node k
#                          gets P+k; default 9094)
#   --max-wait-time S      give up connecting to the SuperLink after S seconds (default: retry forever)
#
# Each SuperNode: pids/supernode-NAME.pid, logs/supernode-NAME.log, nodes/NAME/ (working dir, FLWR_HOME,
# privacy-ledger/: node config state-dir, the node's DP budget; keep it as long as its run names are used).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SUPERLINK="127.0.0.1:${SUPERLINK_PORT:-9092}"
NUM=0
NPARTS=0
FIRST_PORT="${SUPERNODE_FIRST_PORT:-9094}"
EXTRA=""
MAX_WAIT=""
declare -a NAMES=()
declare -A DATA=()
GLOBAL_DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --superlink) SUPERLINK="$2"; shift 2 ;;
    --nodes) NUM="$2"; shift 2 ;;
    --num-partitions) NPARTS="$2"; shift 2 ;;
    --node) NAMES+=("$2"); shift 2 ;;
    --data-path)
      if [ ${#NAMES[@]} -gt 0 ]; then DATA["${NAMES[-1]}"]="$2"; else GLOBAL_DATA="$2"; fi
      shift 2 ;;
    --node-config) EXTRA="$2"; shift 2 ;;
    --first-port) FIRST_PORT="$2"; shift 2 ;;
    --max-wait-time) MAX_WAIT="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -f "$CERTS/ca.crt" ] || die "$CERTS/ca.crt missing (copy the deployment's CA certificate there)"
if [ ${#NAMES[@]} -eq 0 ]; then
  [ "$NUM" -gt 0 ] || die "give --nodes N or --node NAME"
  for ((i = 0; i < NUM; i++)); do NAMES+=("sn$i"); done
fi
[ "$NPARTS" -gt 0 ] || NPARTS="${NUM:-0}"

k=0
STARTED=()
for name in "${NAMES[@]}"; do
  key="$KEYS/$name"
  [ -f "$key" ] || die "private key $key missing (deploy/make_certs.sh --node $name)"
  data="${DATA[$name]:-$GLOBAL_DATA}"
  if [ -n "$data" ]; then
    [ -e "$data" ] || die "data-path $data does not exist"
    data="$(cd "$(dirname "$data")" && pwd)/$(basename "$data")"
    config="data-path=\"$data\""
  elif [[ "$name" =~ ^sn([0-9]+)$ ]] && [ "$NPARTS" -gt 0 ]; then
    config="partition-id=${BASH_REMATCH[1]} num-partitions=$NPARTS"
  else
    die "SuperNode $name: give --data-path (or use sn<i> names with --nodes N)"
  fi
  [ -n "$EXTRA" ] && config="$config $EXTRA"
  port=$((FIRST_PORT + k))
  k=$((k + 1))
  dir="$STATE/nodes/$name"
  mkdir -p "$dir"
  # the node's DP-SGD privacy ledger (fedlora/privacy/ledger.py), unless --node-config names another
  [[ "$EXTRA" == *state-dir=* ]] || config="$config state-dir=\"$dir/privacy-ledger\""
  args=(--superlink "$SUPERLINK" --root-certificates "$CERTS/ca.crt" --auth-supernode-private-key "$key"
        --host 127.0.0.1 --port "$port" --node-config "$config")
  [ -n "$MAX_WAIT" ] && args+=(--max-wait-time "$MAX_WAIT")
  (cd "$dir" && start_bg "supernode-$name" "$dir/flwr-home" flower-supernode "${args[@]}")
  echo "  $name -> $SUPERLINK, ClientApp API 127.0.0.1:$port, node config: $config"
  STARTED+=("$name")
done

# a SuperNode that cannot start or is refused (e.g. key not registered) exits within seconds
sleep "${SUPERNODE_CHECK_SECONDS:-5}"
failed=0
for name in "${STARTED[@]}"; do
  if ! kill -0 "$(cat "$PIDS/supernode-$name.pid")" 2>/dev/null; then
    echo "SuperNode $name exited:" >&2
    tail -n 12 "$LOGS/supernode-$name.log" >&2 || true
    failed=1
  fi
done
[ "$failed" = 0 ] || die "some SuperNodes exited (logs in $LOGS)"
