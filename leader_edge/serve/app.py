"""The HTTP service: a Starlette app around one `Model` at a time.
(~440 lines: routes, auth, limits, metrics and the swap, which share the app state; FHIR mapping
is serve/fhir.py, scoring serve/model.py.)

    app = create_app(ServeConfig(bundle="bundle/"), Model.load("bundle/"))   # uvicorn runs it

Routes (all JSON but /metrics; every one but /healthz and /readyz needs the bearer token if set):
    POST /v1/recommend        canonical visit fields (`serve.schema`), one patient or a batch
    POST /v1/recommend/fhir   a FHIR R4 Bundle (`serve.fhir`), with what it could not use
    GET  /healthz /readyz     liveness; readiness (a bundle is loaded and the service is not stopping)
    GET  /metrics             Prometheus text (`serve.metrics`)
    GET  /openapi.json        the OpenAPI 3.1 description, with the request's JSON schema
    POST /admin/reload        swap to the bundle at `{"bundle": PATH}` (default: the one serving); needs a token

Concurrent requests are scored together: requests queue, and one batcher task hands everything
queued to the model in one call on a worker thread (onnxruntime releases the GIL, so the event loop
keeps reading requests meanwhile). A batch takes the model serving when it starts and every
request in it is answered with that model's id, so a swap (SIGHUP or /admin/reload: the new bundle
is loaded and proven on a thread, then replaces the reference) never drops a request or scores one
with two bundles. Bad input is a 4xx naming the field; an unexpected error a 500 for that request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from pydantic_core import from_json, to_json
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as StarletteJSON
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from leader_edge.errors import DataError
from leader_edge.serve import fhir
from leader_edge.serve.metrics import Metrics
from leader_edge.serve.model import Job, Model, RequestError
from leader_edge.serve.schema import RecommendRequest, request_schema, schema_errors

log = logging.getLogger("leader_edge.serve")

# 1 MiB: a patient with 8 visits of 40 codes is ~3 KB of JSON, so 256 of them fit in ~0.8 MB.
MAX_BODY_BYTES = 1 << 20
MAX_PATIENTS = 256  # per request; larger batches belong to `leader-edge predict`
MAX_BATCH_PATIENTS = 1024  # per model call, across queued requests (the bundle's own batch size)
# Seconds a request's body may stall (no byte arriving; a slow steady upload is not cut): a client that
# stalls mid-body held its connection for good, and at SIGTERM (graceful shutdown: 30 s) its task
# was cancelled into a 500.
BODY_TIMEOUT_S = 20.0


@dataclass
class ServeConfig:
    bundle: Path
    token: str | None = None  # bearer token for every route but /healthz and /readyz
    trust: Path | None = None  # Ed25519 public key every bundle, swaps included, must be signed by
    max_body_bytes: int = MAX_BODY_BYTES
    max_patients: int = MAX_PATIENTS
    threads: int = 1
    workers: int = 1  # processes (see `app_from_env`); >1: swaps are rolling restarts by the parent
    body_timeout: float = BODY_TIMEOUT_S


class JSONResponse(StarletteJSON):
    """JSON through pydantic's Rust serializer: ~2 us per answer against ~10 us for json.dumps."""

    def render(self, content) -> bytes:
        return to_json(content)


class HTTPError(Exception):
    def __init__(self, status: int, errors: list[dict], headers: dict | None = None) -> None:
        super().__init__(errors)
        self.status, self.errors, self.headers = status, errors, headers


def _error(field: str, message: str) -> list[dict]:
    return [{"field": field, "message": message}]


def parse_json(body: bytes):
    """A request body as JSON, or a 400 naming the problem. pydantic's Rust parser, not `json.loads`:
    it stops at nesting depth 255 with an error where `json.loads(b"[" * 200_000)` raises RecursionError."""
    try:
        return from_json(body, allow_inf_nan=False)
    except ValueError as e:  # bad UTF-8, bad syntax, NaN, too deep: "recursion limit exceeded at line 1 column 202"
        raise HTTPError(400, _error("body", f"not JSON ({e})")) from None


