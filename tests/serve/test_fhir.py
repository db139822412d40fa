"""FHIR R4 input over HTTP: a Bundle maps to the same visits as the JSON form (same answer), and every
resource or coding the service cannot use is reported with the reason."""

import pytest
from test_serve import P1

ICD9 = "http://hl7.org/fhir/sid/icd-9-cm"
ATC = "http://www.whocc.no/atc"


def entry(resource, full_url=None):
    return {"fullUrl": full_url or f"urn:uuid:{resource['resourceType'].lower()}-{resource['id']}", "resource": resource}


def coded(system, code):
    return {"coding": [{"system": system, "code": code}]}


def fhir_bundle(extra=()):
    """P1 of the JSON tests as FHIR: two encounters, listed newest first (the service sorts them)."""
    enc = lambda i, start: {"resourceType": "Encounter", "id": i, "subject": {"reference": "Patient/p1"},  # noqa: E731
                            "period": {"start": start}}
    cond = lambda i, code, e, system=ICD9: {"resourceType": "Condition", "id": i, "subject": {"reference": "Patient/p1"},  # noqa: E731
                                            "encounter": {"reference": f"Encounter/{e}"}, "code": coded(system, code)}
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        entry({"resourceType": "Patient", "id": "p1"}),
        entry(enc("v2", "2100-02-01T08:00:00")),
        entry(enc("v1", "2100-01-01")),
        entry(cond("c1", "D1", "v1")), entry(cond("c2", "D2", "v1")),
        entry({"resourceType": "Procedure", "id": "pr1", "subject": {"reference": "Patient/p1"},
               "encounter": {"reference": "Encounter/v1"}, "code": coded(ICD9, "P1")}),
        entry({"resourceType": "MedicationRequest", "id": "m1", "status": "active", "subject": {"reference": "Patient/p1"},
               "encounter": {"reference": "Encounter/v1"}, "medicationCodeableConcept": {"coding": [
                   {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"},
                   {"system": "http://www.whocc.no/atc", "code": "M1"}]}}),
        entry(cond("c3", "D1", "v2")), entry(cond("c4", "X9", "v2")),
        *extra,
    ]}


def test_serve_fhir_bundle_answers_as_json(server):
    json_answer = server.client.post("/v1/recommend", json={"patient": {**P1, "visits": [
        {**v, "profile": {}} for v in P1["visits"]]}}).json()["results"]
    r = server.client.post("/v1/recommend/fhir", json=fhir_bundle(), headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(x["patient_id"], x["visit_id"]) for x in body["results"]] == [("p1", "v2")]
    assert body["results"][0]["medications"] == json_answer[0]["medications"]
    assert body["results"][0]["scores"] == json_answer[0]["scores"]
    assert body["results"][0]["unknown"] == {"diagnoses": ["X9"]}
    report = body["fhir"]
    assert report["unused"] == []
    (rx,) = report["codings"]  # the RxNorm coding: the ATC one of the same request was used
    assert rx["path"] == "medicationCodeableConcept.coding[0]" and "RxNorm" in rx["reason"]
    assert report["visits"] == {"patients[0].visits[0]": "entry[2]", "patients[0].visits[1]": "entry[1]"}


