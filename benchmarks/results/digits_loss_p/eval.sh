#!/bin/bash
cd "$(dirname "$0")/../../.."
for run in d-p075 d-p0; do for k in 1 2 4; do for seed in 0 1; do
  echo "$run k=$k seed=$seed $(PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/meanflow eval --run runs/$run --reference digits --steps $k --num 1000 --seed $seed --threads 1 --quiet 2>&1 | tail -1)"
done; done; done
