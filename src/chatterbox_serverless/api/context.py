"""What every router shares: the service it serves (and the API models it serves), the account gate, URL
building and signing, reading JSON bodies, submitting a job (for one model), finding a caller's job. One
`ApiContext` per app; routers are built over it (`routers/*.py: router(ctx) -> APIRouter`).

Models: `models` are the API model names this deployment serves (`Service.served_models`, the default first);
each has its request schema (api/schemas.py REQUESTS). A job is submitted for one model (`submit(..., model=)`,
stored as `Job.model`: only a worker of that model claims it); a synchronous call waits for a live worker of its
model."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import ValidationError

from ..jobs.store import DEFAULT_MODEL, ChunkRead, Job, JobState, QueueFull
from ..media import FORMATS
from ..service import Service
from .auth import AccountGate
from .errors import ApiError, echo
from .middleware import SAFE_ID
from .bodies import JobBodies
from .schemas import REQUESTS, AnyRequest, TTSRequest, describe_validation_error
from .signing import UrlSigner

log = logging.getLogger("chatterbox_serverless.api")

MAX_BODY_BYTES = 16 * 1024 * 1024     # a 10 MB reference clip in base64 fits
NO_WORKER_GRACE_S = 2.0   # a synchronous call waits this long for a live worker before answering 502
EXT_BY_TYPE = {media_type: name for name, media_type in FORMATS.items()}
IDEMPOTENCY_HEADER = "idempotency-key"
IDEMPOTENT_MODES = ("v1", "v2")          # the hosted routes honour Idempotency-Key
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
IDEMPOTENCY_WAIT = 10.0                  # seconds a duplicate waits for the first submission to be stored
STATE_REPLAYED = "idempotent_replay"     # request.state: the answer is the first submission's job


@dataclass
class ApiMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("chatterbox_http_requests", "HTTP requests", ["endpoint", "method", "status"],
                                registry=r)
        self.latency = Histogram("chatterbox_http_request_seconds", "HTTP request latency", ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5, 30))
        self.submitted = Counter("chatterbox_jobs_submitted", "Jobs accepted", ["mode"], registry=r)
        self.rejected = Counter("chatterbox_jobs_rejected", "Submissions refused because the queue was full",
                                registry=r)


class ApiContext:
    def __init__(self, service: Service):
        self.service = service
        self.settings = service.settings
        self.store = service.store
        self.worker = service.worker
        self.gate = AccountGate(service.accounts)
        self.auth = self.gate.dependency
        self.signer = UrlSigner(self.settings.load_url_secret())
        self.bodies = JobBodies(self.signer, self.settings.retention_seconds)
        self.metrics = ApiMetrics()
        from ..media.fetch import AllowList
        self.allow_hosts = AllowList(self.settings.allow_fetch_hosts)     # what reference URLs may reach
        self.voices = service.voices                                      # the voice library, or None
        self.wait_limiter = anyio.CapacityLimiter(1000)    # threads parked in store.wait for synchronous calls
        self.models: tuple[str, ...] = tuple(service.served_models)    # API models served, the default first
        unknown = [m for m in self.models if m not in REQUESTS]
        if unknown:
            raise ValueError(f"no request schema for the model {unknown[0]!r} (api/schemas.py REQUESTS knows "
                             f"{', '.join(REQUESTS)})")

    @property
    def default_model(self) -> str:
        return self.models[0]

    # --- URLs ------------------------------------------------------------------------------------------------
    def base_url(self, request: Request) -> str:
        return self.settings.public_url or str(request.base_url).rstrip("/")

    def job_urls(self, request: Request, job_id: str) -> dict[str, str]:
        base = self.base_url(request)
        return {"status_url": f"{base}/v2/requests/{job_id}/status", "response_url": f"{base}/v2/requests/{job_id}"}

    def output_url(self, request: Request, job: Job) -> str | None:
        return self.bodies.output_url(self.base_url(request), job)

    # --- bodies ----------------------------------------------------------------------------------------------
    async def read_json_body(self, request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
        """The raw body of a JSON request. 415 unless the content type is application/json (a browser's
        "simple request" cannot send that cross-origin without CORS approval), 413 over `limit`."""
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
            raise ApiError(415, "the request body must be JSON, sent with the header content-type: application/json"
                                + (f" (got {echo(ctype)!r})" if ctype else ""))
        too_large = f"request body too large (limit {limit // (1024 * 1024)} MiB)"
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, too_large)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, too_large)
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse_tts(self, request: Request, model: type[AnyRequest] = TTSRequest) -> AnyRequest:
        """A model's parameters (`model`: its request schema, api/schemas.py REQUESTS / V2_REQUESTS: TTSRequest,
        V2Request with webhook_url, ...), validated: 400 naming the parameter, 415/413 for the body. Audio given
        inline (reference_audio, source_audio) is decoded and probed here; URLs are checked for their address."""
        body = await self.read_json_body(request)
        if not body.strip():
            first = "source_audio" if "source_audio" in model.model_fields else "text"
            raise ApiError(400, f"empty request body: send a JSON object of parameters, at least {{\"{first}\": ...}}")
        try:
            params = model.model_validate_json(body)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            if err.get("type") == "json_invalid":
                raise ApiError(400, f"malformed JSON body: {err.get('msg', '').removeprefix('Invalid JSON: ')}")
            raise ApiError(400, describe_validation_error(e))
        update: dict[str, Any] = {}
        if "text" in model.model_fields:
            text = params.text.strip()
            if not text:
                raise ApiError(400, "parameter 'text': must not be empty")
            if len(text) > self.settings.max_text_chars:
                raise ApiError(400, f"parameter 'text': {len(text)} characters is more than this server's limit of "
                                    f"{self.settings.max_text_chars}")
            update["text"] = text
        if params.reference_audio is not None:
            await self.check_audio_param(params.reference_audio, "reference_audio",
                                         min_seconds=getattr(model, "min_reference_seconds", None))
        if getattr(params, "source_audio", None) is not None:
            await self.check_audio_param(params.source_audio, "source_audio")
        webhook_url = getattr(params, "webhook_url", None)
        if webhook_url is not None:
            from ..jobs.webhooks import WebhookUrlError, check_webhook_url
            try:
                update["webhook_url"] = check_webhook_url(webhook_url, self.allow_hosts)
            except WebhookUrlError as e:
                raise ApiError(400, str(e)) from None
        return params.model_copy(update=update)

    async def check_audio_param(self, value: str, name: str, min_seconds: float | None = None) -> Any:
        """An audio parameter (reference_audio's rules: media/reference.py) checked at submit: its
        ReferenceSource, or 400 naming `name`. Inline audio is decoded and probed (`min_seconds`: None, the
        media default); a URL's address is checked (SSRF rules, `--allow-fetch-hosts`)."""
        from ..media import ReferenceAudioError, parse_reference
        from ..media.reference import PARAM
        limits = {} if min_seconds is None else {"min_seconds": min_seconds}
        try:
            return await run_in_threadpool(lambda: parse_reference(value, allow_hosts=self.allow_hosts, **limits))
        except ReferenceAudioError as e:
            message = str(e)
            raise ApiError(400, name + message[len(PARAM):] if message.startswith(PARAM) else f"{name}: {message}")

    # --- jobs ------------------------------------------------------------------------------------------------
    def submit(self, request: Request, params: AnyRequest, owner: str, mode: str, model: str = DEFAULT_MODEL
               ) -> Job:
        """Hold the credits and queue the job for `model` (blocking: call in a thread). 429 when that model's
        queue is full. On the hosted routes, an Idempotency-Key header seen before (same owner, within the
        retention) with the same parameters and model returns that first job instead
        (`request.state.idempotent_replay`), with other ones 409. The job's params are the request's, by their
        API names (the worker reads `language`, `source_audio`, `top_k` from there)."""
        if params.voice is not None:     # the job records the library voice's id (None: the built-in voice)
            params = params.model_copy(update={"voice": self.resolve_voice(owner, params.voice)})
        webhook_url = getattr(params, "webhook_url", None)
        exclude = {"webhook_url"} | (set() if params.stream else {"stream"})   # unstreamed jobs: params as before
        job = Job(id=str(uuid.uuid4()), owner=owner, params=params.model_dump(mode="json", exclude=exclude),
                  webhook_url=webhook_url, base_url=self.base_url(request) if webhook_url else None, model=model)
        key = self.idempotency_key(request) if mode in IDEMPOTENT_MODES else None
        if key is not None:
            first = self._reserve_key(owner, key, _fingerprint(job), job.id)
            if first is not None:        # the same request again: its first job, nothing held or queued
                setattr(request.state, STATE_REPLAYED, True)
                log.info("idempotent replay", extra={"request_id": first.id, "mode": mode})
                return first
            try:
                return self._queue(request, params, job, mode)
            except ApiError:             # refused (credits, rate, queue full): the key may be used again
                self.store.release_idempotency_key(owner, key, job.id)
                raise
        return self._queue(request, params, job, mode)

    @staticmethod
    def idempotency_key(request: Request) -> str | None:
        """The request's Idempotency-Key header (400 unless 1-255 printable ASCII characters), or None."""
        value = request.headers.get(IDEMPOTENCY_HEADER)
        if value is None:
            return None
        if not IDEMPOTENCY_KEY.fullmatch(value):
            raise ApiError(400, "header 'Idempotency-Key': must be 1 to 255 printable ASCII characters")
        return value

    def _reserve_key(self, owner: str, key: str, fingerprint: str, job_id: str) -> Job | None:
        """Reserve the key for `job_id` (None), or the job it was first used for: 409 when that was with another
        body, or when that submission is still under way after IDEMPOTENCY_WAIT seconds."""
        deadline = time.monotonic() + IDEMPOTENCY_WAIT
        while True:
            first = self.store.claim_idempotency_key(owner, key, fingerprint, job_id, self.settings.retention_seconds)
            if first is None:
                return None
            if first.fingerprint != fingerprint:
                raise ApiError(409, f"Idempotency-Key {echo(key)!r} was already used with a different request "
                                    "body; use a new key for a new request")
            job = self.store.get(first.job_id)
            if job is not None and job.owner == owner:
                return job
            if time.monotonic() > deadline:
                raise ApiError(409, f"a request with Idempotency-Key {echo(key)!r} is still being submitted; "
                                    "retry in a few seconds", {"Retry-After": "2"})
            time.sleep(0.02)    # the first submission is between its reservation and its job

    def _queue(self, request: Request, params: AnyRequest, job: Job, mode: str) -> Job:
        """Hold the credits for `job` (by its text, or for voice conversion by its source's seconds) and store
        it."""
        owner = job.owner
        max_queue = self.settings.max_queue
        if self.gate.enabled and self._queued(job.model) >= max_queue:
            self._queue_full(f"{max_queue} jobs are waiting")      # refused before any hold: no ledger entry
        text = getattr(params, "text", "")
        source = getattr(params, "source_audio", None)
        seconds = self._source_seconds(source) if source is not None else None
        self.gate.charge_submission(request, job.id, text, seconds)     # 429 over the key's rate, 406 unpaid
        try:
            self.store.submit(job, max_queue, model=job.model)
        except QueueFull as e:
            self.gate.cancel_submission(request, job.id, "queue full: not queued")
            self._queue_full(str(e))
        except BaseException:
            self.gate.cancel_submission(request, job.id, "not queued: store error")
            raise
        self.metrics.submitted.labels(mode).inc()
        if self.worker is not None:
            self.worker.notify()
        log.info("job queued", extra={"request_id": job.id, "mode": mode, "owner": owner or None,
                                      "model": job.model, "chars": len(text)})
        return job

    def _queued(self, model: str) -> int:
        """QUEUED jobs of `model` (the store bounds each model's queue)."""
        return self.store.stats().queued_by_model.get(model, 0)

    def _source_seconds(self, value: str) -> float:
        """How long a voice conversion's result will be, for its hold: its source's length (inline audio: from
        its header, checked at parse), or for a URL, fetched only by the worker, the longest source allowed."""
        from ..media.decode import DEFAULT_MAX_SECONDS, probe_audio
        from ..media.reference import parse_reference
        source = parse_reference(value, allow_hosts=self.allow_hosts, check_audio=False)
        if source.data is None:
            return DEFAULT_MAX_SECONDS
        return min(probe_audio(source.data).seconds, DEFAULT_MAX_SECONDS)

    def resolve_voice(self, owner: str, value: str) -> str | None:
        """A request's `voice` as the id of a library voice the caller may use, or None (built-in); 400 naming
        the parameter otherwise (blocking: a store read)."""
        from ..voices.library import BUILTIN_VOICE, VoiceError
        if self.voices is None:
            if value.strip().lower() == BUILTIN_VOICE:
                return None
            raise ApiError(400, "parameter 'voice': this server has no voice library (use 'default')")
        try:
            return self.voices.resolve(owner, value)
        except VoiceError as e:
            raise ApiError(e.status, e.message) from None

    async def _live_worker(self, model: str | None = None) -> None:
        """502 when no worker (of `model`) is alive (after a short grace for a restart)."""
        reason = await run_in_threadpool(self.no_worker_reason, model)
        deadline = time.monotonic() + NO_WORKER_GRACE_S
        while reason and time.monotonic() < deadline:     # ride out a worker restart before answering 502
            await anyio.sleep(0.25)
            reason = await run_in_threadpool(self.no_worker_reason, model)
        if reason:
            raise ApiError(502, f"service temporarily unavailable: {reason}")

    async def run_and_stream(self, request: Request, params: AnyRequest, owner: str, mode: str,
                             model: str = DEFAULT_MODEL) -> tuple[Job, ChunkRead | None, tuple[bytes, str] | None]:
        """Queue a streamed job (`params.stream`) for `model` and wait for its first piece (the synchronous
        routes, streaming): 502/422/504 as `run_and_wait`, within sync_timeout. See `wait_for_audio` for what it
        returns."""
        await self._live_worker(model)
        job = await run_in_threadpool(self.submit, request, params, owner, mode, model)
        return await self.wait_for_audio(request, job.id, self.settings.sync_timeout)

    async def wait_for_audio(self, request: Request, job_id: str, timeout: float
                             ) -> tuple[Job, ChunkRead | None, tuple[bytes, str] | None]:
        """Wait for a job's first streamed piece: (job, the read that holds its first pieces, None). A job that
        COMPLETED without pieces (its worker's engine does not stream): (job, None, (audio, media type)). 422 when
        it FAILED, 504 when nothing came within `timeout` (the job goes on), 404 when it expired."""
        from .audio_stream import first_piece
        read = await first_piece(self.store, job_id, timeout)
        ids = {"x-request-id": job_id}
        job = await run_in_threadpool(self.store.get, job_id)
        if read is None or job is None:
            raise ApiError(404, f"request {job_id} expired before its audio could be sent", ids)
        if read.chunks:
            return job, read, None
        if job.state == JobState.FAILED:
            raise ApiError(422, job.error or "failed", ids, request_id=job_id, status="FAILED")
        if job.state != JobState.COMPLETED:
            raise ApiError(504, f"no audio came within {timeout:g} s; the request goes on: poll its status_url",
                           ids, request_id=job_id, status=job.state.value, **self.job_urls(request, job_id))
        audio = await run_in_threadpool(self.store.get_audio, job_id)
        if audio is None:
            raise ApiError(404, f"request {job_id} expired before its audio could be sent", ids)
        return job, None, audio

    async def run_and_wait(self, request: Request, params: AnyRequest, owner: str, mode: str,
                           model: str = DEFAULT_MODEL) -> tuple[Job, bytes, str]:
        """Queue a job for `model` and wait for it (the synchronous routes): 502 when no worker of that model is
        alive (after a short grace for a restart), 422 when the job FAILED, 504 when it is not done within
        sync_timeout (it goes on: the body carries its status URLs). Returns the COMPLETED job, its audio and
        media type."""
        await self._live_worker(model)
        job = await run_in_threadpool(self.submit, request, params, owner, mode, model)
        final = await anyio.to_thread.run_sync(self.store.wait, job.id, self.settings.sync_timeout,
                                               limiter=self.wait_limiter)
        ids = {"x-request-id": job.id}
        if final is None:
            raise ApiError(500, "the job disappeared before it finished", ids, request_id=job.id)
        if final.state == JobState.FAILED:
            raise ApiError(422, final.error or "failed", ids, request_id=job.id, status="FAILED")
        if final.state != JobState.COMPLETED:
            raise ApiError(504, f"the request did not finish within {self.settings.sync_timeout:g} s; it goes on: "
                                f"poll its status_url", ids, request_id=job.id, status=final.state.value,
                           **self.job_urls(request, job.id))
        audio = await run_in_threadpool(self.store.get_audio, job.id)
        if audio is None:
            raise ApiError(404, f"request {job.id} expired before its audio could be sent", ids)
        return final, audio[0], audio[1]

    def _queue_full(self, why: str) -> None:
        self.metrics.rejected.inc()
        raise ApiError(429, f"the queue is full ({why}); retry later", {"Retry-After": "5"})

    def find(self, job_id: str, owner: str) -> Job:
        """The caller's job, or 404 (another key's job is not found, not forbidden)."""
        job = self.store.get(job_id) if SAFE_ID.match(job_id) else None
        if job is None or job.owner != owner:
            raise ApiError(404, f"request {echo(job_id)} not found (unknown, or expired after "
                                f"{self.settings.retention_seconds:g} s)")
        return job

    def no_worker_reason(self, model: str | None = None) -> str | None:
        """Why no job (of `model`; None: of any model) can run now, or None. A worker in this process serves its
        engines' models; workers elsewhere advertise theirs in their heartbeat ("models"; none: the original)."""
        if self.worker is not None and (model is None or model in getattr(self.worker, "models", (DEFAULT_MODEL,))):
            return None if self.worker.alive else "the worker is not running"
        workers = self.store.stats().workers
        if model is None:
            return None if workers else "no worker is running to serve this request"
        if not any(model in ((info or {}).get("models") or (DEFAULT_MODEL,)) for info in workers.values()):
            return f"no worker is running to serve {model}"
        return None

    def job_body(self, request: Request, job: Job, with_output: bool) -> tuple[dict[str, Any], int]:
        """A job's status (or result) body and its HTTP status (422 when FAILED, as the hosted contract), with
        this server's additive fields (api/bodies.py). Blocking (a store read for a QUEUED job's position)."""
        position = self.store.queue_position(job.id) if job.state == JobState.QUEUED else None
        return self.bodies.body(self.base_url(request), job, with_output, position)


def _fingerprint(job: Job) -> str:
    """What makes two submissions "the same request" for an Idempotency-Key: the model, the validated parameters
    (defaults filled in) and the webhook URL (the original's jobs are fingerprinted as before models existed)."""
    fields: dict[str, Any] = {"params": job.params, "webhook_url": job.webhook_url}
    if job.model != DEFAULT_MODEL:
        fields["model"] = job.model
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
