"""Write a synthetic cohort as raw MIMIC-III v1.4 tables plus GAMENet/SafeDrug map files.

The files exercise `leader-edge prepare mimic3` at full scale (46k patients -> ~4M prescription
rows). Prescription rows are built with numpy index arrays and written with pyarrow: a per-row
Python loop costs ~20 s per million rows, this costs ~1 s.
See docs/DATA.md for what each file holds and which imperfections are planted on purpose.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from leader_edge.files import atomic_directory
from leader_edge.data.icd import icd_names
from leader_edge.data.synth import PROFILE_FIELDS, Cohort

log = logging.getLogger(__name__)

PRESCRIPTION_COLUMNS = (
    "ROW_ID", "SUBJECT_ID", "HADM_ID", "ICUSTAY_ID", "STARTDATE", "ENDDATE", "DRUG_TYPE", "DRUG", "DRUG_NAME_POE",
    "DRUG_NAME_GENERIC", "FORMULARY_DRUG_CD", "GSN", "NDC", "PROD_STRENGTH", "DOSE_VAL_RX", "DOSE_UNIT_RX",
    "FORM_VAL_DISP", "FORM_UNIT_DISP", "ROUTE",
)
ADMISSION_COLUMNS = (
    "ROW_ID", "SUBJECT_ID", "HADM_ID", "ADMITTIME", "DISCHTIME", "DEATHTIME", "ADMISSION_TYPE", "ADMISSION_LOCATION",
    "DISCHARGE_LOCATION", "INSURANCE", "LANGUAGE", "RELIGION", "MARITAL_STATUS", "ETHNICITY", "EDREGTIME",
    "EDOUTTIME", "DIAGNOSIS", "HOSPITAL_EXPIRE_FLAG", "HAS_CHARTEVENTS_DATA",
)
PATIENT_COLUMNS = ("ROW_ID", "SUBJECT_ID", "GENDER", "DOB", "DOD", "DOD_HOSP", "DOD_SSN", "EXPIRE_FLAG")
ICD_COLUMNS = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE")
D_ICD_COLUMNS = ("ROW_ID", "ICD9_CODE", "SHORT_TITLE", "LONG_TITLE")
RXCUI_ATC_COLUMNS = ("YEAR", "MONTH", "NDC", "RXCUI", "ATC4")
DDI_COLUMNS = ("STITCH 1", "STITCH 2", "Polypharmacy Side Effect", "Side Effect Name")
# Rows MIMIC-III keeps with NDC "0": base solutions and supplies (~14% of the demo's rows).
BASE_DRUGS = ("Sodium Chloride 0.9%  Flush", "D5W", "NS", "SW", "Syringe", "Iso-Osmotic Dextrose", "LR", "D5 1/2NS")
SIDE_EFFECTS = (
    ("C0035410", "rhabdomyolysis"), ("C0151714", "hypermagnesemia"), ("C0020538", "hypertensive disease"),
    ("C0002871", "anaemia"), ("C0022660", "acute kidney failure"), ("C0018790", "cardiac arrest"),
    ("C0004238", "atrial fibrillation"), ("C0020649", "hypotension"), ("C0027947", "neutropenia"),
    ("C0040034", "thrombocytopenia"), ("C0023890", "cirrhosis"), ("C0030305", "pancreatitis"),
)
ROUTES = ("PO", "IV", "PO/NG", "SC", "IV DRIP", "IH", "TP", "PR")
FORMS = (("Tab", "mg", "TAB"), ("Vial", "mg", "VIAL"), ("Bag", "mL", "BAG"), ("Cap", "mg", "CAP"), ("Syringe", "mg", "SYR"))
ROWS_PER_MED = 4.0  # Poisson mean of extra rows per class per visit: 46k patients -> ~4M rows
NDC_ZERO_SHARE = 0.13  # extra NDC "0" rows, as share of all rows
NDC_EMPTY_SHARE = 0.001
NDC_UNMAPPED = 0.03  # NDCs missing from ndc2rxnorm_mapping.txt
RXCUI_UNMAPPED = 0.02  # RXCUIs missing from RXCUI2atc4.csv
NO_PRESCRIPTIONS = 0.03  # admissions with diagnoses but no PRESCRIPTIONS rows
NO_PROCEDURES = 0.04  # admissions with no PROCEDURES_ICD rows


def _stamp(times: np.ndarray) -> pa.Array:
    """datetime64[s] -> 'YYYY-MM-DD HH:MM:SS' strings (MIMIC-III v1.4 style)."""
    # Format each distinct time once: 4M prescription rows hold ~0.5M distinct days (10 s -> 1 s).
    distinct, inverse = np.unique(times, return_inverse=True)
    text = np.char.replace(np.datetime_as_string(distinct, unit="s"), "T", " ")
    return pa.array(text).take(pa.array(inverse.ravel()))


def _write(path: Path, table: pa.Table) -> None:
    pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(quoting_style="needed"))


def _products(rng: np.random.Generator, cohort: Cohort) -> dict:
    """NDC products per class: NDC, RXCUI, ATC4, names, forms. The first NDC/RXCUI of every class
    is always mapped, so no class disappears through the planted map gaps."""
    w = cohort.world
    m = len(w.med_codes)
    n_rx = rng.integers(2, 4, m)
    n_ndc = rng.integers(3, 9, m)
    rx_class = np.repeat(np.arange(m), n_rx)
    rxcui = rng.choice(np.arange(100_000, 2_000_000), size=len(rx_class), replace=False)
    rx_first = np.concatenate([[0], np.cumsum(n_rx)[:-1]])
    rx_rank = np.arange(len(rx_class)) - rx_first[rx_class]
    atc4 = [f"{w.med_codes[c]}{'ABC'[r]}" for c, r in zip(rx_class, rx_rank)]
    ndc_class = np.repeat(np.arange(m), n_ndc)
    ndc_first = np.concatenate([[0], np.cumsum(n_ndc)[:-1]])
    ndc_rank = np.arange(len(ndc_class)) - ndc_first[ndc_class]
    ndc_rx = rx_first[ndc_class] + ndc_rank % n_rx[ndc_class]  # NDC rank 0 -> RXCUI rank 0
    ndc = rng.choice(10**10, size=len(ndc_class), replace=False) + 10**9
    form = rng.integers(0, len(FORMS), len(ndc_class))
    strength = rng.choice(np.array([1, 2, 5, 10, 20, 25, 50, 100, 250, 500]), len(ndc_class))
    drug = [
        f"{w.med_names[c].split()[0].capitalize()} {' '.join(w.med_names[c].split()[1:]).rstrip('s')} {'ABC'[r]}".replace("  ", " ")
        for c, r in zip(ndc_class, ndc_rx - rx_first[ndc_class])
    ]
    return {
        "rx_class": rx_class, "rxcui": rxcui, "rx_rank": rx_rank, "atc4": atc4,
        "ndc_class": ndc_class, "ndc_first": ndc_first, "n_ndc": n_ndc, "ndc_rank": ndc_rank, "ndc_rx": ndc_rx,
        "ndc": np.array([f"{x:011d}" for x in ndc]), "form": form, "strength": strength, "drug": drug,
    }


# Every file `_write_tables` writes (an existing --out holding anything else is refused, not replaced)
MIMIC3_FILES = ("PATIENTS.csv", "ADMISSIONS.csv", "DIAGNOSES_ICD.csv", "PROCEDURES_ICD.csv", "D_ICD_DIAGNOSES.csv",
                "D_ICD_PROCEDURES.csv", "PRESCRIPTIONS.csv", "ndc2rxnorm_mapping.txt", "RXCUI2atc4.csv", "drug-atc.csv",
                "drug-DDI.csv")


def write_mimic3(cohort: Cohort, out: str | Path, *, seed: int = 42) -> Path:
    """Write ADMISSIONS, PATIENTS, DIAGNOSES_ICD, PROCEDURES_ICD, PRESCRIPTIONS, D_ICD_* and the
    map files (ndc2rxnorm_mapping.txt, RXCUI2atc4.csv, drug-atc.csv, drug-DDI.csv) atomically.

    An existing `out` is replaced only if it holds an ADMISSIONS.csv written before (it is ours).
    """
    with atomic_directory(out, marker="ADMISSIONS.csv", what="synthetic MIMIC-III", owns=MIMIC3_FILES) as tmp:
        _write_tables(cohort, tmp, np.random.default_rng([seed, 3]))
    return Path(out)


def _write_tables(cohort: Cohort, d: Path, rng: np.random.Generator) -> None:
    w = cohort.world
    n_v = len(cohort.hadm_ids)
    n_p = len(cohort.subject_ids)
    subj_of_visit = cohort.subject_ids[cohort.visit_patient]
    admit = np.array(cohort.admit_times, dtype="datetime64[s]")
    los_days = rng.integers(1, 15, n_v)
    disch = admit + (los_days * 86400 + rng.integers(0, 86400, n_v)).astype("timedelta64[s]")
    died = rng.random(n_v) < 0.08

    # PATIENTS and ADMISSIONS
    first = np.searchsorted(cohort.visit_patient, np.arange(n_p))
    age_days = rng.integers(18 * 365, 90 * 365, n_p)
    dob = (admit[first].astype("datetime64[D]") - age_days.astype("timedelta64[D]")).astype("datetime64[s]")
    last = np.append(first[1:], n_v) - 1
    pat_dead = died[last]
    dod = np.where(pat_dead, disch[last].astype("datetime64[D]").astype("datetime64[s]"), np.datetime64("NaT"))
    dod_text = pa.array([None if not dead else s for dead, s in zip(pat_dead, np.datetime_as_string(dod, unit="s"))],
                        type=pa.string())  # typed: with nobody dead (a few patients) it was a null array
    dod_text = pc.replace_substring(dod_text, "T", " ")
    _write(d / "PATIENTS.csv", pa.table({
        "ROW_ID": np.arange(1, n_p + 1), "SUBJECT_ID": cohort.subject_ids,
        "GENDER": pa.array(np.where(rng.random(n_p) < 0.56, "M", "F")), "DOB": _stamp(dob),
        "DOD": dod_text, "DOD_HOSP": dod_text, "DOD_SSN": dod_text, "EXPIRE_FLAG": pat_dead.astype(np.int8),
    }))
    prof = {f: pa.array([cohort.profiles[p][f] or None for p in cohort.visit_patient]) for f in
            PROFILE_FIELDS}
    death_text = pa.array([s.replace("T", " ") if dd else None for dd, s in zip(died, np.datetime_as_string(disch, unit="s"))])
    first_dx = [w.dx_codes[dx[0]] if len(dx) else "" for dx in cohort.diagnoses]
    dx_titles = icd_names("diagnosis", 9)
    _write(d / "ADMISSIONS.csv", pa.table({
        "ROW_ID": np.arange(1, n_v + 1), "SUBJECT_ID": subj_of_visit, "HADM_ID": cohort.hadm_ids,
        "ADMITTIME": _stamp(admit), "DISCHTIME": _stamp(disch), "DEATHTIME": death_text,
        "ADMISSION_TYPE": pa.array(rng.choice(["EMERGENCY", "ELECTIVE", "URGENT"], n_v, p=[0.8, 0.17, 0.03])),
        "ADMISSION_LOCATION": pa.array(rng.choice(
            ["EMERGENCY ROOM ADMIT", "TRANSFER FROM HOSP/EXTRAM", "CLINIC REFERRAL/PREMATURE", "PHYS REFERRAL/NORMAL DELI"],
            n_v, p=[0.5, 0.2, 0.15, 0.15])),
        "DISCHARGE_LOCATION": pa.array(np.where(died, "DEAD/EXPIRED", rng.choice(
            ["HOME", "HOME HEALTH CARE", "SNF", "REHAB/DISTINCT PART HOSP"], n_v, p=[0.4, 0.25, 0.2, 0.15]))),
        "INSURANCE": prof["insurance"], "LANGUAGE": prof["language"], "RELIGION": prof["religion"],
        "MARITAL_STATUS": prof["marital_status"], "ETHNICITY": prof["ethnicity"],
        "EDREGTIME": _stamp(admit - np.timedelta64(3600 * 3, "s")), "EDOUTTIME": _stamp(admit + np.timedelta64(1800, "s")),
        "DIAGNOSIS": pa.array([dx_titles.get(c, "").upper() for c in first_dx]),
        "HOSPITAL_EXPIRE_FLAG": died.astype(np.int8), "HAS_CHARTEVENTS_DATA": np.ones(n_v, dtype=np.int8),
    }))

    # DIAGNOSES_ICD / PROCEDURES_ICD (long format, SEQ_NUM in visit order)
    for name, lists, codes, drop in (("DIAGNOSES_ICD", cohort.diagnoses, w.dx_codes, 0.0),
                                     ("PROCEDURES_ICD", cohort.procedures, w.proc_codes, NO_PROCEDURES)):
        lengths = np.array([len(x) for x in lists]) * (rng.random(n_v) >= drop)
        flat = np.concatenate([x[:k] for x, k in zip(lists, lengths)]).astype(np.int64)
        visit = np.repeat(np.arange(n_v), lengths)
        seq = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
        _write(d / f"{name}.csv", pa.table({
            "ROW_ID": np.arange(1, len(flat) + 1), "SUBJECT_ID": subj_of_visit[visit], "HADM_ID": cohort.hadm_ids[visit],
            "SEQ_NUM": seq, "ICD9_CODE": pa.array(np.array(codes)[flat]),
        }))
    for name, kind in (("D_ICD_DIAGNOSES", "diagnosis"), ("D_ICD_PROCEDURES", "procedure")):
        titles = icd_names(kind, 9)
        codes = sorted(titles)
        _write(d / f"{name}.csv", pa.table({
            "ROW_ID": np.arange(1, len(codes) + 1), "ICD9_CODE": codes,
            "SHORT_TITLE": [titles[c] for c in codes], "LONG_TITLE": [titles[c] for c in codes],
        }))

    prod = _products(rng, cohort)
    _write_prescriptions(cohort, d, rng, prod, admit, los_days, subj_of_visit)
    _write_maps(cohort, d, rng, prod)


def _write_prescriptions(cohort: Cohort, d: Path, rng: np.random.Generator, prod: dict, admit: np.ndarray,
                         los_days: np.ndarray, subj_of_visit: np.ndarray) -> None:
    n_v = len(cohort.hadm_ids)
    with_rx = rng.random(n_v) >= NO_PRESCRIPTIONS
    lengths = np.array([len(m) for m in cohort.medications]) * with_rx
    med = np.concatenate([m[:k] for m, k in zip(cohort.medications, lengths)]).astype(np.int64)
    med_visit = np.repeat(np.arange(n_v), lengths)
    # Several rows per class per visit (dose changes, refills), each from one of the class's NDCs.
    reps = 1 + rng.poisson(ROWS_PER_MED, len(med))
    row_med = np.repeat(med, reps)
    row_visit = np.repeat(med_visit, reps)
    row_ndc = prod["ndc_first"][row_med] + (rng.random(len(row_med)) * prod["n_ndc"][row_med]).astype(np.int64)
    # NDC "0" base-solution rows, spread over the visits that have prescriptions.
    n_zero = int(len(row_med) * NDC_ZERO_SHARE / (1 - NDC_ZERO_SHARE))
    visits_rx = np.flatnonzero(with_rx & (lengths > 0))
    zero_visit = np.sort(rng.choice(visits_rx, n_zero)) if len(visits_rx) else np.zeros(0, dtype=np.int64)
    n_prod = len(prod["ndc"])
    zero_ndc = n_prod + rng.integers(0, len(BASE_DRUGS), n_zero)  # product ids past the real NDCs
    visit = np.concatenate([row_visit, zero_visit])
    product = np.concatenate([row_ndc, zero_ndc])
    order = np.argsort(visit, kind="stable")
    visit, product = visit[order], product[order]
    n = len(visit)

    # Per-product attribute tables (real products then base drugs), gathered with `take`.
    ndc_text = list(prod["ndc"]) + ["0"] * len(BASE_DRUGS)
    drug = list(prod["drug"]) + list(BASE_DRUGS)
    form = np.concatenate([prod["form"], np.zeros(len(BASE_DRUGS), dtype=np.int64) + 2])
    strength = np.concatenate([prod["strength"], np.full(len(BASE_DRUGS), 100)])
    table_of = lambda values: pa.array(values).take(pa.array(product))  # noqa: E731
    ndc_col = table_of(ndc_text)
    empty = rng.random(n) < NDC_EMPTY_SHARE
    ndc_col = pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), ndc_col)
    start_off = (rng.random(n) * los_days[visit]).astype("timedelta64[D]")
    start = admit[visit].astype("datetime64[D]") + start_off
    end = start + rng.integers(0, 3, n).astype("timedelta64[D]")
    drug_col = table_of(drug)
    _write(d / "PRESCRIPTIONS.csv", pa.table({
        "ROW_ID": np.arange(1, n + 1), "SUBJECT_ID": subj_of_visit[visit], "HADM_ID": cohort.hadm_ids[visit],
        "ICUSTAY_ID": 200_000 + visit,
        "STARTDATE": _stamp(start.astype("datetime64[s]")), "ENDDATE": _stamp(end.astype("datetime64[s]")),
        "DRUG_TYPE": table_of(["MAIN"] * n_prod + ["BASE"] * len(BASE_DRUGS)),
        "DRUG": drug_col, "DRUG_NAME_POE": drug_col, "DRUG_NAME_GENERIC": drug_col,
        "FORMULARY_DRUG_CD": table_of([f"F{i:06d}" for i in range(len(drug))]),
        "GSN": table_of([f"{(i * 7919) % 10**6:06d}" for i in range(len(drug))]),
        "NDC": ndc_col,
        "PROD_STRENGTH": table_of([f"{s}{FORMS[f][1]} {FORMS[f][0]}" for s, f in zip(strength, form)]),
        "DOSE_VAL_RX": table_of([str(s) for s in strength]),
        "DOSE_UNIT_RX": table_of([FORMS[f][1] for f in form]),
        "FORM_VAL_DISP": table_of(["1"] * len(drug)),
        "FORM_UNIT_DISP": table_of([FORMS[f][2] for f in form]),
        "ROUTE": table_of([ROUTES[i % len(ROUTES)] for i in range(len(drug))]),
    }))
    log.info("PRESCRIPTIONS.csv: %d rows (%d NDC '0', %d empty NDC)", n, n_zero, int(empty.sum()))


def _write_maps(cohort: Cohort, d: Path, rng: np.random.Generator, prod: dict) -> None:
    w = cohort.world
    mapped_ndc = (prod["ndc_rank"] == 0) | (rng.random(len(prod["ndc"])) >= NDC_UNMAPPED)
    rxcui = prod["rxcui"]
    body = ", ".join(f"'{n}': u'{rxcui[r]}'" for n, r, keep in zip(prod["ndc"], prod["ndc_rx"], mapped_ndc) if keep)
    (d / "ndc2rxnorm_mapping.txt").write_text("{" + body + "}", encoding="utf-8")

    mapped_rx = (prod["rx_rank"] == 0) | (rng.random(len(rxcui)) >= RXCUI_UNMAPPED)
    rows = [(int(r), a) for r, a, keep in zip(rxcui, prod["atc4"], mapped_rx) if keep]
    ndc_of_rx = {int(rxcui[r]): n for n, r in zip(prod["ndc"], prod["ndc_rx"])}
    _write(d / "RXCUI2atc4.csv", pa.table({
        "YEAR": [2016] * len(rows), "MONTH": [1] * len(rows), "NDC": [ndc_of_rx.get(r, "0") for r, _ in rows],
        "RXCUI": [r for r, _ in rows], "ATC4": [a for _, a in rows],
    }))

    # SafeDrug drug-atc.csv: one PubChem CID per class, listing the class's ATC4 codes.
    m = len(w.med_codes)
    cids = [f"CID{x:09d}" for x in rng.choice(10**7, size=m, replace=False)]
    atc_of_class: list[list[str]] = [[] for _ in range(m)]
    for c, a in zip(prod["rx_class"], prod["atc4"]):
        atc_of_class[c].append(a)
    (d / "drug-atc.csv").write_text("".join(f"{cid},{','.join(a)}\n" for cid, a in zip(cids, atc_of_class)), encoding="utf-8")

    # TWOSIDES drug-DDI.csv: each DDI class pair with one or two side effects (12 types, so a
    # "top-40 side effects" filter in either direction keeps them all).
    a, b = np.nonzero(np.triu(w.ddi, 1))
    effects = rng.integers(0, len(SIDE_EFFECTS), (len(a), 2))
    twice = rng.random(len(a)) < 0.3
    lines = ["STITCH 1,STITCH 2,Polypharmacy Side Effect,Side Effect Name\n"]
    for i, j, e, t in zip(a, b, effects, twice):
        for k in e[: 1 + int(t)]:
            lines.append(f"{cids[i]},{cids[j]},{SIDE_EFFECTS[k][0]},{SIDE_EFFECTS[k][1]}\n")
    (d / "drug-DDI.csv").write_text("".join(lines), encoding="utf-8")

