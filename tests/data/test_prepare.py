"""`leader-edge prepare`: MIMIC-III demo, synthetic MIMIC-III, MIMIC-IV shape, map parsers, located errors."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from leader_edge.cli import main
from leader_edge.data.dataset import load_dataset
from leader_edge.errors import DataError
from leader_edge.data.sources import maps
from leader_edge.data.sources.mimic import PrepareConfig, prepare_mimic
from leader_edge.data.sources.tables import nearest_century, parse_times

from test_faults_prepare import MIMIC3 as DEMO, NDC_MAP, require_shared  # ../shared/data; missing fails

TABLES = ("ADMISSIONS", "DIAGNOSES_ICD", "PROCEDURES_ICD", "PRESCRIPTIONS", "D_ICD_DIAGNOSES", "D_ICD_PROCEDURES")


@pytest.fixture(scope="module")
def demo() -> Path:
    require_shared(DEMO / "ADMISSIONS.csv", NDC_MAP)
    return DEMO


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def _write(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _prepare(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["prepare", *map(str, args)])
    return res.exit_code, res.output


def _rxcui_demo(root: Path, out: Path, *extra: str) -> Path:
    code, output = _prepare("mimic3", "--root", root, "--out", out, "--med-level", "rxcui", "--ndc-rxcui", NDC_MAP, *extra)
    assert code == 0, output
    return out


def test_prepare_demo_end_to_end_rxcui(demo: Path, tmp_path: Path) -> None:
    code, output = _prepare("mimic3", "--root", demo, "--out", tmp_path / "ds", "--med-level", "rxcui", "--ndc-rxcui", NDC_MAP)
    assert code == 0, output
    assert "prescriptions.ndc_zero" in output and "patients" in output  # the statistics table
    ds = load_dataset(tmp_path / "ds")
    c = ds.counts()
    assert 60 <= c["patients"] <= 100 and c["visits"] > c["patients"]
    assert all(v.diagnoses and v.procedures and v.medications for v in ds.visits)  # present in all three tables
    for visits in ds.patients().values():
        assert [v.time for v in visits] == sorted(v.time for v in visits)
    assert c["medication_codes"] == 300  # --top-medications default
    assert "0389" in ds.vocab("diagnosis")  # leading zeros kept
    assert ds.name("diagnosis", "0389") == "Septicemia NOS"  # D_ICD_DIAGNOSES short title
    assert set(ds.profile_fields) == {"insurance", "language", "religion", "marital_status", "ethnicity"}

    # The NDC "0"/empty count equals an independent count over the demo's prescriptions.
    _, rx = _rows(demo / "PRESCRIPTIONS.csv")
    filters = {f["step"]: f for f in ds.meta["filters"]}
    assert filters["prescriptions.ndc_zero"]["removed_rows"] == sum(r["NDC"].strip("0 ") == "" for r in rx)
    # Every visit dropped is accounted for by a recorded step.
    _, adm = _rows(demo / "ADMISSIONS.csv")
    dropped = sum(f.get("removed_visits", 0) for f in ds.meta["filters"])
    assert len(adm) - dropped == c["visits"]


def test_prepare_two_digit_years_land_on_first_prescription_day(demo: Path, tmp_path: Path) -> None:
    ds = load_dataset(_rxcui_demo(demo, tmp_path / "ds"))
    _, rx = _rows(demo / "PRESCRIPTIONS.csv")
    first: dict[str, datetime] = {}
    for r in rx:
        if r["STARTDATE"]:
            t = datetime.fromisoformat(r["STARTDATE"])
            first[r["HADM_ID"]] = min(first.get(r["HADM_ID"], t), t)
    gaps = [abs(first[v.visit_id] - v.time) for v in ds.visits]
    assert max(gaps) < timedelta(days=60), "M/D/YY must land in the century of the visit's ISO prescription dates"
    step = {f["step"]: f for f in ds.meta["filters"]}["admissions.two_digit_years"]
    assert "129 ADMITTIME" in step["reason"] and "0 moved" not in step["reason"]  # the demo has 21YY and 22YY years


def test_prepare_demo_atc3_with_tiny_map_and_ddi_pairs(demo: Path, tmp_path: Path) -> None:
    ndc_rxcui = maps.read_ndc_rxcui(NDC_MAP)
    # Each RXCUI gets one of 12 fake ATC4 codes; ATC-3 is its first 4 characters (6 classes).
    atc4 = [f"{a}{b}" for a in ("A02B", "B01A", "C07A", "N02B", "J01D", "C03C") for b in ("A", "B")]
    rows = [{"RXCUI": r, "ATC4": atc4[int(r) % 12]} for r in sorted(set(ndc_rxcui.values()))]
    _write(tmp_path / "RXCUI2atc4.csv", ["RXCUI", "ATC4"], rows)
    (tmp_path / "ddi.csv").write_text("med_a,med_b\nB01A,N02B\nC07A,Z99Z\n", encoding="utf-8")
    code, output = _prepare(
        "mimic3", "--root", demo, "--out", tmp_path / "ds", "--ndc-rxcui", NDC_MAP, "--rxcui-atc", tmp_path / "RXCUI2atc4.csv",
        "--top-medications", "5", "--ddi", tmp_path / "ddi.csv",
    )
    assert code == 0, output
    ds = load_dataset(tmp_path / "ds")
    meds = ds.vocab("medication")
    assert len(meds) == 5 and set(meds) < {a[:4] for a in atc4}
    assert ds.ddi == [("B01A", "N02B")]  # Z99Z is not a dataset medication: recorded, not kept
    assert {f["step"]: f for f in ds.meta["filters"]}["ddi.unmapped"]["removed_rows"] == 1
    name = ds.name("medication", meds[0])
    assert name != meds[0] and len(name.split(" / ")) <= 2  # named by its most frequent DRUG strings


def test_prepare_atc_without_map_says_which_option(demo: Path, tmp_path: Path) -> None:
    code, output = _prepare("mimic3", "--root", demo, "--out", tmp_path / "ds", "--ndc-rxcui", NDC_MAP)
    assert code == 2 and "--rxcui-atc" in output and "--med-level rxcui" in output
    assert not (tmp_path / "ds").exists()
    code, output = _prepare("mimic3", "--root", demo, "--out", tmp_path / "ds", "--med-level", "rxcui")
    assert code == 2 and "--ndc-rxcui" in output


def test_prepare_missing_table_names_file_and_fix(demo: Path, tmp_path: Path) -> None:
    root = tmp_path / "m3"
    root.mkdir()
    for t in TABLES:
        if t != "PROCEDURES_ICD":
            shutil.copy(demo / f"{t}.csv", root / f"{t}.csv")
    code, output = _prepare("mimic3", "--root", root, "--out", tmp_path / "ds", "--med-level", "rxcui", "--ndc-rxcui", NDC_MAP)
    assert code == 2 and "PROCEDURES_ICD" in output and "--root" in output and "Traceback" not in output


def test_prepare_bad_date_names_line_and_column(demo: Path, tmp_path: Path) -> None:
    root = tmp_path / "m3"
    for t in TABLES:
        header, rows = _rows(demo / f"{t}.csv")
        if t == "ADMISSIONS":
            rows[3]["ADMITTIME"] = "31/31/99 25:00"  # the 4th row is on line 5
        _write(root / f"{t}.csv", header, rows)
    code, output = _prepare("mimic3", "--root", root, "--out", tmp_path / "ds", "--med-level", "rxcui", "--ndc-rxcui", NDC_MAP)
    assert code == 2 and "ADMISSIONS.csv, line 5, column 'ADMITTIME'" in output and "31/31/99" in output


def test_prepare_lowercase_gz_tables_give_the_same_dataset(demo: Path, tmp_path: Path) -> None:
    root = tmp_path / "lower"
    for t in TABLES:
        header, rows = _rows(demo / f"{t}.csv")
        _write(root / f"{t.lower()}.csv.gz", [h.lower() for h in header], [{k.lower(): v for k, v in r.items()} for r in rows])
    a = _rxcui_demo(demo, tmp_path / "a")
    b = _rxcui_demo(root, tmp_path / "b")
    for name in ("visits.csv", "codes.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_prepare_mimic4_shape_prefixes_icd_versions(demo: Path, tmp_path: Path) -> None:
    """hosp/ layout, lower-case, icd_code + icd_version (9 and 10 mixed), race instead of ethnicity, no religion."""
    hosp = tmp_path / "m4" / "hosp"
    for t in TABLES:
        header, rows = _rows(demo / f"{t}.csv")
        rows = [{k.lower(): v for k, v in r.items()} for r in rows]
        header = [h.lower() for h in header]
        if t == "ADMISSIONS":
            for r in rows:
                r["race"] = r.pop("ethnicity")
                del r["religion"]
            header = [("race" if h == "ethnicity" else h) for h in header if h != "religion"]
        if t in ("DIAGNOSES_ICD", "PROCEDURES_ICD", "D_ICD_DIAGNOSES", "D_ICD_PROCEDURES"):
            for r in rows:
                r["icd_code"], r["icd_version"] = r.pop("icd9_code"), "9"
                r.pop("short_title", None)
            header = ["icd_code", "icd_version", *(h for h in header if h not in ("icd9_code", "short_title"))]
        if t == "DIAGNOSES_ICD":
            rows[0]["icd_code"], rows[0]["icd_version"] = "A419", "10"  # an ICD-10 diagnosis beside ICD-9 ones
        _write(hosp / f"{t.lower()}.csv.gz", header, rows)
    code, output = _prepare("mimic4", "--root", tmp_path / "m4", "--out", tmp_path / "ds", "--med-level", "rxcui",
                            "--ndc-rxcui", NDC_MAP, "--sample-frac", "0.5", "--sample-seed", "7")
    assert code == 0, output
    ds = load_dataset(tmp_path / "ds")
    dx = ds.vocab("diagnosis")
    assert all(c.startswith(("ICD9_", "ICD10_")) for c in dx) and "ICD9_0389" in dx
    assert ds.name("diagnosis", "ICD9_0389") == "Unspecified septicemia"  # long_title
    assert "ICD10_A419" in dx  # its patient (10006) is in the seed-7 half
    assert ds.name("diagnosis", "ICD10_A419").lower().startswith("sepsis")  # ICD-10 name from the ICD package
    assert ds.profile_fields == ["insurance", "language", "marital_status", "race"]
    sample = {f["step"]: f for f in ds.meta["filters"]}["sample_patients"]
    assert sample["removed_patients"] == 50  # 100 demo patients, half kept
    assert ds.meta["options"]["sample_frac"] == 0.5


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory):
    from leader_edge.data.synth import SynthConfig, generate_cohort
    from leader_edge.data.synth_mimic import write_mimic3

    cohort = generate_cohort(SynthConfig(patients=300, seed=5))
    root = write_mimic3(cohort, tmp_path_factory.mktemp("synth") / "m3", seed=5)
    return cohort, root


def test_prepare_synth_mimic3_recovers_the_cohort(synth_root, tmp_path: Path) -> None:
    cohort, root = synth_root
    code, output = _prepare(
        "mimic3", "--root", root, "--out", tmp_path / "ds", "--ndc-rxcui", root / "ndc2rxnorm_mapping.txt",
        "--rxcui-atc", root / "RXCUI2atc4.csv", "--ddi", root / "drug-DDI.csv", "--cid-atc", root / "drug-atc.csv",
        "--ddi-side-effects", "all", "--top-medications", "0", "--top-diagnoses", "0",
    )
    assert code == 0, output
    ds = load_dataset(tmp_path / "ds")
    w = cohort.world
    truth = {str(h): {w.med_codes[i] for i in m} for h, m in zip(cohort.hadm_ids, cohort.medications)}
    exact = sum(set(v.medications) == truth[v.visit_id] for v in ds.visits)
    assert all(set(v.medications) <= truth[v.visit_id] for v in ds.visits)
    assert exact >= 0.9 * len(ds.visits)  # the rest lost a class to a planted NDC/RXCUI map gap
    world_ddi = {(min(w.med_codes[i], w.med_codes[j]), max(w.med_codes[i], w.med_codes[j]))
                 for i, j in zip(*w.ddi.nonzero())}
    assert ds.ddi and set(ds.ddi) <= world_ddi
    assert 0.85 * len(cohort.hadm_ids) <= len(ds.visits) < len(cohort.hadm_ids)  # planted visits without rx/procedures


def test_prepare_synth_top_n_and_min_visits(synth_root) -> None:
    _, root = synth_root
    cfg = PrepareConfig(source="mimic3", root=root, ndc_rxcui=root / "ndc2rxnorm_mapping.txt",
                        rxcui_atc=root / "RXCUI2atc4.csv", top_diagnoses=50, top_medications=20, min_visits=2)
    ds = prepare_mimic(cfg)
    assert len(ds.vocab("diagnosis")) == 50 and len(ds.vocab("medication")) == 20
    assert min(len(v) for v in ds.patients().values()) >= 2
    steps = {f["step"]: f for f in ds.meta["filters"]}
    assert steps["patients.min_visits"]["removed_patients"] > 0
    assert steps["diagnoses_icd.top_n"]["removed_codes"] > 0


def test_maps_ndc_rxcui_refuses_code_and_reports_syntax(tmp_path: Path) -> None:
    p = tmp_path / "map.txt"
    p.write_text("__import__('os').system('echo hacked')", encoding="utf-8")
    with pytest.raises(DataError, match="dict literal"):
        maps.read_ndc_rxcui(p)
    p.write_text("{'0001': u'12',\n '0002' '13'}", encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        maps.read_ndc_rxcui(p)
    p.write_text("{'0001': u'12', '0002': u''}", encoding="utf-8")
    assert maps.read_ndc_rxcui(p) == {"0001": "12"}  # '' means unmapped
    p.write_text(" \n", encoding="utf-8")  # was "line 0, column 0"
    with pytest.raises(DataError, match=r"map.txt: is empty\. Fix: pass the ndc2rxnorm_mapping.txt"):
        maps.read_ndc_rxcui(p)
    atc = tmp_path / "RXCUI2atc4.csv"
    atc.write_text("RXCUI,ATC\n1,C07AB\n", encoding="utf-8")  # was "use the table as released by PhysioNet"
    with pytest.raises(DataError, match="missing column.*ATC4.*GAMENet/SafeDrug"):
        maps.read_rxcui_atc(atc)


def test_maps_twosides_least_keeps_the_rarest_side_effects(tmp_path: Path) -> None:
    p = tmp_path / "drug-DDI.csv"
    effects = Counter({"E1": 3, "E2": 2, "E3": 1})
    lines = ["STITCH 1,STITCH 2,Polypharmacy Side Effect,Side Effect Name"]
    for e, n in effects.items():
        lines += [f"CID{e}{i},CIDx,{e},name {e}" for i in range(n)]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    least, stats = maps.read_twosides(p, side_effects="least", top_k=2)
    assert {a for a, _ in least} == {"CIDE20", "CIDE21", "CIDE30"} and stats["types_kept"] == 2
    most, _ = maps.read_twosides(p, side_effects="most", top_k=1)
    assert {a for a, _ in most} == {"CIDE10", "CIDE11", "CIDE12"}
    pairs, lost = maps.map_ddi([("c1", "c2"), ("c1", "c9")], {"A01A", "B01A"}, {"c1": {"A01A"}, "c2": {"B01A", "A01A"}})
    assert pairs == [("A01A", "B01A")] and lost == 1


def test_parse_times_iso_spreadsheet_and_located_error(tmp_path: Path) -> None:
    import pyarrow as pa

    out, two_digit = parse_times(pa.array(["2164-10-23 21:09:00", "10/23/64 21:09", "1/2/2150"]), tmp_path / "A.csv", "admittime")
    assert [str(t) for t in out] == ["2164-10-23T21:09:00", "2164-10-23T21:09:00", "2150-01-02T00:00:00"]
    assert two_digit.tolist() == [False, True, False]
    anchors = np.array(["2202-05-02", "NaT", "NaT"], dtype="datetime64[s]")
    moved, n = nearest_century(np.array(["2102-05-01T22:00", "2102-05-01", "2102-05-01"], dtype="datetime64[s]"), anchors)
    assert str(moved[0]) == "2202-05-01T22:00:00" and str(moved[1]) == "2102-05-01T00:00:00" and n == 1
    with pytest.raises(DataError, match=r"line 3, column 'ADMITTIME'"):
        parse_times(pa.array(["2164-10-23", ""]), tmp_path / "A.csv", "admittime")


def test_prepare_dataset_json_records_options(demo: Path, tmp_path: Path) -> None:
    out = _rxcui_demo(demo, tmp_path / "ds", "--top-diagnoses", "100")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["source"] == "mimic3" and meta["options"]["top_diagnoses"] == 100
    assert meta["counts"]["diagnosis_codes"] == 100
    assert any(f["step"] == "diagnoses_icd.top_n" for f in meta["filters"])
