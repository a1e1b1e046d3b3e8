"""Training-step time of MeanFlow against flow matching on the same MLP and batch.

    python benchmarks/step_time.py                      # defaults below, CPU
    python benchmarks/step_time.py --hidden 1024 --batch 512 --ratio 0.25 0.75

One step = objective + backward + Adam step. The variants run interleaved in rounds (so machine
noise hits all alike) after a warm-up; the report is the median time per step and its ratio to
flow matching, measured in one run. Writes JSON to --out when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from meanflow import FlowMatching, MeanFlow, TimeSampler
from meanflow.nn import MLP


def make_step(objective, model, optimizer, x, generator):
    def step():
        out = objective(model, x, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--ratio", type=float, nargs="+", default=[0.25])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps-per-round", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    x = torch.randn(args.batch, args.dim, device=device)
    variants = {"flow-matching": FlowMatching(TimeSampler())}
    for ratio in args.ratio:
        for mode in ("subset", "detached", "full"):
            variants[f"meanflow r!=t {ratio:.0%} (loss.jvp={mode})"] = MeanFlow(
                TimeSampler(ratio=ratio), jvp=mode)
    steps = {}
    for name, objective in variants.items():
        torch.manual_seed(0)
        model = MLP(args.dim, hidden=args.hidden, depth=args.depth).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        steps[name] = make_step(objective, model, opt, x, torch.Generator(device).manual_seed(0))
        for _ in range(5):
            steps[name]()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps_per_round)
    base = statistics.median(times["flow-matching"])
    result = {"settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": []}
    print(f"MLP {args.dim}-{args.hidden}x{args.depth}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print("| objective | median ms/step | ratio to flow matching |\n|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        result["rows"].append({"objective": name, "ms_per_step": med * 1e3, "ratio": med / base})
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
