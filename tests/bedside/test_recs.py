"""The recommendations format: the one writer (`csv_lines`, `json_records`, `write_predictions`)
checked on literal rows and through the reader, and the reader's located errors."""

import csv
import io
import json

import numpy as np
import pytest

from leader_edge.errors import DataError
from leader_edge.bedside.recs import (
    Prediction,
    Scored,
    csv_lines,
    header,
    json_records,
    prediction_matrices,
    predicted_codes,
    read_predictions,
    score_order,
    write_predictions,
)

MEDS = ["A01", "B02", "C03"]


def test_csv_lines_literal_rows():
    codes = ["A1", "B", "C333"]  # unequal widths: the NUL-padding path
    prob = np.array([[0.9, 0.5, 0.9], [0.00004, 0.2, 0.00006], [0.0, 0.0, 0.0]], dtype=np.float32)
    scored = Scored(["p1", "p,2", 'p"3'], ["v1", "v2", "v3"], prob, np.array([0, 3, 12]))
    got = csv_lines(codes, scored, threshold=0.5, ddi=np.array([[0, 2], [1, 2]]))
    assert got == (b"p1,v1,A1;C333;B,A1:0.9000;C333:0.9000;B:0.5000,A1+C333;B+C333,0\n"  # ties in column order
                   b'"p,2",v2,,B:0.2000;C333:0.0001,,3\n'  # 0.00004 rounds to 0: not listed
                   b'"p""3",v3,,,,12\n')
    assert csv_lines(codes, scored, threshold=0.5, top_k=1).splitlines()[0] == b"p1,v1,A1,A1:0.9000;C333:0.9000;B:0.5000"
    assert header() == b"patient_id,visit_id,medications,scores,ddi_warnings,unknown_codes\n"
    assert header(review=False) == b"patient_id,visit_id,medications,scores\n"


@pytest.mark.parametrize("codes", [["M1", "M22", "M3", "M4444", "M5"], ["M1", 'M"2', "M3", "M4", "M5"]])
def test_csv_lines_read_back_as_written(tmp_path, codes):
    """Random chunks through the reader: the recommended set (threshold, ties in column order), the
    scores at 4 decimals highest first, the pairs inside the set, quoting where a field needs it."""
    rng = np.random.default_rng(0)
    prob = (rng.random((40, len(codes))) ** 3).astype(np.float32)
    prob[:5] = 0.5  # ties at the threshold itself
    ddi = np.array([[0, 2], [3, 4], [1, 4]])
    ids = [f"p{i}" if i % 7 else f"p,{i}" for i in range(40)]
    scored = Scored(ids, [f"v{i}" for i in range(40)], prob, np.arange(40))
    (tmp_path / "r.csv").write_bytes(header() + csv_lines(codes, scored, threshold=0.5, ddi=ddi))
    rows = list(csv.reader(io.StringIO((tmp_path / "r.csv").read_text())))[1:]
    for i, (pred, row) in enumerate(zip(read_predictions(tmp_path / "r.csv"), rows)):
        order = sorted(range(len(codes)), key=lambda j: (-prob[i, j], j))
        assert (pred.patient_id, row[5]) == (ids[i], str(i))
        assert list(pred.medications) == [codes[j] for j in order if prob[i, j] >= 0.5]
        assert list(pred.scores) == [codes[j] for j in order if round(float(prob[i, j]), 4) > 0]
        assert all(abs(pred.scores[c] - prob[i, codes.index(c)]) <= 5e-5 for c in pred.scores)
        inside = [f"{codes[a]}+{codes[b]}" for a, b in ddi if prob[i, a] >= 0.5 and prob[i, b] >= 0.5]
        assert row[4] == ";".join(inside)
    records = list(json_records(codes, scored, threshold=0.5, ddi=ddi))
    assert [r["medications"] for r in records] == [list(p.medications) for p in read_predictions(tmp_path / "r.csv")]
    assert json.loads(json.dumps(records[0]))["unknown_codes"] == 0


