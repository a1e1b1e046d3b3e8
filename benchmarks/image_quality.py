"""Quality against sampling steps on Fashion-MNIST (or digits): the objectives (flow matching,
MeanFlow, improved MeanFlow, AlphaFlow) with the same network, data and seed.

    python benchmarks/image_quality.py --run meanflow=runs/fmnist \
        --run flow-matching=runs/fmnist-fm --out benchmarks/results/image_quality

Each ``--run ENTRY=DIR`` is a run directory of ``meanflow train`` with the preset, ``--objective``
and, for an entry ``OBJECTIVE+key=value...``, those ``--set`` settings; a missing one is trained
first (``--train-seed S`` its seed). ``--equal-compute N``: missing runs
are trained at equal training compute instead of equal steps: the MeanFlow run gets N steps and
every other objective ``N * cost(meanflow) / cost(objective)``, where cost is the median time of
one training step of the preset's network and batch, measured here, interleaved, on one thread,
before any training (averaged over the run: AlphaFlow's alpha and a `time.ratio_start` schedule
change a step's cost). Flow matching is sampled at
1, 2, 4, 10 and 100 steps, the others at 1, 2 and 4 (uniform schedules; the same noise and
labels, cycling through the classes, for every entry). Each sample set is compared with the
test split in the feature space of the shipped feature network: FD, precision and recall
(k = 3); the floor is the same metrics for as many training images. ``--keep``: rows already
in ``OUT/results.json`` for the same entry and training step are reused, not sampled again
(adding an entry to a seed's folder costs that entry only; a kept entry's grid is redrawn
from 100 samples of the same seed and labels). ``--carry ENTRY``: that entry's rows in
``OUT/results.json`` stay in the results without its run directory (a run deleted since; its
grid is not redrawn; the grids of the runs given go to ``grids-OBJECTIVES.png`` beside the
folder's ``grids.png``), so a later entry joins a folder whose runs are gone.
Writes results.json, table.md, quality.png (FD and recall against steps) and grids.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from meanflow.config.schema import OBJECTIVES
from meanflow.data import open_data
from meanflow.eval.features import load_feature_net
from meanflow.eval.protocol import image_metrics, sample_features
from meanflow.plotting import image_grid
from meanflow.runs.run import grid_labels
from meanflow.train import load_run

FEW_STEPS = (1, 2, 4)
FM_STEPS = (1, 2, 4, 10, 100)
NAMES = {"meanflow": "MeanFlow", "flow-matching": "flow matching", "imf": "improved MeanFlow",
         "alphaflow": "AlphaFlow"}


def parse_runs(items: list[str], carried: tuple[str, ...] = ()) -> dict[str, str]:
    """``{entry: run directory}`` from ``ENTRY=DIR`` items; an entry is an objective, optionally
    followed by ``+key=value`` training settings (``meanflow+time.ratio_start=0``). Flow
    matching, the reference, must be a run or among the ``carried`` entries."""
    runs = {}
    for item in items:
        entry, sep, run_dir = item.rpartition("=")
        if not sep or objective_of(entry) not in OBJECTIVES or not run_dir:
            raise SystemExit(f"--run {item!r}: expected OBJECTIVE[+key=value...]=DIR with "
                             f"OBJECTIVE one of {', '.join(OBJECTIVES)}")
        if entry in runs:
            raise SystemExit(f"--run {entry}=... given twice")
        runs[entry] = run_dir
    if "flow-matching" not in runs and "flow-matching" not in carried:
        raise SystemExit("--run flow-matching=DIR (or --keep --carry flow-matching) is needed: "
                         "it is the reference at 100 steps")
    return runs


def objective_of(entry: str) -> str:
    return entry.split("+")[0]


def entry_name(entry: str) -> str:
    objective, *settings = entry.split("+")
    return " ".join([NAMES[objective], *settings])


def step_costs(data: str, preset: str, objectives: list[str], rounds: int) -> dict[str, float]:
    """Median seconds of one training step per objective: the preset's network, batch and
    objective, one thread, interleaved rounds, each step at the next of ten fractions of the
    run (AlphaFlow's alpha and a ``time.ratio_start`` schedule change the step's cost). An
    entry may carry settings after the objective's name, ``meanflow+loss.self_velocity=1``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results_io import interleaved_times
    from train_step import make_step

    from meanflow.config.build import build_model, build_objective
    from meanflow.config.overrides import parse_overrides
    from meanflow.config.presets import configure
    from meanflow.train import TrainConfig

    torch.set_num_threads(1)
    ds = open_data(data)
    gen = torch.Generator().manual_seed(0)
    calls, fractions = {}, [k / 10 + 0.05 for k in range(10)]
    for name in objectives:
        objective, *settings = name.split("+")
        overrides = [("objective", objective), *parse_overrides(settings)]
        cfg = configure(TrainConfig(), preset, overrides)
        torch.manual_seed(0)
        model = build_model(cfg, ds.shape, ds.num_classes)
        obj = build_objective(cfg, ds.num_classes)
        idx = torch.randint(0, len(ds.x), (cfg.batch_size,), generator=gen)
        x = ds.x[idx].float()
        y = None if ds.labels is None else ds.labels[idx]
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        step = make_step(obj, model, opt, x, y, seed=0)
        if hasattr(obj, "at_step"):  # one step per fraction of the run's schedules, in turn
            turn = itertools.count()

            def step(obj=obj, inner=step, turn=turn):
                obj.at_step(int(fractions[next(turn) % 10] * 1000), 1000)
                inner()
        step()  # warm-up
        calls[name] = step
    times = interleaved_times(calls, torch.device("cpu"), rounds, repeats=10, rotate=True,
                              block=True)
    return {name: statistics.median(t) for name, t in times.items()}


