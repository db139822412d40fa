"""MIMIC-III / MIMIC-IV tables -> canonical dataset, by the GAMENet/SafeDrug pipeline (docs/MIMIC.md).
(~440 lines: the pipeline's steps in their order, one function each; table reading is sources/tables.py.)

Order of steps (each recorded in `ds.meta["filters"]` with what it removed and why):
  0. Find every table (one file each) and check it against a SHA256SUMS.txt beside them, before
     any is read (`tables.sha256`, nothing removed; see `leader_edge.data.sources.tables`).
  1. ADMISSIONS: admission time and profile fields per visit; optional random patient sample.
  2. PRESCRIPTIONS: drop NDC "0"/empty, NDC -> RXCUI (-> ATC4 -> ATC-3 = first 4 characters),
     one row per (visit, medication), keep the `top_medications` most frequent.
  3. DIAGNOSES_ICD: keep the `top_diagnoses` most frequent codes. PROCEDURES_ICD: all codes.
  4. Keep visits present in ADMISSIONS and all three tables; order each patient's visits by admission time.
  5. DDI pairs from a TWOSIDES (CID) or plain pairs file, mapped onto the kept medications.
Frequencies count visits (a code once per visit). Tables are handled as integer arrays (row ->
visit index, row -> code index), so 4M prescription rows take seconds and well under 1 GB.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from leader_edge.data.dataset import Dataset, FilterLog, Visit
from leader_edge.bedside.encoding import KINDS
from leader_edge.errors import ConfigError, DataError
from leader_edge.data.icd import icd_name
from leader_edge.progress import progress
from leader_edge.data.sources import maps
from leader_edge.data.sources.tables import (
    column_ids, column_text, encode, find_optional, find_table, nearest_century, parse_times, read_header, read_table,
    verify_checksum,
)

log = logging.getLogger(__name__)

SOURCES = ("mimic3", "mimic4")
MED_LEVELS = ("atc3", "rxcui")
# ADMISSIONS columns used as profile fields, when present (MIMIC-IV has race, no religion).
PROFILE_COLUMNS = ("insurance", "language", "religion", "marital_status", "ethnicity", "race")
TABLES = ("ADMISSIONS", "PRESCRIPTIONS", "DIAGNOSES_ICD", "PROCEDURES_ICD")  # required
NAME_TABLES = ("D_ICD_DIAGNOSES", "D_ICD_PROCEDURES")  # optional: code names, else the ICD package
# A medication class is named by its most frequent DRUG strings: WHO ATC names may not be
# redistributed, and two names ("Metoprolol Tartrate / Metoprolol Succinate") tell the LLM the class.
MED_NAME_DRUGS = 2


@dataclass
class PrepareConfig:
    """Options of `leader-edge prepare` (stored in dataset.json)."""

    source: str
    root: Path
    ndc_rxcui: Path | None = None
    rxcui_atc: Path | None = None
    med_level: str = "atc3"
    ddi: Path | None = None
    cid_atc: Path | None = None
    ddi_side_effects: str = "least"  # the public LEADER/SafeDrug code keeps the 40 least frequent types
    ddi_top_k: int = maps.DDI_TOP_K
    top_diagnoses: int = 2000  # GAMENet/SafeDrug/LEADER; 0 keeps all
    top_medications: int = 300  # idem
    min_visits: int = 1  # GAMENet/SafeDrug use 2; LEADER keeps single-visit patients (cold start)
    sample_frac: float = 1.0  # LEADER used 0.15 of MIMIC-IV patients
    sample_seed: int = 42
    century: int = 2100  # M/D/YY dates read as century + YY (MIMIC dates lie in ~2100-2210)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.source not in SOURCES:
            raise ConfigError(f"source={self.source!r}; use one of {', '.join(SOURCES)}")
        if self.med_level not in MED_LEVELS:
            raise ConfigError(f"med_level={self.med_level!r}; use one of {', '.join(MED_LEVELS)}")
        if self.ndc_rxcui is None:
            raise ConfigError("an NDC -> RXCUI map is required: add --ndc-rxcui FILE (GAMENet/SafeDrug ndc2rxnorm_mapping.txt)")
        if self.med_level == "atc3" and self.rxcui_atc is None:
            raise ConfigError("--med-level atc3 needs an RXCUI -> ATC4 map: add --rxcui-atc FILE (RXCUI2atc4.csv), "
                             "or pass --med-level rxcui to keep RXCUI codes")
        if self.ddi_side_effects not in maps.DDI_SIDE_EFFECTS:
            raise ConfigError(f"ddi_side_effects={self.ddi_side_effects!r}; use one of {', '.join(maps.DDI_SIDE_EFFECTS)}")
        for name in ("top_diagnoses", "top_medications", "ddi_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 keeps all)")
        if self.min_visits < 1:
            raise ConfigError(f"min_visits={self.min_visits} must be >= 1")
        if not 0 < self.sample_frac <= 1:
            raise ConfigError(f"sample_frac={self.sample_frac} must be in (0, 1]; LEADER used 0.15 on MIMIC-IV")
        if not self.root.is_dir():
            raise DataError(self.root, "not a directory", fix=f"pass the folder holding the {self.source.upper()} tables as --root")

    def options(self) -> dict:
        """JSON-ready options for dataset.json."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class _Admissions:
    path: Path
    hadm: np.ndarray  # int64 [V]
    subject: np.ndarray  # int64 [V]
    time: np.ndarray  # datetime64[s] [V]
    two_digit: np.ndarray  # bool [V], admission time written with a two-digit year
    profile: dict[str, list[str]]
    index: pd.Index  # hadm id -> row

    def rows_of(self, hadm: np.ndarray) -> np.ndarray:
        """Admission row of each HADM_ID, -1 where ADMISSIONS has none."""
        return self.index.get_indexer(hadm)


