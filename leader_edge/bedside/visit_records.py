"""In-memory visit records (a service request, `Bundle.recommend`) through the visits reader's own checks.

`read_records` turns P lists of visit records into the rows a visits CSV would hold (header on
line 1, patients[i][j] on line 2 + the records before it) and validates them with the same
`visit_stream._Reader` a file goes through, so a request is refused exactly where the same visits
in a file would be. Split from visit_stream.py (the file reader) at the seam between the two inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

from leader_edge.bedside.csv_checks import PROFILE_PREFIX, VISIT_COLUMNS
from leader_edge.bedside.csv_stream import MAX_FIELD
from leader_edge.bedside.encoding import CODE_COLUMNS
from leader_edge.bedside.visit_stream import _Reader
from leader_edge.bedside.visit_table import VisitTable
from leader_edge.errors import DataError


def read_records(patients: Sequence[Sequence[Any]], source: str = "request") -> VisitTable:
    """In-memory patients through the checks of `read_patients`: one `VisitTable` of them all.

    Args:
        patients: P lists of visit records, each a mapping or an object (`RawVisit`, `dataset.Visit`)
            with `patient_id`, `visit_id`, `visit_time` (ISO text, or a datetime/date; `time` on a
            `dataset.Visit`), `diagnoses`, `procedures`, `medications` (lists of codes, or the
            file's `a;b;c` text) and optionally `profile` (a mapping or (field, value) pairs). A
            patient's records share its id and are in time order, as rows of a visits file.
        source: the name errors give instead of a file name.

    Raises:
        DataError: what `read_patients` refuses in a file, at the line the record would have in the
            equivalent visits CSV (header on line 1: patients[i][j] is line 2 + the number of records
            before it), and records that are not visit records: a missing field, a value that is not
            text, a code holding ';', a list that mixes patient ids or repeats the previous patient's.
    """
    rows: list[list[str]] = []
    profiles: list[dict[str, str]] = []
    fields: dict[str, None] = {}
    previous = None
    for number, visits in enumerate(patients, start=1):
        first = len(rows) + 2
        if not visits:
            raise DataError(source, f"patient {number} of the list has no visits", line=first,
                            fix="give every patient at least its current visit")
        for record in visits:
            line = len(rows) + 2
            row, profile = _record_row(record, source, line)
            if rows and line > first and row[0] != rows[first - 2][0]:
                raise DataError(source, f"patient_id {row[0]!r} differs from {rows[first - 2][0]!r}, the id of the "
                                        f"patient's first visit on line {first}", line=line, column="patient_id",
                                fix="give one patient's visits in one list")
            if line == first and row[0] == previous:
                raise DataError(source, f"patient_id {row[0]!r} is also the previous patient's", line=line,
                                column="patient_id", fix="give each patient's visits in one list")
            rows.append(row)
            profiles.append(profile)
            fields.update(dict.fromkeys(profile))
        previous = rows[-1][0]
    if not rows:
        raise DataError(source, "no patients", fix="pass at least one patient with its current visit")
    for row, profile in zip(rows, profiles):
        row.extend(profile.get(f, "") for f in fields)
    reader = _Reader([*VISIT_COLUMNS, *(PROFILE_PREFIX + f for f in fields)], source, len(rows))
    reader.nul = any("\0" in field for row in rows for field in row)
    long = next((i for i, row in enumerate(rows) if max(map(len, row)) > MAX_FIELD), None)
    if long is not None:
        raise DataError(source, f"a field is longer than the limit of {MAX_FIELD:,} characters", line=long + 2,
                        fix="shorten this visit's code lists (the model reads the first few dozen codes of a visit)")
    reader._block(rows, list(range(2, len(rows) + 2)))
    return reader._take(len(rows))


def _record_row(record: Any, source: str, line: int) -> tuple[list[str], dict[str, str]]:
    """A visit record as the text fields of a visits-file row (`VISIT_COLUMNS` order) and its profile."""
    def get(name: str, default: Any = None) -> Any:
        if isinstance(record, Mapping):
            return record.get(name, default)
        return getattr(record, name, default)

    def text(name: str, value: Any) -> str:
        if isinstance(value, (datetime, date)) and name == "visit_time":
            return value.isoformat()
        if isinstance(value, int) and not isinstance(value, bool) and name != "visit_time":
            return str(value)
        if not isinstance(value, str):
            raise DataError(source, f"{name} is {type(value).__name__} {value!r}, not text", line=line, column=name,
                            fix=f"give every visit record a {name}" if value is None else f"write the {name} as text")
        return value

    time = get("visit_time")
    row = [text("patient_id", get("patient_id")), text("visit_id", get("visit_id")),
           text("visit_time", get("time") if time is None else time)]
    for column in CODE_COLUMNS:
        codes = get(column, ())
        if isinstance(codes, str):
            row.append(codes)
            continue
        if codes is None or isinstance(codes, (bytes, Mapping)) or not isinstance(codes, Iterable):
            raise DataError(source, f"{column} is {type(codes).__name__} {codes!r}, not a list of codes", line=line,
                            column=column, fix="give a list of code strings (empty for none) or an 'a;b' text")
        codes = list(codes)  # a generator is read once, here: the checks below and the join see the same codes
        if not all(isinstance(c, str) for c in codes):
            raise DataError(source, f"{column} holds a code that is not text", line=line, column=column,
                            fix="give codes as strings")
        bad = next((c for c in codes if ";" in c), None)
        if bad is not None:
            raise DataError(source, f"code {bad!r} contains ';'", line=line, column=column,
                            fix="give one code per list element")
        row.append(";".join(codes))
    profile = get("profile") or {}
    items = profile.items() if isinstance(profile, Mapping) else profile
    return row, {str(k): text(PROFILE_PREFIX + str(k), v) for k, v in items}
