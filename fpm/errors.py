"""One error type for everything a user can get wrong.

The CLI catches :class:`FpmError` and prints its message on one line, without a traceback.
Messages name the file, line or key at fault.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Iterable


class FpmError(Exception):
    """A user-facing error: bad recipe, bad data, impossible request."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class DiskError(FpmError):
    """A file fpm must write could not be written (read-only or full disk, quota, permissions).
    Exit code 74 (EX_IOERR): the input was fine, the storage was not."""

    exit_code = 74


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
