#!/usr/bin/env bash
# One command for a CUDA machine: tests, kernels, calibration and a synthetic Qwen2.5-32B
# benched across budgets, in one folder with a markdown summary (every figure beside the
# planner's prediction). Needs only torch, triton, transformers, safetensors, accelerate,
# tqdm, psutil and numpy (pytest for the test step, skipped without it). From a checkout:
#
#   PYTHONPATH=. tools/gpu_report.sh            (or: make gpu-report)
#
# Settings (environment): OUT (report folder), DEVICE (cuda:0), MODEL (qwen2.5-32b),
# SCHEME/GROUP_SIZE (int4-asym/128), SYNTH_DIR (where the ~17 GB synthetic model goes; kept
# and reused), SYNTH_ARGS (e.g. "--layers 2"), BUDGETS (unbounded and three card budgets),
# TOKENS (16), CALIBRATE_ARGS, RUN_TESTS (1), KERNELS (1). The CPU test of this script
# (tests/test_gpu_report.py) runs it with a tiny model and DEVICE=cpu.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-gpu-report-$(date -u +%Y%m%d-%H%M%S)}"
DEVICE="${DEVICE:-cuda:0}"
MODEL="${MODEL:-qwen2.5-32b}"
SCHEME="${SCHEME:-int4-asym}"
GROUP_SIZE="${GROUP_SIZE:-128}"
SYNTH_DIR="${SYNTH_DIR:-${TMPDIR:-/tmp}/offload-engine-synth-${MODEL//\//_}-${SCHEME}-g${GROUP_SIZE}}"
# The budgets the 16, 12 and 8 GB cards leave for weights (as `plan` derives them), since an
# H100 holds everything: a 16GiB arena would hold all 15.6 GiB of int4-asym weights.
BUDGETS="${BUDGETS:-unbounded,card:rtx4060ti-16gb,card:rtx3060-12gb,card:rtx4060-8gb}"
TOKENS="${TOKENS:-16}"
mkdir -p "$OUT"
started=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - started )) s)"; }
oe() { "$PY" -m offload_engine "$@"; }

step "environment"
{ "$PY" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"; } > "$OUT/environment.txt" 2>&1

if [ "${RUN_TESTS:-1}" = 1 ]; then
  step "CUDA tests"
  if "$PY" -c 'import pytest' 2>/dev/null; then
    "$PY" -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  else
    echo "pytest is not installed: CUDA tests skipped" > "$OUT/pytest-cuda.txt"
  fi
fi
if [ "${KERNELS:-1}" = 1 ]; then
  step "kernel check and timings"
  "$PY" tools/bench_kernels.py --check > "$OUT/kernels-check.txt" 2>&1
  "$PY" tools/bench_kernels.py --csv "$OUT/kernels.csv" > "$OUT/kernels.txt" 2>&1
fi

step "calibrate"
oe calibrate --device "$DEVICE" -o "$OUT/profile.toml" --force ${CALIBRATE_ARGS:-} \
  > "$OUT/calibrate.txt" 2>&1 || { cat "$OUT/calibrate.txt"; exit 1; }

step "synthetic $MODEL"
if ! oe inspect "$SYNTH_DIR" > "$OUT/synth.txt" 2>&1; then
  oe synth "$MODEL" "$SYNTH_DIR" --scheme "$SCHEME" --group-size "$GROUP_SIZE" --force \
    --no-progress ${SYNTH_ARGS:-} > "$OUT/synth.txt" 2>&1 || { cat "$OUT/synth.txt"; exit 1; }
fi
oe plan "$SYNTH_DIR" --hw-profile "$OUT/profile.toml" > "$OUT/plan.txt" 2>&1

step "bench at $BUDGETS"
oe bench "$SYNTH_DIR" --device "$DEVICE" --hw-profile "$OUT/profile.toml" --budgets "$BUDGETS" \
  --policies static --tokens "$TOKENS" --out-dir "$OUT/bench" --plot --no-progress \
  > "$OUT/bench.txt" 2>&1 || { cat "$OUT/bench.txt"; exit 1; }

step "summary"
"$PY" tools/gpu_report_summary.py "$OUT" || exit 1
echo "report: $(cd "$OUT" && pwd)/summary.md ($(( $(date +%s) - started )) s)"
