#!/usr/bin/env bash
# The README's main job: set up, train MeanFlow on the checkerboard, write one-step samples.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
out="${1:-runs/checkerboard}"
.venv/bin/meanflow train --data checkerboard --out "$out" --preset toy-2d --overwrite
.venv/bin/meanflow sample --run "$out" --num 5000 --steps 1 --out "$out/one-step.png" --overwrite
echo "one-step samples: $out/one-step.png (beside the data: $out/samples-1step.png)" >&2
