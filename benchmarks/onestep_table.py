"""Summarise benchmarks/results/onestep_2d/runs.csv (written by benchmarks/onestep_2d.py): per
label and set, the mean and range over seeds of the SWD at 1, 2, 4 steps (MeanFlow) and at 100
steps (flow matching), and the ratio of one-step MeanFlow to the flow-matching label given.

    python benchmarks/onestep_table.py --labels s2k-base,s2k-uniform --fm s2k-fm
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
from collections import defaultdict

DEFAULT_LOG = os.path.join(os.path.dirname(__file__), "results", "onestep_2d", "runs.csv")


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default=DEFAULT_LOG)
    ap.add_argument("--labels", required=True, help="comma-separated MeanFlow labels")
    ap.add_argument("--fm", default="", help="the flow-matching label to compare with")
    args = ap.parse_args()
    with open(args.log) as f:
        rows = list(csv.DictReader(f))
    by = defaultdict(list)
    for r in rows:
        by[(r["label"], r["set"])].append(r)
    fm = {s: [float(r["swd100"]) for r in v] for (lab, s), v in by.items() if lab == args.fm}
    print("| label | set | group | seeds | 1-step | 2-step | 4-step | FM 100 | 1-step / FM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in args.labels.split(","):
        ratios = []
        for (lab, s), v in sorted(by.items()):
            if lab != label:
                continue
            one, two, four = ([float(r[f"swd{k}"]) for r in v] for k in (1, 2, 4))
            f_ = fm.get(s, [])
            ratio = statistics.mean(one) / statistics.mean(f_) if f_ else float("nan")
            ratios.append(ratio)
            print(
                f"| {label} | {s} | {v[0]['group']} | {len(v)} | {cell(one)} | {cell(two)} | "
                f"{cell(four)} | {cell(f_)} | {ratio:.2f} |"
            )
        if ratios:
            print(f"| {label} | mean ratio | | | | | | | {statistics.mean(ratios):.2f} |")


if __name__ == "__main__":
    main()
