"""One error type for bad user input, located by file, line and column."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
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