def ensure_run(run_dir: str, data: str, preset: str, entry: str, steps: int | None,
               threads: str, seed: int | None = None) -> None:
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return
    objective, *settings = entry.split("+")
    cmd = [sys.executable, "-m", "meanflow.cli", "train", "--data", data, "--preset", preset,
           "--objective", objective, "--out", run_dir, "--threads", threads]
    for setting in settings:
        cmd += ["--set", setting]
    if steps:
        cmd += ["--steps", str(steps)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    print(" ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"{entry}: trained in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--preset", default="fashion-mnist-small")
    ap.add_argument("--run", action="append", default=[], metavar="OBJECTIVE=DIR",
                    help="a run directory per objective (flow-matching=DIR is needed)")
    ap.add_argument("--equal-compute", type=int, default=0, metavar="N",
                    help="train missing runs at the compute of N MeanFlow steps")
    ap.add_argument("--cost-rounds", type=int, default=7, help="rounds of the step-cost timing")
    ap.add_argument("--threads", default="auto", help="--threads of the training runs")
    ap.add_argument("--num", type=int, default=2000, help="samples per entry")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="--seed of the runs trained here (default: the preset's)")
    ap.add_argument("--keep", action="store_true",
                    help="reuse OUT/results.json's rows of the same entry and training step")
    ap.add_argument("--carry", action="append", default=[], metavar="ENTRY",
                    help="keep OUT/results.json's rows of ENTRY without its run directory")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = parse_runs(args.run, tuple(args.carry))
    if args.carry and not args.keep:
        sys.exit("--carry needs --keep (it reuses rows of OUT/results.json)")
    if set(args.carry) & set(runs):
        sys.exit(f"--carry and --run both name {sorted(set(args.carry) & set(runs))}: pick one")
    os.makedirs(args.out, exist_ok=True)
    costs, budget = {}, {}
    if args.equal_compute:
        costs = step_costs(args.data, args.preset, sorted(set(runs) | {"meanflow"}),
                           args.cost_rounds)
        budget = {o: round(args.equal_compute * costs["meanflow"] / costs[o]) for o in runs}
        print(json.dumps({"step_seconds": costs, "train_steps": budget}), flush=True)
    for entry, run_dir in runs.items():
        ensure_run(run_dir, args.data, args.preset, entry, budget.get(entry), args.threads,
                   args.train_seed)
    extractor, meta = load_feature_net(args.data)
    split = "test" if args.data == "fashion-mnist" else "train"
    reference = open_data(args.data, split=split).x
    train_images = open_data(args.data).x
    kept = _kept_rows(args.out) if args.keep else {}
    if kept.get("step_seconds") and not costs:
        costs = kept["step_seconds"]
    rows, grids = carried_rows(kept, args.carry), {}
    for objective, run_dir in runs.items():
        run = load_run(run_dir)
        assert run.config.objective == objective_of(objective), \
            f"{run_dir} trained {run.config.objective}"
        labels = grid_labels(args.num, run.num_classes)
        for steps in FM_STEPS if objective == "flow-matching" else FEW_STEPS:
            old = kept.get((objective, steps, run.step))
            if old is not None:
                rows.append(old)
                if steps in (1, 2) or steps == 100:
                    images = sample_features(run, {}, 100, keep_images=True, progress=False,
                                             steps=steps, seed=args.seed,
                                             labels=grid_labels(100, run.num_classes))[1]
                    grids[_grid_title(objective, steps)] = torch.from_numpy(images)
                continue
            start = time.perf_counter()
            fake, samples = sample_features(run, {"fd": extractor}, args.num, keep_images=True,
                                            progress=False, steps=steps, seed=args.seed,
                                            labels=labels)
            seconds = time.perf_counter() - start
            m = image_metrics(fake["fd"], reference, train_images, extractor, meta, ("fd", "pr"),
                              f"{args.data}-{split}", cache_dir=None)
            rows.append({"objective": objective, "steps": steps, "train_steps": run.step,
                         "sample_seconds": round(seconds, 1), **m})
            print(json.dumps(rows[-1]), flush=True)
            if steps in (1, 2) or steps == 100:
                grids[_grid_title(objective, steps)] = torch.from_numpy(samples[:100])
    floor = {k[:-6]: v for k, v in rows[0].items() if k.endswith("_floor")}
    fd = {(r["objective"], r["steps"]): r["fd"] for r in rows}
    table = [f"| model | training steps | sampling steps | FD-{args.data} | precision | recall |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {entry_name(r['objective'])} | {r['train_steps']:,} | {r['steps']} | "
                     f"{r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    table.append(f"| training images (floor) | - | - | {floor['fd']:.2f} | "
                 f"{floor['precision']:.3f} | {floor['recall']:.3f} |")
    entries = [*args.carry, *runs]
    fm100 = fd["flow-matching", 100]
    targets = {f"{o}:{k}_over_fm100": fd[o, k] / fm100 for o in entries if o != "flow-matching"
               for k in (1, 2)}
    if "meanflow" in entries:
        targets["mf1_better_than_fm4"] = fd["meanflow", 1] < fd["flow-matching", 4]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"data": args.data, "preset": args.preset, "num": args.num,
                   "equal_compute": args.equal_compute, "step_seconds": costs,
                   "features": {"fingerprint": meta["fingerprint"],
                                "test_accuracy": meta.get("test_accuracy")},
                   "rows": rows, "floor": floor, "targets": targets}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    # with carried entries the grids show the runs given only: beside grids.png, not over it
    grids_name = ("grids-" + "-".join(objective_of(e) for e in runs) + ".png" if args.carry
                  else "grids.png")
    _plots(args.out, rows, floor, grids, args.data, entries, grids_name)
    print("\n".join(table))
    print(json.dumps(targets))


