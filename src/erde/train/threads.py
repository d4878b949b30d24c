"""How many intra-op threads training uses on the CPU.

OpenMP's threads meet at a barrier after every operator: when another process holds one of the
cores, the thread that lost its core holds up every other one, and a 2-core machine with one
busy neighbour trained 4x slower with 2 threads than with 1 (docs/benchmarks.md, "Threads under
load"). So by default (`train.threads=0`) training takes as many threads as there are cores idle
when it starts, shared among the processes of a `torchrun` on this machine, and at least one;
`OMP_NUM_THREADS` (PyTorch's own setting, as `torchrun` and `erde reproduce --jobs` set it) and
`train.threads=N` override it. The choice is logged: kernels may sum in another order with
another thread count, so two runs are bit-identical only with the same threads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from erde.device import cores

PROC_STAT = Path("/proc/stat")


def cpu_times(stat: Path = PROC_STAT) -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs together from `/proc/stat`; None where it is absent."""
    try:
        first = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return idle, sum(values[:8])  # guest time is already counted in user time


def idle_cores(interval: float = 0.25, stat: Path = PROC_STAT) -> float | None:
    """How many of this machine's cores sat idle over the next `interval` seconds."""
    before = cpu_times(stat)
    time.sleep(interval)
    after = cpu_times(stat)
    if before is None or after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


def choose_threads(
    setting: int, local_processes: int = 1, idle: float | None = None
) -> tuple[int, str]:
    """The thread count and why: `train.threads`, else `OMP_NUM_THREADS`, else the idle cores
    (`idle`; measured when None) over the processes of this machine, at most this process's
    cores."""
    if setting > 0:
        return setting, "train.threads"
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given), "OMP_NUM_THREADS"
    have = cores()
    if idle is None:
        idle = idle_cores()
    free = have if idle is None else min(have, int(idle + 0.5))
    threads = max(1, free // max(1, local_processes))
    return threads, f"{free} of {have} cores idle at start"
