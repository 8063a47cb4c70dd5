#!/usr/bin/env bash
# One call on the lent GPU machine, under a fixed time budget: set up what it lacks, then
# bench/gpu_study.py (data → throughput of each study cell alone → the study's cells together →
# evaluate, report, register), which prints a line per step and cell as it ends.
# Prepare here first:  make data && ../shared/gpu/bundle.sh   (fills the ignored .gpu/)
# Then, through the device tool, with carry [".gpu"] and timeout_s 480:
#   bash bench/gpu_study.sh                 # TOTAL_S=450 (the whole call), JOBS=6
# On every exit (a trap, also after a failure or a kill) the results go to $OUT as 4 files (the
# device tool brings back at most 8): gpu-study.md, gpu-study.json, run.log (everything printed)
# and gpu-study-logs.tar.gz (set-up, stage and cell logs, the params used).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
TOTAL_S=${TOTAL_S:-450}
work=gpu-study
mkdir -p "$work/logs"

collect() {
  [ -n "${OUT:-}" ] || return 0
  cp "$work/gpu-study.md" "$work/gpu-study.json" "$work/run.log" "$OUT"/ 2>/dev/null
  tar -czf "$OUT/gpu-study-logs.tar.gz" -C "$work" logs params.yaml 2>/dev/null
  return 0
}
trap collect EXIT

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
  if [ -z "$(ls -A data/raw 2>/dev/null)" ]; then mkdir -p data && cp -r .gpu/raw data/raw; fi
} > "$work/logs/setup.log" 2>&1 || { echo "set-up failed: see $work/logs/setup.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src MLFLOW_TRACKING_URI=sqlite:///$PWD/gpu-study.db PYTHONUNBUFFERED=1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

# What is left of the call, less a margin for the trap: the script stops cleanly within it.
budget=$(( TOTAL_S - (SECONDS - started) - 20 ))
timeout --kill-after=10 $(( budget + 15 )) python3 bench/gpu_study.py --jobs "${JOBS:-6}" --budget-s "$budget" "$@" \
  2>&1 | tee "$work/run.log"
