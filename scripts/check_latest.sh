#!/usr/bin/env bash
# Early warning for new releases: a fresh virtual environment with the newest versions pyproject.toml allows
# (not the lock), then a fast subset of the suite (a few minutes) that touches every integration point:
#   peft        export and PeftModel.from_pretrained round trips (nested and LoRA baselines), add_adapter
#   transformers model loading (MiniLM, SmolLM2 from GGUF), tokenizers, the chat template
#   opacus      grad samplers through DP-SGD training, RDP/PRV accountants, the node's ledger
#   Flower      Message API strategies on a fake grid, ArrayRecord wire format, the ClientApp in process
#   flwr-datasets  the Dirichlet / IID partitioners on real data
# Prints the versions that differ from requirements/lock.txt, then the subset's result; exits non-zero if
# the subset fails. Run it at the start of a session. When it fails: fix the code (and keep the lock), or
# move the lock on purpose after `make test` passes on the new versions.
#
#   bash scripts/check_latest.sh                 # newest allowed versions
#   bash scripts/check_latest.sh --oldest        # the floors of pyproject.toml's ranges instead
#   bash scripts/check_latest.sh --write-lock    # newest, and on success write requirements/lock.txt
# Environment: CHECK_VENV (default: a new temporary folder, removed at exit; set it to keep the venv).
# torch stays at 2.13.0 in every mode: it is the local CPU wheel (a newer or older torch from the registry
# is a multi-GB CUDA build), so torch's own floor (pyproject.toml) is not exercised here.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=latest
WRITE_LOCK=0
for arg in "$@"; do
  case "$arg" in
    --oldest) MODE=oldest ;;
    --write-lock) WRITE_LOCK=1 ;;
    *) echo "usage: $0 [--oldest] [--write-lock]" >&2; exit 2 ;;
  esac
done
if [ "$MODE" = oldest ] && [ "$WRITE_LOCK" = 1 ]; then
  echo "error: --write-lock locks the newest versions; it does not go with --oldest" >&2
  exit 2
fi
if [ -n "${CHECK_VENV:-}" ]; then
  VENV=$(realpath -m "$CHECK_VENV")
else
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  VENV=$WORK/venv
fi
LOCK_FOR_SETUP=""
if [ "$MODE" = oldest ]; then
  # every `name>=X` of [project].dependencies pinned to X (torch excepted, see above)
  mkdir -p "$(dirname "$VENV")"
  FLOORS=$(dirname "$VENV")/floors-$(basename "$VENV").txt
  python3 - "$FLOORS" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = []
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,\s]+).*", dep)
    if m and m.group(1) != "torch":
        pins.append(f"{m.group(1)}=={m.group(3)}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("floors: " + ", ".join(pins))
PY
  LOCK_FOR_SETUP=$FLOORS
fi
echo "check_latest: $MODE versions in $VENV"
START=$(date +%s)
FEDLORA_VENV=$VENV FEDLORA_LOCK=$LOCK_FOR_SETUP bash scripts/setup.sh
echo "check_latest: installed in $(( $(date +%s) - START )) s; versions that differ from requirements/lock.txt:"
"$VENV/bin/python" scripts/lock.py check requirements/lock.txt 2>&1 | sed 's/^lock: /  /' || true
# The subset: each integration point once, the slow end-to-end runs left to `make test`.
SUBSET=(
  tests/test_lora_client.py
  tests/test_export.py
  "tests/test_models.py"
  tests/test_privacy_dp_sgd.py
  tests/test_privacy_accounting.py
  tests/test_privacy_ledger.py
  strategies/
  tests/test_packed_wire.py
  tests/test_inprocess.py
  tests/test_data.py
)
START=$(date +%s)
status=0
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${SUBSET[@]}" || status=$?
echo "check_latest: $MODE subset exit $status in $(( $(date +%s) - START )) s"
if [ "$status" = 0 ] && [ "$WRITE_LOCK" = 1 ]; then
  "$VENV/bin/python" scripts/lock.py write requirements/lock.txt
  echo "check_latest: now run \`make test\` on the new lock before committing it"
fi
exit "$status"
