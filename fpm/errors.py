"""One error type for everything a user can get wrong.

The CLI catches :class:`FpmError` and prints its message on one line, without a traceback.
Messages name the file, line or key at fault.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FpmError(Exception):
    """A user-facing error: bad recipe, bad data, impossible request."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
