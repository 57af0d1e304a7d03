#!/usr/bin/env bash
# The one prepared script of a GPU session (about 8 minutes in all; each step is bounded by `timeout`, so a hang in
# one step costs only its own budget and the next step still runs):
#   1. the CUDA-marked tests (2 min),
#   2. bench_gpu.py: official-720p, mode plain (2.5 min),
#   3. bench_gpu.py: official-480p and official-720p, mode smallest (3.5 min).
# Output goes to the terminal and, when $OUT is set (the device runner's result folder), to $OUT/gpu_session.log.
#
#   bash benchmarks/gpu_session.sh            (from the repository root)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
LOG=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && LOG="$OUT/gpu_session.log"; fi

step() {  # step SECONDS TITLE COMMAND...
  local limit=$1 title=$2; shift 2
  echo "=== $title (limit ${limit}s) ===" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $title: exit $rc after $((SECONDS - t0))s ===" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } 2>&1 | tee -a "$LOG"
step 120 "pytest -m cuda" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
step 150 "bench 720p plain" "$PY" benchmarks/bench_gpu.py --preset official-720p --modes plain --seconds 5
step 210 "bench 480p/720p smallest" "$PY" benchmarks/bench_gpu.py --preset official-480p,official-720p \
  --modes smallest --seconds 5
