"""Quality on the built-in 2-D distributions: MeanFlow at 1 and 2 steps vs flow matching at 1,
2 and 100 Euler steps, same network, same training steps, same seed.

    python benchmarks/toy_quality.py --out benchmarks/results/toy_quality
    python benchmarks/toy_quality.py --datasets checkerboard --steps 2000 --set time.ratio=0.5

Writes ``results.json``, ``table.md`` (SWD and energy distance, 5,000 samples against 5,000 fresh
reference draws) and ``scatter.png`` (one row per dataset) into ``--out``. The floor row is the
distance between two independent reference draws of the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from meanflow.config.presets import configure
from meanflow.config.overrides import parse_overrides
from meanflow.data import TOY_DATASETS, load_vectors
from meanflow.eval import energy_distance, sliced_wasserstein
from meanflow.train import TrainConfig, load_run, train

COLUMNS = [("meanflow", 1), ("meanflow", 2), ("flow-matching", 1), ("flow-matching", 2),
           ("flow-matching", 100)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/toy_quality")
    ap.add_argument("--datasets", default=",".join(TOY_DATASETS))
    ap.add_argument("--preset", default="toy-2d")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results = {"settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "rows": []}
    panels = []
    for name in args.datasets.split(","):
        reference = load_vectors(name, num=args.num, seed=10_000 + args.seed)
        floor_ref = load_vectors(name, num=args.num, seed=20_000 + args.seed)
        row = {"dataset": name, "floor": {"swd": sliced_wasserstein(floor_ref, reference),
                                          "energy": energy_distance(floor_ref, reference)}}
        row_panels = [("data", reference)]
        for objective in ("meanflow", "flow-matching"):
            settings = [("data", name), ("objective", objective), ("seed", args.seed)]
            if args.steps:
                settings.append(("steps", args.steps))
            cfg = configure(TrainConfig(), args.preset, settings + parse_overrides(args.set))
            run_dir = os.path.join(args.out, "runs", f"{name}-{objective}")
            result = train(cfg, run_dir, overwrite=True, progress=False)
            row[f"{objective}_train_s"] = result.seconds
            run = load_run(run_dir)
            for obj, k in COLUMNS:
                if obj != objective:
                    continue
                samples = run.sample(args.num, steps=k, seed=args.seed)
                row[f"{obj}@{k}"] = {"swd": sliced_wasserstein(samples, reference),
                                     "energy": energy_distance(samples, reference)}
                if k <= 2 or k == 100:
                    row_panels.append((f"{'MF' if obj == 'meanflow' else 'FM'} {k} step", samples))
            print(json.dumps({k: v for k, v in row.items()}), flush=True)
        results["rows"].append(row)
        panels.append(row_panels)
    results["train_steps"] = cfg.steps
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_table(results, os.path.join(args.out, "table.md"))
    write_grid(panels, os.path.join(args.out, "scatter.png"))


def write_table(results: dict, path: str) -> None:
    head = "| dataset | metric | " + " | ".join(
        f"{'MF' if o == 'meanflow' else 'FM'} {k}-step" for o, k in COLUMNS) + " | floor |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for row in results["rows"]:
        for metric in ("swd", "energy"):
            cells = [f"{row[f'{o}@{k}'][metric]:.3f}" for o, k in COLUMNS]
            lines.append(f"| {row['dataset']} | {metric} | " + " | ".join(cells)
                         + f" | {row['floor'][metric]:.3f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_grid(panels, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(p) for p in panels)
    fig, axes = plt.subplots(len(panels), cols, figsize=(2.6 * cols, 2.6 * len(panels)),
                             squeeze=False)
    for i, row in enumerate(panels):
        lim = float(np.percentile(np.abs(row[0][1]), 99.5)) * 1.15
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([]), ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            title, pts = row[j]
            ax.scatter(pts[:, 0], pts[:, 1], s=0.6, alpha=0.5, linewidths=0, color="#1f4e9c")
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
