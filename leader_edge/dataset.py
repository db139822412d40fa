"""The canonical dataset directory: read, validate, write, split into samples.

A dataset directory holds (see docs/DATA.md):
    visits.csv    patient_id, visit_id, visit_time, diagnoses, procedures, medications, profile_*
    codes.csv     kind, code, name
    ddi.csv       med_a, med_b
    dataset.json  source, options, counts, filters applied, format version

Every source (synth, MIMIC-III, MIMIC-IV, a user's own extract) ends here, and every model reads
from here. Readers use the csv module on purpose: these files are at most ~10^5 rows, and it gives
exact physical line numbers for error messages.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from leader_edge.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SEP = ";"
KINDS = ("diagnosis", "procedure", "medication")
VISIT_COLUMNS = ("patient_id", "visit_id", "visit_time", "diagnoses", "procedures", "medications")
CODE_LISTS = {"diagnoses": "diagnosis", "procedures": "procedure", "medications": "medication"}
CODES_COLUMNS = ("kind", "code", "name")
DDI_COLUMNS = ("med_a", "med_b")
PROFILE_PREFIX = "profile_"
# LEADER's split: 8:1:1 by patient.
SPLIT_RATIOS = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")


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


@dataclass(frozen=True, slots=True)
class Sample:
    """A prediction target: `visits[-1]` is the current visit, the earlier ones its history."""

    patient_id: str
    visits: tuple[Visit, ...]

    @property
    def target(self) -> Visit:
        return self.visits[-1]

    @property
    def history(self) -> tuple[Visit, ...]:
        return self.visits[:-1]


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
# Parsing helpers shared by every reader (the predict runtime included).


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


def parse_time(text: str, *, path: str | Path, line: int, column: str) -> datetime:
    """ISO 8601 date or date-time, e.g. 2130-05-01 or 2130-05-01T08:30:00."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise DataError(
            path, f"{text!r} is not an ISO 8601 time", line=line, column=column,
            fix="write times as YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS",
        ) from None


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
    """Yield (physical line, row) of a UTF-8 CSV (a BOM is accepted), checking field counts."""
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


def read_visits(path: str | Path) -> list[Visit]:
    """Read and validate visits.csv; return visits grouped by patient and ordered by time.

    Raises:
        DataError: wrong header, empty ids, duplicate visit ids, bad times or code lists.
    """
    path = Path(path)
    rows = iter_csv_rows(path)
    _, head = next(rows)
    header = head["__header__"]
    check_header(header, VISIT_COLUMNS, path, extra_prefix=PROFILE_PREFIX)
    profile_cols = [c for c in header if c.startswith(PROFILE_PREFIX)]
    seen: dict[str, int] = {}
    order: dict[str, int] = {}
    keyed: list[tuple[int, datetime, int, Visit]] = []
    for line, row in rows:
        pid, vid = check_visit_ids(row, seen, path=path, line=line)
        visit = Visit(
            patient_id=pid,
            visit_id=vid,
            time=parse_time(row["visit_time"], path=path, line=line, column="visit_time"),
            **{col: parse_code_list(row[col], path=path, line=line, column=col) for col in CODE_LISTS},
            profile=tuple((c[len(PROFILE_PREFIX):], row[c].strip()) for c in profile_cols),
        )
        order.setdefault(pid, len(order))
        keyed.append((order[pid], visit.time, line, visit))
    keyed.sort(key=lambda k: k[:3])  # patient in first-seen order, then time; ties keep file order
    return [k[3] for k in keyed]


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
    return Dataset(visits=visits, names=names, ddi=ddi, meta=meta)


# ---------------------------------------------------------------------------------------------
# Writing


def _write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(list(header))
        w.writerows(rows)


