#!/usr/bin/env bash
# One call on the lent GPU machine: set up what it lacks, run the whole study profile timed
# (bench/gpu_study.py), then the training-throughput section of bench/run.py at the study's sizes.
# Prepare here first:  make data && ../shared/gpu/bundle.sh   (fills the ignored .gpu/)
# Then, through the device tool, with carry [".gpu"] and timeout_s 480:
#   bash bench/gpu_study.sh
# Results land in bench/results/ and, on the device, are copied to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src MLFLOW_TRACKING_URI=sqlite:///$PWD/gpu-study.db
if [ -z "$(ls -A data/raw 2>/dev/null)" ]; then mkdir -p data && cp -r .gpu/raw data/raw; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 330 python3 bench/gpu_study.py --jobs "${JOBS:-6}" "$@"
timeout 120 python3 bench/run.py --only train --out --conditions scratch,frozen,finetune \
  --warmup 10 --batches 20 --windows 2 || echo "bench/run.py --only train did not finish"
if [ -n "${OUT:-}" ]; then cp bench/results/* "$OUT"/ 2>/dev/null || true; cp gpu-study/*.log "$OUT"/ 2>/dev/null || true; fi
