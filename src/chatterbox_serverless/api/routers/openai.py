"""OpenAI's speech API on the same queue, accounts and engine as the hosted routes:

    POST /v1/audio/speech     text in, audio out (`stream_format` audio: the file, sent in chunks; sse:
                              `speech.audio.delta` events with base64 audio, then `speech.audio.done` with usage)
    GET  /v1/models           the model ids this deployment serves (its models and the operator's aliases)
    GET  /v1/models/{id}

`model`: one of the models this deployment serves (chatterbox-tts, chatterbox-turbo, chatterbox-multilingual:
that model), or one of the operator's aliases (`--model-aliases`, default tts-1, tts-1-hd, gpt-4o-mini-tts: the
default model); anything else is OpenAI's 404 model_not_found, chatterbox-vc a 400 (it converts speech, it does
not speak text: POST /v1/chatterbox-vc). The chosen model's own parameters are accepted beside OpenAI's (extra
body fields: seed, temperature, top_p, repetition_penalty; exaggeration, cfg_weight, min_p where the model has
them; top_k for Turbo; language for Multilingual), with its ranges and defaults (api/schemas.py).

A speech request is a job like `/v1/chatterbox-tts`'s (`ApiContext.run_and_wait`): same keys (Bearer or
x-api-key), credits, rate limits, queue, worker. Errors on these routes are OpenAI's shape (api/errors.py).

Streaming: every speech request in a format that streams (all but flac, media/stream.py) is a streamed job,
and the response starts as soon as the job's first piece of audio exists (the status must be known before the
first byte: a job that fails before that is an error response): `audio_chunks` follows the job's chunk channel
(api/audio_stream.py), encoding each piece as it comes (`Transfer-Encoding: chunked`; SSE: one or more
`speech.audio.delta` per piece). The audio streams between sentence chunks: a one-chunk input comes when it is
done. After the first byte a failure can only end the stream: the raw audio body is cut (an incomplete chunked
body), SSE sends an `error` event. flac: the whole file once the job has COMPLETED, sent in chunks.
"""
from __future__ import annotations

import base64
import json
import time
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...jobs.store import ChunkRead, JobStore
from ...media.formats import MEDIA_TYPES, OutputFormatName
from ...media.stream import STREAM_FORMATS
from ...voices.library import BUILTIN_VOICE, OPENAI_VOICES
from ..audio_stream import StreamInterrupted, cut_on_failure, encoded_audio
from ..context import ApiContext
from ..errors import ApiError
from ..schemas import REQUESTS, TTSRequest, describe_validation_error

CHUNK_BYTES = 16 * 1024                 # body chunks (pcm: whole samples)
SAMPLING = ("seed", "temperature", "exaggeration", "cfg_weight", "min_p", "top_p", "repetition_penalty", "top_k",
            "language")          # the models' parameters taken from extra body fields (where the model has them)
STARTED = int(time.time())


