"""`leader-edge serve`: the bundle behind HTTP (Starlette on uvicorn), without torch."""

from __future__ import annotations

import os
from pathlib import Path

import click

from leader_edge.cli import FiniteRange, InputError, user_errors

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@click.command()
@click.option("--bundle", required=True, envvar="LEADER_EDGE_BUNDLE",
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Bundle directory from `leader-edge export`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback unless you say otherwise).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding the bearer token every route but /healthz and /readyz requires (or set "
                   "LEADER_EDGE_SERVE_TOKEN; never on the command line, where `ps` shows it). Read at start: "
                   "a new token takes a restart (SIGHUP swaps the bundle only).")
@click.option("--trust", envvar="LEADER_EDGE_TRUST", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM): serve, and swap to, only bundles signed by it.")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1024), help="Largest request body.")
@click.option("--body-timeout", default=20.0, show_default=True, type=FiniteRange(min=0, min_open=True),
              help="Seconds a request body may stall (no byte arriving); a stalled client gets 408.")
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(min=1), help="Most patients per request.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="onnxruntime threads per model call (0: all cores).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes, each with its own copy of the bundle (one per core). With more than one, SIGHUP to "
                   "the parent restarts them one at a time on the bundle at --bundle (a retiring worker closes its "
                   "idle keep-alive connections: clients retry), and /metrics counts per worker.")
@user_errors
def serve(bundle: Path, host: str, port: int, token_file: Path | None, trust: Path | None, max_body_bytes: int,
          body_timeout: float, max_batch: int, threads: int, workers: int) -> None:
    """Serve recommendations over HTTP: POST /v1/recommend (JSON visits), POST /v1/recommend/fhir
    (a FHIR R4 Bundle), GET /healthz /readyz /metrics /openapi.json, POST /admin/reload.

    The bundle proves itself at start (as for `predict`). SIGHUP (or POST /admin/reload with the
    token) swaps to the bundle now at --bundle, or at {"bundle": PATH}, without dropping a request;
    a bundle that fails its proof is refused and the old one serves on. SIGTERM/SIGINT stop taking
    connections, finish the requests in flight, then exit.

    \b
    Examples:
      leader-edge serve --bundle bundle
      LEADER_EDGE_SERVE_TOKEN=s3cret leader-edge serve --bundle bundle --host 0.0.0.0 --port 8080
      curl -s localhost:8000/v1/recommend -H 'Content-Type: application/json' -d '{"patient": {"patient_id": "p1",
        "visits": [{"visit_id": "v1", "visit_time": "2100-01-01", "diagnoses": ["4019"]}]}}'
    """
    import logging

    import uvicorn

    from leader_edge.serve.app import CONFIG_ENV, ServeConfig, create_app, worker_config
    from leader_edge.serve.model import Model

    token = token_file.read_text(encoding="utf-8").strip() if token_file else os.environ.get("LEADER_EDGE_SERVE_TOKEN") or None
    if token_file and not token:
        raise InputError(f"{token_file} is empty; write the bearer token in it")
    if host not in LOOPBACK and token is None:
        click.echo(f"warning: listening on {host} without a token: anyone who reaches it can call it "
                   "(--token-file or LEADER_EDGE_SERVE_TOKEN)", err=True)
    model = Model.load(bundle, trust=trust, threads=threads)  # refused here, before any worker starts
    _check_port(host, port)
    config = ServeConfig(bundle=bundle, token=token, trust=trust, max_body_bytes=max_body_bytes, max_patients=max_batch,
                         threads=threads, workers=workers, body_timeout=body_timeout)
    click.echo(f"leader-edge serve: bundle {model.id} ({bundle}) on http://{host}:{port}"
               + (f", {workers} workers" if workers > 1 else ""), err=True)
    logging.getLogger("leader_edge.serve").setLevel(logging.INFO)
    # 30 s: a worker loads and proves its bundle before it answers the parent's health check (~1-3 s on
    # the loaded 2-core VM; uvicorn's default 5 s would abort a rolling restart there).
    options = dict(host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                   server_header=False, timeout_worker_healthcheck=30)
    if workers == 1:
        uvicorn.Server(uvicorn.Config(create_app(config, model), **options)).run()
        return
    del model  # each worker loads its own
    os.environ[CONFIG_ENV] = worker_config(config, token_file)
    # uvicorn.run(..., workers=N) as it does it, but the parent closes the listening socket at
    # SIGTERM/SIGINT: it held it while the workers drained, so a connection opened then was queued
    # for nobody and hung until the process ended; now it is refused at once (a balancer retries).
    from uvicorn.supervisors.multiprocess import Multiprocess

    class Supervisor(Multiprocess):
        def _stop_listening(self) -> None:
            for sock in self.sockets:
                sock.close()

        def handle_term(self) -> None:
            self._stop_listening()
            super().handle_term()

        def handle_int(self) -> None:
            self._stop_listening()
            super().handle_int()

    uv_config = uvicorn.Config("leader_edge.serve.app:app_from_env", factory=True, workers=workers, **options)
    Supervisor(uv_config, sockets=[uv_config.bind_socket()]).run()


def _check_port(host: str, port: int) -> None:
    """Refuse a port that cannot be listened on before the banner is printed (it printed
    "on http://HOST:PORT", then uvicorn's raw "[Errno 98]", exit 3)."""
    import socket

    if port == 0:
        return
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
            probe.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port, or stop what "
                         "holds this one") from None
