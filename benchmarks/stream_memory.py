"""Peak resident memory of a streamed latent run on a data set 10x larger than a memory budget.

Writes a synthetic latent set in the documented format (docs/latents.md: ``latents.json`` +
``moments-K.npy`` shards (n, F=2, 2, C, H, W) float32 + ``labels-K.npy``; the ``vae`` path
does not exist, so training only prints a note), then measures, sampling
``/proc/PID/status`` (VmRSS, RssAnon, RssFile) and ``/proc/PID/smaps_rollup`` (Pss) of the
process and of its DataLoader worker children every ``--interval`` seconds:

1. ``reader``: one epoch of random batches read by a bare process, once through a memory map
   of every shard (what LatentShards did before) and once through ``LatentShards`` (pread);
2. ``train``: ``python -m meanflow train`` through the real CLI on the set for at least one
   full epoch, with ``workers`` DataLoader processes;
3. ``in-memory``: for comparison, a short in-memory run on a ``.npy`` of the posterior means of
   1/10 of the set (the in-memory path holds the whole array, plus a standardized copy).

Results: ``OUT/results.json`` (summaries and the time series) and ``OUT/results.md``.
The synthetic files are deleted afterwards unless ``--keep``.

    nice -n 5 python benchmarks/stream_memory.py --budget-mib 256 --factor 10 \\
        --work /tmp/stream-memory --out benchmarks/results/stream_memory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import md_row, md_table, read_kib  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
ROLLUP = ("Pss", "Pss_Anon", "Pss_File")


# ----------------------------------------------------------------------------- the data
def write_latents(out: str, count: int, shape=(4, 32, 32), shard_size: int = 4096,
                  classes: int = 10, seed: int = 0) -> int:
    """A synthetic latents directory (float32 moments, flips 2); returns its bytes on disk."""
    from meanflow.data.latents import FORMAT, META_NAME, VERSION

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, total = [], 0
    for k, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        moments = rng.standard_normal((n, 2, 2, *shape), dtype=np.float32)
        moments[:, :, 1] = 0.05 + 0.1 * np.abs(moments[:, :, 1])  # a positive std
        name, labels = f"moments-{k:05d}.npy", f"labels-{k:05d}.npy"
        np.save(os.path.join(out, name), moments)
        np.save(os.path.join(out, labels), rng.integers(0, classes, n).astype(np.int64))
        total += os.path.getsize(os.path.join(out, name))
        shards.append({"moments": name, "labels": labels, "count": n})
        del moments
    meta = {"format": FORMAT, "version": VERSION, "count": count, "shape": list(shape),
            "flips": 2, "dtype": "float32", "scaling_factor": 0.18215, "shift_factor": None,
            "vae": os.path.join(os.path.abspath(out), "no-vae-here"),
            "image_size": 8 * shape[1], "source": None,
            "class_names": [f"class{i}" for i in range(classes)], "shard_size": shard_size,
            "shards": shards, "complete": True}
    with open(os.path.join(out, META_NAME), "w") as f:
        json.dump(meta, f)
    return total


# -------------------------------------------------------------------------- the sampler
def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids


class Sampler(threading.Thread):
    """Every ``interval`` s: the memory fields (KiB) of ``pid`` and of its children."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.rows, self.done = pid, interval, [], threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.done.is_set():
            now = time.perf_counter() - self.start_time
            for role, pid in [("main", self.pid)] + [("worker", c) for c in _children(self.pid)]:
                row = read_kib(f"/proc/{pid}/status", FIELDS)
                if "RssAnon" not in row:
                    continue
                row.update(read_kib(f"/proc/{pid}/smaps_rollup", ROLLUP))
                self.rows.append({"t": round(now, 3), "role": role, "pid": pid, **row})
            self.done.wait(self.interval)


def watch(cmd: list[str], interval: float, env=None, log: str | None = None) -> tuple[list, float]:
    """Run ``cmd`` while sampling it; ``(rows, seconds)``; raises when it fails."""
    out = open(log, "w") if log else subprocess.DEVNULL
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    sampler = Sampler(proc.pid, interval)
    sampler.start()
    code = proc.wait()
    sampler.done.set()
    sampler.join()
    if log:
        out.close()
    if code != 0:
        tail = open(log).read()[-2000:] if log else ""
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{tail}")
    return sampler.rows, time.perf_counter() - start


