"""Load test of `leader-edge serve` on loopback, next to the same bundle called in-process.

    .venv/bin/python benchmarks/bench_serve.py --bundle demo-out/bundle --visits demo-out/test-visits.csv

Starts the service (its own process, a free loopback port), then for 1, 8, 32 and 128 concurrent
clients sends single-patient POST /v1/recommend requests over keep-alive HTTP/1.1 connections,
each client waiting for its answer before sending the next (closed loop). Each level stops after
--requests answers or --seconds, whichever comes first, and the service is stopped at the end:
bounded, loopback only, stops by itself. The load generator is written here on asyncio streams (one
connection per client, Content-Length bodies): a few microseconds per request, so it takes as
little as possible of the CPU it shares with the service (httpx's async client cost ~4x more).

Baseline, same process, same patients, one at a time: the service's own per-request path
(`RecommendRequest.model_validate_json` + `Model.recommend`: schema, the core's reader, encode,
score, format), so "service adds" is HTTP, the event loop and the JSON response.
Prints a markdown table (median of --repeats runs, baseline and levels interleaved so that both see
the same machine load): throughput, p50/p99 latency, errors, the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from leader_edge.serve.model import Model
from leader_edge.serve.schema import RecommendRequest
from leader_edge.bedside.visit_stream import read_patients


def request_bodies(visits: Path, n: int) -> list[bytes]:
    """Single-patient request bodies for the first `n` patients of a visits CSV."""
    with open(visits, "rb") as f:
        t = next(read_patients(f, str(visits), chunk_patients=n))
    split = lambda text: text.split(";") if text else []  # noqa: E731

    def visit(r: int) -> dict:
        return {"visit_id": t.visit_ids[r], "visit_time": t.times[r].isoformat(),
                **{c: split(t.codes[c][r]) for c in ("diagnoses", "procedures", "medications")},
                "profile": {f: v[r] for f, v in t.profile.items()}}

    return [json.dumps({"patient": {"patient_id": t.patient_ids[p], "visits": [
        visit(r) for r in range(t.starts[p], t.starts[p + 1])]}}).encode() for p in range(min(n, len(t)))]


def in_process(model: Model, bodies: list[bytes], requests: int, seconds: float) -> dict:
    lat = []
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        model.recommend(RecommendRequest.model_validate_json(bodies[i % len(bodies)]).patient_list())
        lat.append(time.perf_counter() - t)
        if t - start > seconds:
            break
    return summary(lat, time.perf_counter() - start, 0)


def summary(lat: list[float], elapsed: float, errors: int) -> dict:
    a = np.array(lat) * 1e3
    return {"n": len(lat), "rps": len(lat) / elapsed, "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "errors": errors}


async def client(port: int, bodies: list[bytes], offset: int, state: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: "
    i = offset
    try:
        while not state["stop"]:
            body = bodies[i % len(bodies)]
            i += 1
            t = time.perf_counter()
            writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if state["measuring"]:
                state["lat"].append(time.perf_counter() - t)
                state["errors"] += not status.startswith(b"HTTP/1.1 200")
                if len(state["lat"]) >= state["requests"]:
                    state["stop"] = True
    finally:
        writer.close()


async def load(port: int, bodies: list[bytes], clients: int, requests: int, seconds: float, warmup: float) -> dict:
    state = {"stop": False, "measuring": False, "lat": [], "errors": 0, "requests": requests}
    tasks = [asyncio.create_task(client(port, bodies, k * 7919, state)) for k in range(clients)]
    await asyncio.sleep(warmup)
    state["measuring"] = True
    start = time.perf_counter()
    while not state["stop"] and time.perf_counter() - start < seconds:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - start
    state["stop"] = True
    n = len(state["lat"])
    await asyncio.wait(tasks, timeout=30)
    return summary(state["lat"][:n], elapsed, state["errors"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("demo-out/bundle"))
    ap.add_argument("--visits", type=Path, default=Path("demo-out/test-visits.csv"))
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--requests", type=int, default=5000, help="answers measured per level (at most)")
    ap.add_argument("--seconds", type=float, default=10.0, help="time measured per level (at most)")
    ap.add_argument("--patients", type=int, default=200, help="distinct patients cycled through")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every level; the table shows their median")
    ap.add_argument("--workers", type=int, default=1, help="serve --workers")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    bodies = request_bodies(args.visits, args.patients)
    levels = list(map(int, args.clients.split(",")))
    load_before = os.getloadavg()
    model = Model.load(args.bundle)
    in_process(model, bodies, 300, 5)  # warm up
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "leader_edge", "serve", "--bundle", str(args.bundle), "--port", str(port),
                             "--workers", str(args.workers)],
                            env={**os.environ, "LEADER_EDGE_SERVE_TOKEN": ""}, stderr=subprocess.DEVNULL)
    runs: dict = {"in-process": [], **{c: [] for c in levels}}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the service did not start")
                time.sleep(0.1)
        for _ in range(args.repeats):  # baseline and levels interleaved: the same minutes of machine load
            runs["in-process"].append(in_process(model, bodies, args.requests, args.seconds))
            for clients in levels:
                runs[clients].append(asyncio.run(load(port, bodies, clients, args.requests, args.seconds, warmup=1.0)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    load_after = os.getloadavg()
    med = {k: {m: float(np.median([r[m] for r in v])) for m in ("rps", "p50", "p99")} | {
        "errors": sum(r["errors"] for r in v), "n": sum(r["n"] for r in v)} for k, v in runs.items()}
    base = med["in-process"]
    d = model.describe()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.2f} before / {load_after[0]:.2f} after; bundle {model.id} ({d['variant']}, {d['medications']} "
          f"medications); {len(bodies)} patients cycled; median of {args.repeats} repeats; serve --workers {args.workers}")
    print()
    print("| clients | requests/s | p50 ms | p99 ms | errors | answers | p50 - in-process p50 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| in-process, 1 at a time | {base['rps']:,.0f} | {base['p50']:.2f} | {base['p99']:.2f} | 0 | {base['n']} | - |")
    for clients in levels:
        r = med[clients]
        print(f"| {clients} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} | {r['n']} | "
              f"{r['p50'] - base['p50']:+.2f} ms |")


if __name__ == "__main__":
    main()
