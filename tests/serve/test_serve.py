"""`leader-edge serve` over real HTTP: JSON in, the same answer as in-process, bad input named by
field with the server still up, the token, metrics and the OpenAPI description."""

import json
import subprocess
import sys
import time

import pytest
from conftest import TOKEN, Server

from leader_edge.bedside.runtime import Bundle


def visit(vid, time, dx=(), px=(), rx=(), **profile):
    return {"visit_id": vid, "visit_time": time, "diagnoses": list(dx), "procedures": list(px),
            "medications": list(rx), "profile": profile}


P1 = {"patient_id": "p1", "visits": [visit("v1", "2100-01-01", ["D1", "D2"], ["P1"], ["M1"], insurance="Private"),
                                     visit("v2", "2100-02-01T08:00:00", ["D1", "X9"], insurance="Private")]}
P2 = {"patient_id": "p2", "visits": [visit("v3", "2100-01-01", ["D1", "D2", "D3"], ["P2"], ["M5"], insurance="Medicare")]}


def records(patients):
    """The in-process answer: the core's `Bundle.recommend` on the same visits."""
    return [[{"patient_id": p["patient_id"], **v} for v in p["visits"]] for p in patients]


def test_serve_recommend_json_matches_in_process(server, bundle_dir):
    r = server.client.post("/v1/recommend", json={"patients": [P1, P2], "all_scores": True})
    assert r.status_code == 200, r.text
    body = r.json()
    bundle = Bundle.load(bundle_dir)
    assert body["bundle"]["id"] == bundle.manifest["digest"]["sha256"][:16]
    assert body["threshold"] == bundle.threshold == 0.5
    want = bundle.recommend(records([P1, P2]))
    got = body["results"]
    assert [(g["patient_id"], g["visit_id"]) for g in got] == [("p1", "v2"), ("p2", "v3")]
    for g, w in zip(got, want):
        assert g["medications"] == w["medications"] and g["scores"] == w["scores"]
        assert g["ddi_warnings"] == w["ddi_warnings"] and g["unknown_codes"] == w["unknown_codes"]
    assert got[0]["unknown"] == {"diagnoses": ["X9"]} and got[1]["unknown"] == {}
    assert got[1]["medications"] == ["M6", "M5", "M4"] and got[1]["ddi_warnings"] == [["M5", "M6"]]


def test_serve_recommend_one_patient_top_k_threshold(server):
    r = server.client.post("/v1/recommend", json={"patient": P2, "top_k": 2})
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["medications"] == ["M6", "M5"] and list(res["scores"]) == ["M6", "M5"] and r.json()["top_k"] == 2
    r = server.client.post("/v1/recommend", json={"patient": P2, "threshold": 0.99})
    assert r.json()["results"][0]["medications"] == [] and r.json()["threshold"] == 0.99


