"""The C allocator set up for training, from inside the program.

A training step allocates and frees the same large activation buffers over and over. glibc's
malloc serves large blocks with fresh `mmap` calls and hands freed memory back to the kernel
(`munmap`, heap trimming), so every step pays page faults to map and zero that memory again:
millions of minor faults and seconds of system time per step on a CPU. Serving every block from
the heap (no `mmap`; glibc still falls back to it if the heap cannot grow) and never trimming
the heap keeps the freed buffers in the process for the next step. Raising the mmap threshold
instead is not enough: glibc 2.36 accepts a threshold of 1 GiB and still maps a 64 MiB buffer
afresh each time (`tests/trainer/test_allocator.py`).

`configure_allocator()` does this with glibc's `mallopt` at start, unless the user chose for
themselves: any `MALLOC_*` tuning variable set, jemalloc or tcmalloc preloaded, or
`EMBTRAIN_ALLOCATOR=default`. Elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER = -1
"""M_TRIM_THRESHOLD -1: the heap is never trimmed (mallopt(3))."""

TUNING_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def configure_allocator() -> str:
    """Apply the training settings; returns what was done, for the run's log."""
    if os.environ.get("EMBTRAIN_ALLOCATOR", "").lower() == "default":
        return "default (EMBTRAIN_ALLOCATOR=default)"
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preloaded or "tcmalloc" in preloaded:
        return f"preloaded ({preloaded})"
    chosen = [name for name in TUNING_VARIABLES if name in os.environ]
    if chosen:
        return f"as set by {', '.join(chosen)}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER) == 1
    except (OSError, AttributeError):
        return "default"
    return "glibc: heap only, never trimmed" if done else "default"
