#!/usr/bin/env bash
# One-GPU check of MeanFlow on DiT-B/2 (JVP correctness, 200 bf16 training steps, step time and
# memory against flow matching, one-step sampling speed). Run from anywhere on a machine with one
# H100 / H200:
#
#     bash benchmarks/gpu_check.sh            # extra arguments go to benchmarks/gpu_check.py
#
# Prints a results table and writes benchmarks/results/gpu/<card name>.json. Takes about 2 to 4
# minutes; a hard limit of 8 minutes stops it (sections finished by then are already in the JSON).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec timeout --signal=INT --kill-after=10 470 "$PY" benchmarks/gpu_check.py --device cuda "$@"