def test_serve_fhir_reports_what_it_cannot_use(server):
    extra = [
        entry({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"}}),
        entry({"resourceType": "Condition", "id": "c9", "subject": {"reference": "Patient/p1"},
               "encounter": {"reference": "Encounter/v2"}, "code": coded("http://snomed.info/sct", "38341003")}),
        entry({"resourceType": "Condition", "id": "c10", "subject": {"reference": "Patient/p1"},
               "code": coded(ICD9, "D3")}),  # no encounter, and the patient has two
        entry({"resourceType": "Condition", "id": "c11", "subject": {"reference": "Patient/p1"},
               "encounter": {"reference": "Encounter/v2"}, "code": coded(ICD9, "D4"),
               "verificationStatus": coded("http://terminology.hl7.org/CodeSystem/condition-ver-status", "entered-in-error")}),
        entry({"resourceType": "Patient", "id": "p9"}),  # no encounter
        entry({"resourceType": "Observation", "id": "o2", "subject": {"reference": "Patient/p1"},
               "contained": [{"resourceType": "Condition", "id": "k1", "code": coded(ICD9, "D3")}]}),  # was: dropped unsaid
        entry({"resourceType": "Observation", "id": "o3", "subject": {"reference": "Patient/p1"},
               "contained": [{"resourceType": 5}, {"resourceType": ["a"]}, None]}),  # odd ones: named, never a 500
    ]
    r = server.client.post("/v1/recommend/fhir?top_k=2", json=fhir_bundle(extra))
    assert r.status_code == 200, r.text
    unused = {u["resource"]: u["reason"] for u in r.json()["fhir"]["unused"] if not u["entry"].endswith(".contained")}
    assert set(unused) == {"Observation/o1", "Condition/c9", "Condition/c10", "Condition/c11", "Patient/p9",
                           "Observation/o2", "Observation/o3"}
    inner = {u["resource"]: u["reason"] for u in r.json()["fhir"]["unused"] if u["entry"].endswith(".contained")}
    assert "1 contained resource(s) (Condition) are not read" in inner["Observation/o2"]
    assert "3 contained resource(s) (?) are not read" in inner["Observation/o3"]
    assert "not read" in unused["Observation/o1"] and "no usable coding" in unused["Condition/c9"]
    assert "no encounter" in unused["Condition/c10"] and "entered-in-error" in unused["Condition/c11"]
    codings = r.json()["fhir"]["codings"]
    assert any(c["system"] == "http://snomed.info/sct" and c["reason"] == "system not read" for c in codings)
    assert len(r.json()["results"][0]["medications"]) == 2


def test_serve_fhir_bad_bundles_name_the_field(server):
    c = server.client
    cases = [
        ({"resourceType": "Patient", "id": "p1"}, "resourceType"),
        ({"resourceType": "Bundle", "entry": []}, "entry"),
        ({"resourceType": "Bundle", "entry": [entry({"resourceType": "Patient", "id": "p1"})]}, "entry"),
    ]
    no_start = fhir_bundle()
    del no_start["entry"][1]["resource"]["period"]
    cases.append((no_start, "entry[1].resource.period.start"))
    bad_time = fhir_bundle()
    bad_time["entry"][1]["resource"]["period"]["start"] = "February 2100"
    cases.append((bad_time, "patients[0].visits[0].visit_time (entry[1])"))  # unsortable: Bundle order
    for document, field in cases:
        r = c.post("/v1/recommend/fhir", json=document)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == field, r.json()
    r = c.post("/v1/recommend/fhir?threshold=high", json=fhir_bundle())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "threshold"
    r = c.post("/v1/recommend/fhir?top_k=2&threshold=0.9", json=fhir_bundle())  # was: the threshold ignored
    assert r.status_code == 422 and "not both" in r.json()["errors"][0]["message"]
    assert c.post("/v1/recommend/fhir", content=b"<Bundle/>").status_code == 400


def test_serve_fhir_malformed_resources_never_500(server):
    """Wrong types anywhere in a Bundle: a 200 with the resource reported, or a 422 naming the field."""
    weird = [None, 3, "x", [], {}, {"reference": 5}, {"coding": "x"}, {"coding": [None, {"system": 1, "code": []}]}]
    statuses = set()
    for value in weird:
        for field in ("subject", "encounter", "code", "period", "medicationCodeableConcept", "verificationStatus"):
            doc = fhir_bundle()
            for e in doc["entry"][1:]:
                e["resource"][field] = value
            r = server.client.post("/v1/recommend/fhir", json=doc)
            statuses.add(r.status_code)
            assert r.status_code in (200, 422), (field, value, r.text)
            if r.status_code == 422:
                assert r.json()["errors"][0]["field"]
    for entries in (None, "x", [None, 1, "x", {"resource": 3}], [{"resource": {"resourceType": 7}}]):
        r = server.client.post("/v1/recommend/fhir", json={"resourceType": "Bundle", "entry": entries})
        assert r.status_code == 422, r.text
    assert statuses == {200, 422}


def urn(n):
    return f"urn:uuid:00000000-0000-4000-8000-{n:012d}"


def transaction(extra=()):
    """Two patients as a FHIR transaction Bundle: no resource has an id, references are fullUrls."""
    def res(n, resource):
        return {"fullUrl": urn(n), "resource": resource}

    def enc(n, patient, start):
        return res(n, {"resourceType": "Encounter", "subject": {"reference": urn(patient)}, "period": {"start": start}})

    def cond(n, encounter, code):
        return res(n, {"resourceType": "Condition", "encounter": {"reference": urn(encounter)}, "code": coded(ICD9, code)})

    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        res(1, {"resourceType": "Patient"}), res(2, {"resourceType": "Patient"}),
        enc(3, 1, "2100-01-01"), enc(4, 2, "2100-01-02"), cond(5, 3, "D1"), cond(6, 3, "X9"), cond(7, 4, "D2"), *extra]}


