"""The evaluation report from fabricated predictions: tables, quality bar, plots, atomic outputs."""

import json

import numpy as np
import pytest

from leader_edge.dataset import dataset_splits, load_dataset, write_dataset
from leader_edge.recs import write_predictions
from leader_edge.synth import synth_dataset
from leader_edge.train.report import quality_bar, write_report


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(synth_dataset(patients=100, seed=5), tmp_path_factory.mktemp("d") / "data", source="synth")


def fabricate(run, data, name, *, noise: float, seed: int = 0):
    """RUN/<name> with predictions = truth blurred by `noise`, and a metrics.json."""
    ds = load_dataset(data)
    test = dataset_splits(ds, seed=42)["test"]
    meds = ds.vocab("medication")
    truth = np.array([[c in s.target.medications for c in meds] for s in test], dtype=float)
    prob = np.clip(truth * (1 - noise) + np.random.default_rng(seed).random(truth.shape) * noise, 0, 1)
    (run / name).mkdir(parents=True)
    write_predictions(run / name / "predictions-test.csv", [s.patient_id for s in test], [s.target.visit_id for s in test],
                      prob, meds, 0.5)
    n_params = {"total": 1234, "trainable": 12} if name == "teacher" else 1234  # the teacher writes both
    (run / name / "metrics.json").write_text(json.dumps({"n_params": n_params, "inference_ms_per_patient": 1.5, "threshold": 0.5}))


def test_write_report_compares_models_by_group_and_writes_plots(data, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"data": str(data), "seed": 42}))
    fabricate(tmp_path, data, "student", noise=0.95)
    fabricate(tmp_path, data, "teacher", noise=0.6)
    (tmp_path / "student" / "history.json").write_text(json.dumps([{"epoch": 1, "train_loss": 0.3, "val_prauc": 0.5},
                                                                    {"epoch": 2, "train_loss": 0.2, "val_prauc": 0.6}]))
    result = write_report(tmp_path)
    assert list(result["models"]) == ["frequency", "student", "teacher"]
    teacher, student = (result["models"][k]["groups"]["overall"]["jaccard"][0] for k in ("teacher", "student"))
    assert teacher > student  # less noise scores higher through the whole pipeline
    for group in ("overall", "single_visit", "multi_visit"):
        mean, std = result["models"]["student"]["groups"][group]["prauc"]
        assert 0 <= mean <= 1 and std >= 0
    report = (tmp_path / "report.md").read_text()
    assert "| teacher |" in report and "Not trained in this run: student-nodistill" in report and "1,234" in report
    assert json.loads((tmp_path / "metrics.json").read_text())["quality_bar"] == result["quality_bar"]
    for png in ("training-curves.png", "metrics-by-group.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_write_report_refuses_predictions_of_another_split(data, tmp_path):
    fabricate(tmp_path, data, "student", noise=0.2)
    lines = (tmp_path / "student" / "predictions-test.csv").read_text().splitlines()
    (tmp_path / "student" / "predictions-test.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(RuntimeError, match="lacks 1 test visit"):
        write_report(tmp_path, data)
    with pytest.raises(RuntimeError, match="names no data directory"):
        write_report(tmp_path)


def test_quality_bar_checks_the_issue_targets():
    def model(jaccard, single_prauc):
        stats = {"jaccard": (jaccard, 0.0), "prauc": (single_prauc, 0.0)}
        return {"groups": {"overall": stats, "single_visit": stats}}

    models = {"frequency": model(0.40, 0.5), "student-nodistill": model(0.44, 0.60), "student": model(0.46, 0.62), "teacher": model(0.50, 0.7)}
    assert [b["passed"] for b in quality_bar(models)] == [True, False, True]
    del models["teacher"]
    assert quality_bar(models)[1]["passed"] is None
