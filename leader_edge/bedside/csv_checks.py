"""CSV checks shared by every reader: header, code lists, ids, UTF-8, each refusal located.

The visits reader (`leader_edge.bedside.visit_stream`), the dataset's codes.csv and ddi.csv readers
(`leader_edge.data.dataset`) and the recommendations reader (`leader_edge.bedside.recs`) name what is wrong by
file, line and column, with the fix, through these. Standard library only: the bedside runtime
imports this module.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

from leader_edge.errors import DataError

SEP = ";"  # between the codes of one field: `4019;25000`
VISIT_COLUMNS = ("patient_id", "visit_id", "visit_time", "diagnoses", "procedures", "medications")
PROFILE_PREFIX = "profile_"  # a visits file's other columns: `profile_<field>`


def parse_code_list(text: str, *, path: str | Path, line: int, column: str) -> tuple[str, ...]:
    """Split `a;b;c` into codes. Empty text is an empty list; an empty element is an error."""
    text = text.strip()
    if not text:
        return ()
    codes = tuple(c.strip() for c in text.split(SEP))
    if any(not c for c in codes):
        raise DataError(
            path, f"code list {text!r} has an empty element (stray '{SEP}')", line=line, column=column,
            fix=f"separate codes with a single '{SEP}' and no leading or trailing '{SEP}'",
        )
    bad = next((c for c in codes if any(ch.isspace() or ch == "," for ch in c)), None)
    if bad is not None:
        raise DataError(
            path, f"code {bad!r} contains whitespace or ','", line=line, column=column,
            fix=f"codes are separated by '{SEP}' only, e.g. '4019{SEP}25000'",
        )
    return codes


def check_header(
    header: list[str] | None,
    required: Iterable[str],
    path: Path,
    *,
    optional: Iterable[str] = (),
    extra_prefix: str | None = None,
) -> None:
    """Refuse a missing, duplicated or unexpected column, naming it and the expected header.

    Columns may come in any order; `optional` ones may be absent, and with `extra_prefix` any
    column starting with it is allowed too.
    """
    required = list(required)
    optional = list(optional)
    if not header:
        raise DataError(path, "file is empty", line=1, fix=f"the first line must be the header {','.join(required)}")
    seen: set[str] = set()
    for i, col in enumerate(header, start=1):
        if col in seen:
            raise DataError(path, f"column {col!r} appears twice in the header", line=1, column=i, fix="remove the duplicate")
        seen.add(col)
        allowed = col in required or col in optional or (extra_prefix is not None and col.startswith(extra_prefix) and len(col) > len(extra_prefix))
        if not allowed:
            hint = f", optionally {','.join(optional)}" if optional else ""
            hint += f" (or {extra_prefix}<field>)" if extra_prefix else ""
            raise DataError(
                path, f"unexpected column {col!r}", line=1, column=i,
                fix=f"the header must be {','.join(required)}{hint}; check spelling and case",
            )
    missing = [c for c in required if c not in seen]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}", line=1, fix=f"the header must contain {','.join(required)}")


def iter_csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (physical line, row) of a UTF-8 CSV (a BOM is accepted), checking field counts; the
    first item is (1, {"__header__": header}). For the small files (codes, DDI pairs,
    recommendations); visits files go through the streaming `visit_stream.read_patients`."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(path, "file not found", fix="check the path; a dataset directory needs visits.csv, codes.csv, ddi.csv") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(path, "file is empty", line=1, fix="write a header line")
            yield 1, {"__header__": header}  # type: ignore[dict-item]
            start = reader.line_num + 1
            for row in reader:
                if not row:
                    start = reader.line_num + 1
                    continue
                if len(row) != len(header):
                    raise DataError(
                        path, f"{len(row)} fields where the header has {len(header)}", line=start,
                        fix="quote fields that contain ',' and check the row for missing or extra values",
                    )
                yield start, dict(zip(header, row))
                start = reader.line_num + 1
        except UnicodeDecodeError:
            line, column, byte = _first_bad_utf8(path)
            raise DataError(path, f"not valid UTF-8 (byte 0x{byte:02x})", line=line, column=column,
                            fix="re-save the file as UTF-8 (it looks like latin-1 or cp1252 if the byte is >= 0x80)") from None
        except csv.Error as e:
            raise DataError(path, f"malformed CSV: {e}", line=reader.line_num, fix="check quoting on this line") from None


def _first_bad_utf8(path: Path) -> tuple[int, int, int]:
    """(line, 1-based character column, byte) of the first byte that is not UTF-8: the text decoder
    works in blocks and only knows an offset inside one, so the file is re-read line by line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return number, len(raw[: e.start].decode("utf-8", errors="replace")) + 1, raw[e.start]
    return 1, 1, 0


def check_visit_ids(row: dict[str, str], seen: dict[str, int], *, path: Path, line: int) -> tuple[str, str]:
    """Return the row's (patient_id, visit_id), refusing empty ids and a visit id already in
    `seen` (visit id -> line; updated here), so every visit-keyed file is checked the same way."""
    for col in ("patient_id", "visit_id"):
        if not row[col].strip():
            raise DataError(path, f"empty {col}", line=line, column=col, fix=f"every row needs a {col}")
    vid = row["visit_id"].strip()
    if vid in seen:
        raise DataError(
            path, f"visit_id {vid!r} already used on line {seen[vid]}", line=line, column="visit_id",
            fix="visit ids must be unique across the file: one row per visit",
        )
    seen[vid] = line
    return row["patient_id"].strip(), vid