class VoiceId(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's `POST /v1/audio/speech` body; the model's own parameters are accepted beside it (seed,
    temperature, exaggeration, cfg_weight, min_p, top_p, repetition_penalty, top_k (Turbo), language
    (Multilingual): the ranges and defaults of its /v1/<model> route)."""
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="A model this server serves (chatterbox-tts, chatterbox-turbo, "
                                   "chatterbox-multilingual), or one of the operator's aliases for its default model "
                                   "(tts-1, ...): GET /v1/models lists them.")
    input: str = Field(description="The text (at most the server's text limit, 5000 characters by default; "
                                   "long text is spoken in sentence chunks).")
    voice: str | VoiceId = Field(description=f"'{BUILTIN_VOICE}' (the model's built-in voice), one of OpenAI's "
                                             f"names ({', '.join(OPENAI_VOICES)}: the voice the operator mapped it "
                                             "to, by default the built-in one), or a library voice by id, by name, "
                                             "or as {\"id\": ...}.")
    instructions: str | None = Field(None, max_length=4096, description="Accepted, and has no effect: this model "
                                     "takes no style prompt (use exaggeration and cfg_weight).")
    response_format: OutputFormatName = Field("mp3", description="mp3, opus (Ogg), aac (ADTS), flac, wav, pcm (raw "
                                              "24 kHz 16-bit little-endian mono, no header); ogg too.")
    speed: float = Field(1.0, ge=0.25, le=4.0, description="0.25-4: a time-stretch that keeps the pitch.")
    stream_format: Literal["audio", "sse"] = Field("audio", description="audio: the file; sse: server-sent events "
                                                   "(speech.audio.delta with base64 audio, then speech.audio.done "
                                                   "with usage: input_tokens = characters of input, output_tokens "
                                                   "= speech tokens generated).")


_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": SpeechRequest.model_json_schema()}}}}


def served_models(ctx: ApiContext) -> list[str]:
    """The model ids of GET /v1/models: every model served (the default first), then the aliases."""
    return [*ctx.models, *(a for a in ctx.settings.model_aliases if a not in ctx.models)]


def resolve_model(ctx: ApiContext, name: str) -> str | None:
    """The served model a speech request's `model` names (an alias: the default model), or None."""
    if name in ctx.models:
        return name
    return ctx.default_model if name in ctx.settings.model_aliases else None


def model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": STARTED, "owned_by": "chatterbox-serverless"}


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter(tags=["openai"])
    auth = ctx.auth

    async def parse(request: Request) -> tuple[SpeechRequest, TTSRequest, str]:
        body = await ctx.read_json_body(request)
        try:
            speech = SpeechRequest.model_validate_json(body or b"null")
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            if err.get("type") == "json_invalid":
                raise ApiError(400, f"malformed JSON body: {err.get('msg', '').removeprefix('Invalid JSON: ')}")
            raise ApiError(400, describe_validation_error(e))
        model = resolve_model(ctx, speech.model)
        if model is None:
            raise ApiError(404, f"parameter 'model': the model {speech.model[:80]!r} does not exist on this server "
                                f"(it serves {', '.join(served_models(ctx))})", None, openai_code="model_not_found")
        schema = REQUESTS[model]
        if "text" not in schema.model_fields:
            raise ApiError(400, f"parameter 'model': {model} converts speech, it does not speak text: use POST "
                                f"/v1/{model} (source_audio and a target voice)", None, param="model")
        extra = {k: v for k, v in (speech.model_extra or {}).items() if k in SAMPLING and k in schema.model_fields}
        voice = speech.voice.id if isinstance(speech.voice, VoiceId) else speech.voice
        try:
            params = schema.model_validate({"text": speech.input, "voice": voice, "speed": speech.speed,
                                            "output_format": speech.response_format, **extra})
        except ValidationError as e:
            raise ApiError(400, describe_validation_error(e).replace("parameter 'text'", "parameter 'input'"))
        text = params.text.strip()
        if len(text) > ctx.settings.max_text_chars:
            raise ApiError(400, f"parameter 'input': {len(text)} characters is more than this server's limit of "
                                f"{ctx.settings.max_text_chars}")
        return speech, params.model_copy(update={"text": text}), model

    @r.post("/v1/audio/speech", summary="Generate audio from text (OpenAI's speech API)", openapi_extra=_BODY_DOC,
            responses={200: {"content": {**{t: {} for t in MEDIA_TYPES.values()}, "text/event-stream": {}},
                             "description": "The audio (chunked), or server-sent events"}})
    async def speech(request: Request, owner: str = Depends(auth)):
        body, params, model = await parse(request)
        if params.output_format in STREAM_FORMATS:
            params = params.model_copy(update={"stream": True})
            job, first, audio = await ctx.run_and_stream(request, params, owner, "openai", model)
        else:
            job, data, media_type = await ctx.run_and_wait(request, params, owner, "openai", model)
            first, audio = None, (data, media_type)
        headers = {"x-request-id": job.id, "cache-control": "no-store", "x-seed-value": str(params.seed),
                   "x-accel-buffering": "no"}
        chunks = audio_chunks(ctx.store, job.id, first, audio, params.output_format, params.speed)

        async def usage() -> dict[str, int]:
            final = await run_in_threadpool(ctx.store.get, job.id) if first is not None else job
            tokens = int(((final.metrics if final else None) or {}).get("speech_tokens") or 0)
            return {"input_tokens": len(params.text), "output_tokens": tokens,
                    "total_tokens": len(params.text) + tokens}
        if body.stream_format == "sse":
            return StreamingResponse(sse_events(chunks, usage), media_type="text/event-stream", headers=headers)
        return StreamingResponse(cut_on_failure(chunks, job.id), media_type=MEDIA_TYPES[params.output_format],
                                 headers=headers)

    @r.get("/v1/models", summary="The models this server serves (OpenAI's list)")
    def list_models(owner: str = Depends(auth)):
        return JSONResponse({"object": "list", "data": [model_object(m) for m in served_models(ctx)]})

    @r.get("/v1/models/{model_id}", summary="One model (OpenAI's model object)")
    def get_model(model_id: str, owner: str = Depends(auth)):
        if model_id not in served_models(ctx):
            raise ApiError(404, f"the model {model_id[:80]!r} does not exist on this server", None,
                           openai_code="model_not_found", param="model")
        return JSONResponse(model_object(model_id))

    return r


async def audio_chunks(store: JobStore, job_id: str, first: ChunkRead | None, audio: tuple[bytes, str] | None,
                       fmt: str, speed: float = 1.0) -> AsyncIterator[bytes]:
    """The audio as body chunks of at most CHUNK_BYTES (pcm: whole 16-bit samples in every chunk): the job's chunk
    channel encoded as it is generated (`first`: the read holding its first pieces), or the stored file."""
    step = CHUNK_BYTES - CHUNK_BYTES % 2
    if first is not None:
        async for data in encoded_audio(store, job_id, first, fmt, speed):     # pcm: even lengths
            for i in range(0, len(data), step):
                yield data[i:i + step]
        return
    data = audio[0]
    for i in range(0, len(data), step):
        yield data[i:i + step]


async def sse_events(chunks: AsyncIterator[bytes], usage) -> AsyncIterator[bytes]:
    """`speech.audio.delta` per chunk, then `speech.audio.done` with `await usage()`; if the stream is interrupted
    after it started, an `error` event (OpenAI's error object) ends it instead."""
    try:
        async for chunk in chunks:
            event = {"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode("ascii")}
            yield f"data: {json.dumps(event)}\n\n".encode()
    except StreamInterrupted as e:
        error = {"message": str(e), "type": "server_error", "param": None, "code": "stream_interrupted"}
        yield f"event: error\ndata: {json.dumps({'type': 'error', 'error': error})}\n\n".encode()
        return
    yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': await usage()})}\n\n".encode()


__all__ = ["router", "SpeechRequest"]
