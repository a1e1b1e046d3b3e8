"""Quality for compute across data sets: flow matching, MeanFlow, improved MeanFlow and AlphaFlow
(with its authors' window, and with the window ending at half the run) in one table and one
plot, from the committed results of docs/benchmarks.md and docs/onestep.md.

    python benchmarks/objectives_report.py --out benchmarks/results/objectives_report

Every source is a set of runs trained at equal compute (the step counts of each objective are
the budget divided by its measured step cost, docs/benchmarks.md) with three training seeds
where the results hold them:

- Fashion-MNIST (``fashion-mnist-small``): ``objectives_seeds/seed*/results.json`` (the compute
  of 1,200 steps of the former MeanFlow preset) and ``objectives_preset_budget`` (the preset's
  3,000 steps; flow matching and MeanFlow, and ``finetune_fm``: 1,532 flow-matching steps, then
  1,421 MeanFlow steps from them, ``--init``): FD-FMNIST of 2,000 samples, one sampling seed.
- digits (``digits-small``): ``meanflow eval`` lines (FD-digits of 1,000 samples, mean over the
  sampling seeds of a run first).
- 2-D (``toy-2d``): ``onestep_2d/runs.csv`` rows (SWD of 5,000 samples, one draw).

A cell is the metric's mean over training seeds with its (min-max); the ratio to 100-step
flow matching is taken within each training seed (the same seed's flow-matching run), then
averaged. Writes ``table.md`` and ``report.png`` (the ratio against network evaluations per
sample, one panel per data set) into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
from collections import defaultdict

from eval_lines_table import read_lines, sampling_means, setting_and_seed

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FM = "flow matching"
AF_HALF = "AlphaFlow, window to half"  # alpha.finish=0.5: alpha = 0 from 36% of the run on
INIT = "FM, then MeanFlow (--init)"  # Decoupled MeanFlow's conversion, half the compute each
ORDER = [FM, "MeanFlow", "improved MeanFlow", "AlphaFlow", AF_HALF, INIT]
# (data set, kind, path under results/, {entry in the source: objective shown}, 2-D set)
SOURCES: list[tuple[str, str, str, dict[str, str], str]] = [
    ("Fashion-MNIST, 1,200-step budget", "images", "objectives_seeds",
     {"flow-matching": FM, "meanflow+time.ratio_start=0": "MeanFlow",
      "imf+time.ratio_start=0": "improved MeanFlow",
      "alphaflow+time.ratio_start=-1": "AlphaFlow"}, ""),
    ("Fashion-MNIST, 3,000-step budget", "images", "objectives_preset_budget",
     {"flow-matching": FM, "meanflow+time.ratio_start=0": "MeanFlow"}, ""),
    ("Fashion-MNIST, 3,000-step budget", "images", "finetune_fm",
     {"meanflow+init=fm1532": INIT}, ""),
    ("digits", "eval-lines", "digits_fm_w1/eval.jsonl",
     {"w1fm": FM, "w1": "MeanFlow"}, ""),
    ("digits", "eval-lines", "digits_objectives/eval.jsonl",
     {"imf": "improved MeanFlow", "af": "AlphaFlow", "af05": AF_HALF}, ""),
    *[(f"2-D {name}", "runs-csv", "onestep_2d/runs.csv",
       {"h8-fm12k": FM, "h97-ramp": "MeanFlow", "h97-imf": "improved MeanFlow",
        "h97-alpha05": AF_HALF}, name) for name in ("smiley", "grid-gaussians")],
]

# (data set, objective, training seed, sampling steps) -> metric
Records = dict[tuple[str, str, str, int], float]


def image_records(folder: str, data: str, names: dict[str, str],
                  records: Records, train_steps: dict) -> None:
    """Rows of ``image_quality.py`` seed folders (``folder/seedN/results.json``)."""
    paths = sorted(glob.glob(os.path.join(folder, "seed*", "results.json")))
    if not paths:
        raise SystemExit(f"no seed*/results.json under {folder}")
    for path in paths:
        seed = os.path.basename(os.path.dirname(path))[len("seed"):]
        with open(path) as f:
            rows = json.load(f)["rows"]
        for row in rows:
            if row["objective"] in names:
                name = names[row["objective"]]
                records[data, name, seed, row["steps"]] = row["fd"]
                train_steps[data, name] = row["train_steps"]


def eval_line_records(path: str, data: str, names: dict[str, str],
                      records: Records, train_steps: dict) -> None:
    """``meanflow eval`` JSON lines, runs named ``SETTING-sSEED``; sampling seeds averaged."""
    lines = [line for line in read_lines(path) if setting_and_seed(line["run"])[0] in names]
    for line in lines:
        train_steps[data, names[setting_and_seed(line["run"])[0]]] = line["checkpoint_step"]
    for (setting, seed, steps), (fd,) in sampling_means(lines, ("fd",)).items():
        records[data, names[setting], seed, steps] = fd


def csv_records(path: str, data: str, names: dict[str, str], dataset: str,
                records: Records, train_steps: dict) -> None:
    """``onestep_2d.py`` rows of one set: SWD at 1, 2, 4 steps (100 for flow matching)."""
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["label"] not in names or row["set"] != dataset:
                continue
            name = names[row["label"]]
            train_steps[data, name] = int(row["steps"])
            for steps in (1, 2, 4, 100):
                if row[f"swd{steps}"]:
                    records[data, name, row["seed"], steps] = float(row[f"swd{steps}"])


def summarise(records: Records) -> list[dict]:
    """Per (data set, objective, sampling steps): the metric's mean, min and max over training
    seeds, and its ratio to the same seed's 100-step flow matching, mean, min and max."""
    cells: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for (data, name, seed, steps), value in records.items():
        cells[data, name, steps][seed] = value
    out = []
    for (data, name, steps), seeds in cells.items():
        reference = cells.get((data, FM, 100), {})
        ratios = [v / reference[s] for s, v in seeds.items() if s in reference]
        values = list(seeds.values())
        out.append({"data": data, "objective": name, "steps": steps, "seeds": len(values),
                    "mean": statistics.mean(values), "min": min(values), "max": max(values),
                    "ratio": statistics.mean(ratios) if ratios else float("nan"),
                    "ratio_min": min(ratios, default=float("nan")),
                    "ratio_max": max(ratios, default=float("nan"))})
    datasets = list(dict.fromkeys(d for d, *_ in records))
    return sorted(out, key=lambda c: (datasets.index(c["data"]), ORDER.index(c["objective"])
                                      if c["objective"] in ORDER else len(ORDER), c["steps"]))


