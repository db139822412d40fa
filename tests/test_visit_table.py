"""The columnar reader and whole-chunk encoder agree with the per-patient `Encoder.encode` path:
same tables whichever checks ran, same arrays, same batches."""

import io

import numpy as np
import pytest

from leader_edge import visit_stream
from leader_edge.encoding import INPUT_NAMES, Encoder
from leader_edge.runtime import read_counts, size_order
from leader_edge.visit_stream import read_patients
from leader_edge.visit_table import encode_table

DIAG = [f"D{i}" for i in range(12)]
PROC = ["P1", "P22", "P333"]
MEDS = ["M1", "M22", "M3", "M4444", "M5"]
ENCODER = Encoder({"diagnosis": DIAG, "procedure": PROC, "medication": MEDS},
                  {"insurance": ["Medicare", "Private"], "language": ["ENGL"]}, max_visits=3, max_codes=4)
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_visit_table_batch_matches_encoder_encode(seed):
    for table in _tables(_random_csv(seed), chunk_patients=17):
        codes = encode_table(ENCODER, table)
        patients = list(table)
        for ends, histories in (
            (table.starts[1:] - 1, [p.visits for p in patients]),
            (np.arange(len(table.visit_ids)), [p.visits[:e] for p in patients for e in range(1, len(p.visits) + 1)]),
        ):
            got, want = codes.batch(ends), ENCODER.encode(histories)
            for name in (*INPUT_NAMES, "target_medications", "unknown"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
            assert codes.size_order(ends).tolist() == size_order(histories, ENCODER.max_visits)
            for table_count, patient_count in zip(codes.read_counts(ends), read_counts(ENCODER, histories)):
                np.testing.assert_array_equal(table_count, patient_count)
            sub = ends[::3]  # a batch of some targets only: widths pad to that batch's longest row
            np.testing.assert_array_equal(codes.batch(sub).diagnoses, ENCODER.encode(histories[::3]).diagnoses)
        assert want.unknown.sum() > 0 and want.diagnoses.shape[2] == ENCODER.max_codes


def test_visit_table_block_checks_agree_with_row_checks(monkeypatch):
    text = _random_csv(3, patients=200)
    fast = _tables(text, chunk_patients=50)
    monkeypatch.setattr(visit_stream, "BLOCK_BYTES", 300)  # chunk and block edges fall mid-patient
    small = _tables(text, chunk_patients=50)
    monkeypatch.setattr(visit_stream._Reader, "_fast", lambda self, rows, lines: False)
    slow = _tables(text, chunk_patients=50)
    monkeypatch.setattr(visit_stream._Lines, "take_plain", lambda self: None)  # csv.reader for every block
    slow_csv = _tables(text, chunk_patients=50)
    assert [len(t) for t in fast] == [50, 50, 50, 50]
    for a, b, c, d in zip(fast, small, slow, slow_csv):
        for t in (b, c, d):
            assert (t.patient_ids, t.visit_ids, t.codes, t.profile) == (a.patient_ids, a.visit_ids, a.codes, a.profile)
            np.testing.assert_array_equal(t.starts, a.starts)
            np.testing.assert_array_equal(t.lines, a.lines)
    assert " " not in "".join(fast[0].codes["diagnoses"])  # whitespace normalised on the row path
    last = fast[-1]
    assert last[-1].patient_id == last.patient_ids[-1] == list(last)[-1].patient_id
    assert [p.patient_id for p in last[1:3]] == last.patient_ids[1:3]
    with pytest.raises(IndexError):
        last[len(last)]


def test_visit_table_multiline_field_keeps_line_numbers():
    text = HEADER + 'p1,v1,2100-01-01,D1,,,"Medi\ncare"\np2,v2,2100-01-01,D1,,,Private\np2,v3,2100-01-01,D1;;D2,,,\n'
    with pytest.raises(visit_stream.DataError, match="line 5, column 'diagnoses'"):
        _tables(text, chunk_patients=10)


def test_visit_table_first_bad_line_wins_within_a_block():
    text = (HEADER + "p1,v1,2100-01-01,D1,,,\np1,v2,01/02/2100,D1,,,\np2,v3,2100-01-01,D1,,,Priv\xe9\n").encode("latin-1")
    with pytest.raises(visit_stream.DataError, match="line 3, column 'visit_time'"):
        list(read_patients(io.BytesIO(text), "visits.csv"))
    with pytest.raises(visit_stream.DataError, match="line 4.*UTF-8"):
        list(read_patients(io.BytesIO(text.replace(b"01/02/2100", b"2100-01-02")), "visits.csv"))


def test_visit_table_column_check_equals_regex():
    rng = np.random.default_rng(0)
    alphabet = np.array(["A", "1", ";", "\n", " ", ",", "\t", "\r", "\x1c", "\xe9", "\x85", "\xa0"])
    for _ in range(5000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 8))))
        assert visit_stream._column_ok(text) == (visit_stream._COLUMN_OK.fullmatch(text) is not None), repr(text)


def test_visit_table_counts_codes_beyond_the_limit():
    """A 7-code visit under a 4-code limit: 3 codes beyond it (repeats and unknown codes are not),
    in the history of the next visit too, but not the current visit's own medications."""
    text = HEADER + ("p1,v1,2100-01-01,D1;D2;D3;D4;D5;D6;D7;D1;X9,P1,M1;M22;M3;M4444;M5,\n"
                     "p1,v2,2100-01-02,D1,,M1;M22;M3;M4444;M5,\n")
    (table,) = _tables(text, chunk_patients=10)
    codes = encode_table(ENCODER, table)
    written, over = codes.read_counts(np.array([0, 1]))
    assert over.tolist() == [3, 3 + 1]  # v2 reads v1's diagnoses and medications (5 > 4) and its own D1
    assert written.tolist() == [9 + 1, 9 + 1 + 5 + 1]
    histories = [p.visits[:e] for p in table for e in (1, 2)]
    assert [a.tolist() for a in read_counts(ENCODER, histories)] == [written.tolist(), over.tolist()]
