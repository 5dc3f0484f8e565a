"""The hosted contract (../shared/docs/api-contract.md):

    POST /v1/chatterbox-tts            sync: parameters in, audio bytes out (through the same queue as v2)
    POST /v2/chatterbox-tts            queue a job: {request_id, status, status_url, response_url}
    GET  /v2/requests/{id}/status      {request_id, status, metrics[, error]}   (FAILED: HTTP 422)
    GET  /v2/requests/{id}             {request_id, status, output, metrics[, error]}   (FAILED: HTTP 422)
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from ...media import FORMATS
from ..context import EXT_BY_TYPE, NO_WORKER_GRACE_S, ApiContext  # noqa: F401 - NO_WORKER_GRACE_S re-exported
from ..errors import ERROR_RESPONSES, NOT_ENOUGH_CREDITS, ApiError, echo
from ..schemas import ErrorResponse, ResultResponse, StatusResponse, SubmitResponse, TTSRequest

SLUG = "chatterbox-tts"
_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": TTSRequest.model_json_schema()}}}}


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter(tags=[SLUG])
    auth = ctx.auth

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
        job, data, media_type = await ctx.run_and_wait(request, params, owner, "v1")   # 502/422/504 as ApiError
        final, ids = job, {"x-request-id": job.id}
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
