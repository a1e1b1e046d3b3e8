"""Wall-clock cost of one training step of a preset, per objective, measured interleaved: the
ratio that turns "the same wall-clock" into step counts (docs/onestep.md).

Each round trains a short run of every objective in turn (the preset's settings, its data or
``--data``, ``--steps`` steps, one thread) and takes the training loop's own seconds per step;
the table gives the median over rounds and each objective's ratio to the first one, the ratio
computed within each round first (the machine's load changes between rounds, less within one).

    python benchmarks/step_cost.py --preset toy-2d --data checkerboard \\
        --objectives flow-matching,meanflow,imf --rounds 5 --steps 300
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from meanflow.config.overrides import parse_overrides
from meanflow.config.presets import configure
from meanflow.train import TrainConfig, train


def step_seconds(preset: str, data: str, objective: str, steps: int, overrides) -> float:
    """Seconds per step of a ``steps``-step run (the loop's own clock; setup excluded)."""
    settings = [("data", data), ("objective", objective), ("steps", steps), ("seed", 0)]
    cfg = configure(TrainConfig(), preset, settings + list(overrides))
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(cfg, run_dir, overwrite=True, progress=False)
    return result.seconds / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy-2d")
    ap.add_argument("--data", default="checkerboard")
    ap.add_argument("--objectives", default="flow-matching,meanflow")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300, help="steps per timed run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.objectives.split(",")
    overrides = parse_overrides(args.set)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.rounds):
        for name in names:
            times[name].append(step_seconds(args.preset, args.data, name, args.steps, overrides))
        print(f"round {i + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names))
    base = names[0]
    print(f"\n| objective | ms/step (median) | ratio to {base} (median, min-max) |")
    print("|---|---|---|")
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[base])]
        print(
            f"| {n} | {statistics.median(times[n]) * 1e3:.1f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
