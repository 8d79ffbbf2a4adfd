"""Autocast precision: `auto` resolved to what the hardware runs natively.

bf16 autocast is fast only where the hardware has bf16 arithmetic: NVIDIA GPUs from Ampere on,
and CPUs with AVX512-BF16 or AMX (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and
later). Elsewhere PyTorch emulates it, slower than float32, so `auto` keeps float32 there.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

CHOICES = ("no", "fp16", "bf16", "auto")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (Linux: read from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in CPU_BF16_FLAGS)
    return False


def resolve(precision: str, device_type: str) -> str:
    """`precision` with `auto` replaced by `bf16` where `device_type` runs bf16 natively, else `no`."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device_type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def announce(requested: str, resolved: str, device_type: str) -> None:
    """Say on stderr what `auto` resolved to (stdout may be a command's JSON)."""
    if requested == "auto":
        import sys

        print(f"precision {'bf16' if resolved == 'bf16' else 'float32'} (auto, {device_type})", file=sys.stderr)


def autocast(precision: str, device_type: str):
    """The autocast context for a resolved `precision` on `device_type` (none for `no`)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


HELP = ("autocast precision of the forward passes: no (float32), bf16, or auto (bf16 where the device runs it "
        "natively: AVX512-BF16/AMX CPUs, Ampere or later GPUs). Embeddings cached under one precision are not "
        "reused under another")
