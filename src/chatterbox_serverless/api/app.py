"""The HTTP API (FastAPI): the hosted Chatterbox TTS contract (docs: ../shared/docs/api-contract.md).

    POST /v1/chatterbox-tts            sync: parameters in, audio bytes out (through the same queue as v2)
    POST /v2/chatterbox-tts            queue a job: {request_id, status, status_url, response_url}
    GET  /v2/requests/{id}/status      {request_id, status, metrics[, error]}   (FAILED: HTTP 422)
    GET  /v2/requests/{id}             {request_id, status, output, metrics[, error]}   (FAILED: HTTP 422)
    GET  /files/{id}.{ext}?expires=&signature=    the audio (signed URL, no headers needed)
    GET  /health  /ready  /metrics  /docs  /openapi.json

Every error is `{"error": "..."}` (unknown routes, wrong methods, malformed JSON and validation included; a
client error is never 422, which means FAILED here). Accounts plug in through `authenticate`: a FastAPI
dependency returning the owner id of the caller ("" when auth is off); a job is visible only to its owner.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..accounts.web import AccountGate
from ..accounts.web import install as install_accounts
from ..engine.types import Engine
from ..jobs.policy import ContentPolicy
from ..jobs.store import Job, JobState, JobStore, QueueFull, StoreUnavailable
from ..jobs.worker import Janitor, Worker
from ..settings import Settings
from .logs import request_id_var
from .schemas import (OUTPUT_FORMATS, ErrorResponse, ResultResponse, StatusResponse, SubmitResponse, TTSRequest,
                      describe_validation_error)
from .signing import UrlSigner

log = logging.getLogger("chatterbox_serverless.api")

SLUG = "chatterbox-tts"
MAX_BODY_BYTES = 16 * 1024 * 1024     # a 10 MB reference clip in base64 fits
_EXT_BY_TYPE = {v: k for k, v in OUTPUT_FORMATS.items()}
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_FILE_NAME = re.compile(r"^([0-9a-f-]{36})\.(mp3|wav|flac|ogg)$")


class ApiError(Exception):
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None, /, **extra: Any):
        self.code, self.message, self.headers, self.extra = code, message, headers or {}, extra


def error_response(code: int, message: str, headers: dict[str, str] | None = None, /, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=code, headers=headers)


def no_auth() -> str:
    """The `authenticate` dependency when accounts are off: every caller is the owner ""."""
    return ""


_NOT_ENOUGH_CREDITS = {406: {"model": ErrorResponse, "description": "Not enough credits (nothing was queued)"}}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "Invalid parameters or request format"), (401, "Missing or invalid API key"),
        (403, "Revoked API key"), (404, "Not found or expired"), (429, "Queue full or rate limited"), (502, "No worker able to serve"))}


class _StoreCollector:
    """Prometheus gauges read from the store at scrape time (queue depth, jobs by state, workers)."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        try:
            stats = self.store.stats()
        except Exception:
            return
        jobs = GaugeMetricFamily("chatterbox_jobs", "Live (unexpired) jobs by state", labels=["state"])
        for state, n in sorted(stats.by_state.items()):
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("chatterbox_queue_depth", "Jobs waiting in the queue",
                                value=stats.by_state.get("QUEUED", 0))
        yield GaugeMetricFamily("chatterbox_oldest_queued_seconds", "Age of the oldest queued job",
                                value=stats.oldest_queued_age)
        yield GaugeMetricFamily("chatterbox_workers_alive", "Workers that heart-beat recently",
                                value=len(stats.workers))