def _mib(kib) -> float:
    return round(float(kib) / 1024, 1)


def summarize(rows: list[dict], role: str, window: tuple[float, float] | None = None) -> dict:
    """Peak and median of each field (MiB) for ``role``; ``worker`` rows are summed per sample
    time (all workers together) and also reported per worker. ``first10``/``last10``: medians
    over the first and last 10% of ``window`` (default: the whole time ``role`` was seen)."""
    mine = [r for r in rows if r["role"] == role]
    if not mine:
        return {}
    times = sorted({r["t"] for r in mine})
    keys = [k for k in FIELDS + ROLLUP if k in mine[0]]
    per_time = {t: {k: 0 for k in keys} for t in times}
    for r in mine:
        for k in keys:
            per_time[r["t"]][k] += r.get(k, 0)
    lo, hi = window or (times[0], times[-1])
    span = max(hi - lo, 1e-9)
    result = {"samples": len(times), "processes": len({r["pid"] for r in mine})}
    for k in keys:
        series = np.array([per_time[t][k] for t in times], np.float64)
        ts = np.array(times)
        first = series[(ts >= lo) & (ts <= lo + 0.1 * span)]
        last = series[(ts >= hi - 0.1 * span) & (ts <= hi)]
        result[k] = {"peak": _mib(series.max()), "median": _mib(np.median(series)),
                     "first10": _mib(np.median(first)) if first.size else None,
                     "last10": _mib(np.median(last)) if last.size else None}
        if role == "worker":
            result[k]["peak_one_worker"] = _mib(max(r.get(k, 0) for r in mine))
    return result


def _seen(rows: list[dict], role: str) -> tuple[float, float] | None:
    ts = [r["t"] for r in rows if r["role"] == role]
    return (min(ts), max(ts)) if ts else None


