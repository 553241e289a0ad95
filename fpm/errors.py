"""One error type for everything a user can get wrong, fpm's exit codes, and which exception
exits with which (:func:`exit_for`).

The CLI catches :class:`FpmError` and prints its message on one line, without a traceback.
Messages name the file, line or key at fault.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Iterable

EXIT_OK = 0
EXIT_USAGE = 2          # bad input: arguments, recipe, data, a run directory in use
EXIT_NONFINITE = 4      # the loss stayed non-finite; the last good checkpoint is intact
EXIT_DISK = 74          # a file could not be written (full or read-only disk); `latest` is intact
EXIT_PREEMPTED = 75     # a checkpoint was saved on SIGTERM/SIGINT/SIGUSR1; rerun the same command to resume
EXIT_HANG = 76          # no step finished within train.hang_timeout_s: stacks dumped (fpm.engine.watchdog)
EXIT_ABORTED = 130      # Ctrl-C twice, or before training started: nothing saved beyond the last checkpoint


class FpmError(Exception):
    """A user-facing error: bad recipe, bad data, impossible request."""

    exit_code = EXIT_USAGE


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class DiskError(FpmError):
    """A file fpm must write could not be written (read-only or full disk, quota, permissions).
    Exit code 74 (EX_IOERR): the input was fine, the storage was not."""

    exit_code = EXIT_DISK


# errno values that mean "this storage cannot take the write", with what to do about it
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is larger than allowed",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def one_line(exc: BaseException) -> str:
    """An error's message on one line. An FpmError raised in a DataLoader worker reaches the main
    process wrapped in the worker's traceback: keep only the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split("FpmError: ", 1)[-1] if "FpmError: " in last else last
    return " ".join(text.split())


def disk_errno(exc: BaseException) -> int | None:
    """The errno of the first OSError in ``exc``'s chain (or ENOSPC for PyTorch's writer, whose
    failed writes surface as RuntimeError 'unexpected pos' / 'file write failed')."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        text = str(exc)
        if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
            return errno.ENOSPC
        found = re.search(r"\(os error (\d+)\)", text)  # Rust's std::io::Error (tokenizers)
        if found:
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_error(exc: OSError, doing: str = "") -> FpmError:
    """A one-line error for an OSError: the path and what happened (DiskError when the storage
    refused a write; FpmError, exit 2, for a path that does not exist or is not what was expected)."""
    prefix = f"{exc.filename}: " if exc.filename else ""
    doing = f" ({doing})" if doing else ""
    if exc.errno in DISK_ERRNOS:
        return DiskError(f"{prefix}{DISK_ERRNOS[exc.errno]}{doing}")
    return FpmError(f"{prefix}{exc.strerror or exc}{doing}")


def disk_reason(code: int | None) -> str:
    """What an errno means for a write, in words."""
    if code in DISK_ERRNOS:
        return DISK_ERRNOS[code]
    return os.strerror(code) if code else "the write failed"


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a collective that timed out (gloo raises it; NCCL aborts)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, RuntimeError) and ("Timed out waiting" in text or "timed out" in text.lower()
                                              and type(exc).__name__ == "DistBackendError"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def exit_for(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an exception a user can meet; None for a bug, which keeps
    its traceback. Bad input exits 2; a write the storage refused 74 (also a library's: torch's
    writer, tokenizers'); a collective that timed out 76, so that the job is requeued."""
    if isinstance(exc, FpmError):
        return exc.exit_code, one_line(exc)
    if isinstance(exc, OSError):  # a file that cannot be read or written: read-only or full disk, permissions
        err = disk_error(exc)
        return err.exit_code, str(err)
    if is_collective_timeout(exc):  # a peer hung or died (gloo; NCCL aborts the process instead)
        return EXIT_HANG, (f"a collective timed out (train.collective_timeout_s): a peer rank hung or died "
                           f"({one_line(exc)[:300]}); exiting {EXIT_HANG} so that the job is requeued")
    code = disk_errno(exc)
    if code in DISK_ERRNOS:
        return EXIT_DISK, f"{disk_reason(code)} ({type(exc).__name__}: {one_line(exc)[:300]})"
    return None
