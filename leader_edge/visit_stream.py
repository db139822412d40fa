"""Streaming reader of a visits CSV for `predict`: rows grouped into patients, validated as they pass.

Torch-free and Dataset-free: the bedside runtime (`leader_edge.runtime`) reads through this. Rows are
grouped by patient as they arrive and handed on in chunks (`CHUNK_PATIENTS`), so memory is set by the
chunk size, except for the file-wide checks: repeated visit ids and split patients are found through
64-bit hashes (`_SeenIds`, ~60 bytes per row). A patient's visits must therefore be contiguous and
in time order; the canonical `visits.csv` written by `leader-edge synth/prepare` is.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

import numpy as np

from leader_edge.dataset import PROFILE_PREFIX, VISIT_COLUMNS, check_header, parse_code_list
from leader_edge.encoding import RawVisit
from leader_edge.errors import DataError

# 100,000 characters per field: a MIMIC visit's longest code list is ~400 characters (39 diagnoses),
# so anything this long is a broken quote swallowing the rest of the file, not a visit.
MAX_FIELD = 100_000
CHUNK_PATIENTS = 8192  # patients per chunk: ~4 MB of encoded arrays, enough to fill ORT batches
_CODES_OK = re.compile(r"[^\s,;]+(?:;[^\s,;]+)*")  # the common case, checked in C; else parse_code_list



# ---------------------------------------------------------------------------------------------
# Reading visits


@dataclass
class Patient:
    """One patient's visits in time order; `visit_ids[i]` and `lines[i]` belong to `visits[i]`."""

    patient_id: str
    visit_ids: list[str]
    lines: list[int]
    visits: list[RawVisit]


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


def _codes(text: str, path: str, line: int, column: str) -> list[str] | tuple[str, ...]:
    if _CODES_OK.fullmatch(text):
        return text.split(";")
    return parse_code_list(text, path=path, line=line, column=column)


def read_patients(stream: IO[bytes], path: str, *, chunk_patients: int = CHUNK_PATIENTS) -> Iterator[list[Patient]]:
    """Stream a canonical visits CSV as chunks of whole patients, validating every row.

    Args:
        stream: the file opened in binary mode (decoded line by line here, so a non-UTF-8 byte is
            reported on its own line; a UTF-8 BOM is accepted).
        path: the name used in error messages ("<stdin>" for standard input).
        chunk_patients: patients per yielded chunk (the last one may be smaller).

    Raises:
        DataError: empty file, bad header, wrong field count, a field over MAX_FIELD characters,
            non-UTF-8 bytes, empty ids, a repeated visit id, a patient whose rows are not
            contiguous, visits out of time order, bad times or code lists.
    """
    csv.field_size_limit(MAX_FIELD)
    reader = csv.reader(_decoded_lines(stream, path))
    try:
        yield from _read(reader, path, chunk_patients)
    except csv.Error as e:
        fix = (f"a field is longer than {MAX_FIELD:,} characters: look for an unclosed '\"' quote on or above this line"
               if "field larger" in str(e) else "check the quoting on this line")
        raise DataError(path, f"malformed CSV: {e}", line=reader.line_num, fix=fix) from None


def _decoded_lines(stream: IO[bytes], path: str) -> Iterator[str]:
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)",
                            line=number, fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
        yield text[1:] if number == 1 and text.startswith("\ufeff") else text


def _read(reader, path: str, chunk_patients: int) -> Iterator[list[Patient]]:
    header = next(reader, None)
    check_header(header, VISIT_COLUMNS, Path(path), extra_prefix=PROFILE_PREFIX)
    col = {c: i for i, c in enumerate(header)}
    i_pid, i_vid, i_time = col["patient_id"], col["visit_id"], col["visit_time"]
    i_diag, i_proc, i_med = col["diagnoses"], col["procedures"], col["medications"]
    profile = [(c[len(PROFILE_PREFIX):], i) for c, i in col.items() if c.startswith(PROFILE_PREFIX)]
    width = len(header)
    seen_visits, seen_patients = _SeenIds(), _SeenIds()
    chunk: list[Patient] = []
    current: Patient | None = None
    last_time: datetime | None = None
    start = reader.line_num + 1
    for row in reader:
        line, start = start, reader.line_num + 1
        if not row:
            continue
        if len(row) != width:
            raise DataError(path, f"{len(row)} fields where the header has {width}", line=line,
                            fix="quote fields that contain ',' and check the row for missing or extra values")
        pid, vid = row[i_pid].strip(), row[i_vid].strip()
        for name, value in (("patient_id", pid), ("visit_id", vid)):
            if not value:
                raise DataError(path, f"empty {name}", line=line, column=name, fix=f"every row needs a {name}")
        text = row[i_time].strip()
        try:
            time = datetime.fromisoformat(text)
        except ValueError:
            raise DataError(path, f"{text!r} is not an ISO 8601 time", line=line, column="visit_time",
                            fix="write times as YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS") from None
        if current is None or pid != current.patient_id:
            if current is not None:
                chunk.append(current)
                if len(chunk) >= chunk_patients:
                    _check_ids(chunk, seen_visits, seen_patients, path)
                    yield chunk
                    chunk = []
            current, last_time = Patient(pid, [], [], []), None
        elif last_time is not None and _earlier(time, last_time, path, line):
            raise DataError(path, f"visit {vid!r} at {text} is earlier than the patient's previous visit on line "
                            f"{current.lines[-1]} ({last_time.isoformat()})", line=line, column="visit_time",
                            fix="sort each patient's visits by visit_time (oldest first)")
        visit = RawVisit(_codes(row[i_diag], path, line, "diagnoses"), _codes(row[i_proc], path, line, "procedures"),
                         _codes(row[i_med], path, line, "medications"), [(f, row[i].strip()) for f, i in profile])
        last_time = time
        current.visit_ids.append(vid)
        current.lines.append(line)
        current.visits.append(visit)
    if current is not None:
        chunk.append(current)
    if chunk:
        _check_ids(chunk, seen_visits, seen_patients, path)
        yield chunk
    elif current is None:
        raise DataError(path, "no visits after the header", line=2, fix="write one row per visit below the header")


def _earlier(time: datetime, last: datetime, path: str, line: int) -> bool:
    try:
        return time < last
    except TypeError:  # one time has a zone, the other has not
        raise DataError(path, "visit_time mixes times with and without a time zone", line=line, column="visit_time",
                        fix="write every time of a patient the same way, e.g. 2130-05-01T08:30:00") from None


def _check_ids(chunk: list[Patient], seen_visits: _SeenIds, seen_patients: _SeenIds, path: str) -> None:
    """Refuse a visit id used twice, or a patient whose rows are split by other patients' rows."""
    hit = seen_visits.add([v for p in chunk for v in p.visit_ids], [ln for p in chunk for ln in p.lines])
    if hit:
        raise DataError(path, f"visit_id already used on line {hit[1]}", line=hit[0], column="visit_id",
                        fix="visit ids must be unique across the file: one row per visit")
    hit = seen_patients.add([p.patient_id for p in chunk], [p.lines[0] for p in chunk])
    if hit:
        raise DataError(path, f"patient_id reappears after other patients' rows (its earlier rows end before line "
                        f"{hit[0]}, first seen on line {hit[1]})", line=hit[0], column="patient_id",
                        fix="keep each patient's visits together: sort the file by patient_id, then visit_time")
