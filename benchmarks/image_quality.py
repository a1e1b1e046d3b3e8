"""Quality against sampling steps on Fashion-MNIST (or digits): MeanFlow vs flow matching with
the same network, data, seed and number of training steps.

    python benchmarks/image_quality.py --mf runs/fmnist --fm runs/fmnist-fm \\
        --out benchmarks/results/image_quality

``--mf`` and ``--fm`` are run directories of ``meanflow train`` with the same preset, one with
``--objective flow-matching`` (they are trained first, with ``--preset``, when missing).
MeanFlow is sampled at 1, 2 and 4 steps, flow matching at 1, 2, 4, 10 and 100 (uniform
schedules; the same noise and labels, cycling through the classes, for every entry), and each
sample set is compared with the test split in the feature space of the shipped feature network:
FD, precision and recall (k = 3). The floor is the same metrics for as many training images.
Writes results.json, table.md, quality.png (FD and recall against steps) and grids.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from meanflow.data import open_data
from meanflow.eval.features import load_feature_net
from meanflow.eval.protocol import image_metrics, sample_features
from meanflow.plotting import image_grid
from meanflow.train import load_run
from meanflow.train.pictures import grid_labels

STEPS = {"meanflow": (1, 2, 4), "flow-matching": (1, 2, 4, 10, 100)}


def ensure_run(run_dir: str, data: str, preset: str, objective: str) -> None:
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return
    subprocess.run([sys.executable, "-m", "meanflow.cli", "train", "--data", data, "--preset",
                    preset, "--objective", objective, "--out", run_dir], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--preset", default="fashion-mnist-small")
    ap.add_argument("--mf", required=True, help="MeanFlow run directory")
    ap.add_argument("--fm", required=True, help="flow-matching run directory")
    ap.add_argument("--num", type=int, default=2000, help="samples per entry")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for run_dir, objective in ((args.mf, "meanflow"), (args.fm, "flow-matching")):
        ensure_run(run_dir, args.data, args.preset, objective)
    extractor, meta = load_feature_net(args.data)
    split = "test" if args.data == "fashion-mnist" else "train"
    reference = open_data(args.data, split=split).x
    train_images = open_data(args.data).x
    os.makedirs(args.out, exist_ok=True)
    rows, grids = [], {}
    for run_dir, objective in ((args.mf, "meanflow"), (args.fm, "flow-matching")):
        run = load_run(run_dir)
        check_objective = run.config.objective
        assert check_objective == objective, f"{run_dir} trained {check_objective}"
        labels = grid_labels(args.num, run.num_classes)
        for steps in STEPS[objective]:
            start = time.perf_counter()
            fake, samples = sample_features(run, {"fd": extractor}, args.num, keep_images=True,
                                            progress=False, steps=steps, seed=args.seed,
                                            labels=labels)
            seconds = time.perf_counter() - start
            m = image_metrics(fake["fd"], reference, train_images, extractor, meta, ("fd", "pr"),
                              f"{args.data}-{split}", cache_dir=None)
            samples = torch.from_numpy(samples)
            rows.append({"objective": objective, "steps": steps, "train_steps": run.step,
                         "sample_seconds": round(seconds, 1), **m})
            print(json.dumps(rows[-1]), flush=True)
            if steps in (1, 2, 100):
                grids[f"{objective}, {steps} step{'s' if steps > 1 else ''}"] = samples[:100]
    floor = {k[:-6]: v for k, v in rows[0].items() if k.endswith("_floor")}
    fd = {(r["objective"], r["steps"]): r["fd"] for r in rows}
    table = [f"| model | sampling steps | FD-{args.data} | precision | recall |",
             "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['objective']} | {r['steps']} | {r['fd']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    table.append(f"| training images (floor) | - | {floor['fd']:.2f} | {floor['precision']:.3f} "
                 f"| {floor['recall']:.3f} |")
    targets = {"mf2_over_fm100": fd["meanflow", 2] / fd["flow-matching", 100],
               "mf1_better_than_fm4": fd["meanflow", 1] < fd["flow-matching", 4]}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"data": args.data, "preset": args.preset, "num": args.num,
                   "features": {"fingerprint": meta["fingerprint"],
                                "test_accuracy": meta.get("test_accuracy")},
                   "rows": rows, "floor": floor, "targets": targets}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    _plots(args.out, rows, floor, grids, args.data)
    print("\n".join(table))
    print(json.dumps(targets))


def _plots(out: str, rows: list[dict], floor: dict, grids: dict, data: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("fd", "recall")):
        for objective, marker in (("meanflow", "o"), ("flow-matching", "s")):
            mine = [r for r in rows if r["objective"] == objective]
            ax.plot([r["steps"] for r in mine], [r[key] for r in mine], marker=marker,
                    label=objective)
        ax.axhline(floor[key], color="gray", linestyle="--", label="training images")
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (network evaluations)")
        ax.set_ylabel(f"FD-{data}" if key == "fd" else "recall")
        if key == "fd":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.4))
    for ax, (title, images) in zip(np.atleast_1d(axes), grids.items()):
        ax.imshow(image_grid(images.numpy(), 10), cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grids.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
