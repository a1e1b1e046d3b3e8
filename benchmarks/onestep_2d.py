"""One-step MeanFlow against 100-step flow matching on 2-D sets outside the built-ins
(docs/onestep.md): train, sample at 1, 2, 4 steps (MeanFlow) or 100 Euler steps (flow
matching), sliced Wasserstein-2 (SWD) against held-out points; one CSV row per run.

    python benchmarks/toy_sets.py --out /tmp/toy_sets
    python benchmarks/onestep_2d.py --sets spirals,pinwheel --seeds 0,1,2 --steps 3000 \\
        --objective meanflow --label base --set time.r_mean=-2

Every run appends a row to ``--log`` (benchmarks/results/onestep_2d/runs.csv): the label, code
commit, set, group (tuning / held-out), seed, objective, steps, the ``--set`` overrides, the
training seconds and the SWD at each sampling step count. Samples: 5,000 with the run's seed;
reference: the set's ``-test.npy`` points (another seed than the training points).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy_sets import HELD_OUT, TUNING, write  # noqa: E402

from meanflow.config.overrides import parse_overrides  # noqa: E402
from meanflow.config.presets import configure  # noqa: E402
from meanflow.eval import sliced_wasserstein  # noqa: E402
from meanflow.train import TrainConfig, load_run, train  # noqa: E402

FIELDS = [
    "when", "label", "commit", "set", "group", "seed", "objective", "steps", "settings",
    "train_s", "swd1", "swd2", "swd4", "swd100", "floor",
]  # fmt: skip
DEFAULT_LOG = os.path.join(os.path.dirname(__file__), "results", "onestep_2d", "runs.csv")


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""


def group(name: str) -> str:
    return "tuning" if name in TUNING else "held-out" if name in HELD_OUT else "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(TUNING))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--objective", default="meanflow")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    ap.add_argument("--preset", default="toy-2d")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--label", default="")
    ap.add_argument("--data-dir", default="/tmp/toy_sets")
    ap.add_argument("--log", default=DEFAULT_LOG)
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", default="", help="keep each run's directory under this folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(args.log), exist_ok=True)
    new = not os.path.exists(args.log)
    code = commit()
    for name in args.sets.split(","):
        train_path = os.path.join(args.data_dir, f"{name}-train.npy")
        if not os.path.exists(train_path):
            write(name, args.data_dir)
        reference = np.load(os.path.join(args.data_dir, f"{name}-test.npy"))
        floor_ref = np.load(train_path)[: len(reference)]
        floor = sliced_wasserstein(floor_ref, reference)
        for seed in (int(s) for s in args.seeds.split(",")):
            settings = [("data", train_path), ("objective", args.objective), ("seed", seed)]
            if args.steps:
                settings.append(("steps", args.steps))
            cfg = configure(TrainConfig(), args.preset, settings + parse_overrides(args.set))
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = tmp
                if args.keep:
                    run_dir = os.path.join(args.keep, f"{args.label}-{name}-{seed}")
                result = train(cfg, run_dir, overwrite=True, progress=False)
                if result.stopped_by:  # a stopped run is not the run named: log nothing
                    sys.exit(f"{name} seed {seed}: stopped by {result.stopped_by}, not logged")
                run = load_run(run_dir)
                ks = (100,) if args.objective == "flow-matching" else (1, 2, 4)
                swd = {
                    k: sliced_wasserstein(run.sample(args.num, steps=k, seed=seed), reference)
                    for k in ks
                }
            row = {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "label": args.label,
                "commit": code,
                "set": name,
                "group": group(name),
                "seed": seed,
                "objective": args.objective,
                "steps": cfg.steps,
                "settings": " ".join(args.set),
                "train_s": round(result.seconds, 1),
                **{f"swd{k}": round(v, 4) for k, v in swd.items()},
                "floor": round(floor, 4),
            }
            with open(args.log, "a", newline="") as f:
                w = csv.DictWriter(f, FIELDS)
                if new:
                    w.writeheader()
                    new = False
                w.writerow(row)
            print(", ".join(f"{k}={v}" for k, v in row.items() if k not in ("when", "commit")))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
