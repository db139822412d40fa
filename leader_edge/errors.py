"""The errors this project raises for a user to act on.

The CLI shows these (and OSError: a missing file, a full disk) as one line without a traceback,
exit status 2. Anything else - a numpy shape error, CUDA out of memory, a broken invariant - is a
bug or a resource failure and keeps its traceback. Each subclasses the builtin a caller would
expect (ValueError for bad values, RuntimeError for a missing earlier step), so library callers
can keep catching those.

    LeaderEdgeError     the base
    ConfigError         an option, config field or combination of them is invalid
    DataError           a user's file is wrong at a place (file, line, column)
    StateError          an earlier step is missing or does not match (run X first, reinstall Y)
"""

from __future__ import annotations

from pathlib import Path


class LeaderEdgeError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ConfigError(LeaderEdgeError, ValueError):
    """An option, a config field or a combination of them is invalid; the message names it and the fix."""


class StateError(LeaderEdgeError, RuntimeError):
    """An earlier step's output is missing or does not fit (a stage not run, a package not installed)."""


class DataError(LeaderEdgeError, ValueError):
    """A problem in a user's file, with where it is and what to do about it.

    Args:
        path: the file.
        message: what is wrong.
        line: 1-based physical line in the file (the header is line 1), if known.
        column: the column's name (or 1-based number), if known.
        fix: what the user should do.
    """

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        column: str | int | None = None,
        fix: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        self.message = message
        self.fix = fix
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}" if isinstance(column, str) else f", column {column}"
        text = f"{where}: {message}"
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)
