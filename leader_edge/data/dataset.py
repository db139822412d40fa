"""The canonical dataset directory: read, validate, write.

A dataset directory holds (see docs/DATA.md):
    visits.csv    patient_id, visit_id, visit_time, diagnoses, procedures, medications, profile_*
    codes.csv     kind, code, name
    ddi.csv       med_a, med_b
    dataset.json  source, options, counts, filters applied, format version

Every source (synth, MIMIC-III, MIMIC-IV, a user's own extract) ends here, and every model reads
from here. visits.csv is read by the one visits reader (`visit_stream.read_patients`), the reader of
`predict` and `evaluate --truth` too, with its one contract: a patient's rows are contiguous and in
time order (ties keep file order). It streams, so a 10M-row file is checked in bounded memory, and
it never reorders: the row a prediction names is the row that was written. `write_dataset` writes
that order (patients by first appearance, each patient's visits by time), so every dataset this
package writes reads back unchanged. codes.csv and ddi.csv are small and go through the csv module
(`csv_checks.iter_csv_rows`), which gives exact physical lines for errors.

Splits and samples live in `leader_edge.data.splits`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from leader_edge.bedside.csv_checks import PROFILE_PREFIX, SEP, VISIT_COLUMNS, check_header, iter_csv_rows
from leader_edge.bedside.encoding import CODE_COLUMNS, KINDS
from leader_edge.errors import DataError
from leader_edge.files import atomic_directory
from leader_edge.bedside.visit_stream import read_patients
from leader_edge.bedside.visit_table import VisitTable

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CODES_COLUMNS = ("kind", "code", "name")
DDI_COLUMNS = ("med_a", "med_b")


@dataclass(frozen=True, slots=True)
class Visit:
    """One admission. Code tuples keep file order; `profile` maps field name (no prefix) to value."""

    patient_id: str
    visit_id: str
    time: datetime
    diagnoses: tuple[str, ...]
    procedures: tuple[str, ...]
    medications: tuple[str, ...]
    profile: tuple[tuple[str, str], ...] = ()

    def codes(self, kind: str) -> tuple[str, ...]:
        """The visit's codes of one kind: "diagnosis", "procedure" or "medication"."""
        return {"diagnosis": self.diagnoses, "procedure": self.procedures, "medication": self.medications}[kind]


