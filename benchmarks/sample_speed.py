"""Sampling speed: one-step MeanFlow sampling against the bare network, and streaming to disk.

    python benchmarks/sample_speed.py --out benchmarks/results/sample_speed            # CPU
    python benchmarks/sample_speed.py --device cuda --network dit --batch 256 --out DIR

Part 1 (speed). On one network, batch and device, interleaved rounds after a warm-up time
(a) the bare network forward ``model(z, r=0, t=1, y)`` under ``torch.no_grad``, (b) one-step
sampling through the library sampler ``meanflow.sample(model, noise, steps=1, y=y)``, and
(c) flow-matching Euler sampling (the same sampler, ``steps=10`` and ``steps=100``). Reported:
median seconds per batch, images/s, and the throughput ratio to the bare forward (median over
rounds of forward time / sampler time in the same round; target >= 0.95 for one step). The
weights are the untrained initial ones: speed does not depend on them.

Part 2 (streaming). A 2-step run on 8x8 digits (the 8-channel U-Net) is trained, then, each in a
fresh process, ``--stream-num`` samples (and a tenth of them, for comparison) are drawn with
``TrainedRun.iter_samples`` in chunks of ``NOISE_CHUNK`` rows and written with the streaming
``.npz`` writer of ``meanflow sample`` (``sample_files.write_npz``). Memory: after loading the
run the peak-RSS mark is reset (``/proc/self/clear_refs``); the figure is the peak (VmHWM) minus
the resident set before streaming (one thread; one warm-up sample first), with glibc's mmap
threshold fixed at 64 KiB so freed tensors leave the resident set. Bounded means the peak at N does not grow with N: its excess over the
run with N / 10 is under a quarter of the float32 size of all N samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import interleaved_times, md_table, save_results, status_mib  # noqa: E402


def speed(args, device: torch.device) -> dict:
    from train_step import build  # the same network definitions as the training benchmark

    from meanflow import sample

    model, x, y, desc = build(args.network, device, args)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, *x.shape[1:], generator=gen).to(device)
    if y is not None:
        y = torch.randint(0, int(y.max()) + 1, (args.batch,), generator=gen).to(device)
    r0 = torch.zeros(args.batch, device=device)
    t1 = torch.ones(args.batch, device=device)

    def forward():
        with torch.no_grad():
            return model(noise, r0, t1, y=y)

    calls = {"bare network forward": forward,
             "meanflow.sample, 1 step": lambda: sample(model, noise, steps=1, y=y)}
    for steps in args.euler_steps:
        calls[f"flow-matching Euler, {steps} steps"] = \
            (lambda s: lambda: sample(model, noise, steps=s, y=y))(steps)
    names = list(calls)
    for name in names:
        for _ in range(args.warmup):
            calls[name]()
    times = interleaved_times(calls, device, args.rounds, rotate=True)
    rows = []
    for name in names:
        med = statistics.median(times[name])
        ratio = statistics.median(f / s for f, s in zip(times[names[0]], times[name]))
        rows.append({"name": name, "s_per_batch": med, "s_min": min(times[name]),
                     "s_max": max(times[name]), "images_per_s": args.batch / med,
                     "throughput_ratio_to_forward": ratio, "s_rounds": times[name]})
    return {"description": desc.replace(f"batch {x.shape[0]}", f"batch {args.batch}"),
            "batch": args.batch, "rows": rows,
            "one_step_ratio": rows[1]["throughput_ratio_to_forward"]}


def stream_worker(run_dir: str, num: int, path: str) -> dict:
    """Stream ``num`` samples of ``run_dir`` into the .npz ``path``; peak RSS above the start."""
    import numpy as np

    from meanflow.plotting import to_uint8
    from meanflow.runs.noise import NOISE_CHUNK
    from meanflow.runs.sample_files import write_npz
    from meanflow.train import load_run

    torch.set_num_threads(1)  # a memory check: one thread, unhurt by other jobs on the cores
    run = load_run(run_dir, device="cpu")
    first = next(iter(run.iter_samples(1, seed=0)))  # warm-up: lazy library buffers
    shape = (num, *to_uint8(first.numpy()).shape[1:])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mib("VmRSS")
    start = time.perf_counter()

    def blocks():
        for chunk in run.iter_samples(num, batch=NOISE_CHUNK, seed=0):
            yield to_uint8(chunk.numpy())

    write_npz(path, blocks(), shape, None)
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    with np.load(path) as z:
        rows = int(z["arr_0"].shape[0])
    return {"num": num, "rows_in_file": rows, "file_mib": os.path.getsize(path) / 2 ** 20,
            "seconds": seconds, "samples_per_s": num / seconds, "rss_before_mib": before,
            "peak_growth_mib": peak - before,
            "all_samples_float32_mib": num * int(np.prod(first.shape[1:])) * 4 / 2 ** 20}


def streaming(args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from meanflow.cli import main as cli

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        code = cli(["train", "--data", "digits", "--image-size", "8", "--preset", "digits-small",
                    "--set", "model.channels=8", "--steps", "2", "--batch-size", "8", "--out",
                    run_dir, "--quiet"])
        assert code == 0, code

        def worker(num: int) -> dict:  # a fresh process each (peak RSS is per process)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--stream-worker",
                                  run_dir, str(num), os.path.join(tmp, f"s{num}.npz")],
                                 check=True, capture_output=True, text=True, env=env).stdout
            return json.loads(out.strip().splitlines()[-1])

        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(worker, (max(1, args.stream_num // 10), args.stream_num)))
    small, big = results
    excess = big["peak_growth_mib"] - small["peak_growth_mib"]
    return {"run": "digits 8x8, U-Net 8 channels, 2 training steps", "runs": results,
            "excess_mib": excess,
            "bounded": excess < 0.25 * big["all_samples_float32_mib"]
            and big["rows_in_file"] == big["num"]}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Device {s['device']}, {result['threads']} threads, torch {result['torch']}, "
             f"{s['rounds']} rounds after {s['warmup']} warm-up calls; load average before: "
             f"{result['load_before']}, after: {result['load_after']}.", ""]
    if result.get("speed"):
        sp = result["speed"]
        lines += [f"**{sp['description']}**", ""] + md_table(
            ["sampler", "s / batch (median)", "min-max s", "images/s",
             "throughput / bare forward"],
            [[row["name"], f"{row['s_per_batch']:.4f}", f"{row['s_min']:.4f}-{row['s_max']:.4f}",
              f"{row['images_per_s']:.0f}", f"{row['throughput_ratio_to_forward']:.3f}"]
             for row in sp["rows"]]) + [""]
    if result.get("stream"):
        st = result["stream"]
        lines += [f"**Streaming to .npz ({st['run']})**", ""] + md_table(
            ["samples", "samples/s", "file MiB", "peak RSS growth MiB",
             "all samples as float32 MiB"],
            [[f"{run['num']:,}", f"{run['samples_per_s']:.0f}", f"{run['file_mib']:.1f}",
              f"{run['peak_growth_mib']:.1f}", f"{run['all_samples_float32_mib']:.1f}"]
             for run in st["runs"]])
        lines += ["", f"Bounded memory: {'yes' if st['bounded'] else 'NO'} (peak excess of the "
                  f"large run over the small one: {st['excess_mib']:.1f} MiB).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--network", default="unet", help="mlp, unet, dit (as train_step.py), tiny")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--euler-steps", default="10,100", help="flow-matching Euler step counts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--stream-num", type=int, default=50_000, help="0: skip the streaming part")
    ap.add_argument("--no-speed", action="store_true", help="only the streaming part")
    ap.add_argument("--out", help="folder for results.json and table.md")
    ap.add_argument("--stream-worker", nargs=3, help=argparse.SUPPRESS)
    # network options shared with train_step.build
    ap.add_argument("--mlp-hidden", type=int, default=1024)
    ap.add_argument("--mlp-batch", type=int, default=512)
    ap.add_argument("--dit-size", default=None)
    ap.add_argument("--dit-res", type=int, default=None)
    ap.add_argument("--dit-batch", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stream_worker:
        run_dir, num, path = args.stream_worker
        print(json.dumps(stream_worker(run_dir, int(num), path)))
        return
    args.euler_steps = [int(v) for v in args.euler_steps.split(",") if v]
    device = torch.device(args.device)
    load_before = os.getloadavg()
    result = {"settings": {k: v for k, v in vars(args).items() if k != "stream_worker"},
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_before": [round(v, 2) for v in load_before]}
    result["speed"] = None if args.no_speed else speed(args, device)
    result["stream"] = streaming(args) if args.stream_num > 0 else None
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    table = markdown(result)
    print(table)
    save_results(args.out, result, table)


if __name__ == "__main__":
    main()
