#!/usr/bin/env bash
# Everything a GPU session checks, in one go, for a lent GPU machine with a CUDA torch:
# the extension (the library built beforehand on the CPU machine and carried along, else built
# here for the local GPU), the test suite on CUDA, a small workload under compute-sanitizer, then
# the benchmarks (per-call overhead, the loss, the fused linear loss).
# The carried library: on the CPU machine, for the GPU machine's Python (3.12),
#   PSFT_CUDA_PYTHON=python3.12 PSFT_CUDA_VENV=.venv-cuda312 bash .ci/cuda_build.sh
#   cp build/cuda-tree/psft_ext/_C.cpython-312-*.so psft_ext/
# then name that file in the device call's carry: no GPU minute goes to compiling.
# Each stage writes its log under $OUT (default ./gpu_out), so a failing stage never hides the
# others, and has a time limit cut to fit BUDGET (seconds for the whole script, default 540: the
# device tool runs one command for at most 600 s; when less device time is left, pass
# BUDGET=<that limit - 60>), keeping a reserve for the stages after it. The
# stages run by value: the build, the CUDA tests, memcheck, the loss benchmark (the issue's bars),
# the fused linear benchmark, the per-call overhead, racecheck last. The benchmarks write their
# JSON after every shape, so one cut short still returns the shapes it finished.
#   OUT=/tmp/out bash benchmarks/run_gpu_checks.sh [stage ...]
# Stages: build test sanitize bench (default: all, in that order). A later call on the same machine
# can run `bench` alone: the editable install from `build` stays in place.
# A Liger-Kernel wheel placed in .whl/ is installed first (the GPU machine has no network).
# pytest runs with -n 8 (pytest-xdist): a crashing test then fails alone instead of ending the run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# The Hopper single-pass kernel is opt-in until verified: the tests, the sanitizer and the benchmark
# run with it (test_single_pass.py checks both paths; bench_loss compares it with the two kernels).
export PSFT_EXT_SM90_SINGLE_PASS=${PSFT_EXT_SM90_SINGLE_PASS:-1}
# The repository root on the path too, so the scripts under benchmarks/ import the in-place build.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STAGES=" ${*:-build test sanitize bench} "
BUDGET=${BUDGET:-540}
log() { echo "== $(date +%T) [$SECONDS s] $*" | tee -a "$OUT/summary.txt"; }
want() { [[ "$STAGES" == *" $1 "* ]]; }
# limit WANT RESERVE: seconds for the next step, at most WANT, leaving RESERVE for what follows;
# prints 0 when fewer than 20 s would be left for it.
limit() {
  local t=$(( BUDGET - SECONDS - $2 )); (( t > $1 )) && t=$1
  (( t < 20 )) && t=0
  echo $t
}
# timed NAME WANT RESERVE CMD...: runs CMD under that limit, or logs that it was skipped.
timed() {
  local name=$1 t; t=$(limit "$2" "$3"); shift 3
  if (( t == 0 )); then log "$name SKIPPED: out of time"; return 124; fi
  timeout "$t" "$@"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -2; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
} >>"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

if want build; then
if python3 -c "import psft_ext, sys; sys.exit(0 if psft_ext.build_info()['cuda'] else 1)" 2>/dev/null; then
  log "build: the carried library imports with CUDA kernels; nothing compiled"
else
  log "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0a})"
  export TORCH_CUDA_ARCH_LIST
  if ! timed build 360 150 python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; log "BUILD FAILED"; exit 1
  fi
fi
fi
python3 -c "import psft_ext, json; print(json.dumps(psft_ext.build_info()))" | tee -a "$OUT/summary.txt"

if want test; then
log "pytest (the CUDA tests; the CPU ones run in CI)"
timed pytest "${PYTEST_TIMEOUT:-200}" 240 python3 -m pytest -q -n 8 --maxfail=20 --continue-on-collection-errors -p no:cacheprovider tests ${PYTEST_ARGS:--k cuda} \
  >"$OUT/pytest.log" 2>&1
log "pytest exit $?: $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
fi

# sanitize TOOL WANT RESERVE: one compute-sanitizer pass over the small workload.
sanitize() {
  timed "sanitizer $1" "$2" "$3" compute-sanitizer --tool "$1" --error-exitcode 9 \
    python3 benchmarks/sanitizer_workload.py >>"$OUT/sanitizer.log" 2>&1
  log "sanitizer $1 exit $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.log" | tail -1)"
}
if want sanitize; then
log "compute-sanitizer memcheck on a small workload (racecheck runs last)"
sanitize memcheck 120 200
fi

if want bench; then
log "bench_loss"
timed bench_loss "${BENCH_TIMEOUT:-300}" 90 python3 benchmarks/bench_loss.py --device cuda --reps 10 --warmup 2 \
  --json "$OUT/bench_loss_cuda.json" >"$OUT/bench_loss_cuda.md" 2>&1
log "bench_loss exit $?"
tail -40 "$OUT/bench_loss_cuda.md"

if [ -f benchmarks/bench_linear.py ]; then
  log "bench_linear"
  timed bench_linear "${BENCH_LINEAR_TIMEOUT:-180}" 30 python3 benchmarks/bench_linear.py --device cuda \
    --json "$OUT/bench_linear_cuda.json" >"$OUT/bench_linear_cuda.md" 2>&1
  log "bench_linear exit $?"
  tail -20 "$OUT/bench_linear_cuda.md"
fi

log "bench_logprobs (differentiable log-probs + entropy; verl / Liger where installed)"
timed bench_logprobs "${BENCH_LOGPROBS_TIMEOUT:-150}" 20 python3 benchmarks/bench_logprobs.py \
  --device cuda --json "$OUT/bench_logprobs_cuda.json" >"$OUT/bench_logprobs_cuda.md" 2>&1
log "bench_logprobs exit $?"
tail -12 "$OUT/bench_logprobs_cuda.md"

log "bench_overhead (fixed cost per call, tiny shapes)"
timed bench_overhead 60 0 python3 benchmarks/bench_overhead.py --device cuda --trials 7 \
  --json "$OUT/bench_overhead_cuda.json" >"$OUT/bench_overhead_cuda.md" 2>&1
log "bench_overhead exit $?"
tail -12 "$OUT/bench_overhead_cuda.md"
fi
if want sanitize; then sanitize racecheck 240 0; fi
log "done"
