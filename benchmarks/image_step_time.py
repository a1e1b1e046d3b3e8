"""Wall time per 1,000 training steps and peak memory of MeanFlow vs flow matching on an image
preset (default fashion-mnist-small, the real Fashion-MNIST data), through the real trainer.

    python benchmarks/image_step_time.py --out benchmarks/results/image_step_time
    python benchmarks/image_step_time.py --preset digits-small --steps 100 --repeats 3

Each measurement is a fresh process running ``meanflow.train.train`` for ``--steps`` steps
(no grids, one checkpoint at the end) with the preset's settings, MeanFlow and flow matching
alternating ``--repeats`` times so machine noise hits both alike. Time per step is taken from
metrics.jsonl after the first logged window (warm-up excluded). Peak memory is the process's
maximum resident set size (CPU) or ``torch.cuda.max_memory_allocated`` (GPU). The report gives
medians and the MeanFlow / flow-matching ratio measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

OBJECTIVES = ("meanflow", "flow-matching")


def worker(preset: str, objective: str, steps: int, device: str, out: str) -> dict:
    """One training run in this process; returns its timing and memory figures."""
    import torch

    from meanflow.train import TrainConfig, configure, train

    settings = [("objective", objective), ("grid_every", 0), ("ckpt_every", steps),
                ("log_every", max(1, steps // 10)), ("steps", steps)]
    cfg = configure(TrainConfig(), preset, settings)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train(cfg, out, device=device, progress=False)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    timed = records[1:] or records
    seconds = sum(r["elapsed_s"] - p["elapsed_s"] for p, r in zip(records, records[1:])) \
        if len(records) > 1 else records[0]["elapsed_s"]
    counted = timed[-1]["step"] - records[0]["step"] if len(records) > 1 else records[0]["step"]
    result = {"objective": objective, "seconds_per_1000_steps": 1000 * seconds / counted,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fashion-mnist-small")
    ap.add_argument("--steps", type=int, default=150, help="steps per measured run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per objective (alternating)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="folder for results.json and table.md")
    ap.add_argument("--worker", nargs=2, metavar=("OBJECTIVE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.preset, args.worker[0], args.steps, args.device,
                                args.worker[1])))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for objective in OBJECTIVES:
                run_dir = os.path.join(tmp, f"{objective}-{i}")
                cmd = [sys.executable, __file__, "--preset", args.preset, "--steps",
                       str(args.steps), "--device", args.device, "--worker", objective, run_dir]
                line = subprocess.run(cmd, check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1]
                runs.append(json.loads(line))
                print(line, flush=True)
    summary = {}
    for objective in OBJECTIVES:
        mine = [r for r in runs if r["objective"] == objective]
        summary[objective] = {
            "seconds_per_1000_steps": statistics.median(r["seconds_per_1000_steps"] for r in mine),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine)}
        if "peak_cuda_mib" in mine[0]:
            summary[objective]["peak_cuda_mib"] = statistics.median(r["peak_cuda_mib"]
                                                                    for r in mine)
    mf, fm = summary["meanflow"], summary["flow-matching"]
    ratio = mf["seconds_per_1000_steps"] / fm["seconds_per_1000_steps"]
    table = ["| objective | s / 1000 steps | peak RSS (MiB) |", "|---|---|---|"]
    for objective in OBJECTIVES:
        s = summary[objective]
        table.append(f"| {objective} | {s['seconds_per_1000_steps']:.0f} | "
                     f"{s['peak_rss_mib']:.0f} |")
    table.append(f"| MeanFlow / flow matching | {ratio:.2f}x | "
                 f"{mf['peak_rss_mib'] / fm['peak_rss_mib']:.2f}x |")
    print("\n".join(table))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"preset": args.preset, "steps": args.steps, "repeats": args.repeats,
                       "device": args.device, "runs": runs, "summary": summary,
                       "time_ratio": ratio}, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
