"""The voice library (per key): OpenAI's `/v1/audio/voices`, errors in OpenAI's shape.

    POST   /v1/audio/voices         multipart `name` + `audio_sample` (a file), as OpenAI's; or JSON
                                    {"name", "audio_sample": an http(s) URL, a data: URI or base64} (URLs: the
                                    reference_audio rules: SSRF checks, the operator's allow-list)
    GET    /v1/audio/voices         {"object": "list", "data": [voice...]}
    GET    /v1/audio/voices/{id}    a voice (by id, or by name)
    DELETE /v1/audio/voices/{id}    {"id", "object": "audio.voice.deleted", "deleted": true}

Another key's voice is not found (404). With an engine in this process the conditionals are computed at
creation (a clip the model cannot use is a 400 then); otherwise by the first worker that uses the voice.
OpenAI's `consent` field is accepted and ignored (this server has no consent recordings).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ...voices.library import VoiceError
from ..context import ApiContext
from ..errors import ApiError

_FORM_SLACK = 64 * 1024          # multipart headers and the other fields, beyond the sample itself
_CREATE_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["name", "audio_sample"], "properties": {
        "name": {"type": "string"}, "audio_sample": {"type": "string", "format": "binary"},
        "consent": {"type": "string", "description": "accepted, ignored"}}}},
    "application/json": {"schema": {"type": "object", "required": ["name", "audio_sample"], "properties": {
        "name": {"type": "string"},
        "audio_sample": {"type": "string", "description": "an http(s) URL, a data: URI or base64"}}}}}}}


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter(tags=["voices"])
    auth = ctx.auth

    def library():
        if ctx.voices is None:
            raise ApiError(404, "this server has no voice library (its job store keeps none)")
        return ctx.voices

    async def call(fn, *args: Any):
        try:
            return await run_in_threadpool(fn, *args)
        except VoiceError as e:
            raise ApiError(e.status, e.message, None, param=e.param) from None

    @r.post("/v1/audio/voices", summary="Create a voice from an audio sample", openapi_extra=_CREATE_DOC)
    async def create_voice(request: Request, owner: str = Depends(auth)):
        lib = library()
        limit = lib.max_bytes
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == "multipart/form-data":
            name, audio = await read_multipart(request, limit)
        else:
            body = await ctx.read_json_body(request, limit=limit * 4 // 3 + _FORM_SLACK)
            name, audio = await read_json(body, limit)
        voice = await call(lib.create, owner, name, audio)
        return JSONResponse(voice.to_json())

    async def read_multipart(request: Request, limit: int) -> tuple[Any, bytes]:
        declared = request.headers.get("content-length")
        too_large = f"parameter 'audio_sample': more than this server's limit of {limit} bytes"
        if declared and declared.isdigit() and int(declared) > limit + _FORM_SLACK:
            raise ApiError(413, too_large)

        async def bounded():
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit + _FORM_SLACK:
                    raise ApiError(413, too_large)
                yield chunk
        try:
            form = await MultiPartParser(request.headers, bounded(), max_files=1, max_fields=10).parse()
        except MultiPartException as e:
            raise ApiError(400, f"malformed multipart body: {e.message}") from None
        try:
            sample = form.get("audio_sample")
            if sample is None:
                raise ApiError(400, "missing required parameter 'audio_sample' (a file)")
            audio = await sample.read() if isinstance(sample, UploadFile) else str(sample).encode()
            name = form.get("name")
            return (name if isinstance(name, str) else None), audio
        finally:
            await form.close()

    async def read_json(body: bytes, limit: int) -> tuple[Any, bytes]:
        import json

        from ...media import MediaError, parse_reference, resolve
        try:
            data = json.loads(body or b"null")
        except ValueError as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object {\"name\": ..., \"audio_sample\": ...}")
        if "audio_sample" not in data:
            raise ApiError(400, "missing required parameter 'audio_sample' (an http(s) URL, a data: URI or base64)")

        def fetch() -> bytes:
            try:
                source = parse_reference(data["audio_sample"], allow_hosts=ctx.allow_hosts, max_bytes=limit)
                return resolve(source, ctx.service.fetcher)
            except MediaError as e:
                raise ApiError(400, "parameter 'audio_sample': " + str(e).removeprefix("reference_audio: "),
                               None, param="audio_sample") from None
        return data.get("name"), await run_in_threadpool(fetch)

    @r.get("/v1/audio/voices", summary="This key's voices")
    async def list_voices(owner: str = Depends(auth)):
        voices = await call(library().list, owner)
        return JSONResponse({"object": "list", "data": [v.to_json() for v in voices], "has_more": False})

    @r.get("/v1/audio/voices/{voice_id}", summary="One of this key's voices (by id or name)")
    async def get_voice(voice_id: str, owner: str = Depends(auth)):
        return JSONResponse((await call(library().get, owner, voice_id)).to_json())

    @r.delete("/v1/audio/voices/{voice_id}", summary="Delete one of this key's voices (by id or name)")
    async def delete_voice(voice_id: str, owner: str = Depends(auth)):
        voice = await call(library().delete, owner, voice_id)
        return JSONResponse({"id": voice.id, "object": "audio.voice.deleted", "deleted": True})

    return r