def test_score_order_equals_stable_argsort():
    rng = np.random.default_rng(0)
    prob = rng.random((50, 9)).astype(np.float32)
    prob[prob < 0.3] = 0.25  # ties keep column order
    prob[0] = 0.0
    prob[1, 4] = 1.0
    assert np.array_equal(score_order(prob), np.argsort(-prob, axis=1, kind="stable"))
    prob[2, 2] = np.nan  # not a probability: the plain sort, same answer
    assert np.array_equal(score_order(prob), np.argsort(-prob, axis=1, kind="stable"))


def test_write_predictions_round_trip(tmp_path):
    path = tmp_path / "out" / "recs.csv"
    y_prob = np.array([[0.9, 0.2, 0.51], [0.00001, 0.4, 0.3]])
    write_predictions(path, ["p1", "p2"], ["v1", "v2"], y_prob, MEDS, threshold=0.5)
    lines = path.read_text().splitlines()
    assert lines[0] == "patient_id,visit_id,medications,scores"
    assert lines[1] == "p1,v1,A01;C03,A01:0.9000;C03:0.5100;B02:0.2000"
    assert lines[2] == "p2,v2,,B02:0.4000;C03:0.3000"  # 0.00001 rounds to 0: omitted
    preds = read_predictions(path)
    assert preds[0] == Prediction("p1", "v1", ("A01", "C03"), {"A01": 0.9, "C03": 0.51, "B02": 0.2}, line=2)
    y_pred, prob = prediction_matrices(preds, MEDS)
    assert y_pred.tolist() == [[True, False, True], [False, False, False]]
    np.testing.assert_allclose(prob, np.round(y_prob, 4))
    assert not list(tmp_path.glob("out/.recs.csv.*"))  # no temp file left


def test_write_predictions_refuses_bad_input_and_keeps_old_file(tmp_path):
    path = tmp_path / "recs.csv"
    path.write_text("old")
    with pytest.raises(ValueError, match="probabilities"):
        write_predictions(path, ["p"], ["v"], np.array([[1.5, 0, 0]]), MEDS, 0.5)
    with pytest.raises(ValueError, match="shape"):
        write_predictions(path, ["p"], ["v"], np.zeros((1, 2)), MEDS, 0.5)
    assert path.read_text() == "old"


def test_read_predictions_without_scores(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("patient_id,visit_id,medications\np1,v1,A01;B02\np2,v2,\n")
    preds = read_predictions(path)
    assert [p.scores for p in preds] == [None, None]
    y_pred, prob = prediction_matrices(preds, MEDS)
    assert prob is None and y_pred.sum() == 2


@pytest.mark.parametrize(
    "text, line, column, message",
    [
        ("patient_id,visit,medications\n", 1, 2, "unexpected"),
        ("patient_id,visit_id\n", 1, None, "missing column"),
        ("patient_id,visit_id,medications\np,v1,A01\np,v1,B02\n", 3, "visit_id", "already used on line 2"),
        ("patient_id,visit_id,medications\np,v1,A01;;B02\n", 2, "medications", "stray"),
        ("patient_id,visit_id,medications,scores\np,v1,A01,A01:1.2\n", 2, "scores", "outside"),
        ("patient_id,visit_id,medications,scores\np,v1,A01,A01:high\n", 2, "scores", "not a number"),
        ("patient_id,visit_id,medications,scores\np,v1,A01,A01=0.3\n", 2, "scores", "not code:probability"),
        ("patient_id,visit_id,medications,scores\np,v1,A01,A01:0.3;\n", 2, "scores", "stray"),
        ("patient_id,visit_id,medications,scores\np,v1,A01,A01:0.3;A01:0.2\n", 2, "scores", "twice"),
        ("patient_id,visit_id,medications,scores\n,v1,A01,\n", 2, "patient_id", "empty"),
        ("patient_id,visit_id,medications\np,v1,A01,extra\n", 2, None, "fields"),
    ],
)
def test_read_predictions_located_errors(tmp_path, text, line, column, message):
    path = tmp_path / "r.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        read_predictions(path)
    assert (e.value.line, e.value.column) == (line, column)
    assert e.value.fix


def test_read_predictions_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_predictions(tmp_path / "nope.csv")


def test_prediction_matrices_refuse_unknown_code():
    preds = [Prediction("p", "v", ("Z99",))]
    assert predicted_codes(preds) == {"Z99"}
    with pytest.raises(ValueError, match="outside the medication vocabulary"):
        prediction_matrices(preds, MEDS)
