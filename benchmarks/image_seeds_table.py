"""Mean and spread over training seeds of ``image_quality.py`` results: one ``results.json`` per
seed (``DIR/seed*/results.json``), FD at each sampling step count per entry, and each entry's
FD over 100-step flow matching's mean, and the same ratio taken within each seed
(against that seed's 100-step flow matching): mean (min-max).

    python benchmarks/image_seeds_table.py benchmarks/results/objectives_seeds

Writes ``table.md`` in DIR and prints it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_quality import entry_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.folder, "seed*", "results.json")))
    if not paths:
        raise SystemExit(f"no seed*/results.json under {args.folder}")
    fd: dict[tuple[str, int], list[float]] = {}
    paired: dict[tuple[str, int], list[float]] = {}
    train_steps: dict[str, set[int]] = {}
    costs: dict[str, list[float]] = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        fm100_seed = {r["steps"]: r["fd"] for r in result["rows"]
                      if r["objective"] == "flow-matching"}.get(100)
        for row in result["rows"]:
            if fm100_seed:
                paired.setdefault((row["objective"], row["steps"]), []).append(
                    row["fd"] / fm100_seed)
            fd.setdefault((row["objective"], row["steps"]), []).append(row["fd"])
            train_steps.setdefault(row["objective"], set()).add(row["train_steps"])
        for entry, seconds in result.get("step_seconds", {}).items():
            costs.setdefault(entry, []).append(seconds)
    if ("flow-matching", 100) not in fd:
        raise SystemExit("no 100-step flow-matching rows: they are the reference")
    fm100 = statistics.mean(fd["flow-matching", 100])
    lines = [
        f"{len(paths)} seed folders; FD mean (min-max over seeds, n = seeds with that entry); "
        f"100-step flow matching: {fm100:.2f}",
        "",
        "| model | training steps | sampling steps | FD mean (min-max, n) | / FM 100 steps "
        "| within each seed: mean (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for (entry, steps), values in fd.items():
        ratio = statistics.mean(values) / fm100
        trained = ", ".join(f"{s:,}" for s in sorted(train_steps[entry]))
        lines.append(
            f"| {entry_name(entry)} | {trained} | {steps} | {statistics.mean(values):.2f} "
            f"({min(values):.2f}-{max(values):.2f}, {len(values)}) | {ratio:.2f} | "
            f"{_spread(paired.get((entry, steps), []))} |"
        )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.folder, "table.md"), "w") as f:
        f.write(table)
    print(table)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
