"""Find and read raw MIMIC-III / MIMIC-IV tables: plain or .csv.gz, upper- or lower-case names.

Every column is read as text (codes keep their leading zeros: NDC 00006494300, ICD-9 0389) with
pyarrow's multi-threaded CSV reader, which reads MIMIC-III's 4M-row PRESCRIPTIONS in seconds; only
the columns a step needs are materialised. Row numbers are reported as physical lines (header = 1,
first row = 2); this is exact unless an earlier row holds a quoted line break, which the MIMIC
tables we read (no free-text notes) do not.

A table is one file: with both `X.csv` and `X.csv.gz` (or `X.csv` and `x.csv`, or one in --root and
one in hosp/) nothing is picked; every candidate is named and the user keeps one. PhysioNet ships a
`SHA256SUMS.txt` beside each release (`hosp/x.csv.gz` entries at the version root for MIMIC-IV,
`X.csv.gz` in the folder for MIMIC-III): when one lies in the table's folder or the folder above,
a file it lists is checked against it before it is read (`verify_checksum`), and a mismatch is
refused naming the file. A truncated or corrupt `.csv.gz` and a non-UTF-8 byte are named by file
(and line and column).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import re
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from leader_edge.errors import DataError
from leader_edge.bedside.csv_stream import UTF16_BOMS

log = logging.getLogger(__name__)

# MIMIC-IV keeps its hospital tables in hosp/; MIMIC-III puts everything in one folder.
SUBDIRS = ("", "hosp")
CHECKSUMS = "SHA256SUMS.txt"  # PhysioNet's name; lines `<sha256 hex> <path relative to its folder>`
_CHECKSUM_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(.+)$")  # one or two spaces, `*` for binary mode
# M/D/YY HH:MM, as a spreadsheet re-saves MIMIC-III's ADMISSIONS (the MIMIC-III demo ships so).
_SPREADSHEET_TIME = re.compile(r"^\s*(\d{1,2})/(\d{1,2})/(\d{2}|\d{4})(?:\s+(\d{1,2}):(\d{2})(?::(\d{2}))?)?\s*$")


def find_table(root: Path, stem: str, *, source: str) -> Path:
    """The file for table `stem` (e.g. "ADMISSIONS") under `root` or `root/hosp`, any case, .csv or .csv.gz.

    Raises:
        DataError: no such file, or more than one (each named: nothing is picked silently).
    """
    path = find_optional(root, stem, source=source)
    if path is None:
        where = f"{root} or {root / 'hosp'}" if source == "mimic4" else str(root)
        raise DataError(
            root / f"{stem}.csv", f"table {stem} not found in {where}",
            fix=f"pass the {source.upper()} folder as --root; it must hold {stem}.csv or {stem}.csv.gz (upper- or lower-case)",
        )
    return path


def find_optional(root: Path, stem: str, *, source: str) -> Path | None:
    """`find_table`, or None when the table is absent (more than one file is still refused)."""
    wanted = {f"{stem.lower()}.csv", f"{stem.lower()}.csv.gz"}
    found = []
    for sub in SUBDIRS:
        d = root / sub if sub else root
        if d.is_dir():
            found += [p for p in sorted(d.iterdir()) if p.name.lower() in wanted and p.is_file()]
    if len(found) > 1:
        names = " and ".join(str(p) for p in found)
        raise DataError(found[0], f"table {stem} is in {len(found)} files: {names}; leader-edge does not guess which "
                                  "one is current", fix="keep one of them in --root (move or delete the others)")
    return found[0] if found else None


def verify_checksum(path: Path) -> Path | None:
    """Check `path` against a `SHA256SUMS.txt` in its folder or the folder above, where one lists it.

    Returns:
        The SHA256SUMS.txt that listed the file (its sha256 matched), or None when none lists it.

    Raises:
        DataError: the file's sha256 differs from the listed one (names the file and the list).
    """
    for folder in (path.parent, path.parent.parent):
        sums = folder / CHECKSUMS
        if not sums.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        want = _read_checksums(sums).get(name)
        if want is None:
            log.warning("%s is not listed in %s: not checked", path, sums)
            return None
        got = _sha256(path)
        if got != want:
            raise DataError(path, f"has sha256 {got[:16]}..., but {sums} lists {want[:16]}... for {name}: the file is "
                                  "damaged, truncated or altered", fix="download it again from PhysioNet")
        return sums
    return None


def _read_checksums(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _CHECKSUM_LINE.match(line.strip())
        if m:
            out[m.group(2).removeprefix("./")] = m.group(1).lower()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _damaged(path: Path, e: Exception) -> DataError:
    """A table that cannot be decompressed or read (pyarrow and gzip raise OSError, EOFError, zlib.error)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if _gz(path):
        return DataError(path, f"is truncated or corrupt: it does not decompress ({first})",
                         fix=f"download it again (or test a copy with `gzip -t {path.name}`)")
    return DataError(path, f"cannot be read ({first})", fix="check the file and its permissions")


