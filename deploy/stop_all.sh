#!/usr/bin/env bash
# Stop every process the deploy/ scripts started on this machine, by the pids recorded in pids/.
#
#   deploy/stop_all.sh [NAME ...]     e.g. deploy/stop_all.sh supernode-sn1   (default: all)
#   STOP_SIGNAL=KILL deploy/stop_all.sh supernode-sn1    # crash it instead (no graceful shutdown)
#
# A component and all its descendants (SuperExec, ServerApp / ClientApp processes; some run in their
# own session) get SIGTERM, then SIGKILL after 10 s.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SIG="${STOP_SIGNAL:-TERM}"
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

# a pid and all its descendants (collected before any is signalled)
tree() {
  local p="$1" c
  echo "$p"
  for c in $(pgrep -P "$p" 2>/dev/null || true); do tree "$c"; done
}

# alive and not a zombie
running() {
  local st
  st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ -n "$st" ] && [ "$st" != "Z" ]
}

shopt -s nullglob
if [ $# -gt 0 ]; then
  files=()
  for n in "$@"; do files+=("$PIDS/$n.pid"); done
else
  files=("$PIDS"/supernode-*.pid "$PIDS"/superlink*.pid)   # SuperNodes first, then the SuperLink
fi
for f in "${files[@]}"; do
  [ -f "$f" ] || { echo "no pid file $f"; continue; }
  name="$(basename "$f" .pid)"
  pid="$(cat "$f")"
  # not running, or the pid now belongs to something else (pid reuse): leave it alone
  if ! running "$pid" || ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "flower-super"; then
    echo "$name (pid $pid) was not running"
    rm -f "$f"
    continue
  fi
  # shellcheck disable=SC2207
  pids=($(tree "$pid"))
  kill "-$SIG" "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    alive=()
    for p in "${pids[@]}"; do running "$p" && alive+=("$p"); done
    [ ${#alive[@]} -eq 0 ] && break
    sleep 0.2
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  echo "stopped $name (pids ${pids[*]})"
  rm -f "$f"
done