class Service:
    """The model serving now, the batcher, the counters and the swap."""

    def __init__(self, config: ServeConfig, model: Model) -> None:
        self.config, self.model = config, model
        self.metrics = Metrics()
        self.metrics.model = self._info(model)
        self.pending: list[tuple[Job, asyncio.Future]] = []
        self.wake: asyncio.Event | None = None
        self.swap_lock: asyncio.Lock | None = None
        self.stopping = False
        self._task: asyncio.Task | None = None

    @staticmethod
    def _info(model: Model) -> dict:
        d = model.describe()
        return {"bundle_id": d["id"], "variant": d["variant"], "threshold": d["threshold"]}

    async def start(self) -> None:
        self.wake, self.swap_lock = asyncio.Event(), asyncio.Lock()
        self._task = asyncio.create_task(self._batcher())
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not Unix, or not the main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._sighup()))

    async def stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def score(self, job: Job) -> tuple[Model, list[dict]]:
        """Queue a job for the next model call; (the model that scored it, its records)."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((job, future))
        self.wake.set()
        return await future

    async def _batcher(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                take, size = 0, 0
                while take < len(self.pending) and (take == 0 or size + len(self.pending[take][0].patients) <= MAX_BATCH_PATIENTS):
                    size += len(self.pending[take][0].patients)
                    take += 1
                batch, self.pending = self.pending[:take], self.pending[take:]
                model = self.model  # one model for the whole batch, whatever a swap does meanwhile
                batch = [(job, future) for job, future in batch if self._mapped(job, future, model)]
                if not batch:
                    continue
                try:
                    results = await asyncio.to_thread(model.score, [job for job, _ in batch])
                except Exception as e:  # a bug, not bad input: those requests get a 500, the service goes on
                    log.exception("scoring failed")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                scored = sum(len(job.patients) for (job, _), result in zip(batch, results)
                             if not isinstance(result, RequestError))  # a refused request scored no one
                if scored:
                    self.metrics.batch.observe(scored)
                self.metrics.patients += scored
                for (_, future), result in zip(batch, results):
                    if not future.done():  # the client may have gone
                        if isinstance(result, RequestError):
                            future.set_exception(result)
                        else:
                            future.set_result((model, result))

    @staticmethod
    def _mapped(job: Job, future: asyncio.Future, model: Model) -> bool:
        """Map a job again if it was mapped for another bundle than the one about to score it (a
        swap came between its parse and this batch): codes written in bundle A's forms would be
        scored, and named, by bundle B. False: the job is refused, its future answered."""
        if job.remap is None or job.mapped_for is model:
            return True
        try:
            job.remap(model)
        except RequestError as e:
            if not future.done():
                future.set_exception(e)
            return False
        return True

    async def swap(self, path: Path | None = None) -> tuple[Model, Model]:
        """Load, prove and switch to the bundle at `path` (default: the one at --bundle now, as
        SIGHUP promises; it was the one serving, so after a reload to a path SIGHUP kept that one).
        Returns (old, new). Raises DataError (the old model keeps serving)."""
        async with self.swap_lock:
            old = self.model
            path = Path(path) if path is not None else Path(self.config.bundle)
            try:
                new = await asyncio.to_thread(Model.load, path, trust=self.config.trust, threads=self.config.threads)
            except (DataError, OSError, RuntimeError) as e:
                self.metrics.swaps["refused"] += 1
                log.error("bundle swap refused, still serving %s: %s", old.id, e)
                raise
            self.model = new
            self.metrics.model = self._info(new)
            self.metrics.swaps["done"] += 1
            log.warning("bundle swapped: %s -> %s (%s)", old.id, new.id, path)
            if new.bundle.med_codes != old.bundle.med_codes or new.vocab != old.vocab:
                log.warning("the new bundle reads and recommends other codes than the old one (%d -> %d medications): "
                            "clients that send the old vocabulary get unknown codes", len(old.bundle.med_codes),
                            len(new.bundle.med_codes))
            return old, new

    async def _sighup(self) -> None:
        with contextlib.suppress(DataError, OSError, RuntimeError):  # logged by swap
            await self.swap()


def create_app(config: ServeConfig, model: Model) -> Starlette:
    """The ASGI app serving `model` (already loaded and proven) under `config`."""
    service = Service(config, model)
    token = config.token.encode() if config.token else None

    def endpoint(route: str, *, auth: bool = True):
        """Wrap a handler: token check, error bodies, counters. The handler returns a Response or raises HTTPError."""

        def wrap(handler):
            async def call(request: Request) -> Response:
                start = time.perf_counter()
                try:
                    if auth and token is not None:
                        given = request.headers.get("authorization", "")
                        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token)):
                            raise HTTPError(401, _error("Authorization", "missing or wrong bearer token"),
                                            {"WWW-Authenticate": "Bearer"})
                    response = await handler(request)
                except HTTPError as e:
                    response = JSONResponse({"errors": e.errors}, e.status, headers=e.headers)
                except ClientDisconnect:  # the client left before its body came: nobody to answer, nothing failed
                    log.info("%s %s: the client disconnected before sending its whole body", request.method, route)
                    response = Response(status_code=499)  # nginx's "client closed request", for /metrics only
                except Exception:  # never down on one request: log it, answer 500
                    log.exception("%s %s failed", request.method, route)
                    response = JSONResponse({"errors": _error("body", "internal error; the service logged it")}, 500)
                service.metrics.request(route, response.status_code, time.perf_counter() - start)
                return response

            return call

        return wrap

    async def body_json(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            raise HTTPError(413, _error("body", f"{length} bytes; the limit is {config.max_body_bytes:,} (--max-body-bytes)"))
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(config.body_timeout) as deadline:
                async for chunk in request.stream():
                    deadline.reschedule(loop.time() + config.body_timeout)  # a stall, not a slow steady upload
                    size += len(chunk)
                    if size > config.max_body_bytes:
                        raise HTTPError(413, _error("body", f"more than {config.max_body_bytes:,} bytes (--max-body-bytes)"))
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPError(408, _error("body", f"no byte of it came for {config.body_timeout:g} s ({size:,} of "
                                                f"{length or 'an unstated number of'} bytes came): the client "
                                                "stalled (--body-timeout)"), {"Connection": "close"}) from None
        return b"".join(chunks)

    async def run(job: Job) -> tuple[Model, list[dict]]:
        if len(job.patients) > config.max_patients:
            raise HTTPError(422, _error("patients", f"{len(job.patients)} patients; the limit is {config.max_patients} "
                                                    "per request (--max-batch); use `leader-edge predict` for files"))
        try:
            return await service.score(job)
        except RequestError as e:
            raise HTTPError(e.status, _error(e.field, e.message)) from None

    def answer(model: Model, job: Job, records: list[dict], **extra) -> JSONResponse:
        bundle = model.describe()
        return JSONResponse({"bundle": {"id": bundle["id"], "threshold": bundle["threshold"], "variant": bundle["variant"]},
                             "threshold": bundle["threshold"] if job.threshold is None else job.threshold,
                             "top_k": job.top_k, "results": records, **extra})

    @endpoint("/v1/recommend")
    async def recommend(request: Request) -> Response:
        body = await body_json(request)
        try:
            req = RecommendRequest.model_validate_json(body)
        except ValidationError as e:
            status = 400 if any(x["type"] == "json_invalid" for x in e.errors()) else 422
            raise HTTPError(status, schema_errors(e)) from None
        job = Job(req.patient_list(), threshold=req.threshold, top_k=req.top_k, all_scores=req.all_scores,
                  explain=req.explain)
        try:
            model, records = await run(job)
        except HTTPError as e:
            if req.patient is not None:  # name the field as the request wrote it: `patient`, not `patients[0]`
                e.errors = [{k: re.sub(r"\bpatients\[0\]", "patient", v) if k in ("field", "message") else v
                             for k, v in err.items()} for err in e.errors]
            raise
        return answer(model, job, records)

    @endpoint("/v1/recommend/fhir")
    async def recommend_fhir(request: Request) -> Response:
        body = await body_json(request)
        document = parse_json(body)
        try:
            options = fhir.options(request.query_params)
        except fhir.FHIRError as e:
            raise HTTPError(422, _error(e.field, e.message)) from None
        mapping = {"report": {}}  # what the latest mapping could not use

        def remap(model: Model) -> None:
            mapping["report"] = {}  # a refused mapping names FHIR fields itself
            try:
                job.patients, mapping["report"] = fhir.to_patients(document, model.codes, model.profile_fields)
            except fhir.FHIRError as e:
                raise RequestError(e.field, e.message) from None
            job.mapped_for = model

        job = Job([], **options, remap=remap)
        try:
            remap(service.model)  # mapped again by the batcher if a swap comes first
            model, records = await run(job)
        except RequestError as e:
            raise HTTPError(e.status, _error(e.field, e.message)) from None
        except HTTPError as e:  # name the Encounter a refused visit came from
            e.errors = [{**err, "field": fhir.source_field(err["field"], mapping["report"])} for err in e.errors]
            raise
        assert job.mapped_for is model, "the batcher maps a FHIR job for the model that scores it"
        report = mapping["report"]
        return answer(model, job, records, fhir=report)

    @endpoint("/healthz", auth=False)
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @endpoint("/readyz", auth=False)
    async def readyz(request: Request) -> Response:
        if service.stopping:
            return JSONResponse({"status": "stopping"}, 503)
        return JSONResponse({"status": "ready", "bundle": service.model.describe()})

    @endpoint("/metrics")
    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @endpoint("/openapi.json")
    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(service.model))

    @endpoint("/admin/reload")
    async def reload(request: Request) -> Response:
        if token is None:
            raise HTTPError(403, _error("Authorization", "the admin route is off without a token: start the service "
                                                          "with --token-file (or send SIGHUP to reload the bundle)"))
        body = await body_json(request)
        document = parse_json(body) if body.strip() else {}
        if not isinstance(document, dict):
            raise HTTPError(400, _error("body", 'not a JSON object like {"bundle": "/path/to/bundle"}'))
        path = document.get("bundle")
        if path is not None and not isinstance(path, str):
            raise HTTPError(422, _error("bundle", "must be a path (string)"))
        if config.workers > 1:  # one worker cannot swap the others: the parent restarts them all
            if path is not None:
                raise HTTPError(422, _error("bundle", f"with --workers {config.workers} the bundle is the one at --bundle "
                                                      f"({config.bundle}): point it at the new bundle, then reload "
                                                      "without a path"))
            os.kill(os.getppid(), signal.SIGHUP)
            return JSONResponse({"previous": service.model.id, "status": f"restarting the {config.workers} workers on "
                                 f"the bundle at {config.bundle}, one at a time; each answer names its bundle"}, 202)
        try:
            old, new = await service.swap(path)
        except (DataError, OSError, RuntimeError) as e:
            raise HTTPError(409, _error("bundle", f"{e} (still serving {service.model.id})")) from None
        return JSONResponse({"previous": old.id, "bundle": new.describe()})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    routes = [Route("/v1/recommend", recommend, methods=["POST"]),
              Route("/v1/recommend/fhir", recommend_fhir, methods=["POST"]),
              Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]), Route("/openapi.json", openapi, methods=["GET"]),
              Route("/admin/reload", reload, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


CONFIG_ENV = "LEADER_EDGE_SERVE_CONFIG"  # `serve --workers N` hands its settings to the workers in it


def worker_config(config: ServeConfig, token_file: Path | None) -> str:
    """The settings every worker of `serve --workers N` starts from (the token by its file or
    LEADER_EDGE_SERVE_TOKEN, inherited, never written here)."""
    return json.dumps({"bundle": str(config.bundle), "trust": str(config.trust) if config.trust else None,
                       "token_file": str(token_file) if token_file else None, "max_body_bytes": config.max_body_bytes,
                       "max_patients": config.max_patients, "threads": config.threads, "workers": config.workers,
                       "body_timeout": config.body_timeout})


def app_from_env() -> Starlette:
    """The app of one worker process of `serve --workers N`: uvicorn imports this by name in each
    worker, which loads and proves the bundle itself (a bundle it refuses stops that worker only)."""
    c = json.loads(os.environ[CONFIG_ENV])
    token = (Path(c["token_file"]).read_text(encoding="utf-8").strip() if c["token_file"]
             else os.environ.get("LEADER_EDGE_SERVE_TOKEN") or None)
    config = ServeConfig(bundle=Path(c["bundle"]), token=token, trust=Path(c["trust"]) if c["trust"] else None,
                         max_body_bytes=c["max_body_bytes"], max_patients=c["max_patients"], threads=c["threads"],
                         workers=c["workers"], body_timeout=c["body_timeout"])
    try:
        model = Model.load(config.bundle, trust=config.trust, threads=config.threads)
    except (DataError, OSError, RuntimeError) as e:
        # One line instead of uvicorn's traceback of the factory; the parent then says "not ready in
        # time" and keeps the old workers serving (a rolling restart stops at the first refusal).
        log.error("this worker refuses the bundle at %s, the old workers serve on: %s", config.bundle, e)
        raise SystemExit(3) from None
    return create_app(config, model)


def openapi_document(model: Model) -> dict:
    """OpenAPI 3.1: the routes, the request schema (pydantic's JSON schema), the error shape."""
    schema = request_schema()
    components = {name: s for name, s in schema.pop("$defs", {}).items()}
    components["RecommendRequest"] = schema
    components["Errors"] = {"type": "object", "properties": {"errors": {"type": "array", "items": {
        "type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}}}}
    components["Recommendations"] = {"type": "object", "properties": {
        "bundle": {"type": "object", "description": "id (manifest digest prefix), threshold, variant of the bundle that scored"},
        "threshold": {"type": "number"}, "top_k": {"type": ["integer", "null"]},
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "patient_id": {"type": "string"}, "visit_id": {"type": "string", "description": "the visit recommended for"},
            "medications": {"type": "array", "items": {"type": "string"}, "description": "recommended, most probable first"},
            "scores": {"type": "object", "additionalProperties": {"type": "number"}},
            "ddi_warnings": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
            "unknown_codes": {"type": "integer"}, "unknown": {"type": "object"},
            "explanations": {"type": "object"}}}},
        "fhir": {"type": "object", "description": "FHIR input only: resources and codings not used, and why"}}}
    errors = {f"{c}": {"description": d, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}}}
              for c, d in (("400", "not JSON"), ("401", "missing or wrong bearer token"), ("413", "body too large"),
                           ("422", "a field is invalid: `field` names it"))}
    ok = {"200": {"description": "per patient, the recommendation for its last visit",
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Recommendations"}}}}}
    plain = {"200": {"description": "ok"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "leader-edge serve", "version": model.id,
                 "description": "Medication recommendations from a leader-edge bundle (no torch)."},
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/recommend": {"post": {"summary": "Recommend medications for one patient or a batch",
                                       "requestBody": {"required": True, "content": {"application/json": {
                                           "schema": {"$ref": "#/components/schemas/RecommendRequest"}}}},
                                       "responses": {**ok, **errors}}},
            "/v1/recommend/fhir": {"post": {
                "summary": "Recommend from a FHIR R4 Bundle (Patient, Encounter, Condition, Procedure, MedicationRequest)",
                "parameters": [{"name": n, "in": "query", "required": False, "schema": {"type": t}}
                               for n, t in (("top_k", "integer"), ("threshold", "number"), ("all_scores", "boolean"),
                                            ("explain", "boolean"))],
                "requestBody": {"required": True, "content": {"application/fhir+json": {"schema": {"type": "object"}}}},
                "responses": {**ok, **errors}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": plain}},
            "/readyz": {"get": {"summary": "Readiness: a bundle is loaded and the service is not stopping",
                                "security": [], "responses": {**plain, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": plain}},
            "/openapi.json": {"get": {"summary": "This document", "responses": plain}},
            "/admin/reload": {"post": {"summary": "Swap to a bundle ({\"bundle\": PATH}, default: reload the one serving)",
                                       "responses": {**plain, "409": {"description": "bundle refused; the old one serves on"}}}},
        },
    }