class _RequestContext:
    """Pure ASGI middleware: a request id per request (the client's `x-request-id` if sane), echoed in the
    response unless the endpoint set its own (the job id), one structured log line and metrics per request."""

    def __init__(self, app, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        rid = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        job_id = None

        async def send_with_id(message):
            nonlocal status, job_id
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("x-request-id", rid)
                elif headers["x-request-id"] != rid:
                    job_id = headers["x-request-id"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            endpoint = getattr(scope.get("endpoint"), "__name__", "unmatched")
            self.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.latency.labels(endpoint).observe(seconds)
            log.info("%s %s %d", scope["method"], scope["path"], status,
                     extra={"status": status, "ms": round(seconds * 1000, 2), "endpoint": endpoint, "job_id": job_id})
            request_id_var.reset(token)


NO_WORKER_GRACE_S = 2.0   # v1 waits this long for a live worker before answering 502


def create_app(settings: Settings, store: JobStore, engine: Engine | None = None, *, workers: int = 1,
               worker: Worker | None = None, policy: ContentPolicy | None = None, fetcher: Any = None,
               authenticate: Callable[..., str] | None = None, model_name: str = "",
               accounts: AccountGate | None = None) -> FastAPI:
    """The API over `store`. With an `engine` and `workers=1`, an in-process Worker runs the queue (started and
    stopped with the app); pass `worker` to supply one built elsewhere. `fetcher` downloads reference URLs
    (default: media.SafeFetcher honouring `settings.allow_fetch_hosts`). `accounts`: keys, credits and rate
    limits (accounts/web.py); None or a disabled gate: no auth."""
    gate = accounts or AccountGate(None)
    auth = authenticate or (gate.dependency if gate.enabled else no_auth)
    signer = UrlSigner(settings.load_url_secret())
    registry = CollectorRegistry()
    http_requests = Counter("chatterbox_http_requests", "HTTP requests", ["endpoint", "method", "status"],
                            registry=registry)
    http_latency = Histogram("chatterbox_http_request_seconds", "HTTP request latency", ["endpoint"],
                             registry=registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5, 30))
    submitted = Counter("chatterbox_jobs_submitted", "Jobs accepted", ["mode"], registry=registry)
    rejected = Counter("chatterbox_jobs_rejected", "Submissions refused because the queue was full",
                       registry=registry)
    registry.register(_StoreCollector(store))

    if policy is None and settings.blocked_terms_file:
        policy = ContentPolicy.from_file(settings.blocked_terms_file)
    if worker is None and engine is not None and workers > 0:
        from ..media import SafeFetcher, encode_audio, load_reference
        fetch = fetcher or SafeFetcher(allow_hosts=settings.allow_fetch_hosts)
        worker = Worker(store, engine, encode=encode_audio, accounts=gate.accounts,
                        resolve_reference=lambda value: load_reference(value, fetch),
                        policy=policy, batch_size=settings.batch_size, batch_wait=settings.batch_wait,
                        lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts,
                        retention_seconds=settings.retention_seconds, shutdown_grace=settings.shutdown_grace,
                        info={"model": model_name})
    janitor = None if worker is not None else Janitor(store, max_attempts=settings.max_attempts,
                                                      retention_seconds=settings.retention_seconds,
                                                      accounts=gate.accounts)
    wait_limiter = anyio.CapacityLimiter(1000)    # threads parked in store.wait for v1 calls

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker is not None:
            worker.start()
        if janitor is not None:
            janitor.start()
        log.info("API ready", extra={"worker": worker.worker_id if worker else None, "version": __version__})
        try:
            yield
        finally:
            if worker is not None:
                log.info("stopping the worker (grace %.0f s)", settings.shutdown_grace)
                await run_in_threadpool(worker.stop)
            if janitor is not None:
                janitor.stop()

    app = FastAPI(title="chatterbox-serverless", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  description="Self-hosted Chatterbox TTS with the hosted API's contract: `/v1` sync, `/v2` "
                              "queued jobs. Every error body is `{\"error\": ...}`; HTTP 422 means FAILED.")
    app.state.settings, app.state.store, app.state.worker, app.state.engine = settings, store, worker, engine
    app.state.registry = registry

    # --- errors: always {"error": ...} ---------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.code, e.message, e.headers, **e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"not found: {request.method} {request.url.path}"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}" + \
                (f" (allowed: {allowed})" if allowed else "")
        else:
            message = str(e.detail) if e.detail else "request failed"
        return error_response(e.status_code, message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return error_response(400, f"parameter '{loc}': {err.get('msg', 'invalid')}")

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, e: StoreUnavailable):
        log.error("store unavailable: %s", e)
        return error_response(502, f"service temporarily unavailable: {e}")

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", request_id=getattr(request.state, "request_id", None))

    # --- helpers -------------------------------------------------------------------------------------------
    def base_url(request: Request) -> str:
        return settings.public_url or str(request.base_url).rstrip("/")

    def job_urls(request: Request, job_id: str) -> dict[str, str]:
        base = base_url(request)
        return {"status_url": f"{base}/v2/requests/{job_id}/status", "response_url": f"{base}/v2/requests/{job_id}"}

    async def parse_body(request: Request) -> TTSRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body too large (limit {MAX_BODY_BYTES // (1024 * 1024)} MiB)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"request body too large (limit {MAX_BODY_BYTES // (1024 * 1024)} MiB)")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            raise ApiError(400, "empty request body: send a JSON object of parameters, at least {\"text\": ...}")
        try:
            params = TTSRequest.model_validate_json(body)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            if err.get("type") == "json_invalid":
                raise ApiError(400, f"malformed JSON body: {err.get('msg', '').removeprefix('Invalid JSON: ')}")
            raise ApiError(400, describe_validation_error(e))
        text = params.text.strip()
        if not text:
            raise ApiError(400, "parameter 'text': must not be empty")
        if len(text) > settings.max_text_chars:
            raise ApiError(400, f"parameter 'text': {len(text)} characters is more than this server's limit of "
                                f"{settings.max_text_chars}")
        if params.reference_audio is not None:
            from ..media import ReferenceError, parse_reference
            try:
                await run_in_threadpool(parse_reference, params.reference_audio)
            except ReferenceError as e:
                raise ApiError(400, str(e))
        return params.model_copy(update={"text": text})

    def submit(request: Request, params: TTSRequest, owner: str, mode: str) -> Job:
        job = Job(id=str(uuid.uuid4()), owner=owner, params=params.model_dump(mode="json"))
        gate.charge_submission(request, job.id, params.text)     # 429 over the key's rate, 406 unpaid
        try:
            store.submit(job, settings.max_queue)
        except QueueFull as e:
            gate.refund_submission(request, job.id, "queue full: not queued")
            rejected.inc()
            raise ApiError(429, f"the queue is full ({e}); retry later", {"Retry-After": "5"})
        except BaseException:
            gate.refund_submission(request, job.id, "not queued: store error")
            raise
        submitted.labels(mode).inc()
        if worker is not None:
            worker.notify()
        log.info("job queued", extra={"request_id": job.id, "mode": mode, "owner": owner or None,
                                      "chars": len(params.text)})
        return job

    def find(job_id: str, owner: str) -> Job:
        job = store.get(job_id) if _SAFE_ID.match(job_id) else None
        if job is None or job.owner != owner:
            raise ApiError(404, f"request {job_id} not found (unknown, or expired after "
                                f"{settings.retention_seconds:g} s)")
        return job

    def output_url(request: Request, job: Job) -> str | None:
        if job.state != JobState.COMPLETED or job.finished_at is None:
            return None
        ext = _EXT_BY_TYPE.get(job.media_type or "", "bin")
        expires = int(job.finished_at + settings.retention_seconds)
        name = f"{job.id}.{ext}"
        return f"{base_url(request)}/files/{name}?{signer.query(name, expires)}"

    def no_worker_reason() -> str | None:
        if worker is not None:
            return None if worker.alive else "the worker is not running"
        if not store.stats().workers:
            return "no worker is running to serve this request"
        return None

    # --- the contract --------------------------------------------------------------------------------------
    @app.post(f"/v2/{SLUG}", response_model=SubmitResponse, tags=["chatterbox-tts"],
              responses={**_ERROR_RESPONSES, **_NOT_ENOUGH_CREDITS}, summary="Queue a synthesis job",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": TTSRequest.model_json_schema()}}}})
    async def submit_v2(request: Request, owner: str = Depends(auth)):
        params = await parse_body(request)
        job = await run_in_threadpool(submit, request, params, owner, "v2")
        return JSONResponse({"request_id": job.id, "status": "QUEUED", **job_urls(request, job.id)},
                            headers={"x-request-id": job.id})

    @app.post(f"/v1/{SLUG}", tags=["chatterbox-tts"], summary="Synthesize and wait for the audio",
              responses={200: {"content": {t: {} for t in OUTPUT_FORMATS.values()},
                               "description": "The audio file"},
                         422: {"model": ErrorResponse, "description": "The job FAILED"},
                         504: {"model": ErrorResponse, "description": "Waited longer than the sync limit; "
                                                                       "the job goes on (poll its status_url)"},
                         **_ERROR_RESPONSES, **_NOT_ENOUGH_CREDITS},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": TTSRequest.model_json_schema()}}}})
    async def run_v1(request: Request, owner: str = Depends(auth)):
        params = await parse_body(request)
        reason = await run_in_threadpool(no_worker_reason)
        deadline = time.monotonic() + NO_WORKER_GRACE_S
        while reason and time.monotonic() < deadline:     # ride out a worker restart before answering 502
            await anyio.sleep(0.25)
            reason = await run_in_threadpool(no_worker_reason)
        if reason:
            raise ApiError(502, f"service temporarily unavailable: {reason}")
        job = await run_in_threadpool(submit, request, params, owner, "v1")
        final = await anyio.to_thread.run_sync(store.wait, job.id, settings.sync_timeout, limiter=wait_limiter)
        ids = {"x-request-id": job.id}
        if final is None:
            raise ApiError(500, "the job disappeared before it finished", ids, request_id=job.id)
        if final.state == JobState.FAILED:
            raise ApiError(422, final.error or "failed", ids, request_id=job.id, status="FAILED")
        if final.state != JobState.COMPLETED:
            raise ApiError(504, f"the request did not finish within {settings.sync_timeout:g} s; it goes on: poll "
                                f"its status_url", ids, request_id=job.id, status=final.state.value,
                           **job_urls(request, job.id))
        audio = await run_in_threadpool(store.get_audio, job.id)
        if audio is None:
            raise ApiError(404, f"request {job.id} expired before its audio could be sent", ids)
        data, media_type = audio
        headers = {**ids, "x-seed-value": str(params.seed), "cache-control": "no-store",
                   "x-generation-time": str(final.metrics.get("inference_time", "")),
                   "content-disposition": f'inline; filename="{job.id}.{_EXT_BY_TYPE.get(media_type, "bin")}"'}
        return Response(content=data, media_type=media_type, headers=headers)

    @app.post("/v1/{slug}", include_in_schema=False)
    @app.post("/v2/{slug}", include_in_schema=False)
    async def unknown_model(slug: str):
        raise ApiError(404, f"model {slug!r} not found: this server serves '{SLUG}'")

    @app.get("/v2/requests/{request_id}/status", response_model=StatusResponse, tags=["chatterbox-tts"],
             summary="Poll a job", responses={422: {"model": StatusResponse, "description": "The job FAILED"},
                                              **_ERROR_RESPONSES})
    def status_v2(request_id: str, owner: str = Depends(auth)):
        job = find(request_id, owner)
        body: dict[str, Any] = {"request_id": job.id, "status": job.state.value, "metrics": job.metrics or {}}
        if job.state == JobState.FAILED:
            body["error"] = job.error or "failed"
        return JSONResponse(body, status_code=422 if job.state == JobState.FAILED else 200,
                            headers={"x-request-id": job.id})

    @app.get("/v2/requests/{request_id}", response_model=ResultResponse, tags=["chatterbox-tts"],
             summary="The result of a job", responses={422: {"model": ResultResponse, "description": "FAILED"},
                                                       **_ERROR_RESPONSES})
    def result_v2(request: Request, request_id: str, owner: str = Depends(auth)):
        job = find(request_id, owner)
        body: dict[str, Any] = {"request_id": job.id, "status": job.state.value, "output": output_url(request, job),
                                "metrics": job.metrics or {}}
        if job.state == JobState.FAILED:
            body["error"] = job.error or "failed"
        return JSONResponse(body, status_code=422 if job.state == JobState.FAILED else 200,
                            headers={"x-request-id": job.id})

    @app.head("/files/{name}", include_in_schema=False)
    @app.get("/files/{name}", tags=["chatterbox-tts"],
                   summary="The audio of a COMPLETED job (signed URL from `output`)",
                   responses={200: {"content": {t: {} for t in OUTPUT_FORMATS.values()}}, **_ERROR_RESPONSES})
    def audio_file(name: str, expires: str | None = None, signature: str | None = None):
        match = _FILE_NAME.match(name)
        problem = signer.verify(name, expires, signature) if match else "invalid"
        if problem == "invalid":
            raise ApiError(403, "invalid or missing signature: use the `output` URL exactly as returned")
        if problem == "expired":
            raise ApiError(404, "this audio has expired")
        job_id, ext = match.group(1), match.group(2)
        job = store.get(job_id)
        if job is None or job.state != JobState.COMPLETED or _EXT_BY_TYPE.get(job.media_type or "") != ext:
            raise ApiError(404, "this audio does not exist or has expired")
        headers = {"x-request-id": job_id, "content-disposition": f'inline; filename="{name}"',
                   "cache-control": f"private, max-age={max(0, int(expires) - int(time.time()))}"}
        path_of = getattr(store, "audio_file", None)
        path = path_of(job_id) if path_of else None
        if path is not None:
            return FileResponse(path, media_type=job.media_type, headers=headers)
        audio = store.get_audio(job_id)
        if audio is None:
            raise ApiError(404, "this audio does not exist or has expired")
        return Response(content=audio[0], media_type=audio[1], headers=headers)

    # --- operations ----------------------------------------------------------------------------------------
    @app.get("/health", tags=["operations"], summary="The process is alive")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="Model loaded, worker running, store reachable",
             responses={503: {"model": ErrorResponse}})
    def ready():
        stats = store.stats()
        problem = no_worker_reason()
        body = {"model": model_name or None, "engine_loaded": engine is not None,
                "worker": worker.worker_id if worker else None, "workers_alive": len(stats.workers),
                "workers": stats.workers, "oldest_queued_age_s": round(stats.oldest_queued_age, 3),
                "queue_depth": stats.by_state.get("QUEUED", 0)}
        if problem:
            return JSONResponse({"error": f"not ready: {problem}", "status": "not ready", **body}, status_code=503)
        return {"status": "ready", **body}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}}})
    def metrics():
        data = generate_latest(registry)
        if worker is not None:
            data += generate_latest(worker.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    install_accounts(app, gate)     # /v1/account, /v1/admin/*, x-remaining-credits, {"error"} for its errors
    # the request-id/logging middleware wraps everything, error handlers included
    app.add_middleware(_RequestContext, requests=http_requests, latency=http_latency)
    return app