def test_serve_fhir_resources_without_ids_stay_apart(server):
    r = server.client.post("/v1/recommend/fhir", json=transaction())
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [(x["patient_id"], x["visit_id"]) for x in got] == [(urn(1), urn(3)), (urn(2), urn(4))]
    want = server.client.post("/v1/recommend", json={"patients": [
        {"patient_id": "a", "visits": [{"visit_id": "a1", "visit_time": "2100-01-01", "diagnoses": ["D1", "X9"]}]},
        {"patient_id": "b", "visits": [{"visit_id": "b1", "visit_time": "2100-01-02", "diagnoses": ["D2"]}]}]}).json()
    assert [(x["scores"], x["unknown"]) for x in got] == [(x["scores"], x["unknown"]) for x in want["results"]]
    assert got[0]["unknown"] == {"diagnoses": ["X9"]} and r.json()["fhir"]["unused"] == []


def test_serve_fhir_unresolved_or_crossed_references_are_reported(server):
    extra = [{"fullUrl": urn(8), "resource": {"resourceType": "Condition", "encounter": {"reference": urn(99)},
                                                "code": coded(ICD9, "D3")}},
             {"fullUrl": urn(9), "resource": {"resourceType": "Condition", "encounter": {"reference": urn(3)},
                                                "subject": {"reference": urn(2)}, "code": coded(ICD9, "D3")}},
             {"fullUrl": urn(10), "resource": {"resourceType": "Encounter", "subject": {"reference": "Patient/nobody"},
                                                 "period": {"start": "2100-05-01"}}}]
    r = server.client.post("/v1/recommend/fhir", json=transaction(extra))
    assert r.status_code == 200, r.text
    unused = {u["resource"]: u["reason"] for u in r.json()["fhir"]["unused"]}
    assert set(unused) == {urn(8), urn(9), urn(10)}
    assert "names no entry" in unused[urn(8)] and "not the patient of its encounter" in unused[urn(9)]
    assert "'Patient/nobody' names no entry" in unused[urn(10)]
    assert [x["unknown"] for x in r.json()["results"]] == [{"diagnoses": ["X9"]}, {}]  # D3 went nowhere
    twice = transaction([{"fullUrl": urn(4), "resource": {"resourceType": "Patient"}}])
    r = server.client.post("/v1/recommend/fhir", json=twice)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "entry[7].fullUrl", r.text
    assert "also names entry[3]" in r.json()["errors"][0]["message"]


