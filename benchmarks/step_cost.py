"""Wall-clock cost of one training step of a preset, per objective: the ratio that turns "the
same wall-clock" into step counts (docs/onestep.md).

A command-line front to :func:`image_quality.step_costs` (the timing ``image_quality.py
--equal-compute`` uses): the preset's network, batch and objective on ``--data``, one thread,
steps interleaved in ``--rounds`` rounds (AlphaFlow averaged over its schedule); it prints the
median milliseconds per step and each objective's ratio to the first one.

    python benchmarks/step_cost.py --preset toy-2d --data checkerboard \\
        --objectives flow-matching,meanflow,imf,alphaflow --rounds 5
    python benchmarks/step_cost.py --objectives flow-matching,meanflow,meanflow+loss.self_velocity=1

(an entry's ``+key=value`` parts are ``--set`` settings of that entry).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_quality import step_costs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy-2d")
    ap.add_argument("--data", default="checkerboard")
    ap.add_argument("--objectives", default="flow-matching,meanflow")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    names = args.objectives.split(",")
    costs = step_costs(args.data, args.preset, names, args.rounds)
    print(f"| objective | ms/step (median) | ratio to {names[0]} |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {costs[n] * 1e3:.1f} | {costs[n] / costs[names[0]]:.2f} |")


if __name__ == "__main__":
    main()
