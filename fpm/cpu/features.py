"""What this machine's CPU computes natively (read from /proc/cpuinfo once; imports nothing heavy)."""

from __future__ import annotations

import functools
from pathlib import Path

NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's CPU from /proc/cpuinfo (empty off Linux)."""
    name, flags = "", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


@functools.cache
def native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AMX or AVX-512 BF16); elsewhere PyTorch emulates
    bf16 arithmetic."""
    return any(f in cpu_info()[1] for f in NATIVE_BF16_CPU_FLAGS)
