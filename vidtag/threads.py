"""CPU threads from the cores this process may really use (affinity and cgroup quota), never more.

Results of float reductions can depend on the thread count, so a run that must reproduce (the demo)
fixes it; everything else defaults to the cores available. OpenMP threads are told not to spin while
waiting (``OMP_WAIT_POLICY=PASSIVE``), so a run under load degrades instead of burning the other core.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def passive_openmp() -> None:
    """Ask OpenMP not to spin-wait, and MKL / OpenMP not to shrink their thread teams when the machine is
    busy (a team that changes size changes the order of float sums, so results would depend on the load),
    unless the user chose otherwise; effective before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    os.environ.setdefault("OMP_DYNAMIC", "FALSE")


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads (None or 0: the available cores; never more); returns the number set.

    Before torch is imported this sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (so a stage that never
    needs torch does not pay for importing it); after, ``torch.set_num_threads`` as well.
    """
    import sys

    n = available_cores() if not threads else min(int(threads), available_cores())
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n
