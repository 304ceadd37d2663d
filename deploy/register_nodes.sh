#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (run where `flwr` reaches the SuperLink's port).
#
#   deploy/register_nodes.sh [--address HOST:PORT] [KEY.pub ...]
#
# Without KEY arguments every keys/*.pub of the state directory is registered. With --address the
# connection [superlink.$FEDLORA_CONNECTION] is (re)written to HOST:PORT with certs/ca.crt first
# (otherwise the one start_superlink.sh wrote is used). A SuperNode whose key is not registered is
# refused by the SuperLink ("Failed to activate SuperNode").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ADDRESS=""
KEYFILES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) KEYFILES+=("$1"); shift ;;
  esac
done
[ -n "$ADDRESS" ] && connect "$ADDRESS" "$CERTS/ca.crt"
if [ ${#KEYFILES[@]} -eq 0 ]; then
  shopt -s nullglob
  KEYFILES=("$KEYS"/*.pub)
fi
[ ${#KEYFILES[@]} -gt 0 ] || die "no public keys given and none in $KEYS"
for key in "${KEYFILES[@]}"; do
  [ -f "$key" ] || die "$key not found"
  name="$(basename "$key" .pub)"
  if out="$(flwr supernode register "$key" "$CONNECTION" --name "$name" 2>&1)"; then
    echo "$out"
  elif grep -q "already in use" <<< "$out"; then
    echo "$name: public key already registered"
  else
    echo "$out" >&2
    die "registering $key failed"
  fi
done
flwr supernode list "$CONNECTION"
