"""Soak test: a long CPU run killed and resumed at random points must end bitwise identical to an
uninterrupted run, and its memory must stay flat.

    python benchmarks/soak.py --out benchmarks/results/soak
    python benchmarks/soak.py --steps 50000 --kills 10 --seed 3

Both runs are the same ``meanflow train`` command in fresh processes (preset ``tiny`` with
``--steps`` steps, a checkpoint every ``--ckpt-every`` steps). The interrupted run is killed
``--kills`` times with SIGKILL (no chance to save: it loses the steps since its last checkpoint)
and once with SIGTERM (it saves and exits), each after a random delay, and is restarted with the
very same command each time ("rerun the same command to resume"). The report: interruptions
survived, whether every model / EMA / optimizer tensor is bitwise equal, and the resident memory
of the uninterrupted run over time (metrics.jsonl ``memory_mib``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time


def command(out: str, steps: int, ckpt_every: int) -> list[str]:
    return [sys.executable, "-m", "meanflow.cli", "train", "--data", "eight-gaussians",
            "--preset", "tiny", "--steps", str(steps), "--out", out, "--quiet",
            "--threads", "1",
            "--set", f"ckpt_every={ckpt_every}", "--set", "log_every=100",
            "--set", "grad_accum=2", "--set", "ema_decay=0.99"]


def final_tensors(run_dir: str) -> dict:
    from safetensors.torch import load_file

    from meanflow.runs.checkpoint import latest_checkpoint
    tensors = load_file(latest_checkpoint(run_dir) + ".safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim."))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs (plus one SIGTERM)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--out", help="folder for results.json and table.md")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        reference, victim = os.path.join(tmp, "reference"), os.path.join(tmp, "victim")
        start = time.perf_counter()
        subprocess.run(command(reference, args.steps, args.ckpt_every), check=True)
        reference_seconds = time.perf_counter() - start
        print(f"uninterrupted: {reference_seconds:.1f} s", flush=True)

        events = ["SIGKILL"] * args.kills + ["SIGTERM"]
        rng.shuffle(events)
        log = []
        for name in events + [None]:
            proc = subprocess.Popen(command(victim, args.steps, args.ckpt_every),
                                    stderr=subprocess.PIPE, text=True)
            if name is None:
                _, err = proc.communicate()
                log.append({"signal": None, "returncode": proc.returncode})
                break
            delay = rng.uniform(0.15, 0.9) * reference_seconds / (len(events) + 1) + 3.0
            try:
                proc.wait(timeout=delay)  # finished early: nothing to interrupt
            except subprocess.TimeoutExpired:
                proc.send_signal(getattr(signal, name))
            _, err = proc.communicate()
            resumed = [line for line in err.splitlines() if "resuming" in line]
            log.append({"signal": name, "after_s": round(delay, 2),
                        "returncode": proc.returncode, "resumed_from": resumed[-1:] or None})
            print(json.dumps(log[-1]), flush=True)
        assert log[-1]["returncode"] == 0, err

        a, b = final_tensors(reference), final_tensors(victim)
        identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        with open(os.path.join(reference, "metrics.jsonl")) as f:
            memory = [(r["step"], r["memory_mib"]) for r in map(json.loads, f)]
    quarter = max(1, len(memory) // 4)
    early = sorted(m for _, m in memory[:quarter])[quarter // 2]
    late = sorted(m for _, m in memory[-quarter:])[quarter // 2]
    result = {"steps": args.steps, "ckpt_every": args.ckpt_every,
              "interruptions": sum(1 for e in log if e["signal"]),
              "killed": sum(1 for e in log if e["signal"] and e["returncode"] != 0),
              "identical": identical, "tensors_compared": len(a),
              "uninterrupted_seconds": round(reference_seconds, 1),
              "memory_mib_first_quarter_median": round(early, 1),
              "memory_mib_last_quarter_median": round(late, 1),
              "memory_growth": round(late / early - 1, 4), "events": log,
              "memory_series": memory}
    table = ["| steps | interruptions (SIGKILL + SIGTERM) | tensors bitwise equal | memory, "
             "first -> last quarter (MiB) |", "|---|---|---|---|",
             f"| {args.steps} | {result['interruptions']} ({args.kills} + 1) | "
             f"{'all ' + str(len(a)) if identical else 'NO'} | {early:.0f} -> {late:.0f} "
             f"({100 * (late / early - 1):+.1f}%) |"]
    print("\n".join(table))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write("\n".join(table) + "\n")
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
