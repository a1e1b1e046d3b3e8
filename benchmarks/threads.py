"""The demo's training alone and beside another PyTorch job, for two thread settings.

    python benchmarks/threads.py --out benchmarks/results/threads
    python benchmarks/threads.py --steps 8000 --repeats 1     # the whole demo (slow)

The measured command is the demo's training (``meanflow train --data checkerboard --preset
toy-2d``, see scripts/demo.sh) for ``--steps`` steps in a fresh process, with ``--threads auto``
(the default) and with ``--threads N`` for N = all usable cores (PyTorch's own default, which
every command used before ``--threads`` existed). Each runs (a) alone and (b) while a concurrent
CPU-bound process runs: another PyTorch job, the same training with PyTorch's default thread
count, started a few seconds before so that it is running when the measured one starts. The job
runs either in a session of its own (as one started from another terminal or by a job scheduler:
Linux's autogroup then shares the cores between the two sessions) or in the benchmark's own
session (as one started with ``&`` from the same shell: the cores are shared between threads).
Conditions are interleaved over ``--repeats`` rounds; the figure is the training loop's own time
(the ``seconds`` that ``meanflow train`` prints: no imports, no data generation), median over
rounds, and the ratio (b) / (a). Target: (b) at most 2x (a) with the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

DEMO = ["--data", "checkerboard", "--preset", "toy-2d", "--quiet"]


def meanflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "meanflow.cli", *args]


def train_seconds(steps: int, threads: str, workdir: str) -> tuple[float, int]:
    """Run the demo's training for ``steps`` steps; (training seconds, threads it used)."""
    out = tempfile.mkdtemp(dir=workdir)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(meanflow("train", *DEMO, "--steps", str(steps), "--out", out,
                                   "--threads", threads, "--set", f"ckpt_every={steps}"),
                          capture_output=True, text=True, env=env, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        used = json.loads(f.readlines()[-1])["threads"]
    return float(result["seconds"]), int(used)


def start_load(workdir: str, own_session: bool) -> subprocess.Popen:
    """Another PyTorch job: the same training, PyTorch's default threads, (almost) endless;
    ``own_session``: started in a session of its own, as a job from another terminal or a job
    scheduler is (Linux's autogroup then shares the CPU between sessions, not threads)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = tempfile.mkdtemp(dir=workdir)
    load = subprocess.Popen(meanflow("train", *DEMO, "--steps", "10000000", "--out", out,
                                     "--threads", str(os.cpu_count()), "--set",
                                     "ckpt_every=10000000", "--set", "log_every=1000000"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=own_session)
    time.sleep(5)  # imports done, training running
    return load


def main() -> None:
    from meanflow.runtime.threads import usable_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default="auto,all",
                        help="comma list of --threads values; 'all' = every usable core")
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args()
    cores = usable_cores()
    settings = [str(cores) if s == "all" else s for s in args.settings.split(",")]
    conditions = ("alone", "load", "load-same-session")
    times: dict[str, list[float]] = {f"{s}/{c}": [] for s in settings for c in conditions}
    used: dict[str, list[int]] = {k: [] for k in times}
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(args.repeats):
            for condition in conditions:
                load = None if condition == "alone" else \
                    start_load(workdir, own_session=condition == "load")
                try:
                    for setting in settings if round_ % 2 == 0 else settings[::-1]:
                        seconds, n = train_seconds(args.steps, setting, workdir)
                        key = f"{setting}/{condition}"
                        times[key].append(seconds)
                        used[key].append(n)
                        print(f"round {round_}: threads {setting:>4} {condition:>17}: "
                              f"{seconds:7.2f} s ({n} threads)", file=sys.stderr, flush=True)
                finally:
                    if load is not None:
                        load.kill()
                        load.wait()
    rows = []
    for setting in settings:
        alone = statistics.median(times[f"{setting}/alone"])
        loaded = statistics.median(times[f"{setting}/load"])
        same = statistics.median(times[f"{setting}/load-same-session"])
        rows.append({"threads": setting, "alone_s": round(alone, 2), "load_s": round(loaded, 2),
                     "ratio": round(loaded / alone, 2), "load_same_session_s": round(same, 2),
                     "ratio_same_session": round(same / alone, 2),
                     "threads_used": {c: used[f"{setting}/{c}"] for c in conditions},
                     "seconds": {c: times[f"{setting}/{c}"] for c in conditions}})
    print("| --threads | alone (s) | beside a job in its own session (s) | ratio | beside a job "
          "in the same session (s) | ratio | threads used |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        counts = " / ".join(str(sorted(set(v))) for v in r["threads_used"].values())
        print(f"| {r['threads']} | {r['alone_s']} | {r['load_s']} | {r['ratio']} | "
              f"{r['load_same_session_s']} | {r['ratio_same_session']} | {counts} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "results.json" if args.settings == "auto,all" else \
            f"results-{'-'.join(settings)}-{args.steps}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"steps": args.steps, "repeats": args.repeats, "usable_cores": cores,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
