"""The hosted contract (../shared/docs/api-contract.md):

    POST /v1/chatterbox-tts            sync: parameters in, audio bytes out (through the same queue as v2)
    POST /v2/chatterbox-tts            queue a job: {request_id, status, status_url, response_url}
    POST /v1|v2/<model>                the same for every model this deployment serves (ctx.models:
                                       chatterbox-turbo, chatterbox-multilingual, chatterbox-vc), each with its
                                       own request schema (api/schemas.py REQUESTS); a model not served is 404
    GET  /v2/requests/{id}/status      {request_id, status, metrics[, error]}   (FAILED: HTTP 422)
    GET  /v2/requests/{id}             {request_id, status, output, metrics[, error]}   (FAILED: HTTP 422)

and this server's queue conventions, additive (a client of the hosted contract sees nothing change):

    POST /v2/requests/{id}/cancel      cancel a QUEUED or PROCESSING job: 200 with its status body (FAILED,
                                       cancelled: true); 409 when it finished otherwise
    GET  /v2/requests/{id}/events      Server-Sent Events of its state changes and progress, resumable with
                                       Last-Event-ID, ending after the terminal event
    webhook_url (v2 body), Idempotency-Key (v1/v2 header), queue_position (status/result of a QUEUED job)

and streaming, additive (`"stream": true` in the body; without it nothing changes):

    POST /v1/chatterbox-tts            {"stream": true}: the audio as it is generated (chunked), from the job's
                                       chunk channel (api/audio_stream.py), once its first piece exists
    GET  /v2/requests/{id}/audio       a job's audio: the whole file once COMPLETED; while QUEUED / PROCESSING, a
                                       job submitted with "stream": true is streamed as it is generated
"""
from __future__ import annotations

import json
import time

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...media import FORMATS
from ...jobs.store import ChunkRead, Job, JobState
from ..audio_stream import cut_on_failure, encoded_audio
from ..context import EXT_BY_TYPE, NO_WORKER_GRACE_S, STATE_REPLAYED, ApiContext  # noqa: F401 - re-exported
from ..errors import ERROR_RESPONSES, NOT_ENOUGH_CREDITS, ApiError, echo
from ..fileresponse import serve_file
from ..schemas import MODEL, REQUESTS, V2_REQUESTS, ErrorResponse, ResultResponse, StatusResponse, SubmitResponse

SLUG = MODEL              # the hosted contract's model, the default one where it is served
SUMMARIES = {"chatterbox-tts": ("Queue a synthesis job", "Synthesize and wait for the audio"),
             "chatterbox-turbo": ("Queue a synthesis job (Turbo)", "Synthesize with Turbo and wait for the audio"),
             "chatterbox-multilingual": ("Queue a synthesis job (23 languages)",
                                         "Synthesize in one of 23 languages and wait for the audio"),
             "chatterbox-vc": ("Queue a voice conversion job", "Convert a voice and wait for the audio")}
_IDEMPOTENCY_DOC = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string",
                    "maxLength": 255}, "description": "Retry safely: the same key and body (per API key, within the "
                    "retention) answer the first submission's request again (header idempotent-replayed: true), "
                    "no second job or charge; the same key with another body is 409."}
EVENTS_POLL_S = 0.2        # how often an event stream looks for new events in the store
KEEPALIVE_S = 15.0         # a comment line this often keeps proxies from closing a quiet stream


def _body_doc(schema: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema.model_json_schema()}}}}