def _kept_rows(out: str) -> dict:
    """``{(entry, sampling steps, training step): row}`` and ``"step_seconds"`` of an earlier
    ``results.json`` in ``out`` (empty without one)."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        result = json.load(f)
    kept: dict = {(r["objective"], r["steps"], r["train_steps"]): r for r in result["rows"]}
    kept["step_seconds"] = result.get("step_seconds", {})
    return kept


def carried_rows(kept: dict, entries: list[str]) -> list[dict]:
    """The kept rows of ``entries`` (``--carry``), in their order; an entry without rows is an
    error (a misspelt name would silently drop it)."""
    rows = []
    for entry in entries:
        mine = [r for key, r in kept.items() if isinstance(key, tuple) and key[0] == entry]
        if not mine:
            sys.exit(f"--carry {entry}: no rows of that entry in the kept results.json")
        rows += sorted(mine, key=lambda r: r["steps"])
    return rows


def _grid_title(entry: str, steps: int) -> str:
    return f"{entry_name(entry)}, {steps} step{'s' if steps > 1 else ''}"


def _plots(out: str, rows: list[dict], floor: dict, grids: dict, data: str,
           objectives: list[str], grids_name: str = "grids.png") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("fd", "recall")):
        for objective, marker in zip(objectives, "osD^v<>p"):
            mine = [r for r in rows if r["objective"] == objective]
            ax.plot([r["steps"] for r in mine], [r[key] for r in mine], marker=marker,
                    label=entry_name(objective))
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
    cols = min(len(grids), 4)
    rows_ = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 3.4 * rows_), squeeze=False)
    for ax in axes.flat[len(grids):]:
        ax.axis("off")
    for ax, (title, images) in zip(axes.flat, grids.items()):
        ax.imshow(image_grid(images.numpy(), 10), cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, grids_name), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
