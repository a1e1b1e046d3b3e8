"""Precision and recall of kept 2-D runs (``benchmarks/onestep_2d.py --keep DIR``): what the
sliced Wasserstein distance does not see (docs/onestep.md, "What SWD misses").

SWD compares 1-D projections, so a blob with the data's extent (a failed spiral) can score close
to the data. Improved precision (the fraction of samples inside the k-NN balls of the held-out
points) and recall (the fraction of held-out points inside the balls of the samples;
Kynkaanniemi et al. 2019, ``meanflow.eval.precision_recall``, k = 3) separate the two. For each
run folder ``LABEL-SET-SEED`` under ``--runs``: 5,000 samples with the run's seed at 1, 2 and 4
steps (MeanFlow objectives) or 100 Euler steps (flow matching), against the set's test points;
one CSV row per run and step count, and a summary per label and set (mean and range over seeds).
``--mf-steps 1,100`` adds 100-step sampling of MeanFlow runs: how good the network's own
velocity is, the ceiling of its one-step map.

    python benchmarks/onestep_pr.py --runs /tmp/kept --data-dir /tmp/toy_sets \\
        --out benchmarks/results/onestep_2d/precision_recall.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy_sets import HELD_OUT, TUNING  # noqa: E402

from meanflow.errors import MeanFlowError  # noqa: E402
from meanflow.eval import sliced_wasserstein  # noqa: E402
from meanflow.eval.precision_recall import precision_recall  # noqa: E402
from meanflow.plotting import scatter_png  # noqa: E402
from meanflow.train import load_run  # noqa: E402

FIELDS = ["label", "set", "seed", "objective", "steps", "sampling_steps", "swd", "precision",
          "recall"]  # fmt: skip
SETS = sorted(TUNING + HELD_OUT, key=len, reverse=True)  # longest first: "swiss-roll" before "roll"


def parse_name(folder: str) -> tuple[str, str, int] | None:
    """``LABEL-SET-SEED`` -> (label, set, seed), or None for another folder."""
    head, _, seed = folder.rpartition("-")
    for name in SETS:
        if head.endswith("-" + name) and seed.isdigit():
            return head[: -len(name) - 1], name, int(seed)
    return None


def measure(
    run_dir: str,
    reference: np.ndarray,
    seed: int,
    num: int,
    picture: str = "",
    mf_steps: tuple[int, ...] = (1, 2, 4),
) -> list[dict]:
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    run = load_run(run_dir)
    if run.step < int(cfg["steps"]):  # still training (or stopped): not the run named
        raise RuntimeError(f"at step {run.step} of {cfg['steps']}")
    ks = (100,) if cfg["objective"] == "flow-matching" else mf_steps
    rows, panels = [], [("held-out points", reference)]
    for k in ks:
        fake = run.sample(num, steps=k, seed=seed)
        pr = precision_recall(reference, fake, k=3)
        panels.append((f"{k} step{'s' * (k > 1)}, precision {pr['precision']:.2f}", np.asarray(fake)))
        rows.append(
            {
                "objective": cfg["objective"],
                "steps": cfg["steps"],
                "sampling_steps": k,
                "swd": round(sliced_wasserstein(fake, reference), 4),
                "precision": round(pr["precision"], 4),
                "recall": round(pr["recall"], 4),
            }
        )
    if picture:
        scatter_png(picture, panels, lim=float(np.quantile(np.abs(reference), 0.999)) * 1.15)
    return rows


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="folder of kept runs (LABEL-SET-SEED)")
    ap.add_argument("--data-dir", default="/tmp/toy_sets")
    ap.add_argument("--out", required=True, help="CSV to write")
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pictures", default="", help="write LABEL-SET-SEED.png here (seed 0 only)")
    ap.add_argument("--mf-steps", default="1,2,4",
                    help="sampling steps of MeanFlow-type runs (100: how good the network's own "
                         "velocity is, docs/onestep.md section (f))")  # fmt: skip
    args = ap.parse_args()
    mf_steps = tuple(int(k) for k in args.mf_steps.split(","))
    torch.set_num_threads(args.threads)
    rows = []
    for folder in sorted(os.listdir(args.runs)):
        parsed = parse_name(folder)
        run_dir = os.path.join(args.runs, folder)
        if parsed is None or not os.path.exists(os.path.join(run_dir, "config.json")):
            continue
        label, name, seed = parsed
        reference = np.load(os.path.join(args.data_dir, f"{name}-test.npy"))
        try:
            picture = ""
            if args.pictures and seed == 0:
                os.makedirs(args.pictures, exist_ok=True)
                picture = os.path.join(args.pictures, folder + ".png")
            measured = measure(run_dir, reference, seed, args.num, picture, mf_steps)
        except (OSError, RuntimeError, ValueError, MeanFlowError) as err:  # unfinished: skip
            print(f"skipped {folder}: {err}", file=sys.stderr)
            continue
        rows += [{"label": label, "set": name, "seed": seed, **r} for r in measured]
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["set"], r["sampling_steps"])].append(r)
    print("| label | set | steps | seeds | SWD | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for (label, name, k), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        vals = {m: [float(r[m]) for r in rs] for m in ("swd", "precision", "recall")}
        print(f"| {label} | {name} | {k} | {len(rs)} | {cell(vals['swd'])} | "
              f"{cell(vals['precision'])} | {cell(vals['recall'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
