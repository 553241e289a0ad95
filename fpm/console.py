"""Output: Rich on rank 0 only, plain lines when stdout is not a terminal (SLURM logs)."""

from __future__ import annotations

import os
import sys
from functools import lru_cache

from rich.console import Console


def rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def is_rank0() -> bool:
    return rank() == 0


def is_tty() -> bool:
    return sys.stdout.isatty()


@lru_cache(maxsize=1)
def console() -> Console:
    """The shared console; silent on ranks other than 0. Wide enough for tables in log files."""
    return Console(quiet=not is_rank0(), width=None if is_tty() else 160, soft_wrap=not is_tty())


def err_console() -> Console:
    return Console(stderr=True, width=None if sys.stderr.isatty() else 200, soft_wrap=True)


def info(msg: str) -> None:
    """A plain status line on rank 0 (markup allowed)."""
    console().print(msg, highlight=False)


def warn(msg: str) -> None:
    if is_rank0():
        err_console().print(f"[yellow]warning:[/yellow] {msg}", highlight=False)