def markdown(cells: list[dict], train_steps: dict) -> str:
    lines = ["| data | objective | training steps | sampling steps | metric mean (min-max, "
             "seeds) | / FM 100 steps, within seed: mean (min-max) |",
             "|---|---|---|---|---|---|"]
    for c in cells:
        ratio = (f"{c['ratio']:.2f} ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})"
                 if c["ratio"] == c["ratio"] else "-")
        steps = train_steps.get((c["data"], c["objective"]))
        lines.append(f"| {c['data']} | {c['objective']} | {steps:,} | {c['steps']} | "
                     f"{c['mean']:.3f} ({c['min']:.3f}-{c['max']:.3f}, {c['seeds']}) | "
                     f"{ratio} |")
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    datasets = list(dict.fromkeys(c["data"] for c in cells))
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.3 * len(datasets), 3.3),
                             squeeze=False)
    for ax, data in zip(axes[0], datasets):
        for name, marker, color in zip(ORDER, "osD^vP", ("C0", "C1", "C2", "C3", "C4", "C5")):
            mine = [c for c in cells if c["data"] == data and c["objective"] == name
                    and c["steps"] <= 4 and c["ratio"] == c["ratio"]]
            if not mine:
                continue
            x = [c["steps"] for c in mine]
            y = [c["ratio"] for c in mine]
            err = [[c["ratio"] - c["ratio_min"] for c in mine],
                   [c["ratio_max"] - c["ratio"] for c in mine]]
            ax.errorbar(x, y, yerr=err, marker=marker, color=color, capsize=3, label=name)
        ax.axhline(1.0, color="gray", linestyle="--", label="FM, 100 steps")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4], ["1", "2", "4"])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(minor_thresholds=(2, 0.5)))
        ax.set_title(data, fontsize=9)
        ax.set_xlabel("network evaluations per sample")
    axes[0][0].set_ylabel("metric / 100-step flow matching")
    legend: dict = {}  # every objective once, from whichever panel has it
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=HERE, help="the benchmarks/results folder")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    records: Records = {}
    train_steps: dict[tuple[str, str], int] = {}
    for data, kind, rel, names, dataset in SOURCES:
        path = os.path.join(args.results, rel)
        if kind == "images":
            image_records(path, data, names, records, train_steps)
        elif kind == "eval-lines":
            eval_line_records(path, data, names, records, train_steps)
        else:
            csv_records(path, data, names, dataset, records, train_steps)
    cells = summarise(records)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(cells, train_steps)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plot(cells, os.path.join(args.out, "report.png"))
    print(table, end="")


if __name__ == "__main__":
    main()
