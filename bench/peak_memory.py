"""Peak resident memory of this process, for the benchmarks' per-contestant children."""

from __future__ import annotations

import resource
import sys


def peak_rss_mib() -> float:
    """This process's peak resident memory. On Linux from VmHWM, which starts afresh at exec:
    getrusage's ru_maxrss survives it, so a child forked from a large parent reports the
    parent's peak (every contestant read the same 11.5 GB)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
