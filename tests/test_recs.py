import numpy as np
import pytest

from leader_edge.errors import DataError
from leader_edge.recs import (
    Prediction,
    prediction_matrices,
    predicted_codes,
    read_predictions,
    write_predictions,
)

MEDS = ["A01", "B02", "C03"]


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
