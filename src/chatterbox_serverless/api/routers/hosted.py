"""The hosted contract (../shared/docs/api-contract.md):

    POST /v1/chatterbox-tts            sync: parameters in, audio bytes out (through the same queue as v2)
    POST /v2/chatterbox-tts            queue a job: {request_id, status, status_url, response_url}
    GET  /v2/requests/{id}/status      {request_id, status, metrics[, error]}   (FAILED: HTTP 422)
    GET  /v2/requests/{id}             {request_id, status, output, metrics[, error]}   (FAILED: HTTP 422)

and this server's queue conventions, additive (a client of the hosted contract sees nothing change):

    POST /v2/requests/{id}/cancel      cancel a QUEUED or PROCESSING job: 200 with its status body (FAILED,
                                       cancelled: true); 409 when it finished otherwise
    GET  /v2/requests/{id}/events      Server-Sent Events of its state changes and progress, resumable with
                                       Last-Event-ID, ending after the terminal event
    webhook_url (v2 body), Idempotency-Key (v1/v2 header), queue_position (status/result of a QUEUED job)
"""
from __future__ import annotations

import json
import time

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...media import FORMATS
from ...jobs.store import JobState
from ..context import EXT_BY_TYPE, NO_WORKER_GRACE_S, STATE_REPLAYED, ApiContext  # noqa: F401 - re-exported
from ..errors import ERROR_RESPONSES, NOT_ENOUGH_CREDITS, ApiError, echo
from ..schemas import ErrorResponse, ResultResponse, StatusResponse, SubmitResponse, TTSRequest, V2Request

SLUG = "chatterbox-tts"
_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": TTSRequest.model_json_schema()}}}}
_V2_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": V2Request.model_json_schema()}}}}
_IDEMPOTENCY_DOC = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string",
                    "maxLength": 255}, "description": "Retry safely: the same key and body (per API key, within the "
                    "retention) answer the first submission's request again (header idempotent-replayed: true), "
                    "no second job or charge; the same key with another body is 409."}
EVENTS_POLL_S = 0.2        # how often an event stream looks for new events in the store
KEEPALIVE_S = 15.0         # a comment line this often keeps proxies from closing a quiet stream


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter(tags=[SLUG])
    auth, store = ctx.auth, ctx.store

    @r.post(f"/v2/{SLUG}", response_model=SubmitResponse, responses={
                **ERROR_RESPONSES, **NOT_ENOUGH_CREDITS,
                409: {"model": ErrorResponse, "description": "Idempotency-Key used before with another body"}},
            summary="Queue a synthesis job", openapi_extra={**_V2_BODY_DOC, "parameters": [_IDEMPOTENCY_DOC]})
    async def submit_v2(request: Request, owner: str = Depends(auth)):
        params = await ctx.parse_tts(request, V2Request)
        job = await run_in_threadpool(ctx.submit, request, params, owner, "v2")
        headers = {"x-request-id": job.id}
        if getattr(request.state, STATE_REPLAYED, False):
            headers["idempotent-replayed"] = "true"
        return JSONResponse({"request_id": job.id, "status": "QUEUED", **ctx.job_urls(request, job.id)},
                            headers=headers)

    @r.post(f"/v1/{SLUG}", summary="Synthesize and wait for the audio",
            openapi_extra={**_BODY_DOC, "parameters": [_IDEMPOTENCY_DOC]},
            responses={200: {"content": {t: {} for t in FORMATS.values()}, "description": "The audio file"},
                       422: {"model": ErrorResponse, "description": "The job FAILED"},
                       504: {"model": ErrorResponse, "description": "Waited longer than the sync limit; "
                                                                     "the job goes on (poll its status_url)"},
                       **ERROR_RESPONSES, **NOT_ENOUGH_CREDITS})
    async def run_v1(request: Request, owner: str = Depends(auth)):
        params = await ctx.parse_tts(request)
        job, data, media_type = await ctx.run_and_wait(request, params, owner, "v1")   # 502/422/504 as ApiError
        final, ids = job, {"x-request-id": job.id}
        headers = {**ids, "x-seed-value": str(params.seed), "cache-control": "no-store",
                   "x-generation-time": str(final.metrics.get("inference_time", "")),
                   "content-disposition": f'inline; filename="{job.id}.{EXT_BY_TYPE.get(media_type, "bin")}"'}
        if getattr(request.state, STATE_REPLAYED, False):
            headers["idempotent-replayed"] = "true"
        return Response(content=data, media_type=media_type, headers=headers)

    @r.post("/v1/{slug}", include_in_schema=False)
    @r.post("/v2/{slug}", include_in_schema=False)
    async def unknown_model(slug: str):
        raise ApiError(404, f"model {echo(slug)!r} not found: this server serves '{SLUG}'")

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

    return r
