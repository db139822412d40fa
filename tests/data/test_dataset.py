"""The canonical dataset reader/writer: round trip, validation errors, splits and samples."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from leader_edge.data.dataset import Dataset, FilterLog, Visit, load_dataset, read_codes, read_ddi, read_visits, write_dataset, write_visits
from leader_edge.errors import DataError
from leader_edge.data.splits import dataset_splits, make_samples, split_patients

HEADER = "patient_id,visit_id,visit_time,diagnoses,procedures,medications,profile_insurance\n"


def _visit(pid: str, vid: str, day: int, meds: tuple[str, ...] = ("A01B",)) -> Visit:
    return Visit(pid, vid, datetime(2130, 1, day), ("4019", "25000"), ("3893",), meds, (("insurance", "Medicare"),))


def _write(tmp_path: Path, text: str, name: str = "visits.csv", encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_dataset_round_trip_keeps_everything(tmp_path: Path) -> None:
    visits = [_visit("p1", "v1", 1), _visit("p1", "v2", 5, ()), _visit("p2", "v3", 2)]
    ds = Dataset(visits, names={"diagnosis": {"4019": "Hypertension NOS"}, "procedure": {}, "medication": {"A01B": "x"}},
                 ddi=[("A01B", "C02D")])
    write_dataset(ds, tmp_path / "d", source="test", options={"k": 1})
    back = load_dataset(tmp_path / "d")
    assert back.visits == visits
    assert back.names["diagnosis"] == {"4019": "Hypertension NOS"}
    assert back.ddi == [("A01B", "C02D")]
    assert back.meta["counts"]["patients"] == 2 and back.meta["counts"]["visits"] == 3
    assert back.meta["options"] == {"k": 1}
    assert back.name("diagnosis", "25000") == "25000"  # no name -> the code itself, not dropped


def test_dataset_write_refuses_foreign_directory_and_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="not a leader-edge dataset"):
        write_dataset(Dataset([_visit("p", "v", 1)]), tmp_path / "mine", source="t")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_read_visits_keeps_file_order_and_refuses_another(tmp_path: Path) -> None:
    p = _write(tmp_path, HEADER + "p1,a,2130-01-01T08:00,2,,,M\np1,b,2130-01-01T08:00,1,,,M\np2,c,2130-01-01,,,,M\n")
    assert [v.visit_id for v in read_visits(p)] == ["a", "b", "c"]  # equal times keep file order
    with pytest.raises(DataError, match="earlier than the patient's previous visit on line 2") as e:
        read_visits(_write(tmp_path, HEADER + "p1,b,2130-02-01,1,,,M\np1,a,2130-01-01T08:00,2,,,M\n"))
    assert (e.value.line, e.value.column) == (3, "visit_time") and "sort each patient's visits" in e.value.fix
    with pytest.raises(DataError, match="reappears after other patients' rows") as e:
        read_visits(_write(tmp_path, HEADER + "p1,b,2130-02-01,1,,,M\np2,c,2130-01-01,,,,M\np1,d,2130-03-01,2,,,M\n"))
    assert (e.value.line, e.value.column) == (4, "patient_id")


def test_write_dataset_writes_the_reader_order(tmp_path: Path) -> None:
    late, other, early = _visit("p1", "b", 9), _visit("p2", "c", 1), _visit("p1", "a", 2)
    write_dataset(Dataset([late, other, early]), tmp_path / "d", source="test")
    assert [v.visit_id for v in load_dataset(tmp_path / "d").visits] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("body", "line", "column", "fragment"),
    [
        ("p1,v1,2130-01-01,4019;;25000,,,M\n", 2, "diagnoses", "stray"),
        ("p1,v1,2130-01-01,4019;,,,M\n", 2, "diagnoses", "stray"),
        ("p1,v1,2130-01-01,4019 25000,,,M\n", 2, "diagnoses", "whitespace"),
        ("p1,v1,01/02/2130,,,,M\n", 2, "visit_time", "ISO 8601"),
        ("p1,v1,2130-01-01,,,,M\np2,v1,2130-01-01,,,,M\n", 3, "visit_id", "already used on line 2"),
        (",v1,2130-01-01,,,,M\n", 2, "patient_id", "empty"),
    ],
)
def test_read_visits_names_line_and_column(tmp_path: Path, body: str, line: int, column: str, fragment: str) -> None:
    p = _write(tmp_path, HEADER + body)
    with pytest.raises(DataError) as e:
        read_visits(p)
    assert (e.value.line, e.value.column) == (line, column)
    assert fragment in str(e.value) and "Fix:" in str(e.value)


def test_read_visits_rejects_bad_headers(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing column"):
        read_visits(_write(tmp_path, "patient_id,visit_id,visit_time,diagnoses,procedures\n"))
    with pytest.raises(DataError, match="unexpected column 'insurance'"):
        read_visits(_write(tmp_path, HEADER.strip() + ",insurance\n"))
    with pytest.raises(DataError, match="appears twice"):
        read_visits(_write(tmp_path, HEADER.strip() + ",visit_id\n"))
    with pytest.raises(DataError, match="empty"):
        read_visits(_write(tmp_path, ""))


def test_read_visits_counts_lines_through_quoted_newlines(tmp_path: Path) -> None:
    body = 'p1,v1,2130-01-01,,,,"Medi\ncare"\np1,v2,2130-01-01,,,\n'
    with pytest.raises(DataError) as e:
        read_visits(_write(tmp_path, HEADER + body))
    assert e.value.line == 4 and "fields" in str(e.value)


def test_read_visits_accepts_bom_and_rejects_latin1(tmp_path: Path) -> None:
    assert len(read_visits(_write(tmp_path, "\ufeff" + HEADER + "p1,v1,2130-01-01,,,,M\n"))) == 1
    with pytest.raises(DataError, match="UTF-8"):
        read_visits(_write(tmp_path, HEADER + "p1,v1,2130-01-01,,,,M\u00e9dicare\n", encoding="latin-1"))


def test_read_codes_and_ddi_validate(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown kind 'drug'") as e:
        read_codes(_write(tmp_path, "kind,code,name\ndiagnosis,4019,HTN\ndrug,X,y\n", "codes.csv"))
    assert e.value.line == 3
    with pytest.raises(DataError, match="listed twice"):
        read_codes(_write(tmp_path, "kind,code,name\ndiagnosis,4019,HTN\ndiagnosis,4019,HTN\n", "codes.csv"))
    pairs = read_ddi(_write(tmp_path, "med_a,med_b\nB,A\nA,B\nC,A\n", "ddi.csv"))
    assert pairs == [("A", "B"), ("A", "C")]
    with pytest.raises(DataError, match="with itself"):
        read_ddi(_write(tmp_path, "med_a,med_b\nA,A\n", "ddi.csv"))


def test_split_patients_is_disjoint_complete_and_seeded() -> None:
    ids = [f"p{i}" for i in range(1003)]
    a = split_patients(ids, seed=7)
    assert [len(a[s]) for s in ("train", "val", "test")] == [802, 100, 101]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(ids)
    assert a == split_patients(ids, seed=7)
    assert a["test"] != split_patients(ids, seed=8)["test"]
    with pytest.raises(ValueError, match="sum"):
        split_patients(ids, ratios=(0.5, 0.1, 0.1))


def test_split_patients_safedrug_protocol_is_file_order_two_thirds() -> None:
    ids = [f"p{i}" for i in range(10)]
    # SafeDrug/GAMENet main(): train int(10 * 2/3) = 6; test the next int(4 / 2) = 2; validation the rest
    s = split_patients(ids, seed=7, protocol="safedrug")
    assert s == {"train": ids[:6], "test": ids[6:8], "val": ids[8:]}
    assert s == split_patients(ids, seed=8, protocol="safedrug")  # no shuffle: the seed does not matter
    ds = Dataset([_visit("p1", "a", 1), _visit("p1", "b", 2), _visit("p2", "c", 1), _visit("p3", "d", 1)])
    # 3 patients: train int(2.0) = 2 (p1, p2), test int(1 / 2) = 0, validation p3; every val visit scored
    splits = dataset_splits(ds, protocol="safedrug")
    assert [s.patient_id for s in splits["train"]] == ["p1", "p2"] and splits["test"] == []
    assert [s.target.visit_id for s in splits["val"]] == ["d"]
    with pytest.raises(ValueError, match="unknown protocol"):
        dataset_splits(ds, protocol="gamenet")


def test_make_samples_last_visit_and_all_visits() -> None:
    ds = Dataset([_visit("p1", "a", 1), _visit("p1", "b", 2), _visit("p1", "c", 3), _visit("p2", "d", 1)])
    last = make_samples(ds, ["p1", "p2"])
    assert [(s.target.visit_id, len(s.history)) for s in last] == [("c", 2), ("d", 0)]
    every = make_samples(ds, ["p1"], all_visits=True)
    assert [[v.visit_id for v in s.visits] for s in every] == [["a"], ["a", "b"], ["a", "b", "c"]]
    splits = dataset_splits(ds, seed=1, train_all_visits=True)
    assert sum(len(s) for s in splits.values()) >= 2


def test_filter_log_records_counts() -> None:
    f = FilterLog()
    f.record("top-diagnoses", "keep the 2000 most frequent", rows=12, visits=0)
    assert f.steps == [{"step": "top-diagnoses", "reason": "keep the 2000 most frequent", "removed_rows": 12, "removed_visits": 0}]


def test_read_visits_names_the_line_of_a_latin1_byte(tmp_path) -> None:
    rows = "".join(f"p{i},v{i},2130-01-01,d1,,A\n" for i in range(70))
    raw = ("patient_id,visit_id,visit_time,diagnoses,procedures,medications\n" + rows).encode()
    lines = raw.split(b"\n")
    lines[59] = lines[59].replace(b"d1", b"d\xe91")  # line 60 of the file: 'é' in latin-1
    path = tmp_path / "visits.csv"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as e:
        read_visits(path)
    assert e.value.line == 60 and "0xe9" in str(e.value) and "latin-1" in str(e.value)


def test_write_visits_writes_the_readers_order_and_reads_back(tmp_path):
    from datetime import datetime

    v = lambda p, i, day, prof: Visit(p, i, datetime(2100, 1, day), ("D1",), (), ("M1",), prof)  # noqa: E731
    visits = [v("p2", "b2", 3, (("ins", "x"),)), v("p1", "a1", 2, (("ins", "y"),)), v("p2", "b1", 1, (("ins", "x"),))]
    path = tmp_path / "visits.csv"
    assert write_visits(visits, path, ["ins"]) == 3
    back = read_visits(path)  # the reader refuses split or unordered patients: this passing is the check
    assert [(x.patient_id, x.visit_id) for x in back] == [("p2", "b1"), ("p2", "b2"), ("p1", "a1")]
    assert [dict(x.profile)["ins"] for x in back] == ["x", "x", "y"]
