"""Peak resident memory of this process, for the benchmarks' per-contestant children."""

from __future__ import annotations

from trainer.run_summary import peak_resident_bytes


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM on Linux: a child forked from a large parent
    would otherwise report the parent's peak; every contestant read the same 11.5 GB)."""
    return peak_resident_bytes() / 2**20
