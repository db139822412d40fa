"""The one visits reader: a visits CSV (or in-memory visit records) validated into `VisitTable`s.

Training (`dataset.read_visits`/`load_dataset`), `evaluate --truth`, `predict` and the service
(`read_records`, through `Bundle.recommend`) all read visits here, under one contract:
- the header and every row as docs/DATA.md says (ids, ISO 8601 times, `a;b;c` code lists,
  `profile_*` columns), each refusal named by file, line, column and fix;
- a patient's rows are contiguous and in time order (equal times keep file order); visit ids are
  unique across the file.
Why contiguous and ordered rather than "any order, sorted on read": the reader streams, so a
10M-row file is checked in bounded memory (chunks of `CHUNK_PATIENTS` whole patients; repeated
visit ids and split patients are found through 64-bit hashes, `_SeenIds`, ~60 bytes per row), and
it never reorders, so the visit a recommendation names is the row that was written, and a file
whose order disagrees with its times is refused at the row instead of silently re-read. The
`visits.csv` that `leader-edge synth/prepare` write (`dataset.write_dataset`) is in this order.

Also refused, besides the format checks:
- a file that is not UTF-8 (`leader_edge.bedside.csv_stream`): UTF-16 (a byte-order mark FF FE / FE FF, or
  NULs between the characters of the header), gzip and ZIP are named as such; another encoding at
  the first line that does not decode;
- a NUL byte in any field (it would pass into the ids of the output);
- a field over `MAX_FIELD` characters: named as a field too long when it sits on one line (a
  50,000-code visit), as an unclosed quote when the field runs over several lines;
- an id holding a line break (it would split its row of the recommendations);
- an id that begins with `=`, `+`, `-` or `@` (`FORMULA_START`). A spreadsheet opening the
  recommendations would run such an id as a formula (CSV injection), and rewriting it (a leading
  `'`) would break the join with the truth file in `leader-edge evaluate`, so it is refused rather
  than escaped; ordinary ids are written unchanged.
Torch-free and Dataset-free: the bedside runtime imports this module.
"""

from __future__ import annotations

import csv
import operator
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO

import numpy as np

from leader_edge.bedside.csv_checks import PROFILE_PREFIX, VISIT_COLUMNS, check_header, parse_code_list
from leader_edge.bedside.csv_stream import MAX_FIELD, Lines, csv_error
from leader_edge.bedside.encoding import CODE_COLUMNS
from leader_edge.errors import DataError
from leader_edge.bedside.visit_table import VisitTable