def _read_admissions(cfg: PrepareConfig, path: Path, flog: FilterLog) -> _Admissions:
    table = read_table(path, ["subject_id", "hadm_id", "admittime"], PROFILE_COLUMNS)
    hadm = column_ids(table, "hadm_id", path)
    subject = column_ids(table, "subject_id", path)
    for name, ids in (("HADM_ID", hadm), ("SUBJECT_ID", subject)):
        if (ids < 0).any():
            raise DataError(path, f"empty {name}", line=int(np.flatnonzero(ids < 0)[0]) + 2, column=name,
                            fix="every admission needs SUBJECT_ID and HADM_ID")
    index = pd.Index(hadm)
    if not index.is_unique:
        row = int(np.flatnonzero(index.duplicated())[0])
        raise DataError(path, f"HADM_ID {hadm[row]} appears twice", line=row + 2, column="HADM_ID",
                        fix="each admission must be listed once")
    time, two_digit = parse_times(column_text(table, "admittime"), path, "admittime", century=cfg.century)
    profile = {c: column_text(table, c).to_pylist() for c in PROFILE_COLUMNS if c in table.column_names}
    adm = _Admissions(path, hadm, subject, time, two_digit, profile, index)
    if cfg.sample_frac < 1:
        patients = np.unique(subject)
        n_keep = max(1, int(round(len(patients) * cfg.sample_frac)))
        chosen = np.random.default_rng(cfg.sample_seed).choice(patients, size=n_keep, replace=False)
        keep = np.isin(subject, chosen)
        flog.record("sample_patients", f"random {cfg.sample_frac:g} of patients (seed {cfg.sample_seed})",
                    patients=len(patients) - n_keep, visits=int((~keep).sum()))
        adm = _Admissions(path, hadm[keep], subject[keep], time[keep], two_digit[keep],
                          {c: [v for v, k in zip(vals, keep) if k] for c, vals in adm.profile.items()}, pd.Index(hadm[keep]))
    return adm


def _visit_rows(table: pa.Table, path: Path, adm: _Admissions, flog: FilterLog, step: str) -> np.ndarray:
    """Admission row per table row; rows without a (sampled) admission are recorded and marked -1."""
    hadm = column_ids(table, "hadm_id", path)
    rows = adm.rows_of(hadm)
    missing = rows < 0
    if missing.any():
        flog.record(f"{step}.no_admission", f"HADM_ID empty or not among the {len(adm.hadm):,} admissions kept",
                    rows=int(missing.sum()))
    return rows


