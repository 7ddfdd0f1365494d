#!/usr/bin/env bash
# Everything the first GPU run (issue 13) needs, in two device calls of under 10 minutes
# each, so a 30-minute lease is not spent typing commands. Here, once:
#
#   tools/gpu_wheels.sh                   the packages the GPU image lacks, into .whl/
#
# then, through the device tool (carry [".whl"]), one call per stage:
#
#   bash tools/gpu_session.sh check       CUDA tests, kernel check and timings, `run` with
#                                         KV int8 and lookup speculation, a served load test
#   bash tools/gpu_session.sh measure     tools/gpu_report.sh: calibrate, a synthetic
#                                         Qwen2.5-32B benched unbounded and at 16/12/8 GB
#   bash tools/gpu_session.sh moe         a Qwen3-30B-A3B slice: experts streamed (prefetch
#                                         on, off) and computed on the CPU; serve --compile
#
# Results go to $RESULTS (default $OUT, the device tool's return folder, else
# ./gpu-session): session.log (every step's output), status.md (one line per step with
# its exit code and seconds) and session.tgz (every file). They are rewritten after each
# step, so a call cut off at its time limit still returns what was done. A failing step
# is recorded and the next one runs: one failure must not cost the rest of the lease.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-check}"
case "$STAGE" in
  check|measure|moe) ;;
  *) echo "usage: tools/gpu_session.sh check|measure|moe" >&2; exit 2 ;;
esac
RESULTS="${RESULTS:-${OUT:-gpu-session}}"
WORK="${WORK:-${TMPDIR:-/tmp}/gpu-session-work}"
DEVICE="${DEVICE:-cuda:0}"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"  # seconds; a hung step must not eat the call
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
export WORK DEVICE PY
mkdir -p "$RESULTS" "$WORK"
LOG="$RESULTS/session.log"
STATUS="$RESULTS/status.md"
started=$(date +%s)