BAD = [  # (request, status, field, words in the message)
    ({"patient": {**P1, "visits": [{k: v for k, v in P1["visits"][0].items() if k != "visit_time"}]}}, 422,
     "patient.visits[0].visit_time", "required"),
    ({"patient": {**P1, "visits": [visit("v1", "2100-01-01", ["D1 D2"])]}}, 422, "patient.visits[0].diagnoses[0]", "pattern"),
    ({"patient": {**P1, "visits": [visit("v1", "2100-01-01", ["D1;D2"])]}}, 422, "patient.visits[0].diagnoses[0]", "pattern"),
    ({"patient": {**P1, "visits": [{**visit("v1", "2100-01-01"), "diagnosis": ["D1"]}]}}, 422,
     "patient.visits[0].diagnosis", "Extra inputs"),
    ({"patient": P1, "patients": [P2]}, 422, "body", "either 'patient'"),
    ({"patient": P2, "threshold": 2}, 422, "threshold", "less than or equal"),
    ({"patient": P2, "top_k": 0}, 422, "top_k", "greater than or equal"),
    ({"patient": {**P1, "visits": []}}, 422, "patient.visits", "at least 1"),
    ({"patients": [{**P1, "visits": [visit("v1", "01/02/2100")]}]}, 422, "patients[0].visits[0].visit_time", "ISO 8601"),
    ({"patients": [{**P1, "visits": [visit("v1", "2100-02-01"), visit("v2", "2100-01-01")]}]}, 422,
     "patients[0].visits[1].visit_time", "earlier"),
    ({"patients": [{**P1, "visits": [visit("v1", "2100-02-01"), visit("v2", "2100-01-01")]}]}, 422,
     "patients[0].visits[1].visit_time", "previous visit at patients[0].visits[0] ("),  # not "on line 2" of no file
    ({"patients": [P1, {**P2, "visits": [visit("v1", "2100-01-01")]}]}, 422, "patients[1].visits[0].visit_id",
     "already used at patients[0].visits[0]"),
    ({"patients": [{**P1, "patient_id": "=cmd()"}]}, 422, "patients[0].patient_id", "formula"),
    ({"patients": [P2] * 9}, 422, "patients", "limit is 8"),
    ({"patient": P2, "explain": True}, 422, "explain", "no explanation graph"),  # a bundle exported without one
    # strict option types: lax parsing took `true` for 1.0 (no medication) and "5" for 5
    ({"patient": P2, "threshold": True}, 422, "threshold", "valid number"),
    ({"patient": P2, "threshold": "0.5"}, 422, "threshold", "valid number"),
    ({"patient": P2, "top_k": True}, 422, "top_k", "valid integer"),
    ({"patient": P2, "top_k": "5"}, 422, "top_k", "valid integer"),
    ({"patient": P2, "all_scores": "yes"}, 422, "all_scores", "valid boolean"),
    ({"patient": P2, "explain": 1}, 422, "explain", "valid boolean"),
    ({"patient": P2, "top_k": 3, "threshold": 0.9}, 422, "body", "top_k or threshold, not both"),  # was: threshold ignored
    # the reader's errors named `patients[0]` for a request that wrote `patient`
    ({"patient": {**P1, "visits": [visit("v1", "2100-02-01"), visit("v2", "2100-01-01")]}}, 422,
     "patient.visits[1].visit_time", "earlier"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_serve_bad_input_names_the_field(server, case):
    request, status, field, words = BAD[case]
    r = server.client.post("/v1/recommend", json=request)
    assert r.status_code == status, r.text
    errors = r.json()["errors"]
    assert any(e["field"] == field and words in e["message"] for e in errors), errors


def test_serve_bad_bodies_and_server_stays_up(server):
    c = server.client
    assert c.post("/v1/recommend", content=b"{not json").status_code == 400
    assert c.post("/v1/recommend", content=b"\xff\xfe").status_code == 400
    assert c.post("/v1/recommend", content=b"[1, 2]").status_code == 422
    big = c.post("/v1/recommend", content=b" " * 70_000)
    assert big.status_code == 413 and big.json()["errors"][0]["field"] == "body"
    chunked = c.post("/v1/recommend", content=iter([b" " * 40_000, b" " * 40_000]))  # no Content-Length
    assert chunked.status_code == 413
    assert c.get("/v1/recommend").status_code == 405 and c.get("/nope").status_code == 404
    for route in ("/v1/recommend", "/v1/recommend/fhir", "/admin/reload"):  # json.loads: RecursionError, a 500
        deep = c.post(route, content=b"[" * 60_000)
        assert deep.status_code == 400 and "recursion limit" in deep.json()["errors"][0]["message"], (route, deep.text)
        assert c.post(route, content=b'{"bundle": NaN}').status_code == (422 if route == "/v1/recommend" else 400), route
    assert c.post("/v1/recommend", json={"patient": P2}).status_code == 200
    assert c.get("/readyz").json()["status"] == "ready"


def test_serve_token_required_except_health(server):
    import httpx

    for path in ("/healthz", "/readyz"):
        assert httpx.get(server.url + path).status_code == 200
    for method, path in (("POST", "/v1/recommend"), ("POST", "/v1/recommend/fhir"), ("GET", "/metrics"),
                         ("GET", "/openapi.json"), ("POST", "/admin/reload")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.request(method, server.url + path, json={"patient": P2}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
    assert server.client.post("/v1/recommend", json={"patient": P2}).status_code == 200


def test_serve_metrics_and_openapi(server, bundle_dir):
    server.client.post("/v1/recommend", json={"patient": P2})
    server.client.post("/v1/recommend", json={"patient": {}})
    text = server.client.get("/metrics").text
    bundle_id = Bundle.load(bundle_dir).manifest["digest"]["sha256"][:16]
    assert f'bundle_id="{bundle_id}"' in text and "leader_edge_model_info{" in text
    assert 'leader_edge_requests_total{route="/v1/recommend",code="200"}' in text
    assert 'leader_edge_request_errors_total{route="/v1/recommend",code="422"}' in text
    assert 'leader_edge_request_duration_seconds_bucket{route="/v1/recommend",le="+Inf"}' in text
    assert "leader_edge_patients_total" in text
    doc = server.client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and {"/v1/recommend", "/v1/recommend/fhir", "/metrics"} <= set(doc["paths"])
    visit_schema = doc["components"]["schemas"]["VisitIn"]
    assert {"visit_id", "visit_time"} <= set(visit_schema["required"])


def test_serve_imports_no_torch(bundle_dir):
    code = ("import sys\nimport leader_edge.cli.serve\nfrom leader_edge.serve.app import ServeConfig, create_app\n"
            "from leader_edge.serve.model import Model\n"
            f"m = Model.load({str(bundle_dir)!r})\ncreate_app(ServeConfig(bundle=m.path), m)\n"
            "from leader_edge.serve.schema import RecommendRequest\n"
            "m.recommend(RecommendRequest.model_validate({'patient': {'patient_id': 'p', 'visits': [{'visit_id': 'v', "
            "'visit_time': '2100-01-01', 'diagnoses': ['D1']}]}}).patient_list())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'sklearn', 'pandas')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_cli_refuses_a_bad_bundle_or_empty_token_file(tmp_path, bundle_dir):
    from click.testing import CliRunner

    from leader_edge.cli import main

    result = CliRunner().invoke(main, ["serve", "--bundle", str(tmp_path)])
    assert result.exit_code == 2 and "not a leader-edge bundle" in result.output and "Traceback" not in result.output
    (tmp_path / "token").write_text("\n")
    result = CliRunner().invoke(main, ["serve", "--bundle", str(bundle_dir), "--token-file", str(tmp_path / "token")])
    assert result.exit_code == 2 and "is empty" in result.output
    import socket

    with socket.socket() as taken:  # a port in use: named before the banner (was the banner, then uvicorn's Errno 98)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--bundle", str(bundle_dir), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
    assert "on http://" not in result.output


def test_serve_stalled_body_gets_408_and_a_client_that_leaves_is_no_failure(bundle_dir):
    """A client that stops mid-body held its connection for good, and at SIGTERM its cancelled task
    was a 500 with a traceback; one that disconnects was logged as a failed request with a traceback."""
    import socket

    server = Server(bundle_dir, args=("--body-timeout", "1"))
    try:
        body = json.dumps({"patient": P2}).encode()
        head = (f"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            start = time.monotonic()
            sock.sendall(head + body)  # 100 bytes short, then silence
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 0.5 < time.monotonic() - start < 15 and b"--body-timeout" in answer
        steady = head.replace(f"Content-Length: {len(body) + 100}".encode(), f"Content-Length: {len(body)}".encode())
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(steady)
            step = len(body) // 4 + 1
            for k in range(0, len(body), step):  # 2.4 s in all, never 1 s without a byte: not a stall
                time.sleep(0.6)
                sock.sendall(body[k:k + step])
            assert sock.recv(65536).startswith(b"HTTP/1.1 200"), "a slow steady upload was cut"
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(head + body[:10])  # leaves before the rest
        time.sleep(0.5)
        assert server.client.post("/v1/recommend", json={"patient": P2}).status_code == 200
    finally:
        output = server.stop()
    assert "Traceback" not in output and "failed" not in output, output


def test_serve_metrics_count_only_patients_scored(server):
    """A request the visits reader refuses (422) was counted among the patients scored."""
    def patients() -> int:
        line = next(x for x in server.client.get("/metrics").text.splitlines() if x.startswith("leader_edge_patients_total "))
        return int(float(line.split()[1]))

    before = patients()
    bad = {"patients": [P1, {**P2, "visits": [visit("v1", "2100-01-01")]}]}  # visit v1 twice
    assert server.client.post("/v1/recommend", json=bad).status_code == 422
    assert patients() == before
    assert server.client.post("/v1/recommend", json={"patients": [P1, P2]}).status_code == 200
    assert patients() == before + 2
