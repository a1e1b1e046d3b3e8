"""Mean and spread over training seeds of ``meanflow eval`` JSON lines.

Each line is one ``meanflow eval --run DIR --steps K --seed S`` result with a ``run`` field
naming its run directory ``SETTING-sSEED`` (``runs/w1-s0``: setting ``w1``, training seed 0).
Lines of the same run and step count (several sampling seeds) are averaged first; the table
then gives, per setting and step count, the mean over training seeds and its (min-max), and the
mean precision and recall. FD, or SWD for vector runs.

    python benchmarks/eval_lines_table.py benchmarks/results/digits_guidance/eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict


def metric_of(line: dict) -> str:
    return "fd" if "fd" in line else "swd"


def setting_and_seed(run: str) -> tuple[str, str]:
    name = os.path.basename(run.rstrip("/"))
    setting, sep, seed = name.rpartition("-s")
    if not sep or not seed.isdigit():
        raise SystemExit(f"run {run!r}: expected a directory named SETTING-sSEED (runs/w1-s0)")
    return setting, seed


def read_lines(path: str) -> list[dict]:
    """The JSON lines of one file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(text) for text in f if text.strip()]


def sampling_means(lines: list[dict], keys: tuple[str, ...]) -> dict[tuple[str, str, int], list]:
    """``{(setting, training seed, sampling steps): [mean of each key]}``: the lines of one run
    and step count (its sampling seeds) averaged, a missing key as NaN."""
    runs: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for line in lines:
        setting, seed = setting_and_seed(line["run"])
        runs[(setting, seed, int(line["steps"]))].append(line)
    return {
        key: [statistics.mean(g.get(k, float("nan")) for g in group) for k in keys]
        for key, group in runs.items()
    }


def table(lines: list[dict]) -> str:
    metric = metric_of(lines[0])
    cells: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(dict)
    for (setting, seed, steps), means in sampling_means(
        lines, (metric, "precision", "recall")
    ).items():
        cells[(setting, steps)][seed] = means
    out = [
        f"| setting | sampling steps | training seeds | {metric.upper()} mean (min-max) "
        "| precision | recall |",
        "|---|---|---|---|---|---|",
    ]
    for (setting, steps), seeds in sorted(cells.items()):
        values = [v[0] for v in seeds.values()]
        out.append(
            f"| {setting} | {steps} | {', '.join(sorted(seeds))} | {statistics.mean(values):.3f} "
            f"({min(values):.3f}-{max(values):.3f}) "
            f"| {statistics.mean(v[1] for v in seeds.values()):.3f} "
            f"| {statistics.mean(v[2] for v in seeds.values()):.3f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="files of meanflow eval JSON lines")
    args = ap.parse_args()
    lines = [line for path in args.files for line in read_lines(path)]
    if not lines:
        raise SystemExit(f"no eval lines in {', '.join(args.files)}")
    print(table(lines), end="")


if __name__ == "__main__":
    main()
