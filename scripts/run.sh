#!/usr/bin/env bash
# The main job: a `flwr run .` simulation of federated fine-tuning of MiniLM on Rotten Tomatoes
# (10 clients, Dirichlet alpha=0.5, fedsb r=16) on this machine, offline. Extra arguments are passed
# to --run-config, e.g.  bash scripts/run.sh "strategy='hetero' ranks='16,8,4'"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/flwr_env.sh
NUM_SUPERNODES=${NUM_SUPERNODES:-10}
RESULTS_DIR=${RESULTS_DIR:-$REPO_ROOT/results}
RUN_NAME=${RUN_NAME:-main-$(date +%Y%m%d-%H%M%S)}
check_local_superlink_port
trap stop_local_superlink EXIT
mkdir -p "$RESULTS_DIR"
flwr run . --stream \
  --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=1" \
  --run-config "results-dir='$RESULTS_DIR' run-name='$RUN_NAME' num-partitions=$NUM_SUPERNODES ${1:-}" \
  2> >(grep -v -e "is ignored" -e "FutureWarning" -e "warnings.warn" >&2)
status=$(latest_run_status)
echo "flwr run status: $status"
if [ "$status" != "finished:completed" ]; then
  echo "the run did not complete; see $FLWR_HOME/local-superlink/superlink.log" >&2
  exit 1
fi
echo "results: $RESULTS_DIR/$RUN_NAME (metrics.jsonl, config.json, adapter/, *.png)"
