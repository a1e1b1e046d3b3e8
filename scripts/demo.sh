#!/usr/bin/env bash
# The README's main job: set up, train MeanFlow on the checkerboard, write one-step samples.
#   ./scripts/demo.sh [RUN_DIR] [extra 'meanflow train' options]
# Rerunning it never throws work away: an interrupted demo resumes from its last checkpoint, a
# finished one only redraws its samples; an unfinished demo run of the checkerboard with other
# settings is started over; any other run in RUN_DIR (a finished one, another data set, one the
# demo did not create) is left alone and the demo stops with one line (pass --overwrite to
# replace it). MEANFLOW_SKIP_SETUP=1 skips the setup step.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEANFLOW_VENV:-.venv}"
[ "${MEANFLOW_SKIP_SETUP:-0}" = 1 ] || ./scripts/setup.sh
out="${1:-runs/checkerboard}"
shift || true
# a picture without its run is a leftover; with a run, it goes only when that run is replaced
[ -e "$out/config.json" ] || rm -f "$out/one-step.png"
"$venv/bin/meanflow" train --data checkerboard --out "$out" --preset toy-2d --restart-if-changed "$@"
"$venv/bin/meanflow" sample --run "$out" --num 5000 --steps 1 --out "$out/one-step.png" --overwrite
echo "one-step samples: $out/one-step.png (beside the data: $out/samples-1step.png)" >&2