CHUNK_PATIENTS = 8192  # patients per chunk: ~4 MB of encoded arrays, enough to fill ORT batches
_CODES_OK = re.compile(r"[^\s,;]+(?:;[^\s,;]+)*")  # the common case, checked in C; else parse_code_list
# A whole column of code lists, one per line, each empty or canonical. ASCII text (the usual) is
# checked with substring scans, ~10x faster than this regex (0.2 s per 100k patients).
_COLUMN_OK = re.compile(r"(?:[^\s,;]+(?:;[^\s,;]+)*)?(?:\n(?:[^\s,;]+(?:;[^\s,;]+)*)?)*")
_ASCII_BAD = (",", ";;", ";\n", "\n;", " ", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")  # \s but \n
# First characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection"; tab
# and CR too, but ids are stripped of them).
FORMULA_START = "=+-@"
_FORMULA_AFTER_NEWLINE = tuple("\n" + c for c in FORMULA_START)


# ---------------------------------------------------------------------------------------------
# Reading visits


class _SeenIds:
    """Set of ids that costs 12 bytes each: 64-bit hashes + first line, in sorted numpy runs
    merged like an LSM tree (amortised O(n log n)). A hash collision between two different ids
    (probability ~n^2 / 2^65, 3e-6 at 10^7 ids) would be reported as a repeat."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, ids: list[str], lines: list[int]) -> tuple[int, int] | None:
        """Add ids; return (line of the repeat, line of the first) for the first repeated id, if any."""
        if not ids:
            return None
        h = np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids))
        ln = np.asarray(lines, dtype=np.int32)
        order = np.argsort(h, kind="stable")
        h, ln = h[order], ln[order]
        dup = np.flatnonzero(h[1:] == h[:-1])
        hits = [(int(ln[d + 1]), int(ln[d])) for d in dup]
        for run_h, run_ln in self._runs:
            pos = np.searchsorted(run_h, h).clip(max=len(run_h) - 1)
            found = np.flatnonzero(run_h[pos] == h)
            hits += [(int(ln[i]), int(run_ln[pos[i]])) for i in found]
        if hits:
            return min(hits)
        self._runs.append((h, ln))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (a, la), (b, lb) = self._runs.pop(), self._runs.pop()
            merged, lm = np.concatenate([b, a]), np.concatenate([lb, la])
            order = np.argsort(merged, kind="stable")
            self._runs.append((merged[order], lm[order]))
        return None


def read_patients(stream: IO[bytes], path: str, *, chunk_patients: int = CHUNK_PATIENTS) -> Iterator[VisitTable]:
    """Stream a canonical visits CSV as chunks of whole patients, validating every row.

    Args:
        stream: the file opened in binary mode (decoded line by line here, so a non-UTF-8 byte is
            reported on its own line; a UTF-8 BOM is accepted).
        path: the name used in error messages ("<stdin>" for standard input).
        chunk_patients: patients per yielded chunk (the last one may be smaller).

    Yields:
        `VisitTable`s of `chunk_patients` whole patients.

    Raises:
        DataError: empty file, bad header, wrong field count, a field over MAX_FIELD characters,
            non-UTF-8 bytes (UTF-16 named as such), a NUL byte, empty ids, an id that begins like
            a spreadsheet formula, a repeated visit id, a patient whose rows are not contiguous,
            visits out of time order, bad times or code lists.
    """
    csv.field_size_limit(MAX_FIELD)
    source = Lines(stream, path)
    try:
        reader = csv.reader(source)
        yield from _Reader(next(reader, None), path, chunk_patients).chunks(source, reader)
    except csv.Error as e:  # in the header (the rows' errors are named in `_Reader.chunks`)
        raise csv_error(e, source, path, start=1) from None


class _Reader:
    """Rows a block at a time, validated by whole-block checks (`_fast`); a block that fails any of
    them goes through the row-by-row checks (`_slow`), which name the first bad row exactly as a
    row-at-a-time reader would. Valid rows accumulate as columns until a chunk is full."""

    def __init__(self, header: list[str] | None, path: str, chunk_patients: int) -> None:
        self.path, self.chunk_patients = path, chunk_patients
        check_header(header, VISIT_COLUMNS, Path(path), extra_prefix=PROFILE_PREFIX)
        self.nul = False  # a NUL byte was seen: every row goes through `_slow` from then on
        col = {c: i for i, c in enumerate(header)}
        self.header, self.width = header, len(header)
        self.i_pid, self.i_vid, self.i_time = col["patient_id"], col["visit_id"], col["visit_time"]
        self.i_codes = [col[c] for c in CODE_COLUMNS]
        self.profile = [(c[len(PROFILE_PREFIX):], i) for c, i in col.items() if c.startswith(PROFILE_PREFIX)]
        self.seen_visits, self.seen_patients = _SeenIds(), _SeenIds()
        # The patient of the last valid row, its time and line (visit order continues across blocks).
        self.pid: str | None = None
        self.last_time: datetime | None = None
        self.last_line = 0
        self._reset()

    def _reset(self) -> None:
        self.pids: list[str] = []  # one per row (the table keeps one per patient)
        self.vids: list[str] = []
        self.lines: list[int] = []
        self.times: list[datetime] = []
        self.codes: list[list[str]] = [[] for _ in CODE_COLUMNS]
        self.values: list[list[str]] = [[] for _ in self.profile]
        self.patient_starts: list[int] = []

    def chunks(self, source: Lines, reader) -> Iterator[VisitTable]:
        """The rows of `source` (after the header `reader`, a csv.reader over it, has taken) as chunks."""
        try:
            yield from self._chunks(source, reader)
        except DataError as error:
            self._raise_earlier_id_error(error)
            raise

    def _chunks(self, source: Lines, reader) -> Iterator[VisitTable]:
        while source.pending or source.fill():
            first = source.number + 1
            rows = source.take_plain()
            if rows is not None:
                self._block(rows, list(range(first, first + len(rows))), source)
            else:  # csv.reader, record by record: a record may span lines (and blocks)
                rows, lines = [], []
                try:
                    while source.pending:
                        lines.append(source.number + 1)
                        rows.append(next(reader))
                except csv.Error as e:
                    self._block(rows, lines[: len(rows)], source)  # the rows above the error are checked first
                    raise csv_error(e, source, self.path, start=lines[len(rows)]) from None
                except DataError:
                    self._block(rows, lines[: len(rows)], source)
                    raise
                self._block(rows, lines, source)
            while len(self.patient_starts) > self.chunk_patients:
                yield self._take(self.patient_starts[self.chunk_patients])
        if self.pids:
            yield self._take(len(self.pids))
        elif self.pid is None:
            raise DataError(self.path, "no visits after the header", line=2, fix="write one row per visit below the header")

    def _raise_earlier_id_error(self, error: DataError) -> None:
        """Repeated visit ids and split patients are checked when a chunk is taken; when a row error
        ends the file first, check the rows accepted before it now, so the first bad line is named
        whichever kind of check finds it (a patient's rows accepted so far are contiguous runs, so a
        repeat among them is an error whatever the rest of the file holds)."""
        if not self.pids or error.line is None:
            return
        try:
            self._take(len(self.pids))
        except DataError as earlier:
            if earlier.line is not None and earlier.line < error.line:
                raise earlier from None

    def _block(self, rows: list[list[str]], lines: list[int], source: Lines | None = None) -> None:
        # `_fast` does not look for NUL: once the file has shown one, every row goes through `_slow`.
        # Read after the rows were taken: a quoted multi-line record may have pulled in the next
        # block (and its NUL) while they were read. (In-memory records set `nul` themselves.)
        self.nul = self.nul or (source is not None and source.nul)
        if rows and (self.nul or not self._fast(rows, lines)):
            self._slow(rows, lines)

    def _fast(self, rows: list[list[str]], lines: list[int]) -> bool:
        """Validate and append a block with whole-column checks; False (nothing appended) if any fails."""
        if {len(r) for r in rows} != {self.width}:
            return False  # blank lines or a wrong field count
        cols = list(zip(*rows))
        pids, vids = list(map(str.strip, cols[self.i_pid])), list(map(str.strip, cols[self.i_vid]))
        if "" in pids or "" in vids:
            return False
        for ids in (pids, vids):  # one scan of the joined ids, ~1 ms per 100k rows
            text = "\n" + "\n".join(ids)
            if any(map(text.__contains__, _FORMULA_AFTER_NEWLINE)) or text.count("\n") != len(ids) or "\r" in text:
                return False
        try:
            times = list(map(datetime.fromisoformat, map(str.strip, cols[self.i_time])))
            prev_pid = [self.pid, *pids[:-1]]
            prev_time = [self.last_time or times[0], *times[:-1]]
            if any(map(operator.and_, map(operator.eq, pids, prev_pid), map(operator.lt, times, prev_time))):
                return False
        except (ValueError, TypeError):  # a bad time, or times with and without a zone side by side
            return False
        codes = []
        for i in self.i_codes:
            text = "\n".join(cols[i])
            if text.count("\n") != len(rows) - 1 or not _column_ok(text):
                return False  # whitespace, a stray ';' or ',' somewhere: the row checks say where
            codes.append(cols[i])
        self._append(pids, vids, lines, times, codes, [list(map(str.strip, cols[i])) for _, i in self.profile])
        self.last_time, self.last_line = times[-1], lines[-1]
        return True

    def _slow(self, rows: list[list[str]], lines: list[int]) -> None:
        """Row-by-row validation: raises on the first bad row; appends the rows of a valid block."""
        path = self.path
        pids, vids, kept, times, codes = [], [], [], [], [[] for _ in CODE_COLUMNS]
        values: list[list[str]] = [[] for _ in self.profile]
        pid_before = self.pid
        try:
            for row, line in zip(rows, lines):
                if not row:
                    continue
                if len(row) != self.width:
                    raise DataError(path, f"{len(row)} fields where the header has {self.width}", line=line,
                                    fix="quote fields that contain ',' and check the row for missing or extra values")
                if "\0" in "".join(row):
                    column = self.header[next(i for i, f in enumerate(row) if "\0" in f)]
                    raise DataError(path, "NUL byte (0x00) in the field", line=line, column=column,
                                    fix="remove the NUL bytes; a file full of them is UTF-16 or binary: re-save it as "
                                        "UTF-8 text")
                pid, vid = row[self.i_pid].strip(), row[self.i_vid].strip()
                for name, value in (("patient_id", pid), ("visit_id", vid)):
                    if not value:
                        raise DataError(path, f"empty {name}", line=line, column=name, fix=f"every row needs a {name}")
                    if value[0] in FORMULA_START:
                        raise DataError(path, f"{name} {value!r} begins with {value[0]!r}: a spreadsheet opening the "
                                              "recommendations would run it as a formula", line=line, column=name,
                                        fix="give ids that begin with a letter or a digit (e.g. prefix them with 'id')")
                    if "\n" in value or "\r" in value:
                        raise DataError(path, f"{name} {value!r} holds a line break: it would split its row of the "
                                              "recommendations", line=line, column=name,
                                        fix="remove the line break (a quoted id spans two lines of the file)")
                text = row[self.i_time].strip()
                try:
                    time = datetime.fromisoformat(text)
                except ValueError:
                    raise DataError(path, f"{text!r} is not an ISO 8601 time", line=line, column="visit_time",
                                    fix="write times as YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS") from None
                if pid == self.pid and self.last_time is not None and _earlier(time, self.last_time, path, line):
                    raise DataError(path, f"visit {vid!r} at {text} is earlier than the patient's previous visit on line "
                                    f"{self.last_line} ({self.last_time.isoformat()})", line=line, column="visit_time",
                                    fix="sort each patient's visits by visit_time (oldest first)")
                for out, i, column in zip(codes, self.i_codes, CODE_COLUMNS):
                    out.append(";".join(_codes(row[i], path, line, column)))
                for out, (_, i) in zip(values, self.profile):
                    out.append(row[i].strip())
                pids.append(pid)
                vids.append(vid)
                kept.append(line)
                times.append(time)
                self.pid, self.last_time, self.last_line = pid, time, line
        except DataError:
            # The rows above the bad one are kept, so that `_raise_earlier_id_error` can name a repeated
            # id among them (an earlier line) instead of this row.
            self.pid = pid_before
            if pids:
                self._append(pids, vids, kept, times, codes, values)
            raise
        self.pid = pid_before  # `_append` moves it
        if pids:
            self._append(pids, vids, kept, times, codes, values)

    def _append(self, pids: list[str], vids: list[str], lines: list[int], times: list[datetime], codes: list,
                values: list) -> None:
        base = len(self.pids)
        prev = [self.pid, *pids[:-1]]
        self.patient_starts.extend(base + i for i, new in enumerate(map(operator.ne, pids, prev)) if new)
        self.pid = pids[-1]
        self.pids.extend(pids)
        self.vids.extend(vids)
        self.lines.extend(lines)
        self.times.extend(times)
        for out, column in zip(self.codes, codes):
            out.extend(column)
        for out, column in zip(self.values, values):
            out.extend(column)

    def _take(self, end: int) -> VisitTable:
        """The first `end` rows (whole patients) as a checked table; the rest stays pending."""
        n_patients = sum(1 for s in self.patient_starts if s < end)
        starts = np.array([*self.patient_starts[:n_patients], end], dtype=np.int64)
        table = VisitTable([self.pids[s] for s in self.patient_starts[:n_patients]], starts, self.vids[:end],
                           np.array(self.lines[:end], dtype=np.int64),
                           {c: list(col[:end]) for c, col in zip(CODE_COLUMNS, self.codes)},
                           {f: col[:end] for (f, _), col in zip(self.profile, self.values)}, self.times[:end])
        rest = (self.pids[end:], self.vids[end:], self.lines[end:], self.times[end:], [c[end:] for c in self.codes],
                [v[end:] for v in self.values], [s - end for s in self.patient_starts[n_patients:]])
        self.pids, self.vids, self.lines, self.times, self.codes, self.values, self.patient_starts = rest
        _check_ids(table, self.seen_visits, self.seen_patients, self.path)
        return table


def _column_ok(text: str) -> bool:
    """`_COLUMN_OK.fullmatch(text)`: every line empty or `code(;code)*`, codes without whitespace or ','."""
    if not text.isascii():
        return _COLUMN_OK.fullmatch(text) is not None
    return not (text.startswith(";") or text.endswith(";") or any(bad in text for bad in _ASCII_BAD))


def _codes(text: str, path: str, line: int, column: str) -> list[str] | tuple[str, ...]:
    if _CODES_OK.fullmatch(text):
        return text.split(";")
    return parse_code_list(text, path=path, line=line, column=column)


def _earlier(time: datetime, last: datetime, path: str, line: int) -> bool:
    try:
        return time < last
    except TypeError:  # one time has a zone, the other has not
        raise DataError(path, "visit_time mixes times with and without a time zone", line=line, column="visit_time",
                        fix="write every time of a patient the same way, e.g. 2130-05-01T08:30:00") from None


def _check_ids(chunk: VisitTable, seen_visits: _SeenIds, seen_patients: _SeenIds, path: str) -> None:
    """Refuse a visit id used twice, or a patient whose rows are split by other patients' rows."""
    hit = seen_visits.add(chunk.visit_ids, chunk.lines)
    if hit:
        raise DataError(path, f"visit_id already used on line {hit[1]}", line=hit[0], column="visit_id",
                        fix="visit ids must be unique across the file: one row per visit")
    hit = seen_patients.add(chunk.patient_ids, chunk.lines[chunk.starts[:-1]])
    if hit:
        raise DataError(path, f"patient_id reappears after other patients' rows (its earlier rows end before line "
                        f"{hit[0]}, first seen on line {hit[1]})", line=hit[0], column="patient_id",
                        fix="keep each patient's visits together: sort the file by patient_id, then visit_time")
