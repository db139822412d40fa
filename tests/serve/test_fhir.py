"""FHIR R4 input over HTTP: a Bundle maps to the same visits as the JSON form (same answer), and every
resource or coding the service cannot use is reported with the reason."""

from test_serve import P1

ICD9 = "http://hl7.org/fhir/sid/icd-9-cm"


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
    ]
    r = server.client.post("/v1/recommend/fhir?top_k=2", json=fhir_bundle(extra))
    assert r.status_code == 200, r.text
    unused = {u["resource"]: u["reason"] for u in r.json()["fhir"]["unused"]}
    assert set(unused) == {"Observation/o1", "Condition/c9", "Condition/c10", "Condition/c11", "Patient/p9"}
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