@contextmanager
def atomic_directory(directory: str | Path, *, marker: str, what: str) -> Iterator[Path]:
    """Yield a temp directory beside `directory`; on success it replaces `directory`, on any
    error it is removed, so no half-written output is ever left.

    An existing `directory` is replaced only when it is empty or holds `marker` (a file that a
    previous run of the same writer left there): anything else is refused, not overwritten.
    """
    out = Path(directory)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise DataError(out, f"exists and is not a {what} directory", fix="choose a new --out path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_dataset(ds: Dataset, directory: str | Path, *, source: str, options: dict | None = None) -> Path:
    """Write a dataset directory atomically (see `atomic_directory`); returns its path."""
    with atomic_directory(directory, marker="dataset.json", what="leader-edge dataset") as tmp:
        fields = ds.profile_fields
        _write_csv(
            tmp / "visits.csv",
            [*VISIT_COLUMNS, *(PROFILE_PREFIX + f for f in fields)],
            (
                [v.patient_id, v.visit_id, v.time.isoformat(), SEP.join(v.diagnoses), SEP.join(v.procedures),
                 SEP.join(v.medications), *(val for _, val in v.profile)]
                for v in ds.visits
            ),
        )
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


# ---------------------------------------------------------------------------------------------
# Splits and samples


@dataclass(frozen=True)
class Protocol:
    """How a dataset is split and scored; one of `PROTOCOLS`, named in every report.

    Attributes:
        name: "leader" or "safedrug".
        ratios: train/val/test shares of the patients.
        shuffle: deal patients in a seeded random order; False keeps file order.
        eval_per_visit: score every visit of a val/test patient (with the visits before it)
            instead of the last one.
        per_patient: average a patient's visits first, then over patients.
        frac: each subsample draws `frac` of the patients with replacement, `rounds` times.
    """

    name: str
    ratios: tuple[float, float, float]
    shuffle: bool
    eval_per_visit: bool
    per_patient: bool
    frac: float = 0.8
    rounds: int = 10

    def describe(self) -> str:
        order = "seeded shuffle" if self.shuffle else "file order"
        scored = "every visit of a test patient, averaged per patient" if self.per_patient else "each test patient's last visit"
        shares = ":".join(f"{r:.3g}" for r in self.ratios)
        return (f"protocol {self.name}: patients split {shares} ({order}); scored: {scored}; mean ± std over "
                f"{self.rounds} draws of {self.frac:.0%} of the patients with replacement")


PROTOCOLS = {
    # LEADER: 8:1:1 by patient, one sample per patient (the last visit).
    "leader": Protocol("leader", SPLIT_RATIOS, shuffle=True, eval_per_visit=False, per_patient=False),
    # GAMENet/SafeDrug main(): the first int(n * 2/3) patients in file order train, the next half of
    # the rest is TEST and the remainder validation; every visit scored, metrics averaged per patient.
    "safedrug": Protocol("safedrug", (2 / 3, 1 / 6, 1 / 6), shuffle=False, eval_per_visit=True, per_patient=True),
}


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def split_patients(
    patient_ids: list[str], *, seed: int = 42, ratios: tuple[float, float, float] = SPLIT_RATIOS, protocol: str | Protocol | None = None,
) -> dict[str, list[str]]:
    """Split patients 8:1:1 (by default) into train/val/test, shuffled deterministically by `seed`.

    With `protocol="safedrug"`: no shuffle, train = the first int(n * 2 / 3) patients, test the
    next int((n - train) / 2), validation the rest - the GAMENet/SafeDrug code's exact arithmetic.
    No patient appears in two splits. The order within each split follows the (shuffled) order.
    """
    ids = list(dict.fromkeys(patient_ids))
    if protocol is not None and get_protocol(protocol).name == "safedrug":
        n_train = int(len(ids) * 2 / 3)
        n_test = int((len(ids) - n_train) / 2)
        return {"train": ids[:n_train], "val": ids[n_train + n_test:], "test": ids[n_train:n_train + n_test]}
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")
    random.Random(seed).shuffle(ids)
    n_train = int(round(len(ids) * ratios[0]))
    n_val = int(round(len(ids) * ratios[1]))
    return {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}


def make_samples(ds: Dataset, patient_ids: Iterable[str], *, per_visit: bool = False) -> list[Sample]:
    """Samples for these patients: the last visit with its history (LEADER), or every visit
    with the visits before it (`per_visit`, the GAMENet/SafeDrug protocol)."""
    by_patient = ds.patients()
    out: list[Sample] = []
    for pid in patient_ids:
        visits = by_patient[pid]
        ends = range(1, len(visits) + 1) if per_visit else [len(visits)]
        out.extend(Sample(pid, tuple(visits[:end])) for end in ends)
    return out


def dataset_splits(
    ds: Dataset, *, seed: int = 42, train_per_visit: bool = False, eval_per_visit: bool | None = None,
    protocol: str | Protocol = "leader",
) -> dict[str, list[Sample]]:
    """train/val/test samples, split by patient.

    Args:
        seed: the split seed (ignored by protocols that split in file order).
        train_per_visit: one training sample per visit (more samples from the same patients;
            helps on small data) instead of one per patient.
        eval_per_visit: score every visit of val/test patients (GAMENet/SafeDrug protocol)
            instead of each patient's last visit (LEADER protocol); None: the protocol's choice.
        protocol: "leader" (8:1:1 seeded, last visit) or "safedrug" (see `PROTOCOLS`).
    """
    proto = get_protocol(protocol)
    per_visit_eval = proto.eval_per_visit if eval_per_visit is None else eval_per_visit
    ids = split_patients(list(ds.patients()), seed=seed, ratios=proto.ratios, protocol=proto)
    return {
        name: make_samples(ds, ids[name], per_visit=train_per_visit if name == "train" else per_visit_eval)
        for name in SPLITS
    }


def check_splits(splits: dict[str, list[Sample]], *, source: str | Path, protocol: str | Protocol = "leader") -> None:
    """Refuse splits too small to train, select or score a model, before any stage runs.

    Raises:
        ValueError: an empty split (validation selects epochs and thresholds; test is the score), or
            fewer than 2 training patients. Names the counts and the fix.
    """
    patients = {k: len({s.patient_id for s in v}) for k, v in splits.items()}
    proto = get_protocol(protocol)
    if patients["train"] < 2 or patients["val"] < 1 or patients["test"] < 1:
        total = sum(patients.values())
        raise ValueError(
            f"{source}: {total} patient(s) split {patients['train']}/{patients['val']}/{patients['test']} "
            f"(train/val/test, {proto.name} protocol); training needs at least 2 training patients and one each for "
            "validation and test - use a dataset with at least 10 patients"
        )
