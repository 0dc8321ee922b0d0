#!/usr/bin/env bash
# One GPU, a few minutes: correctness of the CUDA path (bf16, compiled, FSDP on one device), then
# the tinyllama-1.1b preset at sequence 2048 for a few dozen steps (tokens/s, MFU), then the
# memory plan against the measured peak (benchmarks/memory_plan.py, into OUT_DIR/memory_plan.json).
#
#   benchmarks/gpu_check.sh OUT_DIR              # results in OUT_DIR/gpu_check.json
#   benchmarks/gpu_check.sh OUT_DIR --dry-run    # the same steps on CPU with tiny models
#
# Needs only torch and scion's own dependencies; scion is installed from this working tree
# (pip install --no-deps -e .) only when it is not importable already. No network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]}
shift
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! (cd /tmp && "$PY" -c "import scion" 2>/dev/null); then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || echo "gpu_check: pip install -e . failed; using PYTHONPATH instead"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The whole check stays under 8 minutes: stop it at 470 s whatever happens (results so far are
# kept). GPU_CHECK_TIMEOUT overrides that, for a dry run on a slow CPU.
timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
# The memory plan against torch.cuda.max_memory_allocated (eager blocks, bf16, 2 steps a row, each
# row in a fresh process): about two minutes; MEMORY_PLAN=0 leaves it out.
if [ "${MEMORY_PLAN:-1}" != 0 ]; then
  if [ "${1:-}" = --dry-run ]; then rows=(--device cpu --presets tiny --precisions fp32 --no-fsdp --micro 2)
  else rows=(--device cuda --presets small tinyllama-1.1b --precisions bf16 --no-fsdp); fi
  timeout "${MEMORY_PLAN_TIMEOUT:-180}" "$PY" benchmarks/memory_plan.py "${rows[@]}" --json "$OUT/memory_plan.json" \
    2>&1 | tee "$OUT/memory_plan.log"
fi
exit "$status"