def router(ctx: ApiContext) -> APIRouter:
    root = APIRouter()             # each model's routes under its own tag, first (before the unknown model's)
    for model in ctx.models:
        _model_routes(root, ctx, model)
    r = APIRouter(tags=[SLUG])     # the job routes (every model's jobs) under the hosted contract's tag
    auth, store = ctx.auth, ctx.store

    @r.post("/v1/{slug}", include_in_schema=False)
    @r.post("/v2/{slug}", include_in_schema=False)
    async def unknown_model(slug: str):
        served = ", ".join(f"'{m}'" for m in ctx.models)
        raise ApiError(404, f"model {echo(slug)!r} not found: this server serves {served}")

    @r.get("/v2/requests/{request_id}/status", response_model=StatusResponse, summary="Poll a job",
           responses={422: {"model": StatusResponse, "description": "The job FAILED"}, **ERROR_RESPONSES})
    def status_v2(request: Request, request_id: str, owner: str = Depends(auth)):
        return job_response(request, request_id, owner, with_output=False)

    @r.get("/v2/requests/{request_id}", response_model=ResultResponse, summary="The result of a job",
           responses={422: {"model": ResultResponse, "description": "FAILED"}, **ERROR_RESPONSES})
    def result_v2(request: Request, request_id: str, owner: str = Depends(auth)):
        return job_response(request, request_id, owner, with_output=True)

    def job_response(request: Request, request_id: str, owner: str, with_output: bool) -> JSONResponse:
        job = ctx.find(request_id, owner)
        body, code = ctx.job_body(request, job, with_output)
        return JSONResponse(body, status_code=code, headers={"x-request-id": job.id})

    @r.get("/v2/requests/{request_id}/audio", summary="A job's audio (streamed while it is generated)",
           responses={200: {"content": {t: {} for t in FORMATS.values()},
                            "description": "The audio file; for a job submitted with stream: true that is still "
                                           "running, the audio as it is generated (chunked)"},
                      409: {"model": ErrorResponse, "description": "Not COMPLETED, and not submitted with stream: "
                                                                   "true"},
                      422: {"model": ErrorResponse, "description": "The job FAILED"},
                      504: {"model": ErrorResponse, "description": "No audio within the sync limit (it goes on)"},
                      **ERROR_RESPONSES})
    async def audio_v2(request: Request, request_id: str, owner: str = Depends(auth)):
        """COMPLETED: the audio file (Range and If-None-Match answered, as the `output` URL). QUEUED or PROCESSING
        and submitted with `"stream": true`: the audio as it is generated, once its first piece exists (waiting up
        to the sync limit: 504 then, the job goes on); if the job fails after that, the response ends early
        (an incomplete chunked body). FAILED: 422."""
        job = await run_in_threadpool(ctx.find, request_id, owner)
        ids = {"x-request-id": job.id}
        if job.state == JobState.FAILED:
            raise ApiError(422, job.error or "failed", ids, request_id=job.id, status="FAILED")
        if job.state != JobState.COMPLETED:
            if not job.params.get("stream"):
                raise ApiError(409, f"request {job.id} is {job.state.value}: its audio is served once it is COMPLETED "
                                    "(poll its status_url); submit with \"stream\": true to hear it while it is made",
                               ids, request_id=job.id, status=job.state.value)
            job, first, audio = await ctx.wait_for_audio(request, job.id, ctx.settings.sync_timeout)
            if first is not None:
                return audio_response(store, job, first, None, {**ids, "cache-control": "no-store"})
        fmt = str(job.params.get("output_format") or "mp3")
        ext = EXT_BY_TYPE.get(job.media_type or "", fmt)
        headers = {**ids, "cache-control": "private, no-cache",
                   "content-disposition": f'inline; filename="{job.id}.{ext}"'}
        path_of = getattr(store, "audio_file", None)     # a file on disk: streamed, not read whole
        path = await run_in_threadpool(path_of, job.id) if path_of else None
        if path is not None:
            return serve_file(path, job.media_type or "application/octet-stream", headers, etag_key=job.id)
        audio = await run_in_threadpool(store.get_audio, job.id)
        if audio is None:
            raise ApiError(404, f"request {job.id} expired before its audio could be sent", ids)
        return serve_file(audio[0], audio[1], headers)

    @r.post("/v2/requests/{request_id}/cancel", response_model=StatusResponse, summary="Cancel a job",
            responses={409: {"model": ErrorResponse, "description": "The job already finished"}, **ERROR_RESPONSES})
    def cancel_v2(request: Request, request_id: str, owner: str = Depends(auth)):
        """A QUEUED job never runs; a PROCESSING one is FAILED at once (its worker drops it at its next stage;
        the engine's batch in progress is not interrupted). The hold is released with the transition. Cancelling
        a cancelled job answers the same again; a finished one is 409."""
        job = ctx.find(request_id, owner)
        if not job.state.terminal:
            job = store.cancel(job.id) or job
        ids = {"x-request-id": job.id}
        if not (job.state == JobState.FAILED and job.cancelled):
            raise ApiError(409, f"request {job.id} already finished ({job.state.value}): it cannot be cancelled",
                           ids, request_id=job.id, status=job.state.value)
        body, _ = ctx.job_body(request, job, with_output=False)
        return JSONResponse(body, status_code=200, headers=ids)

    @r.get("/v2/requests/{request_id}/events", summary="Follow a job (Server-Sent Events)",
           responses={200: {"content": {"text/event-stream": {}}, "description": "The event stream"},
                      **ERROR_RESPONSES})
    async def events_v2(request: Request, request_id: str, owner: str = Depends(auth)):
        """`event: state` (data: {request_id, status, ...}; the terminal one carries the whole result body, as
        GET /v2/requests/{id}), `event: progress` (data: {request_id, stage, chunks_done, chunks_total}), each
        with an `id:` to resume from (`Last-Event-ID`); `event: queue` (no id: {queue_position}) while QUEUED
        when the position changes; a comment every 15 s. The stream ends after the terminal event."""
        job = await run_in_threadpool(ctx.find, request_id, owner)
        raw = request.headers.get("last-event-id", "").strip()
        if raw and not raw.isdigit():
            raise ApiError(400, "header 'Last-Event-ID': must be the id of an event of this stream")
        after = int(raw or 0)
        return StreamingResponse(event_stream(request, job.id, after), media_type="text/event-stream",
                                 headers={"x-request-id": job.id, "cache-control": "no-store",
                                          "x-accel-buffering": "no"})

    async def event_stream(request: Request, job_id: str, after: int):
        yield "retry: 1000\n\n"
        last_write, position = time.monotonic(), None
        while True:
            events = await run_in_threadpool(store.job_events, job_id, after)
            for ev in events:
                after = ev.seq
                data = {"request_id": job_id, **ev.data}
                terminal = ev.type == "state" and ev.data.get("status") in ("COMPLETED", "FAILED")
                if terminal:
                    job = await run_in_threadpool(store.get, job_id)
                    if job is not None:
                        body, _ = await run_in_threadpool(ctx.job_body, request, job, True)
                        data = {**body, "at": ev.data.get("at")}
                yield f"id: {ev.seq}\nevent: {ev.type}\ndata: {json.dumps(data)}\n\n"
                last_write = time.monotonic()
                if terminal:
                    return
            if not events:
                job = await run_in_threadpool(store.get, job_id)
                if job is None:                          # expired
                    return
                if job.state.terminal:                   # its terminal event was written with the state: one
                    if not await run_in_threadpool(store.job_events, job_id, after, 1):   # more look, or done
                        return                           # (resumed after the end)
                    continue
                if job.state == JobState.QUEUED:
                    now = await run_in_threadpool(store.queue_position, job_id)
                    if now is not None and now != position:
                        position = now
                        yield f"event: queue\ndata: {json.dumps({'request_id': job_id, 'queue_position': now})}\n\n"
                        last_write = time.monotonic()
                if time.monotonic() - last_write >= KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    last_write = time.monotonic()
            await anyio.sleep(EVENTS_POLL_S)

    root.include_router(r)
    return root