# ------------------------------------------------------------------------- reader phase
def read_epoch(path: str, how: str, batch: int, seed: int) -> None:
    """One epoch of random batches of ``batch`` rows, through memory maps or LatentShards."""
    from meanflow.data.latents import LatentShards

    shards = LatentShards(path)
    order = np.random.default_rng(seed).permutation(len(shards))
    maps = None
    if how == "mmap":  # the reader before: np.load(mmap_mode="r") and a fancy-index gather
        maps = [np.load(os.path.join(path, s["moments"]), mmap_mode="r")
                for s in shards.meta["shards"]]
        starts = np.concatenate([[0], np.cumsum([s["count"] for s in shards.meta["shards"]])])
    checksum = 0.0
    for b in range(len(order) // batch):
        idx = order[b * batch:(b + 1) * batch]
        if maps is None:
            rows = shards.moments(idx)
        else:
            rows = np.empty((len(idx), shards.flips, 2, *shards.shape), np.float32)
            shard_of = np.searchsorted(starts, idx, side="right") - 1
            for k in np.unique(shard_of):
                where = np.nonzero(shard_of == k)[0]
                local = idx[where] - starts[k]
                order_k = np.argsort(local, kind="stable")
                rows[where[order_k]] = maps[k][local[order_k]]
        checksum += float(rows[:, 0, 0, 0, 0, 0].sum())
    print(json.dumps({"how": how, "batches": len(order) // batch, "checksum": checksum}))


# ------------------------------------------------------------------------------- report
def thin(rows: list[dict], every: float = 1.0) -> list[dict]:
    """The rows of one sample time per ``every`` seconds (for the stored series)."""
    kept, last = [], -math.inf
    for t in sorted({r["t"] for r in rows}):
        if t - last >= every:
            kept.append(t)
            last = t
    keep = set(kept)
    return [r for r in rows if r["t"] in keep]


def plot(result: dict, path: str) -> None:
    """Memory over time: the training run (left), the two readers' RssFile (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = result["train"]["series"]
    for role, field, style in (("main", "RssAnon", "C0-"), ("main", "RssFile", "C0--"),
                               ("worker", "RssAnon", "C1-"), ("worker", "RssFile", "C1--")):
        per_t: dict[float, int] = {}
        for r in rows:
            if r["role"] == role:
                per_t[r["t"]] = per_t.get(r["t"], 0) + r[field]
        ts = sorted(per_t)
        label = f"{'trainer' if role == 'main' else 'workers (sum)'} {field}"
        left.plot(ts, [per_t[t] / 1024 for t in ts], style, label=label)
    total: dict[float, int] = {}
    for r in rows:
        total[r["t"]] = total.get(r["t"], 0) + r.get("Pss", 0)
    left.plot(sorted(total), [total[t] / 1024 for t in sorted(total)], "k:", label="total Pss")
    left.set(xlabel="seconds", ylabel="MiB", title=f"train, {result['train']['steps']} steps "
             f"({result['train']['epochs']:.2f} epochs) on {result['data']['gib_on_disk']:.2f} GiB")
    left.legend(fontsize=8)
    for how, style in (("mmap", "C3-"), ("pread", "C2-")):
        series = result[f"reader-{how}"]["series"]
        right.plot([r["t"] for r in series], [r["RssFile"] / 1024 for r in series], style,
                   label=f"{how}: RssFile")
        right.plot([r["t"] for r in series], [r["RssAnon"] / 1024 for r in series], style,
                   alpha=0.4, label=f"{how}: RssAnon")
    right.set(xlabel="seconds", ylabel="MiB", title="one epoch of random batches, one process")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict) -> str:
    data = result["data"]
    lines = [
        f"Synthetic latent set: {data['count']:,} samples of {data['shape']} "
        f"(moments (N, 2, 2, C, H, W) float32, {data['bytes_per_sample'] // 1024} KiB per "
        f"sample), {data['gib_on_disk']:.2f} GiB on disk = {data['factor']:g}x a "
        f"{data['budget_mib']} MiB budget.",
        "", *md_table(["phase", "process", "field", "peak MiB", "median MiB", "first 10%",
                       "last 10%"])]
    for phase in ("reader-mmap", "reader-pread", "train", "in-memory-1/10"):
        info = result.get(phase)
        if not info:
            continue
        for role in ("main", "worker"):
            summary = info.get(role) or {}
            label = {"main": "trainer" if phase.startswith(("train", "in-")) else "reader",
                     "worker": f"workers (sum of {summary.get('processes', 0)})"}[role]
            for field in ("RssAnon", "RssFile", "VmRSS", "Pss"):
                s = summary.get(field)
                if s:
                    lines.append(md_row(phase, label, field, s["peak"], s["median"],
                                        s["first10"], s["last10"]))
    train = result.get("train", {})
    lines += ["", f"Training: {train.get('steps')} steps of batch {train.get('batch_size')} "
              f"({train.get('epochs', 0):.2f} epochs) in {train.get('seconds', 0):.0f} s; "
              f"total peak resident memory (trainer + workers, sum of per-sample VmRSS): "
              f"{train.get('peak_total_vmrss_mib')} MiB; sum of Pss: "
              f"{train.get('peak_total_pss_mib')} MiB; data size "
              f"{data['gib_on_disk'] * 1024:.0f} MiB.",
              f"In-memory path, from arithmetic: the whole set as moments is "
              f"{data['gib_on_disk'] * 1024:.0f} MiB of private memory (the means alone "
              f"{data['count'] * data['bytes_per_sample'] / 4 / 2 ** 20:.0f} MiB, plus the "
              "trainer's standardized copy of an `.npy`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-mib", type=int, default=256)
    p.add_argument("--factor", type=float, default=10.0, help="data size / budget")
    p.add_argument("--shape", default="4x32x32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=float, default=1.05, help="training length (>= 1)")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--in-memory-steps", type=int, default=100)
    p.add_argument("--work", default="/tmp/stream-memory")
    p.add_argument("--out", default="benchmarks/results/stream_memory")
    p.add_argument("--keep", action="store_true", help="keep the synthetic files")
    p.add_argument("--read-epoch", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.read_epoch:
        read_epoch(args.read_epoch[0], args.read_epoch[1], args.batch_size, 0)
        return 0

    shape = tuple(int(s) for s in args.shape.split("x"))
    per_sample = 2 * 2 * int(np.prod(shape)) * 4
    count = int(math.ceil(args.factor * args.budget_mib * 2 ** 20 / per_sample))
    os.makedirs(args.work, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    need = count * per_sample * 1.15
    if free < 2 * need:
        raise SystemExit(f"{args.work}: {free / 2 ** 30:.1f} GiB free, the set needs "
                         f"{need / 2 ** 30:.1f} GiB (x2 margin); lower --budget-mib or --factor")
    latents, run_dir = os.path.join(args.work, "latents"), os.path.join(args.work, "run")
    for path in (latents, run_dir):
        shutil.rmtree(path, ignore_errors=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
              "python": sys.version.split()[0], "interval_s": args.interval}
    try:
        t0 = time.perf_counter()
        size = write_latents(latents, count, shape)
        result["data"] = {"count": count, "shape": list(shape), "bytes_per_sample": per_sample,
                          "gib_on_disk": size / 2 ** 30, "budget_mib": args.budget_mib,
                          "factor": args.factor,
                          "write_seconds": round(time.perf_counter() - t0, 1)}
        print(f"wrote {count} samples, {size / 2 ** 30:.2f} GiB", file=sys.stderr)
        me = [sys.executable, os.path.abspath(__file__), "--batch-size", str(args.batch_size)]

        for how in ("mmap", "pread"):
            rows, seconds = watch(me + ["--read-epoch", latents, how], args.interval)
            result[f"reader-{how}"] = {"seconds": round(seconds, 1),
                                       "main": summarize(rows, "main"), "series": rows}
            print(f"reader {how}: {result[f'reader-{how}']['main']['RssFile']}", file=sys.stderr)

        per_epoch = count // args.batch_size
        steps = int(math.ceil(args.epochs * per_epoch))
        cmd = [sys.executable, "-m", "meanflow", "train", "--data", latents, "--out", run_dir,
               "--preset", "unet-small", "--set", "model.arch=dit", "--set", "model.size=T/4",
               "--batch-size", str(args.batch_size), "--steps", str(steps),
               "--set", f"workers={args.workers}", "--set", "grid_every=0",
               "--set", f"ckpt_every={steps}", "--set", "log_every=50", "--quiet"]
        rows, seconds = watch(cmd, args.interval, log=os.path.join(args.work, "train.log"))
        window = _seen(rows, "worker")  # training proper: while the workers live
        totals: dict[float, list[int]] = {}
        for r in rows:
            totals.setdefault(r["t"], [0, 0])
            totals[r["t"]][0] += r["VmRSS"]
            totals[r["t"]][1] += r.get("Pss", 0)
        result["train"] = {
            "command": " ".join(["python"] + cmd[1:]), "steps": steps,
            "batch_size": args.batch_size, "epochs": steps / per_epoch,
            "seconds": round(seconds, 1), "workers": args.workers, "window_s": window,
            "main": summarize(rows, "main", window), "worker": summarize(rows, "worker", window),
            "peak_total_vmrss_mib": _mib(max(v[0] for v in totals.values())),
            "peak_total_pss_mib": _mib(max(v[1] for v in totals.values())),
            "series": rows}
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            result["train"]["metrics"] = [json.loads(line) for line in f if line.strip()]
        print(f"train: {seconds:.0f} s", file=sys.stderr)

        if args.in_memory_steps:
            npy = os.path.join(args.work, "means-tenth.npy")
            from meanflow.data.latents import LatentShards
            tenth = LatentShards(latents).moments(
                np.arange(max(count // 10, args.batch_size)))[:, 0, 0]
            np.save(npy, tenth)
            del tenth
            cmd = [sys.executable, "-m", "meanflow", "train", "--data", npy, "--out",
                   run_dir + "-memory", "--preset", "unet-small", "--set", "model.arch=dit",
                   "--set", "model.size=T/4", "--batch-size", str(args.batch_size),
                   "--steps", str(args.in_memory_steps), "--set", "grid_every=0",
                   "--set", f"ckpt_every={args.in_memory_steps}", "--quiet"]
            rows, seconds = watch(cmd, args.interval,
                                  log=os.path.join(args.work, "train-memory.log"))
            result["in-memory-1/10"] = {
                "command": " ".join(["python"] + cmd[1:]), "seconds": round(seconds, 1),
                "data_mib": _mib(os.path.getsize(npy) / 1024), "main": summarize(rows, "main")}
    finally:
        if not args.keep:
            for path in (latents, run_dir, run_dir + "-memory",
                         os.path.join(args.work, "means-tenth.npy")):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.exists(path):
                    os.remove(path)
    os.makedirs(args.out, exist_ok=True)
    plot(result, os.path.join(args.out, "memory.png"))
    for phase in ("reader-mmap", "reader-pread", "train"):
        result[phase]["series"] = thin(result[phase]["series"])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
