"""Quality each JVP back-end reaches on the same training: MeanFlow on 2-D data, one run per
back-end (same preset, seed, steps), 1- and 2-step samples against fresh reference draws.

    python benchmarks/jvp_quality.py --out benchmarks/results/jvp_quality
    python benchmarks/jvp_quality.py --datasets checkerboard --steps 2000 --backends forward-ad

Back-end names: ``forward-ad``, ``func``, ``fd-forward``, ``fd-central`` (finite differences
with their default steps). Writes ``results.json`` and ``table.md`` (SWD and energy distance
in data units, lower is better; the floor is two independent reference draws) into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import md_table, save_results  # noqa: E402

from meanflow.config.presets import configure
from meanflow.config.overrides import parse_overrides
from meanflow.data import load_vectors
from meanflow.eval import energy_distance, sliced_wasserstein
from meanflow.train import TrainConfig, load_run, train

BACKENDS = {"forward-ad": [("loss.jvp_backend", "forward-ad")],
            "func": [("loss.jvp_backend", "func")],
            "fd-forward": [("loss.jvp_backend", "finite-difference"),
                           ("loss.fd_scheme", "forward")],
            "fd-central": [("loss.jvp_backend", "finite-difference"),
                           ("loss.fd_scheme", "central")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/jvp_quality")
    ap.add_argument("--datasets", default="checkerboard")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--preset", default="toy-2d")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    ap.add_argument("--num", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    rows, result = [], {"settings": vars(args), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "runs": []}
    for name in args.datasets.split(","):
        reference = load_vectors(name, num=args.num, seed=10_000 + args.seed)
        floor = load_vectors(name, num=args.num, seed=20_000 + args.seed)
        floor_swd = sliced_wasserstein(floor, reference)
        for backend in args.backends.split(","):
            settings = [("data", name), ("objective", "meanflow"), ("seed", args.seed),
                        *BACKENDS[backend]]
            if args.steps:
                settings.append(("steps", args.steps))
            cfg = configure(TrainConfig(), args.preset, settings + parse_overrides(args.set))
            run_dir = os.path.join(args.out, "runs", f"{name}-{backend}")
            trained = train(cfg, run_dir, overwrite=True, progress=False)
            run = load_run(run_dir)
            metrics = {}
            for k in (1, 2):
                samples = run.sample(args.num, steps=k, seed=args.seed)
                metrics[k] = (sliced_wasserstein(samples, reference),
                              energy_distance(samples, reference))
            record = {"dataset": name, "backend": backend, "train_s": trained.seconds,
                      "steps": cfg.steps, "swd": {k: m[0] for k, m in metrics.items()},
                      "energy": {k: m[1] for k, m in metrics.items()}, "floor_swd": floor_swd}
            result["runs"].append(record)
            print(record, flush=True)
            rows.append([name, backend, f"{metrics[1][0]:.3f}", f"{metrics[2][0]:.3f}",
                         f"{metrics[1][1]:.4f}", f"{metrics[2][1]:.4f}", f"{floor_swd:.3f}",
                         f"{trained.seconds:.0f}"])
    table = "\n".join(md_table(["dataset", "JVP back-end", "SWD 1-step", "SWD 2-step",
                                "energy 1-step", "energy 2-step", "SWD floor",
                                "train s"], rows))
    print(table)
    save_results(args.out, result, table + "\n")


if __name__ == "__main__":
    main()
