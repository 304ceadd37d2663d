#!/usr/bin/env bash
# Create the TLS material of a deployment and SuperNode authentication keys.
#
#   deploy/make_certs.sh [--hosts LIST] [--nodes N | --node NAME]... [--days D] [--force]
#   deploy/make_certs.sh --keys-only --node NAME        # on a client machine: only its own key pair
#
#   --hosts LIST  comma-separated names/addresses the SuperNodes and the CLI use to reach the SuperLink;
#                 they become the server certificate's subjectAltName (IPs as IP:, names as DNS:).
#                 localhost and 127.0.0.1 are always added (the SuperLink's own SuperExec connects
#                 there). Default: just those (trials on one machine). For a real server e.g.
#                 --hosts "superlink.example.org,203.0.113.7" (its DNS name and its address).
#   --nodes N     create SuperNode key pairs sn0 … sn<N-1> (default 2; 0 for none)
#   --node NAME   create the key pair NAME (repeatable; use on each client machine for its own key)
#   --keys-only   create SuperNode keys only (no CA, no server certificate)
#   --days D      certificate validity (default 365)
#   --force       re-issue the server certificate (e.g. new --hosts) and replace the named node keys;
#                 the CA is kept (clients keep trusting it) unless --new-ca
#   --new-ca      also replace the CA (then give the new ca.crt to every SuperNode and CLI machine)
#
# Output under $FEDLORA_DEPLOY_STATE (default deploy/.state):
#   certs/ca.crt       CA certificate: give to every SuperNode and to every machine that runs `flwr`
#   certs/ca.key       CA private key: signs server certificates; keep it off the servers if you can
#   certs/server.pem   SuperLink certificate (signed by the CA), certs/server.key its private key
#   keys/<name>        SuperNode private key (ECDSA P-384, stays on that client machine)
#   keys/<name>.pub    its public key: register it on the SuperLink (deploy/register_nodes.sh)
# Existing files are kept (so re-running only adds missing pieces) unless --force / --new-ca.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOSTS="${SUPERLINK_HOSTS:-localhost,127.0.0.1}"
NUM_NODES=2
NODE_NAMES=()
DAYS=365
FORCE=0
KEYS_ONLY=0
NEW_CA=0
NODES_GIVEN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --nodes) NUM_NODES="$2"; NODES_GIVEN=1; shift 2 ;;
    --node) NODE_NAMES+=("$2"); NUM_NODES=0; NODES_GIVEN=1; shift 2 ;;
    --days) DAYS="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --keys-only) KEYS_ONLY=1; shift ;;
    --new-ca) NEW_CA=1; FORCE=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
for ((i = 0; i < NUM_NODES; i++)); do NODE_NAMES+=("sn$i"); done

mkdir -p "$CERTS" "$KEYS"
chmod 700 "$CERTS" "$KEYS"

# --- CA + SuperLink certificate ------------------------------------------------------------------------
if [ "$KEYS_ONLY" = 1 ]; then
  :
elif [ "$FORCE" = 1 ] || [ ! -f "$CERTS/server.pem" ]; then
  SAN=""
  # the SuperLink's own SuperExec reaches it on 127.0.0.1 when it listens on 0.0.0.0: always include it
  IFS=',' read -r -a host_list <<< "$HOSTS,localhost,127.0.0.1"
  # shellcheck disable=SC2207
  host_list=($(printf '%s\n' "${host_list[@]}" | tr -d '[:blank:]' | awk 'NF && !seen[$0]++'))
  for h in "${host_list[@]}"; do
    if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then SAN+="IP:$h,"; else SAN+="DNS:$h,"; fi
  done
  SAN="${SAN%,}"
  [ -n "$SAN" ] || die "--hosts is empty"
  CN="${host_list[0]}"
  if [ "$NEW_CA" = 1 ] || [ ! -f "$CERTS/ca.crt" ]; then
    openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$DAYS" \
      -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" -subj "/CN=fedlora deployment CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  fi
  [ -f "$CERTS/ca.key" ] || die "$CERTS/ca.key missing: sign on the machine that holds the CA key (or --new-ca)"
  openssl req -newkey rsa:4096 -sha256 -nodes -keyout "$CERTS/server.key" -out "$CERTS/server.csr" \
    -subj "/CN=$CN" 2>/dev/null
  cat > "$CERTS/server.ext" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $SAN
EXT
  openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" -CAcreateserial \
    -out "$CERTS/server.pem" -days "$DAYS" -sha256 -extfile "$CERTS/server.ext" 2>/dev/null
  rm -f "$CERTS/server.csr"
  chmod 600 "$CERTS/ca.key" "$CERTS/server.key"
  openssl verify -CAfile "$CERTS/ca.crt" "$CERTS/server.pem" >/dev/null
  echo "SuperLink certificate $CERTS/server.pem for $SAN (CA $CERTS/ca.crt)"
else
  echo "keeping existing $CERTS/server.pem (use --force to replace)"
fi

# --- SuperNode authentication keys ---------------------------------------------------------------------
for name in "${NODE_NAMES[@]}"; do
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "node name '$name': use letters, digits, . _ -"
  if { [ "$FORCE" = 1 ] && [ "$NODES_GIVEN" = 1 ]; } || [ ! -f "$KEYS/$name" ]; then
    rm -f "$KEYS/$name" "$KEYS/$name.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedlora-$name" -f "$KEYS/$name"
    echo "SuperNode key $KEYS/$name (public: $KEYS/$name.pub)"
  else
    echo "keeping existing SuperNode key $KEYS/$name"
  fi
done
