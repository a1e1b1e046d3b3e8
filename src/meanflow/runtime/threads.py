"""CPU threads for PyTorch: how many to use, chosen by measurement (docs/benchmarks.md, section
"Threads").

PyTorch's OpenMP workers spin at every parallel region's barrier. When another process keeps
some of our cores busy, a worker that lost its core holds up the others at each barrier, and a
small network that runs thousands of short parallel regions per second slows down many times.
One thread per core that is actually free avoids that, and costs nothing when all cores are free.

``auto`` (the default of every command's ``--threads``) is therefore
``max(1, usable - busy)``: ``usable`` is the number of cores this process may run on
(``os.sched_getaffinity``, capped by a cgroup CPU quota), ``busy`` the cores that other
processes kept busy during a short look at ``/proc/stat`` (rounded to the nearest core).
``OMP_NUM_THREADS``, when set, wins over ``auto``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from ..errors import check

PROBE_SECONDS = 0.1


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen and why (``reason`` is one short phrase for the log)."""

    threads: int
    reason: str


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup CPU quota, or None when there is no quota."""
    for path, parse in (
        ("/sys/fs/cgroup/cpu.max", lambda s: s.split()[:2]),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", lambda s: [s.strip(), None]),
    ):
        try:
            with open(path) as f:
                quota, period = parse(f.read())
            if period is None:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    period = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    return None


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat, or None where unreadable."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        busy += sum(values) - idle
        total += sum(values)
    return (busy, total) if total else None


def busy_cores(seconds: float = PROBE_SECONDS) -> float:
    """Cores kept busy by other processes over the next ``seconds`` (this process sleeps)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return 0.0
    before = _cpu_times(cpus)
    own = time.process_time()
    time.sleep(seconds)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    share = (after[0] - before[0]) / (after[1] - before[1])  # fraction of our cpus busy
    own_share = (time.process_time() - own) / seconds / len(cpus)
    return max(0.0, share - own_share) * len(cpus)


def parse_threads(text: str | int | None) -> int | None:
    """``--threads`` value: a positive count, or None for ``auto`` (also for None / 0)."""
    if text is None or str(text).strip().lower() in ("auto", "0", ""):
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    check(value >= 1, f"--threads must be a positive number of threads or 'auto', got {text!r}")
    return value


def choose_threads(requested: str | int | None = None) -> ThreadChoice:
    """The thread count for ``requested`` (``--threads``): a number is taken as given; ``auto``
    uses ``OMP_NUM_THREADS`` if set, else one thread per core not busy with other work."""
    value = parse_threads(requested)
    if value is not None:
        return ThreadChoice(value, "as requested")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    usable = usable_cores()
    busy = busy_cores()
    threads = max(1, usable - round(busy))
    if threads == usable:
        return ThreadChoice(threads, f"auto: {usable} usable core{'s' * (usable != 1)}, free")
    return ThreadChoice(
        threads, f"auto: {usable} usable cores, {busy:.1f} busy with other processes"
    )


def set_threads(requested: str | int | None = None) -> ThreadChoice:
    """Choose (:func:`choose_threads`) and apply with ``torch.set_num_threads``."""
    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    return choice
