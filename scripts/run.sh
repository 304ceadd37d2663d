#!/usr/bin/env bash
# The main job: a `flwr run .` simulation of federated fine-tuning of MiniLM on Rotten Tomatoes
# (10 clients, Dirichlet alpha=0.5, fedsb r=16) on this machine, offline. Extra arguments are passed
# to --run-config, e.g.  bash scripts/run.sh "strategy='hetero' ranks='16,8,4'"
#
# Environment: NUM_SUPERNODES (10), RESULTS_DIR (<repo>/results), RUN_NAME (main-<date>-<time>), FLWR (the flwr
# command, default flwr from .venv), CLIENT_GPUS (each ClientApp's GPU share, e.g. 0.25; unset: none).
# The overrides are checked before Flower starts (python -m simulations.check_config): an unknown key or a
# bad value fails at once, naming the key. The console shows the run's [fedlora] lines (start, one per
# round, done); the whole output of flwr run goes to $RESULTS_DIR/$RUN_NAME/run.log. Exits non-zero unless
# the run's status is finished:completed (`flwr run` itself exits 0 for a failed run, e.g. one whose round
# aggregated nothing because every reply was rejected, unless allow-empty-rounds=true).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/flwr_env.sh
NUM_SUPERNODES=${NUM_SUPERNODES:-10}
RESULTS_DIR=$(realpath -m "${RESULTS_DIR:-$REPO_ROOT/results}")
RUN_NAME=${RUN_NAME:-main-$(date +%Y%m%d-%H%M%S)}
if [[ " ${1:-}" =~ [[:space:]](results-dir|run-name|num-partitions)= ]]; then
  declare -A VAR=([results-dir]=RESULTS_DIR [run-name]=RUN_NAME [num-partitions]=NUM_SUPERNODES)
  echo "error: run config '${BASH_REMATCH[1]}' is set by this script: use ${VAR[${BASH_REMATCH[1]}]}=..." >&2
  exit 2
fi
RUN_CONFIG="results-dir='$RESULTS_DIR' run-name='$RUN_NAME' num-partitions=$NUM_SUPERNODES ${1:-}"
python -m simulations.check_config "$RUN_CONFIG" || exit 2
check_local_superlink_port
# flwr run starts a detached local SuperLink that outlives it: stop it at exit, unless it was running before
if [ -z "$(pgrep -f "flower-superlink.*--log-file $FLWR_HOME/" || true)" ]; then
  trap stop_local_superlink EXIT
fi
RUN_DIR="$RESULTS_DIR/$RUN_NAME"
LOG="$RUN_DIR/run.log"
mkdir -p "$RUN_DIR"
echo "=== $(date -Is) flwr run --run-config \"$RUN_CONFIG\"" >> "$LOG"  # a resumed run appends
{ "${FLWR:-flwr}" run . --stream \
    --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=1${CLIENT_GPUS:+ client-resources-num-gpus=$CLIENT_GPUS}" \
    --run-config "$RUN_CONFIG" 2>&1 || true; } \
  | tee -a "$LOG" | { grep --line-buffered -o '\[fedlora\] .*' || true; }
status=$(latest_run_status)
echo "flwr run status: $status" >> "$LOG"
if [ "$status" != "finished:completed" ]; then
  {
    echo "the run did not complete (flwr run status: $status); last lines of the log:"
    tail -n 25 "$LOG" | sed 's/^/  /'
    echo "full log: $LOG (SuperLink: $FLWR_HOME/local-superlink/superlink.log)"
  } >&2
  exit 1
fi
echo "[fedlora] full log: $LOG"
