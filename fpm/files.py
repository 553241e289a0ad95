"""Small file utilities shared by the data and engine layers."""

from __future__ import annotations

import zlib
from pathlib import Path


def crc32_of(path: Path) -> int:
    """CRC32 of a file's bytes, read in 4 MiB blocks."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc
