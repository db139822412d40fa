"""Bundle swaps under traffic (SIGHUP and the admin route) and graceful shutdown, on a real server.

"No request dropped or mixed": every request made during three swaps gets a 200, and each answer
equals, for every patient in it, what the bundle it names gives in-process."""

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from conftest import TOKEN, Server
from test_serve import P1, P2

from leader_edge.bedside.runtime import Bundle


def point(link, target):
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)  # atomic: the service reads one bundle or the other


@pytest.fixture(scope="module")
def swap_server(bundle_dir, tmp_path_factory):
    link = tmp_path_factory.mktemp("live") / "current"
    point(link, bundle_dir)
    s = Server(link)
    yield s, link
    s.stop()


def test_serve_swap_under_traffic_drops_and_mixes_nothing(swap_server, bundle_dir, other_bundle_dir, tmp_path):
    server, link = swap_server
    request = {"patients": [P2, P1], "all_scores": True}
    expected = {}
    for d in (bundle_dir, other_bundle_dir):
        b = Bundle.load(d)
        rows = b.recommend([[{"patient_id": p["patient_id"], **v} for v in p["visits"]] for p in request["patients"]])
        expected[b.manifest["digest"]["sha256"][:16]] = [r["scores"] for r in rows]
    id_a, id_b = list(expected)
    assert expected[id_a] != expected[id_b]
    answers, stop = [], threading.Event()

    def traffic():
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/recommend", json=request)
                answers.append((r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json")
                                else {"text": r.text}))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        point(link, other_bundle_dir)
        server.proc.send_signal(signal.SIGHUP)  # reload the bundle at --bundle
        deadline = time.monotonic() + 20
        while server.client.get("/readyz").json()["bundle"]["id"] != id_b:
            assert time.monotonic() < deadline, "SIGHUP did not swap the bundle"
            time.sleep(0.05)
        time.sleep(0.3)
        r = server.client.post("/admin/reload", json={"bundle": str(bundle_dir)})
        assert r.status_code == 200 and r.json()["previous"] == id_b and r.json()["bundle"]["id"] == id_a, r.text
        (tmp_path / "broken").mkdir()
        r = server.client.post("/admin/reload", json={"bundle": str(tmp_path / "broken")})
        assert r.status_code == 409 and r.json()["errors"][0]["field"] == "bundle", r.text
        assert "not a leader-edge bundle" in r.json()["errors"][0]["message"]
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert server.client.get("/readyz").json()["bundle"]["id"] == id_a  # the refused bundle changed nothing
    assert len(answers) > 20 and {status for status, _ in answers} == {200}
    seen = {body["bundle"]["id"] for _, body in answers}
    assert seen == {id_a, id_b}
    for _, body in answers:
        assert [r["scores"] for r in body["results"]] == expected[body["bundle"]["id"]]
    metrics = server.client.get("/metrics").text
    assert 'leader_edge_model_swaps_total{result="done"} 2' in metrics
    assert 'leader_edge_model_swaps_total{result="refused"} 1' in metrics
    # SIGHUP goes back to the bundle at --bundle (the link, pointing at b), not to the last path the
    # admin route loaded (a): it reloaded that one, so a repointed link and a HUP changed nothing
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while server.client.get("/readyz").json()["bundle"]["id"] != id_b:
        assert time.monotonic() < deadline, "SIGHUP reloaded the last path, not --bundle"
        time.sleep(0.05)


def test_serve_admin_reload_needs_a_token(bundle_dir):
    s = Server(bundle_dir, token=None)
    try:
        r = s.client.post("/admin/reload", json={})
        assert r.status_code == 403 and "--token-file" in r.json()["errors"][0]["message"]
        assert s.client.post("/v1/recommend", json={"patient": P2}).status_code == 200  # no token: open
    finally:
        s.stop()


def test_serve_graceful_shutdown_finishes_the_request_in_flight(swap_server):
    server, _ = swap_server
    body = json.dumps({"patient": P2}).encode()
    head = (f"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body[:10])  # the request is in flight: headers read, body still coming
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new connections once stopping
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        assert server.proc.poll() is None  # still finishing ours
        sock.sendall(body[10:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status, _, rest = reply.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK", reply[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["results"][0]["patient_id"] == "p2"
    # uvicorn re-raises the signal once everything is finished: the exit status says what stopped it
    assert server.proc.wait(30) == -signal.SIGTERM
    assert "Traceback" not in server.proc.stdout.read()


def test_serve_workers_refuse_new_connections_while_draining(bundle_dir):
    """--workers 2, SIGTERM: the request in flight is answered, and a connection opened meanwhile is
    refused at once (the parent held the listening socket, so it was queued for nobody and hung)."""
    server = Server(bundle_dir, args=("--workers", "2"))
    body = json.dumps({"patient": P2}).encode()
    head = (f"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + body[:10])
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            start = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
            assert time.monotonic() - start < 2
            sock.sendall(body[10:])
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK"), reply[:200]
    finally:
        output = server.stop()
    assert "Traceback" not in output, output


def test_serve_workers_rolling_swap_under_traffic(bundle_dir, other_bundle_dir, tmp_path):
    """--workers 2: SIGHUP to the parent replaces the workers one at a time on the bundle now at
    --bundle (every answer a 200 and its bundle's); a bundle that fails its proof leaves the old
    workers serving; the admin route restarts them (202) and refuses a path (422). A retiring worker
    closes its idle keep-alive connections, so a request written onto one at that moment meets a
    reset: clients retry those (counted here), which the single-process swap never needs."""
    link = tmp_path / "current"
    point(link, bundle_dir)
    ids = {Bundle.load(d).manifest["digest"]["sha256"][:16]: d for d in (bundle_dir, other_bundle_dir)}
    id_a, id_b = list(ids)
    expected = {i: [r["scores"] for r in Bundle.load(d).recommend([[{"patient_id": "p2", **v} for v in P2["visits"]]])]
                for i, d in ids.items()}
    server = Server(link, args=("--workers", "2"))
    answers, resets, stop = [], [], threading.Event()

    def traffic():
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/recommend", json={"patient": P2, "all_scores": True})
                except httpx.TransportError as e:  # a retired worker's keep-alive connection: retry
                    resets.append(repr(e))
                    continue
                answers.append((r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json")
                                else {"text": r.text}))

    def serving(bundle_id: str, polls: int = 10) -> bool:
        return all(server.client.get("/readyz").json()["bundle"]["id"] == bundle_id for _ in range(polls))

    def answered_by(bundle_id: str) -> None:
        """Wait for the traffic to get an answer from `bundle_id` after this call (on 2 busy cores the
        swaps can otherwise come and go between two of its requests). /readyz alone does not show
        it: the probe's keep-alive connection sits on one worker, and the traffic's may sit on the
        other, not yet replaced, one."""
        seen, deadline = len(answers), time.monotonic() + 60
        while not any(status == 200 and body["bundle"]["id"] == bundle_id for status, body in answers[seen:]):
            assert time.monotonic() < deadline, f"no answer from {bundle_id}"
            time.sleep(0.05)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    failure = None
    try:
        answered_by(id_a)
        point(link, other_bundle_dir)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not serving(id_b):
            assert time.monotonic() < deadline, "the workers were not replaced"
            time.sleep(0.2)
        answered_by(id_b)
        (tmp_path / "broken").mkdir()
        point(link, tmp_path / "broken")
        server.proc.send_signal(signal.SIGHUP)  # the new worker refuses it: the old ones serve on
        time.sleep(3)
        assert serving(id_b) and server.proc.poll() is None
        r = server.client.post("/admin/reload", json={"bundle": str(bundle_dir)})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "bundle"
        point(link, bundle_dir)
        assert server.client.post("/admin/reload", json={}).status_code == 202
        deadline = time.monotonic() + 60
        while not serving(id_a):
            assert time.monotonic() < deadline, "the admin route did not restart the workers"
            time.sleep(0.2)
        answered_by(id_a)
    except Exception as e:  # shown with the service's own log (a restart uvicorn aborted, say)
        failure = e
    finally:
        stop.set()
        for t in threads:
            t.join()
        output = server.stop()
    assert failure is None, f"{failure}\n--- serve output ---\n{output}"
    # the refused bundle: one line from the worker, no traceback of uvicorn's factory call
    assert "this worker refuses the bundle at" in output and "Traceback" not in output, output
    assert len(answers) > 10 and {status for status, _ in answers} == {200}, output
    assert len(resets) <= 3 * 4, resets  # at most one per client connection per worker retired (4 retirements)
    assert {body["bundle"]["id"] for _, body in answers} == {id_a, id_b}
    for _, body in answers:
        assert [r["scores"] for r in body["results"]] == expected[body["bundle"]["id"]]
