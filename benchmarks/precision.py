"""bf16 against fp32 training through the real CLI, on CPU: does the loss stay within seed noise?

    nice -n 5 python benchmarks/precision.py --out benchmarks/results/precision

Data: a seeded Gaussian mixture of "latents" of shape 4x16x16 (10 classes, one smooth mean
pattern per class plus isotropic noise), written as an ``.npz`` with labels ``y``. Network: a
class-conditional DiT (``--size``, default T/2) with the CPU image recipe of preset
``unet-small`` (guidance in the target, 50% r != t, p = 0.75, cosine lr). Four runs of
``python -m meanflow train``, one after the other, each a fresh process on ``--threads`` threads:

- ``fp32`` (seed 0) and ``fp32 seed 1``: the seed-to-seed noise;
- ``bf16`` (seed 0): ``--set precision=bf16``, the JVP in fp32 (the default ``loss.jvp_dtype``);
- ``bf16 + bf16 JVP`` (seed 0): also ``--set loss.jvp_dtype=autocast``.

Reported per run: the mean ``loss`` and ``mse`` (unweighted squared error per sample) over the
last ``--last`` records of ``metrics.jsonl``, the number of skipped (non-finite) steps, whether
any record holds a NaN, and the training seconds printed by the CLI. Writes ``results.json`` and
``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import md_row, md_table  # noqa: E402

RUNS = [  # name, seed, extra --set overrides
    ("fp32", 0, []),
    ("bf16 (fp32 JVP, default)", 0, ["precision=bf16"]),
    ("bf16 + bf16 JVP (loss.jvp_dtype=autocast)", 0, ["precision=bf16", "loss.jvp_dtype=autocast"]),
    ("fp32 seed 1", 1, []),
]


def make_data(path: str, n: int = 4000, classes: int = 10, seed: int = 0) -> None:
    """A Gaussian mixture of 4x16x16 'latents': per class a smooth mean (4x4 blocks), noise 0.5."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, 4, 4, 4)).repeat(4, axis=2).repeat(4, axis=3)
    y = rng.integers(0, classes, size=n)
    x = means[y] + 0.5 * rng.normal(size=(n, 4, 16, 16))
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))


def train(data: str, out: str, seed: int, overrides: list[str], args) -> dict:
    cmd = [sys.executable, "-m", "meanflow", "train", "--data", data, "--preset", "unet-small",
           "--set", "model.arch=dit", "--set", f"model.size={args.size}",
           "--steps", str(args.steps), "--batch-size", str(args.batch), "--seed", str(seed),
           "--set", f"log_every={args.log_every}", "--set", "grid_every=0",
           "--set", f"ckpt_every={args.steps}", "--out", out, "--overwrite", "--quiet",
           "--threads", str(args.threads)]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    records = []
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    row = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": wall,
           "records": len(records)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return row
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    tail = records[-args.last:]
    finite = all(math.isfinite(r[k]) for r in records for k in ("loss", "mse", "grad_norm"))
    row.update(seconds=summary["seconds"], skipped=summary["skipped_steps"], nan=not finite,
               loss=float(np.mean([r["loss"] for r in tail])),
               loss_sd=float(np.std([r["loss"] for r in tail])),
               mse=float(np.mean([r["mse"] for r in tail])),
               mse_sd=float(np.std([r["mse"] for r in tail])),
               first_loss=records[0]["loss"], steps=summary["step"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", default="T/2", help="DiT SIZE/PATCH")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--last", type=int, default=10, help="records averaged for the final loss")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="where the runs go (default: a temp folder)")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = ap.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="meanflow-precision-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "gaussian-mixture-4x16x16.npz")
    make_data(data)
    rows = {}
    for i, (name, seed, overrides) in enumerate(RUNS):
        rows[name] = train(data, os.path.join(work, f"run{i}"), seed, overrides, args)
        r = rows[name]
        print(f"{name}: " + (f"loss {r['loss']:.4f}, mse {r['mse']:.2f}, {r['seconds']:.0f} s"
                             if r["returncode"] == 0 else f"FAILED {r.get('error')}"), flush=True)

    ok = all(r["returncode"] == 0 for r in rows.values())
    lines = [f"DiT-{args.size} on 4x16x16 Gaussian-mixture latents (10 classes), batch "
             f"{args.batch}, {args.steps} steps, {args.threads} thread(s); final = mean of the "
             f"last {args.last} records (log_every {args.log_every})", "",
             *md_table(["run", "final loss", "final mse", "skipped steps", "NaN", "seconds"])]
    for name, r in rows.items():
        if r["returncode"] != 0:
            lines.append(md_row(name, "failed", "", "", "", ""))
            continue
        lines.append(md_row(name, f"{r['loss']:.4f} (sd {r['loss_sd']:.4f})",
                            f"{r['mse']:.2f} (sd {r['mse_sd']:.2f})", r["skipped"],
                            "yes" if r["nan"] else "no", f"{r['seconds']:.0f}"))
    verdict = {}
    if ok:
        base, other = rows["fp32"], rows["fp32 seed 1"]
        noise = {k: abs(other[k] - base[k]) for k in ("loss", "mse")}
        lines.append("")
        lines.append(f"seed-to-seed |fp32 seed 1 - fp32|: loss {noise['loss']:.4f}, "
                     f"mse {noise['mse']:.2f}")
        for name in RUNS[1:3]:
            r = rows[name[0]]
            diff = {k: abs(r[k] - base[k]) for k in ("loss", "mse")}
            within = all(diff[k] <= noise[k] for k in diff)
            verdict[name[0]] = {"diff": diff, "within_seed_noise": within}
            lines.append(f"{name[0]}: |run - fp32| loss {diff['loss']:.4f}, mse "
                         f"{diff['mse']:.2f}: {'within' if within else 'NOT within'} seed noise")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        import torch
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"settings": vars(args), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "rows": rows, "verdict": verdict},
                      f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