@dataclass
class Dataset:
    """Visits grouped by patient (each patient's visits ordered by time), code names, DDI pairs."""

    visits: list[Visit]
    names: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    ddi: list[tuple[str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def patients(self) -> dict[str, list[Visit]]:
        """patient_id -> visits in time order, patients in order of first appearance."""
        out: dict[str, list[Visit]] = {}
        for v in self.visits:
            out.setdefault(v.patient_id, []).append(v)
        return out

    @property
    def profile_fields(self) -> list[str]:
        return [k for k, _ in self.visits[0].profile] if self.visits else []

    def vocab(self, kind: str) -> list[str]:
        """Sorted codes of one kind that occur in visits or in codes.csv."""
        seen = set(self.names.get(kind, {}))
        for v in self.visits:
            seen.update(v.codes(kind))
        return sorted(seen)

    def name(self, kind: str, code: str) -> str:
        """The code's words for the LLM; the code itself when it has no name (never dropped)."""
        return self.names.get(kind, {}).get(code) or code

    def counts(self) -> dict:
        pats = self.patients()
        n = max(len(self.visits), 1)
        return {
            "patients": len(pats),
            "visits": len(self.visits),
            "single_visit_patients": sum(len(v) == 1 for v in pats.values()),
            "diagnosis_codes": len(self.vocab("diagnosis")),
            "procedure_codes": len(self.vocab("procedure")),
            "medication_codes": len(self.vocab("medication")),
            "ddi_pairs": len(self.ddi),
            "mean_diagnoses_per_visit": round(sum(len(v.diagnoses) for v in self.visits) / n, 2),
            "mean_procedures_per_visit": round(sum(len(v.procedures) for v in self.visits) / n, 2),
            "mean_medications_per_visit": round(sum(len(v.medications) for v in self.visits) / n, 2),
        }


# ---------------------------------------------------------------------------------------------
# Reading


def read_visits(path: str | Path) -> list[Visit]:
    """Read and validate visits.csv (`visit_stream.read_patients`); visits in file order.

    Raises:
        DataError: what the visits reader refuses (see `visit_stream`): a wrong header, empty or
            repeated ids, a patient whose rows are split by other patients' rows or out of time
            order, bad times or code lists, a file that is not UTF-8 text, no visits.
    """
    path = Path(path)
    try:
        stream = open(path, "rb", buffering=1 << 20)
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(path, "file not found", fix="check the path; a dataset directory needs visits.csv, codes.csv, ddi.csv") from None
    with stream:
        return [visit for table in read_patients(stream, str(path)) for visit in _table_visits(table)]


def _table_visits(table: VisitTable) -> Iterator[Visit]:
    fields = list(table.profile)
    codes = [[tuple(text.split(SEP)) if text else () for text in table.codes[c]] for c in CODE_COLUMNS]
    for pid, vid, time, d, p, m, *values in zip(table.row_patients(), table.visit_ids, table.times, *codes,
                                                 *table.profile.values()):
        yield Visit(pid, vid, time, d, p, m, tuple(zip(fields, values)))


def read_codes(path: str | Path) -> dict[str, dict[str, str]]:
    """Read codes.csv into kind -> code -> name."""
    path = Path(path)
    rows = iter_csv_rows(path)
    _, head = next(rows)
    check_header(head["__header__"], CODES_COLUMNS, path)
    names: dict[str, dict[str, str]] = {k: {} for k in KINDS}
    for line, row in rows:
        kind, code = row["kind"].strip(), row["code"].strip()
        if kind not in KINDS:
            raise DataError(path, f"unknown kind {kind!r}", line=line, column="kind", fix=f"use one of {', '.join(KINDS)}")
        if not code:
            raise DataError(path, "empty code", line=line, column="code", fix="every row needs a code")
        if code in names[kind]:
            raise DataError(path, f"{kind} code {code!r} listed twice", line=line, column="code", fix="keep one name per code")
        names[kind][code] = row["name"].strip()
    return names


def read_ddi(path: str | Path) -> list[tuple[str, str]]:
    """Read ddi.csv into sorted, de-duplicated (med_a, med_b) pairs with med_a < med_b."""
    path = Path(path)
    rows = iter_csv_rows(path)
    _, head = next(rows)
    check_header(head["__header__"], DDI_COLUMNS, path)
    pairs: set[tuple[str, str]] = set()
    for line, row in rows:
        a, b = row["med_a"].strip(), row["med_b"].strip()
        if not a or not b:
            raise DataError(path, "empty medication code", line=line, column="med_a" if not a else "med_b", fix="both columns need a code")
        if a == b:
            raise DataError(path, f"{a!r} paired with itself", line=line, column="med_b", fix="remove the row")
        pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def load_dataset(directory: str | Path) -> Dataset:
    """Load and validate a dataset directory (visits.csv, codes.csv, ddi.csv, dataset.json)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(d, "not a directory", fix="pass a dataset directory made by `leader-edge synth` or `leader-edge prepare`")
    meta_path = d / "dataset.json"
    meta: dict = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(meta_path, f"invalid JSON: {e.msg}", line=e.lineno, column=e.colno, fix="regenerate the dataset") from None
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(meta_path, f"format_version {version!r}, this leader-edge reads {FORMAT_VERSION}", fix="regenerate the dataset with this version")
    visits = read_visits(d / "visits.csv")
    names = read_codes(d / "codes.csv") if (d / "codes.csv").exists() else {k: {} for k in KINDS}
    ddi = read_ddi(d / "ddi.csv") if (d / "ddi.csv").exists() else []
    for name, means in (("codes.csv", "the teacher's prompts name no code (bare codes) and bundles carry no names"),
                        ("ddi.csv", "no interaction is known, so every DDI rate reads 0 and no warning is given")):
        if not (d / name).exists():  # said, not assumed (a header-only file says "none" on purpose)
            log.warning("%s has no %s: %s; write one (a header-only file if there is nothing to list)", d, name, means)
    return Dataset(visits=visits, names=names, ddi=ddi, meta=meta)


# ---------------------------------------------------------------------------------------------
# Writing


def _write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(list(header))
        w.writerows(rows)


def write_visits(visits: Iterable[Visit], path: str | Path, profile_fields: list[str]) -> int:
    """Write a visits CSV in the visits reader's contract: patients in order of first appearance,
    each patient's visits by time (ties keep the given order); returns the rows written."""
    first: dict[str, int] = {}
    visits = list(visits)
    for v in visits:
        first.setdefault(v.patient_id, len(first))
    visits.sort(key=lambda v: (first[v.patient_id], v.time))  # stable
    _write_csv(
        Path(path),
        [*VISIT_COLUMNS, *(PROFILE_PREFIX + f for f in profile_fields)],
        (
            [v.patient_id, v.visit_id, v.time.isoformat(), SEP.join(v.diagnoses), SEP.join(v.procedures),
             SEP.join(v.medications), *(dict(v.profile).get(f, "") for f in profile_fields)]
            for v in visits
        ),
    )
    return len(visits)


DATASET_FILES = ("visits.csv", "codes.csv", "ddi.csv", "dataset.json")  # all `write_dataset` writes


def _is_dataset_json(path: Path) -> bool:
    """Whether `path` is the dataset.json `write_dataset` writes (another tool's file of that name is not)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and "counts" in meta


def write_dataset(ds: Dataset, directory: str | Path, *, source: str, options: dict | None = None) -> Path:
    """Write a dataset directory atomically (see `atomic_directory`); returns its path. visits.csv
    is written by `write_visits`, in the visits reader's contract order."""
    with atomic_directory(directory, marker="dataset.json", what="leader-edge dataset", owns=DATASET_FILES,
                          is_ours=_is_dataset_json) as tmp:
        write_visits(ds.visits, tmp / "visits.csv", ds.profile_fields)
        _write_csv(tmp / "codes.csv", CODES_COLUMNS, ([k, c, n] for k in KINDS for c, n in sorted(ds.names.get(k, {}).items())))
        _write_csv(tmp / "ddi.csv", DDI_COLUMNS, sorted(ds.ddi))
        # No creation timestamp: the same source and options give a byte-identical directory.
        meta = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "options": options or {},
            "counts": ds.counts(),
            "filters": ds.meta.get("filters", []),
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    ds.meta = meta
    return Path(directory)


# ---------------------------------------------------------------------------------------------
# Filters that say what they removed


@dataclass
class FilterLog:
    """Records every filter step so that nothing is dropped silently (stored in dataset.json)."""

    steps: list[dict] = field(default_factory=list)

    def record(self, step: str, reason: str, **removed: int) -> None:
        entry = {"step": step, "reason": reason, **{f"removed_{k}": int(v) for k, v in removed.items()}}
        self.steps.append(entry)
        what = ", ".join(f"{v:,} {k}" for k, v in removed.items())
        log.info("%s: removed %s (%s)", step, what or "nothing", reason)

