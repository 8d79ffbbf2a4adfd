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

Better still is an allocator built for this: where tcmalloc or jemalloc is installed (Debian:
`libtcmalloc-minimal4`, `libjemalloc2`), the `embtrain` command runs itself again with it
preloaded (`preload_allocator`, before anything heavy is imported), told to keep freed memory.
On quickstart steps (bf16, batch 32 + 32 hard negatives, 2-core CPU, steps 2 to 25): glibc
heap-only 3.64 s and 3.81 GB, tcmalloc 3.15 s and 3.18 GB, jemalloc 3.17 s and 3.54 GB.
`EMBTRAIN_ALLOCATOR=glibc` keeps glibc with the settings above.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER = -1
"""M_TRIM_THRESHOLD -1: the heap is never trimmed (mallopt(3))."""

TUNING_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")

PRELOADS = (
    ("tcmalloc_minimal", {"TCMALLOC_RELEASE_RATE": "0"}),
    ("tcmalloc", {"TCMALLOC_RELEASE_RATE": "0"}),
    ("jemalloc", {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
)
"""Allocators to preload, best first (measured in the module docstring), with the setting that
makes each keep freed memory for reuse instead of handing it back to the kernel."""

PRELOADED_MARK = "EMBTRAIN_ALLOCATOR_PRELOADED"
"""Set in the re-executed command, so that it never re-executes again (even if the loader
refused the library)."""


def preload_allocator() -> None:
    """Run this command again with tcmalloc or jemalloc preloaded, when one is installed and the
    user has not chosen an allocator (`EMBTRAIN_ALLOCATOR`, `LD_PRELOAD`, a `MALLOC_*` variable)
    or already been through here. Returns only when nothing is to be done; call it first."""
    if os.environ.get(PRELOADED_MARK) or os.environ.get("EMBTRAIN_ALLOCATOR") or os.environ.get("LD_PRELOAD"):
        return
    if any(name in os.environ for name in TUNING_VARIABLES + tuple(k for _, settings in PRELOADS for k in settings)):
        return
    if platform.system() != "Linux" or not getattr(sys, "orig_argv", None):
        return
    for name, settings in PRELOADS:
        library = ctypes.util.find_library(name)
        if library:
            env = {**os.environ, **settings, "LD_PRELOAD": library, PRELOADED_MARK: library}
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, sys.orig_argv, env)


def configure_allocator() -> str:
    """Apply the training settings; returns what was done, for the run's log."""
    if os.environ.get("EMBTRAIN_ALLOCATOR", "").lower() == "default":
        return "default (EMBTRAIN_ALLOCATOR=default)"
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preloaded or "tcmalloc" in preloaded:
        return f"preloaded ({preloaded}), keeping freed memory" if os.environ.get(PRELOADED_MARK) else f"preloaded ({preloaded})"
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


def release_free_memory() -> bool:
    """Hand the allocator's free memory back to the kernel now: glibc's `malloc_trim` (which also
    frees whole free pages inside the heap), tcmalloc's `MallocExtension_ReleaseFreeMemory`.
    Called before an evaluation during training: the training step's freed buffers are kept for
    the next step, but evaluation's batches have other sizes and would otherwise come on top of
    them (the quickstart under glibc: the process peaked 0.3 GB above its steps, in its final
    evaluation). Returns whether an allocator did it."""
    if platform.system() != "Linux":
        return False
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return False
    for name, arguments in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        function = getattr(process, name, None)
        if function is not None:
            function(*arguments)
            return True
    return False
