#!/usr/bin/env bash
# Submit the fedlora app to the SuperLink and stream its logs; exit 0 only if the run completed.
#
#   deploy/submit.sh [--address HOST:PORT] [--app DIR] [--no-stream] [--run-config "k=v k2=v2"]...
#
#   --address HOST:PORT  (re)write the connection [superlink.$FEDLORA_CONNECTION] (default fedlora-deploy)
#                        in $FLWR_HOME/config.toml with root-certificates = certs/ca.crt; without it the
#                        entry start_superlink.sh / register_nodes.sh wrote is used
#   --app DIR            the Flower app (default: the repository root)
#   --run-config "…"     run-config overrides (repeatable), e.g. "num-server-rounds=3 results-dir='/abs/results'"
#   --no-stream          submit and return (follow with `flwr log RUN_ID fedlora-deploy`)
#
# The overrides are checked first (python -m simulations.check_config, for this repository's app): an unknown
# key or a bad value fails at once naming the key, before any connection (Flower would answer an unknown key
# with "[code: 15] Invalid run configuration." and name nothing).
# `flwr run` exits 0 even when a run fails (e.g. a round that aggregated nothing because every reply was
# rejected, unless allow-empty-rounds=true), so the status is read back with `flwr ls --format json`
# (finished:completed, else exit 1). The run id goes to last_run_id in the state directory.
# FLWR: the flwr command (default: flwr from the venv).
# The ServerApp runs on the SuperLink machine with the SuperLink's working directory: give
# results-dir as an absolute path on that machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ADDRESS=""
APP="$REPO_ROOT"
STREAM=(--stream)
RUN_CONFIG=()
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --app) APP="$(cd "$2" && pwd)"; shift 2 ;;
    --run-config|-c) RUN_CONFIG+=(--run-config "$2"); OVERRIDES+=("$2"); shift 2 ;;
    --no-stream) STREAM=(); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
if [ "$APP" = "$REPO_ROOT" ] && [ ${#OVERRIDES[@]} -gt 0 ]; then
  (cd "$REPO_ROOT" && python3 -m simulations.check_config "${OVERRIDES[@]}") || exit 2
fi
[ -n "$ADDRESS" ] && connect "$ADDRESS" "$CERTS/ca.crt"
grep -q "^\[superlink\.$CONNECTION\]" "$FLWR_HOME/config.toml" 2>/dev/null \
  || die "no connection '$CONNECTION' in $FLWR_HOME/config.toml: pass --address HOST:PORT"

# The FAB holds the app's *.py/*.toml/*.md/*.json files minus what the app's ROOT .gitignore excludes
# (flwr reads no other .gitignore). If the state directory (FLWR_HOMEs with extracted apps, config.toml)
# lies inside the app and is not excluded there, submit a staged copy of the app without it.
APP_DIR="$APP"
case "$STATE/" in
  "$APP/"*)
    rel="${STATE#"$APP/"}"
    if ! python3 - "$APP" "$rel" <<'PY'
import sys
from pathlib import Path

from flwr.cli.utils import build_pathspec, load_gitignore_patterns

spec = build_pathspec(load_gitignore_patterns(Path(sys.argv[1]) / ".gitignore"))
sys.exit(0 if spec.match_file(f"{sys.argv[2]}/flwr-home/config.toml") else 1)
PY
    then
      APP_DIR="$STATE/app"
      python3 - "$APP" "$APP_DIR" "$rel" <<'PY'
import shutil
import sys
from pathlib import Path

from flwr.cli.utils import collect_files, filter_paths_for_publish

src, dst, rel = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
files = {k: v for k, v in collect_files(src).items() if not k.startswith(rel + "/")}
shutil.rmtree(dst, ignore_errors=True)
for name, path in filter_paths_for_publish(files).items():
    (dst / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dst / name)
PY
      echo "note: $STATE is inside the app and not in its .gitignore; submitting a staged copy ($APP_DIR)"
    fi
    ;;
esac

before="$(date -u +%Y-%m-%dT%H:%M:%S)"
"${FLWR:-flwr}" run "$APP_DIR" "$CONNECTION" "${STREAM[@]}" "${RUN_CONFIG[@]}"

# newest run of this SuperLink and its status
read -r run_id status < <("${FLWR:-flwr}" ls "$CONNECTION" --format json | python3 -c '
import json, sys
runs = sorted(json.load(sys.stdin).get("runs", []), key=lambda r: r.get("pending-at", ""))
print(runs[-1]["run-id"], runs[-1]["status"]) if runs else print("none none")')
echo "$run_id" > "$STATE/last_run_id"
echo "run $run_id (submitted after $before UTC): $status"
if [ ${#STREAM[@]} -gt 0 ] && [ "$status" != "finished:completed" ]; then
  echo "run $run_id did not complete; full log: flwr log $run_id $CONNECTION --show" >&2
  exit 1
fi
