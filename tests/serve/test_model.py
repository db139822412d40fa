"""The service's adapter in-process: concurrent requests scored together answer as each alone."""

import pytest
from test_serve import P1, P2, visit

from leader_edge.serve.model import Job, Model, RequestError
from leader_edge.serve.schema import PatientIn


@pytest.fixture(scope="module")
def model(bundle_dir) -> Model:
    return Model.load(bundle_dir)


def patients(*ps):
    return [PatientIn.model_validate(p) for p in ps]


def test_serve_model_batch_equals_one_by_one_and_bad_request_fails_alone(model):
    bad = {**P2, "patient_id": "p3", "visits": [visit("v9", "2100-02-01"), visit("v10", "2100-01-01")]}
    jobs = [Job(patients(P1)), Job(patients(P1), top_k=1),  # the same patient twice: the merged read refuses, each passes
            Job(patients(bad)), Job(patients(P2, {**P1, "patient_id": "p4", "visits": [visit("w1", "2100-01-01", ["D3"])]}),
                                     threshold=0.9)]
    together = model.score(jobs)
    assert isinstance(together[2], RequestError) and together[2].field == "patients[0].visits[1].visit_time"
    for job, got in zip(jobs, together):
        if not isinstance(got, RequestError):
            assert got == model.score([job])[0]
    assert len(together[1][0]["medications"]) == 1 and together[0][0]["medications"] != together[1][0]["medications"]
    good = [Job(patients(P1)), Job(patients(P2), all_scores=True)]  # no collision: one read for both
    assert model.score(good) == [model.score([j])[0] for j in good]
    assert len(model.score(good)[1][0]["scores"]) == 6


def test_serve_model_names_everything_it_does_not_read(tmp_path):
    """Known codes past the per-visit limit were only counted in unknown_codes (and which were read
    depended on their order); an unseen profile value and visits older than the model's window
    went unsaid."""
    from test_runtime import write_fake_bundle

    model = Model.load(write_fake_bundle(tmp_path / "b", max_codes=2))
    window = model.bundle.encoder.max_visits
    old = [visit(f"o{i}", f"2099-01-{i + 1:02d}", ["D1"]) for i in range(window)]
    p = {"patient_id": "p1", "visits": [*old, visit("v1", "2100-01-01", ["D1", "D2", "X9", "D3", "D4", "D2"],
                                                     insurance="Gold", ward="B")]}
    (record,) = model.score([Job(patients(p))])[0]
    assert record["unknown"] == {"diagnoses": ["X9"], "over_limit": {"diagnoses": ["D3", "D4"]}, "profile": ["ward"],
                                 "profile_values": {"insurance": "Gold"}, "older_visits": 1}
    assert record["unknown_codes"] == 3  # X9 + D3 + D4, as before
    (plain,) = model.score([Job(patients({"patient_id": "q", "visits": [visit("w", "2100-01-01", ["D1", "D2"])]}))])[0]
    assert plain["unknown"] == {}
