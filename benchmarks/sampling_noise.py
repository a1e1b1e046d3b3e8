"""How much of a 2-D run's SWD is the draw of its samples: the SWD of ``--num`` samples against
the set's held-out points for ``--sampling-seeds`` seeds, at each sampling step count.

Each ``--runs`` directory is one kept by ``onestep_2d.py --keep``, named ``LABEL-SET-SEED``
(``h97-ramp-banana-0``); the reference is ``--data-dir/SET-test.npy`` (what ``onestep_2d.py``
scores against). One JSON line per run: the mean and the standard deviation over sampling seeds
at each step count.

    python benchmarks/sampling_noise.py --runs /tmp/kept/h97-ramp-* --steps 1,2,4 \\
        > benchmarks/results/onestep_2d/sampling_noise_h97.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch

from meanflow.eval import sliced_wasserstein
from meanflow.train import load_run


def set_and_seed(run_dir: str) -> tuple[str, int]:
    """``("banana", 0)`` from ``.../h97-ramp-banana-0`` (the set is matched by its test file)."""
    name = os.path.basename(run_dir.rstrip("/"))
    head, _, seed = name.rpartition("-")
    if not seed.isdigit():
        raise SystemExit(f"{run_dir!r}: expected a directory named LABEL-SET-SEED")
    return head, int(seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--sampling-seeds", type=int, default=8)
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--data-dir", default="/tmp/toy_sets")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sets = sorted(
        f[: -len("-test.npy")] for f in os.listdir(args.data_dir) if f.endswith("-test.npy")
    )
    for run_dir in args.runs:
        head, seed = set_and_seed(run_dir)
        matches = [s for s in sets if head.endswith("-" + s)]
        if not matches:
            sys.exit(f"{run_dir!r}: no SET-test.npy in {args.data_dir} matches its name")
        name = max(matches, key=len)
        reference = np.load(os.path.join(args.data_dir, f"{name}-test.npy"))
        run = load_run(run_dir)
        row: dict = {"run": os.path.basename(run_dir.rstrip("/")), "set": name, "train_seed": seed}
        for k in (int(v) for v in args.steps.split(",")):
            values = [
                sliced_wasserstein(run.sample(args.num, steps=k, seed=s), reference)
                for s in range(args.sampling_seeds)
            ]
            row[str(k)] = {
                "mean": round(statistics.mean(values), 4),
                "std": round(statistics.stdev(values), 4),
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