install_wheels() {
  # The wheels go to their own folder ahead of the image's packages on sys.path.
  [ -d .whl ] || { echo "no .whl/ here: using the image's packages as they are"; return 0; }
  # after the checkout, before the image: our pins win over the image's versions
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .whl/*.whl; then
    export PYTHONPATH="$(pwd):$WORK/site"
  else  # e.g. cp312 wheels on another Python: say so, the environment step shows versions
    echo "the wheels in .whl/ did not install (above): using the image's packages"
  fi
}

pack() {
  tar czf "$RESULTS/session.tgz.part" -C "$WORK" --exclude=site --exclude=models . \
    && mv "$RESULTS/session.tgz.part" "$RESULTS/session.tgz"
}

# step NAME COMMAND...: run it under a time limit, log it, record its exit code and time.
step() {
  local name="$1"; shift
  local begun=$(date +%s)
  echo "== $name ($(( begun - started )) s into the session)" | tee -a "$LOG"
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a program
    timeout --kill-after=10 "$STEP_TIMEOUT" bash -c "$(declare -f oe "$1"); $*" >> "$LOG" 2>&1
  else
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >> "$LOG" 2>&1
  fi
  local rc=$?
  local took=$(( $(date +%s) - begun ))
  echo "| $STAGE | $name | $rc | $took |" >> "$STATUS"
  echo "   exit $rc after $took s" | tee -a "$LOG"
  pack
  return 0
}

oe() { "$PY" -m offload_engine "$@"; }

environment() {
  "$PY" - <<'PYEOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "triton", "transformers", "tokenizers", "accelerate", "safetensors",
             "gguf", "fastapi", "uvicorn", "numpy"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as exc:  # a missing package is a finding, not a reason to stop
        print(f"{name}: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("device", props.name, f"{props.total_memory / 2**30:.1f} GiB",
          props.multi_processor_count, "SMs")
PYEOF
  nvidia-smi || true
  git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"
  git status --short 2>/dev/null | head -20
}

# A small real-shape model for the end-to-end steps: SmolLM2-135M's shape, random weights,
# a generated tokenizer (the real GGUF is larger than a device call may carry).
small_model() {
  oe synth smollm2-135m "$WORK/models/small" --scheme int4-asym --group-size 64 --force \
    --no-progress
}

run_variants() {
  local model="$WORK/models/small" prompt="def fibonacci(n): return n if n < 2 else"
  local args=(--device "$DEVICE" --greedy -n 64 --no-progress)
  oe run "$model" "$prompt" "${args[@]}" --stats-json "$WORK/run-plain.json" &&
  oe run "$model" "$prompt" "${args[@]}" --gpu-budget 24MiB --stats-json "$WORK/run-min.json" &&
  oe run "$model" "$prompt" "${args[@]}" --kv-cache int8 --stats-json "$WORK/run-kv-int8.json" &&
  oe run "$model" "$prompt" "${args[@]}" --speculate lookup \
    --stats-json "$WORK/run-lookup.json" &&
  oe run "$model" "$prompt" "${args[@]}" --profile-trace "$WORK/run.trace.json" &&
  "$PY" -m offload_engine trace-summary "$WORK/run.trace.json"
}

# Host memory the store takes against its weight bytes (runtime/pinned.py pins exactly).
pinned_check() {
  "$PY" - "$1" "$DEVICE" <<'PYEOF'
import sys, time
import psutil
from offload_engine import load
process = psutil.Process()
before, started = process.memory_info().rss, time.perf_counter()
with load(sys.argv[1], device=sys.argv[2], progress=False, cache_entries=4) as engine:
    store = engine.store
    parts = [t for name in store for t in store[name].components().values()]
    print(f"load {time.perf_counter() - started:.1f} s; store pinned: {store.pinned}; "
          f"weights seen as pinned by the runtime: {all(t.is_pinned() for t in parts)}")
    print(f"quantized weights {store.nbytes / 2**30:.2f} GiB; host RSS grew "
          f"{(process.memory_info().rss - before) / 2**30:.2f} GiB")
PYEOF
}

stage_check() {
  step "environment" environment
  step "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests \
    --junitxml "$WORK/pytest-cuda.xml"
  step "kernel check" "$PY" tools/bench_kernels.py --check
  step "kernel timings" "$PY" tools/bench_kernels.py --csv "$WORK/kernels.csv"
  step "small model" small_model
  step "pinned host memory" pinned_check "$WORK/models/small"
  step "run: plain, min budget, KV int8, lookup, trace" run_variants
  step "serve: load test" "$PY" tools/load_test.py "$WORK/models/small" --device "$DEVICE" \
    --concurrency 1 4 16 --requests 16 --max-tokens 32
  # eager against --compile (CUDA graphs: everything resident), alternating, in one process
  step "eager vs --compile (small model)" "$PY" tools/compile_table.py "$WORK/models/small" \
    --device "$DEVICE" --tokens 64 --rounds 3 --out "$WORK/compile-table.json"
}

stage_measure() {
  step "environment" environment
  # The ~17 GB synthetic model is written where the machine has room; it does not come back.
  step "GPU report (32B synthetic)" env OUT="$WORK/report" DEVICE="$DEVICE" RUN_TESTS=0 \
    KERNELS=0 SYNTH_DIR="$WORK/models/qwen2.5-32b" PYTHON="$PY" bash tools/gpu_report.sh
  [ -f "$WORK/report/summary.md" ] && cp "$WORK/report/summary.md" "$RESULTS/summary.md"
  step "pinned host memory (32B)" pinned_check "$WORK/models/qwen2.5-32b"
}

# What landed after the runbook was first written (2026-12-03): a mixture-of-experts slice
# (Qwen3-30B-A3B's shapes, one layer) streaming its experts with next-layer prefetch and
# with cold experts computed on the CPU, and serve --compile (fixed batch slots) against
# eager serving. Its own stage, so a short lease can skip it.
moe_model() {
  oe synth tests/fixtures/qwen3_30b_a3b_config.json "$WORK/models/moe" --layers 1 --force \
    --no-progress
}

stage_moe() {
  step "environment" environment
  step "MoE slice (Qwen3-30B-A3B, 1 layer)" moe_model
  step "MoE: experts streamed, prefetch on" oe bench "$WORK/models/moe" --device "$DEVICE" \
    --budgets min,50%,unbounded --policies static --tokens 16 --no-progress \
    --out-dir "$WORK/bench-moe"
  step "MoE: experts streamed, prefetch off" oe bench "$WORK/models/moe" --device "$DEVICE" \
    --budgets min,50% --policies static --tokens 16 --expert-prefetch off --no-progress \
    --out-dir "$WORK/bench-moe-noprefetch"
  step "MoE: cold experts on the CPU" oe bench "$WORK/models/moe" --device "$DEVICE" \
    --budgets min,50% --policies static --tokens 16 --placement experts-cpu --no-progress \
    --out-dir "$WORK/bench-moe-cpu"
  [ -d "$WORK/models/small" ] || step "small model" small_model
  step "serve: eager vs --compile" "$PY" tools/load_test.py "$WORK/models/small" \
    --device "$DEVICE" --no-progress --concurrency 1 4 --requests 8 --max-tokens 32 \
    --compare-compile --rounds 2
}

install_wheels >> "$LOG" 2>&1
[ -f "$STATUS" ] || printf '| stage | step | exit | seconds |\n|---|---|---|---|\n' > "$STATUS"
case "$STAGE" in
  check) stage_check ;;
  measure) STEP_TIMEOUT="${STEP_TIMEOUT_MEASURE:-540}" stage_measure ;;
  moe) STEP_TIMEOUT="${STEP_TIMEOUT_MOE:-380}" stage_moe ;;  # the MoE steps took 168 s on CPU
esac
pack
echo "== done in $(( $(date +%s) - started )) s; results in $RESULTS"
cat "$STATUS"