def _model_routes(r: APIRouter, ctx: ApiContext, model: str) -> None:
    """POST /v2/<model> (queue) and /v1/<model> (wait for the audio) with `model`'s request schema."""
    auth = ctx.auth
    v1_request, v2_request = REQUESTS[model], V2_REQUESTS[model]
    v2_summary, v1_summary = SUMMARIES.get(model, (f"Queue a {model} job", f"Run {model} and wait for the audio"))
    tags = [model]

    async def submit_v2(request: Request, owner: str = Depends(auth)):
        params = await ctx.parse_tts(request, v2_request)
        job = await run_in_threadpool(ctx.submit, request, params, owner, "v2", model)
        headers = {"x-request-id": job.id}
        if getattr(request.state, STATE_REPLAYED, False):
            headers["idempotent-replayed"] = "true"
        return JSONResponse({"request_id": job.id, "status": "QUEUED", **ctx.job_urls(request, job.id)},
                            headers=headers)

    async def run_v1(request: Request, owner: str = Depends(auth)):
        params = await ctx.parse_tts(request, v1_request)
        if params.stream:
            job, first, audio = await ctx.run_and_stream(request, params, owner, "v1", model)   # 502/422/504
            headers = {"x-request-id": job.id, "x-seed-value": str(params.seed), "cache-control": "no-store"}
            if getattr(request.state, STATE_REPLAYED, False):
                headers["idempotent-replayed"] = "true"
            return audio_response(ctx.store, job, first, audio, headers)
        job, data, media_type = await ctx.run_and_wait(request, params, owner, "v1", model)   # 502/422/504
        final, ids = job, {"x-request-id": job.id}
        headers = {**ids, "x-seed-value": str(params.seed), "cache-control": "no-store",
                   "x-generation-time": str(final.metrics.get("inference_time", "")),
                   "content-disposition": f'inline; filename="{job.id}.{EXT_BY_TYPE.get(media_type, "bin")}"'}
        if getattr(request.state, STATE_REPLAYED, False):
            headers["idempotent-replayed"] = "true"
        return Response(content=data, media_type=media_type, headers=headers)

    suffix = "" if model == SLUG else "_" + model.removeprefix("chatterbox-").replace("-", "_")
    submit_v2.__name__, run_v1.__name__ = f"submit_v2{suffix}", f"run_v1{suffix}"
    r.add_api_route(f"/v2/{model}", submit_v2, methods=["POST"], response_model=SubmitResponse, tags=tags,
                    responses={**ERROR_RESPONSES, **NOT_ENOUGH_CREDITS,
                               409: {"model": ErrorResponse, "description": "Idempotency-Key used before with another "
                                                                            "body"}},
                    summary=v2_summary, description=v2_request.__doc__ if model != SLUG else None,
                    openapi_extra={**_body_doc(v2_request), "parameters": [_IDEMPOTENCY_DOC]})
    r.add_api_route(f"/v1/{model}", run_v1, methods=["POST"], tags=tags, summary=v1_summary,
                    description=v1_request.__doc__ if model != SLUG else None,
                    openapi_extra={**_body_doc(v1_request), "parameters": [_IDEMPOTENCY_DOC]},
                    responses={200: {"content": {t: {} for t in FORMATS.values()}, "description": "The audio file"},
                               422: {"model": ErrorResponse, "description": "The job FAILED"},
                               504: {"model": ErrorResponse, "description": "Waited longer than the sync limit; "
                                                                            "the job goes on (poll its status_url)"},
                               **ERROR_RESPONSES, **NOT_ENOUGH_CREDITS})


def audio_response(store, job: Job, first: ChunkRead | None, audio: tuple[bytes, str] | None,
                   headers: dict) -> Response:
    """A streamed job's audio: from its chunk channel as it comes, or (its worker did not stream) the file."""
    fmt = str(job.params.get("output_format") or "mp3")
    headers = {**headers, "content-disposition": f'inline; filename="{job.id}.{fmt}"'}
    if first is None:
        return Response(content=audio[0], media_type=audio[1], headers=headers)
    body = encoded_audio(store, job.id, first, fmt, float(job.params.get("speed") or 1.0))
    return StreamingResponse(cut_on_failure(body, job.id), media_type=FORMATS[fmt],
                             headers={**headers, "x-accel-buffering": "no"})