def _dedup(visit: np.ndarray, code: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first row of each (visit, code) pair, in file order."""
    _, first = np.unique(visit.astype(np.int64) * n_codes + code, return_index=True)
    first.sort()
    return visit[first], code[first]


def _top(visit: np.ndarray, code: np.ndarray, values: list[str], n: int, flog: FilterLog, step: str, what: str
         ) -> tuple[np.ndarray, np.ndarray]:
    """Keep the `n` codes found in most visits (ties: smaller code first); 0 keeps all."""
    counts = np.bincount(code, minlength=len(values))
    present = np.flatnonzero(counts)
    if n == 0 or len(present) <= n:
        return visit, code
    order = sorted(present, key=lambda i: (-counts[i], values[i]))
    keep_code = np.zeros(len(values), dtype=bool)
    keep_code[order[:n]] = True
    keep = keep_code[code]
    flog.record(step, f"outside the {n:,} most frequent {what} (by visits)", rows=int((~keep).sum()), codes=len(present) - n)
    return visit[keep], code[keep]


def _read_icd(stem: str, path: Path, adm: _Admissions, flog: FilterLog
              ) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, int]]:
    """(visit row, code index) pairs of DIAGNOSES_ICD / PROCEDURES_ICD, codes, and code -> ICD version.

    MIMIC-IV mixes ICD-9 and ICD-10 (icd_version column): its codes are stored as ICD9_<code> and
    ICD10_<code> so that the two never collide; MIMIC-III's ICD9_CODE is stored as is.
    """
    header = {h.strip().lower() for h in read_header(path)}
    versioned = "icd9_code" not in header
    cols = ["hadm_id", "icd_code", "icd_version"] if versioned else ["hadm_id", "icd9_code"]
    table = read_table(path, cols)
    step = stem.lower()
    visit = _visit_rows(table, path, adm, flog, step)
    text = column_text(table, cols[1])
    if versioned:
        version = column_text(table, "icd_version")
        bad = pc.invert(pc.is_in(version, pa.array(["9", "10"]))).to_numpy(zero_copy_only=False) & (visit >= 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(path, f"icd_version {version[row].as_py()!r} is not 9 or 10", line=row + 2, column="icd_version",
                            fix="use the table as released by PhysioNet")
        text = pc.if_else(pc.equal(text, ""), "", pc.binary_join_element_wise("ICD", version, "_", text, ""))
    bad = pc.match_substring_regex(text, r"[\x00-\x1f\x7f;,]").to_numpy(zero_copy_only=False) & (visit >= 0)
    if bad.any():  # visits.csv could not hold it: the dataset's own reader refused what prepare wrote
        row = int(np.flatnonzero(bad)[0])
        raise DataError(path, f"the code {text[row].as_py()!r} holds a control character (a NUL byte, a tab), ';' or ','",
                        line=row + 2, column=cols[1], fix="remove it from the table (codes are letters and digits)")
    dotted = pc.match_substring(text, ".").to_numpy(zero_copy_only=False) & (visit >= 0)
    if dotted.any():  # "996.62" and "99662" were two codes with one name
        text = pc.replace_substring(text, ".", "")
        flog.record(f"{step}.dotted_code", f"nothing removed: {int(dotted.sum()):,} ICD codes written with a dot "
                    "(996.62) read without it, as MIMIC stores them")
    code, values = encode(text)
    empty_idx = values.index("") if "" in values else -1
    keep = visit >= 0
    empty = code == empty_idx
    if (empty & keep).any():
        flog.record(f"{step}.empty_code", "empty ICD code", rows=int((empty & keep).sum()))
    keep &= ~empty
    n_rows = int(keep.sum())
    visit, code = _dedup(visit[keep], code[keep], len(values))
    if n_rows > len(code):
        flog.record(f"{step}.duplicate", "same code twice in one visit", rows=n_rows - len(code))
    versions = {v: (int(v[3:v.index("_")]) if versioned else 9) for v in values if v}
    return visit, code, values, versions


def _icd_names(cfg: PrepareConfig, stem: str, path: Path | None, kind: str, codes: set[str], versions: dict[str, int]
               ) -> tuple[dict[str, str], int]:
    """Names from D_ICD_* (SHORT_TITLE, else LONG_TITLE), then the ICD package; (names, codes without one)."""
    names: dict[str, str] = {}
    if path is not None:
        header = {h.strip().lower() for h in read_header(path)}
        versioned = "icd9_code" not in header
        title = "short_title" if "short_title" in header else "long_title"
        table = read_table(path, ["icd_code", "icd_version", title] if versioned else ["icd9_code", title])
        code = column_text(table, "icd_code" if versioned else "icd9_code").to_pylist()
        if versioned:
            code = [f"ICD{v}_{c}" for v, c in zip(column_text(table, "icd_version").to_pylist(), code)]
        names = {c: t for c, t in zip(code, column_text(table, title).to_pylist()) if c in codes and t}
    else:
        log.warning("%s not found under %s: naming %s codes from the ICD package", stem, cfg.root, kind)
    for c in codes - names.keys():
        raw = c.split("_", 1)[1] if c.startswith("ICD") and "_" in c else c
        found = icd_name(kind, raw, versions.get(c, 9))
        if found:
            names[c] = found
    return names, len(codes - names.keys())


def _read_prescriptions(cfg: PrepareConfig, path: Path, adm: _Admissions, flog: FilterLog
                        ) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, str]]:
    """(visit row, medication index) pairs after mapping and top-N, medication codes, code -> name."""
    # Start dates only serve to anchor two-digit admission years: skip 4M date strings otherwise.
    table = read_table(path, ["hadm_id", "ndc", "drug"], ("startdate", "starttime") if adm.two_digit.any() else ())
    visit = _visit_rows(table, path, adm, flog, "prescriptions")
    if adm.two_digit.any():
        _anchor_two_digit_years(adm, table, visit, flog, cfg.century)
    ndc_idx, ndcs = encode(column_text(table, "ndc"))
    drug_idx, drugs = encode(column_text(table, "drug"))
    del table
    keep = visit >= 0
    zero = np.isin(ndc_idx, [i for i, n in enumerate(ndcs) if n.strip("0") == ""]) & keep
    flog.record("prescriptions.ndc_zero", 'NDC "0" or empty (base solutions, supplies)', rows=int(zero.sum()))
    keep &= ~zero

    ndc_rxcui = maps.read_ndc_rxcui(cfg.ndc_rxcui)
    rxcui = [ndc_rxcui.get(n) for n in ndcs]
    unmapped = np.array([r is None for r in rxcui], dtype=bool)[ndc_idx] & keep  # bool for an empty table too
    flog.record("prescriptions.ndc_unmapped", f"NDC not in {cfg.ndc_rxcui.name}", rows=int(unmapped.sum()),
                codes=len(np.unique(ndc_idx[unmapped])))
    keep &= ~unmapped
    if cfg.med_level == "atc3":
        rxcui_atc = maps.read_rxcui_atc(cfg.rxcui_atc)
        med_of_ndc = [rxcui_atc[r][:4] if r is not None and r in rxcui_atc else None for r in rxcui]
        unmapped = np.array([m is None for m in med_of_ndc], dtype=bool)[ndc_idx] & keep
        flog.record("prescriptions.rxcui_unmapped", f"RXCUI not in {cfg.rxcui_atc.name}", rows=int(unmapped.sum()))
        keep &= ~unmapped
    else:
        med_of_ndc = rxcui
    meds = sorted({m for m in med_of_ndc if m is not None})
    med_index = {m: i for i, m in enumerate(meds)}
    lut = np.array([med_index.get(m, -1) if m is not None else -1 for m in med_of_ndc], dtype=np.int64)
    visit, med, drug_idx = visit[keep], lut[ndc_idx[keep]], drug_idx[keep]
    names = _drug_names(med, drug_idx, drugs, meds)
    n_rows = len(med)
    visit, med = _dedup(visit, med, len(meds))
    flog.record("prescriptions.duplicate", "same medication twice in one visit (doses, refills, sibling NDCs)",
                rows=n_rows - len(med))
    visit, med = _top(visit, med, meds, cfg.top_medications, flog, "prescriptions.top_n", "medications")
    return visit, med, meds, names


def _anchor_two_digit_years(adm: _Admissions, table: pa.Table, visit: np.ndarray, flog: FilterLog, century: int) -> None:
    """Put each two-digit-year admission in the century of its first prescription (its start date, `_dates`)."""
    col = "startdate" if "startdate" in table.column_names else "starttime" if "starttime" in table.column_names else None
    anchors = np.full(len(adm.hadm), np.datetime64("NaT"), dtype="datetime64[s]")
    if col is not None:
        rows = np.flatnonzero((visit >= 0) & adm.two_digit[np.maximum(visit, 0)])
        text = column_text(table, col).take(pa.array(rows)).to_pandas()
        start = _dates(text)
        unreadable = int((start.isna() & (text != "")).sum())
        if unreadable:
            example = text[start.isna() & (text != "")].iloc[0]
            log.warning("%s: %d prescription %s value(s) are not dates (e.g. %r): those visits keep the %d+YY reading",
                        col, unreadable, col.upper(), example, century)
        first = pd.Series(start.to_numpy()).groupby(visit[rows]).min().dropna()
        anchors[first.index.to_numpy()] = first.to_numpy(dtype="datetime64[s]")
    else:
        unreadable = 0
    adm.time, moved = nearest_century(adm.time, anchors)
    flog.record("admissions.two_digit_years",
                f"nothing removed: {int(adm.two_digit.sum()):,} ADMITTIME years had two digits, read as {century}+YY; "
                f"{int((~np.isnat(anchors)).sum()):,} checked against the visit's first prescription date, {moved:,} moved a century"
                + (f"; {unreadable:,} prescription dates unreadable" if unreadable else ""))


def _dates(text: pd.Series) -> pd.Series:
    """Date strings -> naive datetimes: ISO 8601, then other written forms (M/D/YYYY; ISO alone left
    those out without a word), time zones read as UTC; NaT where nothing reads."""
    try:
        out = pd.to_datetime(text, format="ISO8601", errors="coerce")
    except ValueError:  # time zones mixed with naive times
        out = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
    if getattr(out.dt, "tz", None) is not None:
        out = out.dt.tz_convert(None)
    retry = out.isna() & (text != "")
    if retry.any():
        try:
            out[retry] = pd.to_datetime(text[retry], format="mixed", errors="coerce", utc=True).dt.tz_convert(None)
        except (TypeError, ValueError):  # forms pandas cannot read at all: left NaT, counted by the caller
            pass
    return out


def _drug_names(med: np.ndarray, drug_idx: np.ndarray, drugs: list[str], meds: list[str]) -> dict[str, str]:
    """Each medication named by its MED_NAME_DRUGS most frequent DRUG strings, e.g. "Metoprolol / Atenolol"."""
    # Fold spelling variants ("HEPARIN", "Heparin ") before counting.
    folded: dict[str, int] = {}
    fold = np.array([folded.setdefault(" ".join(d.split()).lower(), len(folded)) for d in drugs] or [0], dtype=np.int64)
    shown: dict[int, str] = {}
    pair_counts = np.unique(med * (len(folded) + 1) + fold[drug_idx], return_counts=True)
    by_med: dict[int, list[tuple[int, int]]] = {}
    for key, n in zip(*pair_counts):
        m, f = divmod(int(key), len(folded) + 1)
        by_med.setdefault(m, []).append((-int(n), f))
    for i, d in enumerate(drugs):
        shown.setdefault(int(fold[i]), " ".join(d.split()))
    names = {}
    for m, items in by_med.items():
        top = [shown[f] for _, f in sorted(items)[:MED_NAME_DRUGS] if shown[f]]
        if top:
            names[meds[m]] = " / ".join(top)
    return names


def _find_tables(cfg: PrepareConfig, flog: FilterLog) -> dict[str, Path | None]:
    """Every table the pipeline reads (None: an absent optional one), found before any is read and
    checked against a SHA256SUMS.txt beside them (`tables.verify_checksum`), recorded in the log.

    Raises:
        DataError: a required table missing, a table in two files, a checksum that does not match.
    """
    tables = {stem: find_table(cfg.root, stem, source=cfg.source) for stem in TABLES}
    tables |= {stem: find_optional(cfg.root, stem, source=cfg.source) for stem in NAME_TABLES}
    # The release, from DIAGNOSES_ICD's header: MIMIC-III has ICD9_CODE, MIMIC-IV icd_code + icd_version.
    # Both read alike, but the dataset recorded the subcommand's source (mimic4 for MIMIC-III tables).
    header = {h.strip().lower() for h in read_header(tables["DIAGNOSES_ICD"])}
    release = "mimic3" if "icd9_code" in header else "mimic4" if {"icd_code", "icd_version"} <= header else None
    if release is not None and release != cfg.source:
        name = {"mimic3": "MIMIC-III", "mimic4": "MIMIC-IV"}
        raise DataError(tables["DIAGNOSES_ICD"], f"is a {name[release]} table "
                                                 f"({'ICD9_CODE' if release == 'mimic3' else 'icd_code, icd_version'}), "
                                                 f"not {name.get(cfg.source, cfg.source)}", line=1,
                        fix=f"run `leader-edge prepare {release}` on these tables")
    checked: dict[Path, list[str]] = {}
    for path in tables.values():
        sums = verify_checksum(path) if path is not None else None
        if sums is not None:
            checked.setdefault(sums, []).append(path.name)
    for sums, names in checked.items():
        log.info("%s match their sha256 in %s", ", ".join(names), sums)
        flog.record("tables.sha256", f"nothing removed: {len(names)} table files match their sha256 in {sums}")
    return tables


def prepare_mimic(cfg: PrepareConfig) -> Dataset:
    """Run the pipeline on MIMIC-III or MIMIC-IV tables and return the dataset (not yet written).

    Returns:
        Dataset with visits ordered by patient (SUBJECT_ID) then admission time, code names,
        DDI pairs, and `meta["filters"]`: every step with the rows/visits/patients/codes it removed.
    """
    flog = FilterLog()
    tables = _find_tables(cfg, flog)
    # Progress in bytes of the four big tables (PRESCRIPTIONS is ~4M rows / 0.7 GB in MIMIC-III).
    size = {name: tables[name].stat().st_size for name in ("ADMISSIONS", "PRESCRIPTIONS", "DIAGNOSES_ICD", "PROCEDURES_ICD")}
    with progress(sum(size.values()), desc="prepare", unit="B") as bar:
        def done(name: str) -> None:
            bar.update(size[name])
            bar.set_postfix_str(f"{name} read")

        adm = _read_admissions(cfg, tables["ADMISSIONS"], flog)
        done("ADMISSIONS")
        mv, mc, meds, med_names = _read_prescriptions(cfg, tables["PRESCRIPTIONS"], adm, flog)
        done("PRESCRIPTIONS")
        dv, dc, dx, dx_versions = _read_icd("DIAGNOSES_ICD", tables["DIAGNOSES_ICD"], adm, flog)
        dv, dc = _top(dv, dc, dx, cfg.top_diagnoses, flog, "diagnoses_icd.top_n", "diagnoses")
        done("DIAGNOSES_ICD")
        pv, pc_, px, px_versions = _read_icd("PROCEDURES_ICD", tables["PROCEDURES_ICD"], adm, flog)
        done("PROCEDURES_ICD")
    n_adm = len(adm.hadm)

    present = np.ones(n_adm, dtype=bool)
    for name, v in (("PRESCRIPTIONS", mv), ("DIAGNOSES_ICD", dv), ("PROCEDURES_ICD", pv)):
        has = np.zeros(n_adm, dtype=bool)
        has[v] = True
        lost = present & ~has
        flog.record(f"visits.no_{name.lower()}", f"no {name} rows left after the steps above",
                    visits=int(lost.sum()), patients=_patients_lost(adm.subject, present, present & has))
        present &= has
    counts = np.bincount(np.unique(adm.subject[present], return_inverse=True)[1]) if present.any() else np.zeros(0, int)
    if cfg.min_visits > 1:
        subj = np.unique(adm.subject[present])
        few = np.isin(adm.subject, subj[counts < cfg.min_visits]) & present
        flog.record("patients.min_visits", f"fewer than {cfg.min_visits} visits", visits=int(few.sum()),
                    patients=int((counts < cfg.min_visits).sum()))
        present &= ~few
    if not present.any():
        removed = [f"{st['step']} ({', '.join(f'{v:,} {k[8:]}' for k, v in st.items() if k.startswith('removed_') and v)}: "
                   f"{st['reason']})" for st in flog.steps if any(v for k, v in st.items() if k.startswith("removed_"))]
        raise ConfigError(f"no visit of {cfg.root} survived the filters; what removed them: " + "; ".join(removed)
                          + ". Check the tables (an empty one?), the map files and the options")

    order = [r for r in np.lexsort((adm.hadm, adm.time, adm.subject)) if present[r]]
    lists = {key: _lists(v, c, vals, n_adm) for key, v, c, vals in
             (("diagnoses", dv, dc, dx), ("procedures", pv, pc_, px), ("medications", mv, mc, meds))}
    fields = list(adm.profile)
    visits = [
        Visit(patient_id=str(adm.subject[r]), visit_id=str(adm.hadm[r]), time=adm.time[r].astype("datetime64[s]").item(),
              diagnoses=lists["diagnoses"][r], procedures=lists["procedures"][r], medications=lists["medications"][r],
              profile=tuple((f, adm.profile[f][r]) for f in fields))
        for r in order
    ]
    ds = Dataset(visits=visits)
    vocab = {k: set(ds.vocab(k)) for k in KINDS}
    unnamed = {}
    for kind, stem, versions in (("diagnosis", "D_ICD_DIAGNOSES", dx_versions), ("procedure", "D_ICD_PROCEDURES", px_versions)):
        ds.names[kind], unnamed[kind] = _icd_names(cfg, stem, tables[stem], kind, vocab[kind], versions)
    ds.names["medication"] = {m: n for m, n in med_names.items() if m in vocab["medication"]}
    unnamed["medication"] = len(vocab["medication"] - ds.names["medication"].keys())
    if cfg.ddi is not None:
        ds.ddi = _ddi(cfg, vocab["medication"], flog)
    ds.meta = {"filters": flog.steps, "unnamed_codes": unnamed}
    return ds


def _patients_lost(subject: np.ndarray, before: np.ndarray, after: np.ndarray) -> int:
    return len(np.unique(subject[before])) - len(np.unique(subject[after]))


def _lists(visit: np.ndarray, code: np.ndarray, values: list[str], n_visits: int) -> list[tuple[str, ...]]:
    """Per admission row, its codes in file order."""
    order = np.argsort(visit, kind="stable")
    bounds = np.searchsorted(visit[order], np.arange(n_visits + 1))
    names = np.array(values, dtype=object)[code[order]]
    return [tuple(names[bounds[i]:bounds[i + 1]]) for i in range(n_visits)]


def _ddi(cfg: PrepareConfig, vocab: set[str], flog: FilterLog) -> list[tuple[str, str]]:
    fmt = maps.ddi_format(cfg.ddi)
    if fmt == "pairs":
        pairs, lost = maps.map_ddi(maps.read_pairs(cfg.ddi), vocab)
        flog.record("ddi.unmapped", "pair with a medication outside the dataset", rows=lost)
        return pairs
    if cfg.med_level != "atc3" or cfg.cid_atc is None:
        raise ConfigError(f"{cfg.ddi} is a TWOSIDES file (PubChem CIDs): it needs --med-level atc3 and --cid-atc FILE "
                         "(SafeDrug drug-atc.csv); or pass a med_a,med_b pairs file at your medication level")
    raw, stats = maps.read_twosides(cfg.ddi, side_effects=cfg.ddi_side_effects, top_k=cfg.ddi_top_k)
    flog.record("ddi.side_effects", f"side-effect type outside the kept {stats['types_kept']} of "
                f"{stats['side_effect_types']} ({cfg.ddi_side_effects})", rows=stats["rows"] - stats["rows_kept"])
    pairs, lost = maps.map_ddi(raw, vocab, maps.read_cid_atc(cfg.cid_atc))
    flog.record("ddi.unmapped", f"CID pair with no ATC-3 pair among the dataset's medications ({len(raw):,} CID pairs read)",
                rows=lost)
    return pairs


def stats_table(meta: dict, *, unnamed: dict[str, int] | None = None) -> str:
    """Plain-text table of the filters applied and the dataset's counts (from dataset.json's meta)."""
    cols = ("rows", "visits", "patients", "codes")
    lines = [f"{'filter':<34} {'removed ' + '/'.join(cols):>40}  reason"]
    for step in meta.get("filters", []):
        cells = " ".join(f"{step[f'removed_{c}']:>9,}" if f"removed_{c}" in step else f"{'-':>9}" for c in cols)
        lines.append(f"{step['step']:<34} {cells}  {step['reason']}")
    lines.append("")
    for key, value in meta.get("counts", {}).items():
        lines.append(f"{key:<34} {value:>12,}" if isinstance(value, int) else f"{key:<34} {value:>12}")
    for kind, n in (unnamed or {}).items():
        lines.append(f"{kind + ' codes without a name':<34} {n:>12,}")
    return "\n".join(lines)
