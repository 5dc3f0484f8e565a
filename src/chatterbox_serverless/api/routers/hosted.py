"""The hosted contract (../shared/docs/api-contract.md):

    POST /v1/chatterbox-tts            sync: parameters in, audio bytes out (through the same queue as v2)
    POST /v2/chatterbox-tts            queue a job: {request_id, status, status_url, response_url}
    GET  /v2/requests/{id}/status      {request_id, status, metrics[, error]}   (FAILED: HTTP 422)
    GET  /v2/requests/{id}             {request_id, status, output, metrics[, error]}   (FAILED: HTTP 422)
"""
from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from ...jobs.store import JobState
from ...media import FORMATS
from ..context import EXT_BY_TYPE, ApiContext
from ..errors import ERROR_RESPONSES, NOT_ENOUGH_CREDITS, ApiError, echo
from ..schemas import ErrorResponse, ResultResponse, StatusResponse, SubmitResponse, TTSRequest

SLUG = "chatterbox-tts"
NO_WORKER_GRACE_S = 2.0   # v1 waits this long for a live worker before answering 502
_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": TTSRequest.model_json_schema()}}}}


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter(tags=[SLUG])
    store, settings, auth = ctx.store, ctx.settings, ctx.auth
    wait_limiter = anyio.CapacityLimiter(1000)    # threads parked in store.wait for v1 calls

    @r.post(f"/v2/{SLUG}", response_model=SubmitResponse, responses={**ERROR_RESPONSES, **NOT_ENOUGH_CREDITS},
            summary="Queue a synthesis job", openapi_extra=_BODY_DOC)
    async def submit_v2(request: Request, owner: str = Depends(auth)):
        params = await ctx.parse_tts(request)
        job = await run_in_threadpool(ctx.submit, request, params, owner, "v2")
        return JSONResponse({"request_id": job.id, "status": "QUEUED", **ctx.job_urls(request, job.id)},
                            headers={"x-request-id": job.id})

    @r.post(f"/v1/{SLUG}", summary="Synthesize and wait for the audio", openapi_extra=_BODY_DOC,
            responses={200: {"content": {t: {} for t in FORMATS.values()}, "description": "The audio file"},
                       422: {"model": ErrorResponse, "description": "The job FAILED"},
                       504: {"model": ErrorResponse, "description": "Waited longer than the sync limit; "
                                                                     "the job goes on (poll its status_url)"},
                       **ERROR_RESPONSES, **NOT_ENOUGH_CREDITS})
    async def run_v1(request: Request, owner: str = Depends(auth)):
        params = await ctx.parse_tts(request)
        reason = await run_in_threadpool(ctx.no_worker_reason)
        deadline = time.monotonic() + NO_WORKER_GRACE_S
        while reason and time.monotonic() < deadline:     # ride out a worker restart before answering 502
            await anyio.sleep(0.25)
            reason = await run_in_threadpool(ctx.no_worker_reason)
        if reason:
            raise ApiError(502, f"service temporarily unavailable: {reason}")
        job = await run_in_threadpool(ctx.submit, request, params, owner, "v1")
        final = await anyio.to_thread.run_sync(store.wait, job.id, settings.sync_timeout, limiter=wait_limiter)
        ids = {"x-request-id": job.id}
        if final is None:
            raise ApiError(500, "the job disappeared before it finished", ids, request_id=job.id)
        if final.state == JobState.FAILED:
            raise ApiError(422, final.error or "failed", ids, request_id=job.id, status="FAILED")
        if final.state != JobState.COMPLETED:
            raise ApiError(504, f"the request did not finish within {settings.sync_timeout:g} s; it goes on: poll "
                                f"its status_url", ids, request_id=job.id, status=final.state.value,
                           **ctx.job_urls(request, job.id))
        audio = await run_in_threadpool(store.get_audio, job.id)
        if audio is None:
            raise ApiError(404, f"request {job.id} expired before its audio could be sent", ids)
        data, media_type = audio
        headers = {**ids, "x-seed-value": str(params.seed), "cache-control": "no-store",
                   "x-generation-time": str(final.metrics.get("inference_time", "")),
                   "content-disposition": f'inline; filename="{job.id}.{EXT_BY_TYPE.get(media_type, "bin")}"'}
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

    return r
