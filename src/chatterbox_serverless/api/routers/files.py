"""GET /files/{id}.{ext}?expires=&signature=  the audio of a COMPLETED job, by the signed URL in `output`
(no headers needed: a browser or a player can open it until the result expires)."""
from __future__ import annotations

import re
import time

from fastapi import APIRouter

from ...jobs.store import JobState
from ...media import FORMATS
from ..context import EXT_BY_TYPE, ApiContext
from ..errors import ERROR_RESPONSES, ApiError
from ..fileresponse import serve_file

_FILE_NAME = re.compile(r"^([0-9a-f-]{36})\.(" + "|".join(FORMATS) + r")$")


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter(tags=["chatterbox-tts"])
    store, signer = ctx.store, ctx.signer

    @r.head("/files/{name}", include_in_schema=False)
    @r.get("/files/{name}", summary="The audio of a COMPLETED job (signed URL from `output`)",
           responses={200: {"content": {t: {} for t in FORMATS.values()}}, **ERROR_RESPONSES})
    def audio_file(name: str, expires: str | None = None, signature: str | None = None):
        match = _FILE_NAME.match(name)
        problem = signer.verify(name, expires, signature) if match else "invalid"
        if problem == "invalid":
            raise ApiError(403, "invalid or missing signature: use the `output` URL exactly as returned")
        if problem == "expired":
            raise ApiError(404, "this audio has expired")
        job_id, ext = match.group(1), match.group(2)
        job = store.get(job_id)
        if job is None or job.state != JobState.COMPLETED or EXT_BY_TYPE.get(job.media_type or "") != ext:
            raise ApiError(404, "this audio does not exist or has expired")
        headers = {"x-request-id": job_id, "content-disposition": f'inline; filename="{name}"',
                   "cache-control": f"private, max-age={max(0, int(expires) - int(time.time()))}"}
        path_of = getattr(store, "audio_file", None)     # a file on disk: streamed, not read whole
        path = path_of(job_id) if path_of else None
        if path is not None:
            return serve_file(path, job.media_type or "application/octet-stream", headers, etag_key=job_id)
        audio = store.get_audio(job_id)
        if audio is None:
            raise ApiError(404, "this audio does not exist or has expired")
        return serve_file(audio[0], audio[1], headers)

    return r