def test_serve_fhir_skips_resources_whose_status_states_no_fact(server):
    def med(i, status, code="M2", **more):
        return entry({"resourceType": "MedicationRequest", "id": i, "status": status, "subject": {"reference": "Patient/p1"},
                      "encounter": {"reference": "Encounter/v1"}, "medicationCodeableConcept": coded(ATC, code), **more})

    ver = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    extra = [
        entry({"resourceType": "Encounter", "id": "v9", "status": "cancelled", "subject": {"reference": "Patient/p1"},
               "period": {"start": "2100-03-01"}}),  # the newest: it would be the visit recommended for
        entry({"resourceType": "Condition", "id": "c20", "encounter": {"reference": "Encounter/v9"}, "code": coded(ICD9, "D3")}),
        entry({"resourceType": "Condition", "id": "c21", "encounter": {"reference": "Encounter/v2"}, "code": coded(ICD9, "D3"),
               "verificationStatus": coded(ver, "refuted"), "clinicalStatus": coded(ver, "active")}),
        entry({"resourceType": "Condition", "id": "c22", "encounter": {"reference": "Encounter/v2"}, "code": coded(ICD9, "D4"),
               "clinicalStatus": {"coding": [{"code": "resolved"}]}}),  # resolved now, diagnosed then: read
        entry({"resourceType": "Procedure", "id": "pr2", "status": "not-done", "encounter": {"reference": "Encounter/v1"},
               "code": coded(ICD9, "P2")}),
        med("m2", "cancelled"), med("m3", "draft"), med("m4", "entered-in-error"), med("m5", "active", doNotPerform=True),
        med("m6", "stopped", "M3"),  # prescribed, then stopped: read
    ]
    r = server.client.post("/v1/recommend/fhir", json=fhir_bundle(extra))
    assert r.status_code == 200, r.text
    unused = {u["resource"]: u["reason"] for u in r.json()["fhir"]["unused"]}
    assert unused == {
        "Encounter/v9": "status 'cancelled': the encounter was cancelled",
        "Condition/c20": "its encounter Encounter/v9 (entry[9]) is not used: status 'cancelled': the encounter was cancelled",
        "Condition/c21": "verificationStatus 'refuted': the diagnosis was refuted",
        "Procedure/pr2": "status 'not-done': the procedure was not done",
        "MedicationRequest/m2": "status 'cancelled': withdrawn before any administration",
        "MedicationRequest/m3": "status 'draft': a draft, not yet prescribed",
        "MedicationRequest/m4": "status 'entered-in-error': entered in error",
        "MedicationRequest/m5": "doNotPerform: an order not to give it"}
    (res,) = r.json()["results"]
    assert res["visit_id"] == "v2" and res["unknown"] == {"diagnoses": ["X9"]}
    json_p1 = {**P1, "visits": [{**P1["visits"][0], "medications": ["M1", "M3"], "profile": {}},
                                {**P1["visits"][1], "diagnoses": ["D1", "X9", "D4"], "profile": {}}]}
    assert res["scores"] == server.client.post("/v1/recommend", json={"patient": json_p1}).json()["results"][0]["scores"]


@pytest.fixture(scope="module")
def prefixed_dir(tmp_path_factory):
    """The fake model in a bundle whose vocabulary writes diagnoses as MIMIC-IV does: a FHIR ICD-9 `D1`
    is `D1` for bundle_dir and `ICD9_D1` for this one (procedures alike)."""
    import test_runtime

    from leader_edge.bedside.encoding import Encoder

    e = test_runtime.ENCODER
    prefixed = Encoder({**e.codes, **{k: [f"ICD9_{c}" for c in e.codes[k]] for k in ("diagnosis", "procedure")}},
                       e.profile_values)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_runtime, "ENCODER", prefixed)
        return test_runtime.write_fake_bundle(tmp_path_factory.mktemp("prefixed"))


def test_serve_fhir_is_mapped_by_the_bundle_that_scores_it(bundle_dir, prefixed_dir, monkeypatch):
    """A swap between a FHIR request's parse and its model call (forced here): the request is mapped
    again with the vocabulary of the bundle that scores it and is named in the answer."""
    from starlette.testclient import TestClient

    from leader_edge.serve import fhir
    from leader_edge.serve.app import ServeConfig, create_app
    from leader_edge.serve.model import Model
    from leader_edge.serve.schema import PatientIn

    a, b = Model.load(bundle_dir), Model.load(prefixed_dir)
    app = create_app(ServeConfig(bundle=bundle_dir), a)
    mapped_for, to_patients = [], fhir.to_patients

    def map_then_swap(document, vocab, profile_fields):
        mapped_for.append("b" if vocab is b.codes else "a")
        app.state.service.model = b  # the swap lands after this request's parse, before its batch
        return to_patients(document, vocab, profile_fields)

    monkeypatch.setattr(fhir, "to_patients", map_then_swap)
    with TestClient(app) as client:
        r = client.post("/v1/recommend/fhir", json=fhir_bundle())
    assert r.status_code == 200, r.text
    assert mapped_for == ["a", "b"] and r.json()["bundle"]["id"] == b.id
    (res,) = r.json()["results"]
    assert res["unknown"] == {"diagnoses": ["ICD9_X9"]}  # mapped for a: D1 and X9 unknown to b
    prefixed_p1 = {**P1, "visits": [{**v, **{k: [f"ICD9_{c}" for c in v[k]] for k in ("diagnoses", "procedures")},
                                     "profile": {}} for v in P1["visits"]]}
    (want,) = b.recommend([PatientIn.model_validate(prefixed_p1)])
    assert res["medications"] == want["medications"] and res["scores"] == want["scores"]
