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


class Progress:
    """A progress display: a Rich bar on an interactive rank-0 terminal, otherwise plain lines
    every ``every_s`` seconds (and at the end), so SLURM logs stay readable."""

    def __init__(self, total: float | None, description: str, unit: str = "", every_s: float = 10.0,
                 fmt=lambda done, total: f"{done:,.0f}" + (f"/{total:,.0f}" if total else ""), quiet: bool = False):
        import time

        self.total, self.description, self.unit, self.every_s, self.fmt = total, description, unit, every_s, fmt
        self.done = 0.0
        self.fields: dict[str, str] = {}
        self._time = time.monotonic
        self._start = self._last = self._time()
        self._bar = None
        self._task = None
        self.quiet = quiet or not is_rank0()
        if not self.quiet and is_tty():
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=console(), transient=False)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc[0] is None and not self.quiet:
            self._line(final=True)

    def update(self, advance: float = 0.0, **fields) -> None:
        self.done += advance
        self.fields.update({k: str(v) for k, v in fields.items()})
        info = "  ".join(f"{k} {v}" for k, v in self.fields.items())
        if self._bar is not None:
            self._bar.update(self._task, advance=advance, info=info)
        elif not self.quiet and self._time() - self._last >= self.every_s:
            self._line()

    def _line(self, final: bool = False) -> None:
        self._last = self._time()
        elapsed = self._last - self._start
        pct = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
        eta = ""
        if self.total and self.done and not final:
            eta = f" eta {max(0.0, elapsed * (self.total - self.done) / self.done):.0f}s"
        info = "  ".join(f"{k} {v}" for k, v in self.fields.items())
        info_str = f" {info}" if info else ""
        info_line = f"{self.description}: {self.fmt(self.done, self.total)}{self.unit}{pct}{info_str} elapsed {elapsed:.0f}s{eta}"
        if is_rank0():
            print(info_line, flush=True)


def verbose() -> bool:
    """``fpm --verbose …`` (or FPM_VERBOSE=1): show what libraries print while they start up."""
    return os.environ.get("FPM_VERBOSE", "") not in ("", "0")


class library_chatter:
    """Hold back what libraries print to stdout while they start up (DeepSpeed's "… built
    successfully", PyTorch's extension-loading lines) unless --verbose; if the block fails, what
    was held back is printed on stderr, so nothing that explains a failure is lost."""

    def __enter__(self):
        import contextlib
        import io

        self._buffer = io.StringIO()
        self._redirect = contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(self._buffer)
        self._redirect.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._redirect.__exit__(exc_type, exc, tb)
        if exc_type is not None and self._buffer.getvalue():
            sys.stderr.write(self._buffer.getvalue())