def read_header(path: Path) -> list[str]:
    """The header fields of a plain or gzip CSV."""
    opener = gzip.open if _gz(path) else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(io.StringIO(f.readline())), None)
    except UnicodeDecodeError as e:
        raise _header_not_utf8(path, e) from None
    except (OSError, EOFError, zlib.error) as e:
        raise _damaged(path, e) from None
    if not header:
        raise DataError(path, "file is empty", line=1, fix="re-extract the table from the MIMIC release")
    lower = [h.strip().lower() for h in header]
    twice = sorted({h for h in lower if lower.count(h) > 1})
    if twice:  # the first of two NDC columns (one really GSN) was read, the rows counted as unmapped
        raise DataError(path, f"column(s) {', '.join(twice)} appear more than once in the header", line=1,
                        fix="rename or remove the duplicate column (names match case-insensitively)")
    return header


def _header_not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
    """A header that is not UTF-8, named for what it is: UTF-16 text, or gzip data under a plain name."""
    with open(path, "rb") as f:
        first = f.read(512)
    if first.startswith(b"\x1f\x8b"):
        return DataError(path, "the file holds gzip data under a plain .csv name", line=1,
                         fix=f"rename it to {path.name}.gz (prepare reads gzip tables), or gunzip it")
    kind = UTF16_BOMS.get(first[:2]) or ("UTF-16 without a byte-order mark" if first.count(b"\0") * 3 >= len(first) > 3 else None)
    if kind is not None:
        return DataError(path, f"the file is {kind}, not UTF-8", line=1,
                         fix=f"convert it: `iconv -f UTF-16 -t UTF-8 {path.name} > {path.stem}-utf8.csv`")
    return DataError(path, f"not valid UTF-8 ({e.reason} at byte {e.start + 1} of the header)", line=1,
                     fix="use the table as released by PhysioNet (UTF-8 CSV, plain or gzip)")


