"""The visits reader: the same tables whichever checks ran (whole-block or row by row, plain split or
csv.reader), the first bad line named, whole patients per chunk."""

import io

import numpy as np
import pytest

from leader_edge.bedside import csv_stream, visit_records, visit_stream
from leader_edge.bedside.visit_stream import _SeenIds, read_patients

DIAG = [f"D{i}" for i in range(12)]
PROC = ["P1", "P22", "P333"]
MEDS = ["M1", "M22", "M3", "M4444", "M5"]
HEADER = "patient_id,visit_id,visit_time,diagnoses,procedures,medications,profile_insurance\n"


def _random_csv(seed: int, patients: int = 60) -> str:
    """Visits with unknown and repeated codes, lists over the 4-code cap, empty lists, histories
    longer than the 3-visit cap, whitespace to strip and a profile field the encoder lacks."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        for v in range(int(rng.integers(1, 6))):
            lists = []
            for vocab in (DIAG, PROC, MEDS):
                codes = [str(c) for c in rng.choice(vocab + ["X9", "Y8"], size=int(rng.integers(0, 8)))]
                lists.append(";".join(codes))
            if rng.random() < 0.1:
                lists[0] = " " + lists[0].replace(";", " ; ") + " "
            insurance = rng.choice(["Medicare", "Private", "Other", ""])
            rows.append(f"p{p},v{p}_{v},2100-01-{v + 1:02d},{lists[0]},{lists[1]},{lists[2]},{insurance}\n")
    return HEADER + "".join(rows)


def _tables(text: str, chunk_patients: int) -> list:
    return list(read_patients(io.BytesIO(text.encode()), "visits.csv", chunk_patients=chunk_patients))


def test_visit_stream_block_checks_agree_with_row_checks(monkeypatch):
    text = _random_csv(3, patients=200)
    fast = _tables(text, chunk_patients=50)
    monkeypatch.setattr(csv_stream, "BLOCK_BYTES", 300)  # chunk and block edges fall mid-patient
    small = _tables(text, chunk_patients=50)
    monkeypatch.setattr(visit_stream._Reader, "_fast", lambda self, rows, lines: False)
    slow = _tables(text, chunk_patients=50)
    monkeypatch.setattr(csv_stream.Lines, "take_plain", lambda self: None)  # csv.reader for every block
    slow_csv = _tables(text, chunk_patients=50)
    assert [len(t) for t in fast] == [50, 50, 50, 50]
    for a, b, c, d in zip(fast, small, slow, slow_csv):
        for t in (b, c, d):
            assert (t.patient_ids, t.visit_ids, t.codes, t.profile, t.times) == (a.patient_ids, a.visit_ids, a.codes,
                                                                                   a.profile, a.times)
            np.testing.assert_array_equal(t.starts, a.starts)
            np.testing.assert_array_equal(t.lines, a.lines)
    assert " " not in "".join(fast[0].codes["diagnoses"])  # whitespace normalised on the row path
    last = fast[-1]
    assert last.row_patients()[-1] == last.patient_ids[-1] and len(last.row_patients()) == len(last.visit_ids)
    assert last.times[0].year == 2100 and len(last.times) == len(last.visit_ids)


def test_visit_stream_multiline_field_keeps_line_numbers():
    text = HEADER + 'p1,v1,2100-01-01,D1,,,"Medi\ncare"\np2,v2,2100-01-01,D1,,,Private\np2,v3,2100-01-01,D1;;D2,,,\n'
    with pytest.raises(visit_stream.DataError, match="line 5, column 'diagnoses'"):
        _tables(text, chunk_patients=10)


def test_visit_stream_first_bad_line_wins_within_a_block():
    text = (HEADER + "p1,v1,2100-01-01,D1,,,\np1,v2,01/02/2100,D1,,,\np2,v3,2100-01-01,D1,,,Priv\xe9\n").encode("latin-1")
    with pytest.raises(visit_stream.DataError, match="line 3, column 'visit_time'"):
        list(read_patients(io.BytesIO(text), "visits.csv"))
    with pytest.raises(visit_stream.DataError, match="line 4.*UTF-8"):
        list(read_patients(io.BytesIO(text.replace(b"01/02/2100", b"2100-01-02")), "visits.csv"))


def test_visit_stream_column_check_equals_regex():
    rng = np.random.default_rng(0)
    alphabet = np.array(["A", "1", ";", "\n", " ", ",", "\t", "\r", "\x1c", "\xe9", "\x85", "\xa0"])
    for _ in range(5000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 8))))
        assert visit_stream._column_ok(text) == (visit_stream._COLUMN_OK.fullmatch(text) is not None), repr(text)


def test_visit_stream_chunks_whole_patients():
    rows = "".join(f"p{i // 2},v{i},2100-01-0{i % 2 + 1},D1,,,\n" for i in range(10))
    chunks = _tables(HEADER + rows, chunk_patients=2)
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert all(c.starts.tolist() == list(range(0, 2 * len(c) + 1, 2)) for c in chunks)


def test_visit_stream_refuses_reappearing_patient():
    rows = "p1,v1,2100-01-01,D1,,,\np2,v2,2100-01-01,D1,,,\np1,v3,2100-01-02,D1,,,\n"
    with pytest.raises(visit_stream.DataError, match="line 4.*reappears"):
        _tables(HEADER + rows, chunk_patients=1)


def test_visit_stream_seen_ids_reports_repeat_across_runs():
    seen = _SeenIds()
    for start in range(0, 1000, 100):
        assert seen.add([f"v{i}" for i in range(start, start + 100)], list(range(start + 2, start + 102))) is None
    assert len(seen._runs) < 10  # runs were merged
    assert seen.add(["new", "v417"], [5000, 5001]) == (5001, 419)


def test_visit_stream_refuses_an_id_with_a_line_break():
    text = HEADER + 'p1,v1,2100-01-01,D1,,,\n"p\n2",v2,2100-01-01,D1,,,\n'
    with pytest.raises(visit_stream.DataError, match="line 3, column 'patient_id'.*line break"):
        _tables(text, chunk_patients=10)


@pytest.mark.parametrize("block", [1 << 19, 100, 110, 120, 130])
def test_visit_stream_nul_is_refused_when_a_quoted_record_pulls_in_the_next_block(monkeypatch, block):
    """A multi-line quoted field makes csv.reader read on into the next block; a NUL there must still be
    refused, whatever the block size (with 100-130 byte blocks the NUL rows were accepted before)."""
    monkeypatch.setattr(csv_stream, "BLOCK_BYTES", block)
    header = "patient_id,visit_id,visit_time,diagnoses,procedures,medications,profile_insurance\n"
    text = header + 'p1,v1,2100-01-01,D1,,,"Pri\nvate"\np2\0x,v2,2100-01-01,D1,,,x\np3,v3,2100-01-01,D1\0,,,x\n'
    with pytest.raises(visit_stream.DataError, match="NUL") as e:
        list(read_patients(io.BytesIO(text.encode()), "v.csv"))
    assert e.value.line == 4  # the row of p2 (the quoted record spans lines 2-3)


def test_visit_stream_records_take_code_lists_of_any_iterable_and_refuse_none():
    rec = {"patient_id": "p1", "visit_id": "v1", "visit_time": "2100-01-01", "procedures": [], "medications": []}
    table = visit_records.read_records([[{**rec, "diagnoses": (c for c in ["D1", "D2"])}]], "request")
    assert table.codes["diagnoses"] == ["D1;D2"]  # a generator was read once, not consumed by a check first
    with pytest.raises(visit_stream.DataError, match="diagnoses is NoneType None, not a list of codes"):
        visit_records.read_records([[{**rec, "diagnoses": None}]], "request")


def test_visit_stream_names_a_split_patient_before_a_later_bad_row():
    """The id checks run when a chunk is taken; a bad row later in the same chunk must not be named first."""
    header = "patient_id,visit_id,visit_time,diagnoses,procedures,medications\n"
    rows = ["p1,v1,2100-01-01,D1,,", "p2,v2,2100-01-01,D1,,", "p1,v3,2100-02-01,D1,,",  # p1 reappears: line 4
            "p3,v4,2100-01-01,D1,,", "p3,v5,not-a-time,D1,,"]  # a bad time: line 6
    with pytest.raises(visit_stream.DataError) as e:
        list(read_patients(io.BytesIO((header + "\n".join(rows) + "\n").encode()), "v.csv"))
    assert e.value.line == 4 and e.value.column == "patient_id", str(e.value)
    rows[2] = "p9,v1,2100-02-01,D1,,"  # a repeated visit id on line 4, the same bad time on line 6
    with pytest.raises(visit_stream.DataError) as e:
        list(read_patients(io.BytesIO((header + "\n".join(rows) + "\n").encode()), "v.csv"))
    assert e.value.line == 4 and e.value.column == "visit_id", str(e.value)