def read_table(path: Path, required: list[str], optional: tuple[str, ...] = (),
               fix: str = "use the table as released by PhysioNet (column names in upper or lower case)") -> pa.Table:
    """Read the `required` and present `optional` columns of one table as text (`fix`: the advice
    when a required column is missing; map files are not PhysioNet's).

    Column names match case-insensitively; the returned table's columns are the lower-case names.

    Raises:
        DataError: a required column is missing (names the file and the columns it has) or the
            CSV is malformed (names the line).
    """
    header = read_header(path)
    by_lower = {h.strip().lower(): h for h in header}
    missing = [c for c in required if c not in by_lower]
    if missing:
        raise DataError(
            path, f"missing column(s) {', '.join(missing)}; the header has {', '.join(header)}", line=1, fix=fix,
        )
    wanted = [c for c in (*required, *optional) if c in by_lower]
    actual = [by_lower[c] for c in wanted]
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            convert_options=pacsv.ConvertOptions(
                include_columns=actual, column_types={a: pa.string() for a in actual}, strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        column = re.search(r"CSV column #(\d+)", str(e))
        if "invalid UTF8" in str(e) and column:
            raise _not_utf8(path, header, int(column.group(1))) from None
        line = re.search(r"[Rr]ow #?(\d+)", str(e))
        found = None if line else _first_malformed_row(path, len(header))
        if found is not None:  # pyarrow names no line: a second pass (error path only) finds it
            number, what = found
            raise DataError(path, f"malformed CSV: {what}", line=number,
                            fix="check quoting (an unclosed '\"'?) and the number of fields on this line") from None
        what = str(e).splitlines()[0]
        if "straddl" in what:  # pyarrow's words for a field longer than its block
            what = "a field longer than 16 MiB (an unclosed quote?)"
        raise DataError(
            path, f"malformed CSV: {what}", line=int(line.group(1)) if line else None,
            fix="check quoting and the number of fields on this line",
        ) from None
    except (OSError, EOFError, zlib.error) as e:
        raise _damaged(path, e) from None
    return table.rename_columns(wanted)


def _not_utf8(path: Path, header: list[str], column: int) -> DataError:
    """The first line whose field `column` (0-based) is not UTF-8, found by a second pass (error path only)."""
    name = header[column].strip() if column < len(header) else column + 1
    opener = gzip.open if _gz(path) else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
                continue
            except UnicodeDecodeError:
                pass
            fields = next(csv.reader([raw.decode("utf-8", errors="surrogateescape")]), [])
            if column < len(fields) and not fields[column].isascii():
                bad = fields[column].encode("utf-8", errors="surrogateescape")
                try:
                    bad.decode("utf-8")
                except UnicodeDecodeError as e:
                    return DataError(path, f"{bad!r} is not valid UTF-8 (byte 0x{bad[e.start]:02x})", line=number,
                                     column=name, fix="re-save the table as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), "
                                                      "or use it as released by PhysioNet")
    return DataError(path, "not valid UTF-8", column=name, fix="re-save the table as UTF-8, or use it as released by PhysioNet")


def _first_malformed_row(path: Path, n_fields: int) -> tuple[int, str] | None:
    """(line, what) of the first row whose field count differs from the header's, or where a
    quote is not closed; None when Python's csv finds none (pyarrow's complaint is then shown)."""
    opener = gzip.open if _gz(path) else open
    csv.field_size_limit(1 << 30)
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        while True:
            start = reader.line_num + 1  # the row's first line: where an unclosed quote opened
            try:
                row = next(reader)
            except StopIteration:
                return None
            except csv.Error as e:
                return start, f"{e}: a quote opened on this line is not closed"
            if row and len(row) != n_fields:
                what = f"{len(row)} fields where the header has {n_fields}"
                if reader.line_num > start:  # the row ran over several lines: a quote held the line ends
                    what += f" (the row runs to line {reader.line_num}: an unclosed '\"'?)"
                return start, what


def column_text(table: pa.Table, name: str) -> pa.Array:
    """One text column, stripped, as a single contiguous array."""
    return pc.utf8_trim_whitespace(table.column(name).combine_chunks())


def column_ids(table: pa.Table, name: str, path: Path) -> np.ndarray:
    """An integer id column (SUBJECT_ID, HADM_ID) as int64; empty values become -1.

    Raises:
        DataError: naming the first line whose value is not an integer.
    """
    text = column_text(table, name)
    empty = pc.equal(text, "")
    filled = pc.if_else(empty, "-1", text)
    try:
        return pc.cast(filled, pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok = pc.match_substring_regex(filled, r"^-?\d+$").to_numpy(zero_copy_only=False)
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(
            path, f"{name.upper()} {text[row].as_py()!r} is not an integer", line=row + 2, column=name.upper(),
            fix=f"{name.upper()} must be a whole number as in the PhysioNet release",
        ) from None


def encode(values: pa.Array) -> tuple[np.ndarray, list[str]]:
    """Dictionary-encode text: (int32 index per row, distinct values in first-seen order)."""
    enc = pc.dictionary_encode(values)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int32), enc.dictionary.to_pylist()


def parse_times(values: pa.Array, path: Path, column: str, *, century: int = 2100) -> tuple[np.ndarray, np.ndarray]:
    """Parse admission times: ISO 8601 ("2164-10-23 21:09:00") or spreadsheet-style M/D/YY HH:MM.

    Two-digit years are read as `century + YY` here; they are ambiguous (MIMIC shifts dates into
    ~2100-2210, so "02" may be 2102 or 2202: the MIMIC-III demo holds both), and the caller
    re-anchors them on a four-digit date of the same visit where it has one (`nearest_century`).

    Returns:
        (datetime64[s] [N], bool [N] True where the year had two digits).

    Raises:
        DataError: naming the line and column of the first empty or unparseable time.
    """
    text = values.to_pandas() if isinstance(values, pa.Array) else pd.Series(values)
    parsed = pd.to_datetime(text, format="ISO8601", errors="coerce")
    out = np.array(parsed.to_numpy(dtype="datetime64[s]"), copy=True)
    two_digit = np.zeros(len(out), dtype=bool)
    for row in np.flatnonzero(np.isnat(out)):
        raw = text.iloc[row]
        m = _SPREADSHEET_TIME.match(raw)
        when = None
        if m:
            month, day, year, hour, minute, second = (int(g) if g else 0 for g in m.groups())
            two_digit[row] = len(m.group(3)) == 2
            year = century + year if two_digit[row] else year
            try:
                when = datetime(year, month, day, hour, minute, second)
            except ValueError:
                when = None
        if when is None:
            raise DataError(
                path, f"{raw!r} is not a date-time", line=int(row) + 2, column=column.upper(),
                fix="use ISO 8601 (2164-10-23 21:09:00) or M/D/YY HH:MM as in the MIMIC-III demo",
            )
        out[row] = np.datetime64(when, "s")
    return out, two_digit


def nearest_century(times: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, int]:
    """Move each time by -100, 0 or +100 years to land nearest its anchor (NaT anchor: unchanged).

    Returns:
        (datetime64[s] [N], number of times moved).
    """
    out = times.copy()
    moved = 0
    for i in np.flatnonzero(~np.isnat(anchors)):
        t = times[i].astype("datetime64[s]").item()
        anchor = anchors[i].astype("datetime64[s]").item()
        options = []
        for shift in (-100, 0, 100):
            try:
                options.append((abs(t.replace(year=t.year + shift) - anchor), shift))
            except ValueError:  # 29 February in a year without it
                continue
        best = min(options)[1]
        if best:
            out[i] = np.datetime64(t.replace(year=t.year + best), "s")
            moved += 1
    return out, moved
