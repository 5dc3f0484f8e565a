"""Python SDK for chatterbox-serverless, with the hosted `segmind` SDK's surface.

Code written for the hosted API runs with only its import changed:

    from chatterbox_serverless import client as segmind
    from chatterbox_serverless.client import SegmindClient, InferenceFailed, InferenceTimeout

    result = segmind.run("chatterbox-tts", text="Hello there.", seed=42)
    print(result["status"], result["output"], result["metrics"]["inference_time"])

Other models of the family: the slug (or `model=`) names them, with their own parameters
(client/params.py): `run("chatterbox-turbo", text="Ha! [laugh]", top_k=50)`, `run("chatterbox-multilingual",
text="Bonjour.", language="fr")`, `Client().convert_voice("me.wav", reference_audio="target.wav")`.

The server and key come from `Client(api_key=..., base_url=...)` or the environment (`CHATTERBOX_API_URL`,
`CHATTERBOX_API_KEY`, `SEGMIND_API_KEY`). Beyond the hosted SDK: `AsyncClient`, `wait(on_progress=...)` with
backoff, `download()`, local reference audio (`reference_audio=Path("me.wav")`), parameters checked before
sending, and retried submissions on 429/502/503.
"""
from __future__ import annotations

from typing import Any

import httpx

from ._async import AsyncClient, AsyncJobHandle
from ._base import DEFAULT_POLL_INTERVAL_S, DEFAULT_POLL_TIMEOUT_S, Progress
from ._sync import Client, Job
from .errors import (APIConnectionError, ChatterboxError, InferenceFailed, InferenceTimeout, ParameterError,
                     SegmindError)
from .params import MODEL, MODELS, OUTPUT_FORMATS, TTSParams, encode_audio, validate_params

# The hosted SDK's names for the same things.
SegmindClient = Client
AsyncJob = Job          # the handle of a queued ("v2 async") request; `AsyncJobHandle` is the asyncio one

_default_client: Client | None = None


def _get_client() -> Client:
    """The module-level functions' client, configured from the environment on first use."""
    global _default_client
    if _default_client is None:
        _default_client = Client()
    return _default_client


def run(slug: str | None = None, **params: Any) -> dict[str, Any]:
    """Submit to the queue and wait until COMPLETED: the result body (`output`, `metrics`)."""
    return _get_client().run(slug, **params)


def run_sync(slug: str | None = None, **params: Any) -> httpx.Response:
    """One blocking call (`/v1`): the response's `.content` is the audio."""
    return _get_client().run_sync(slug, **params)


def submit_async(slug: str | None = None, **params: Any) -> Job:
    """Queue a request and return its `Job` (`request_id`, `status()`, `result()`, `wait()`)."""
    return _get_client().submit_async(slug, **params)


def convert_voice(source_audio: Any, **params: Any) -> bytes:
    """Voice conversion (`/v1/chatterbox-vc`): `source_audio` in the target voice (`reference_audio=`, `voice=`
    or neither: the built-in one); the audio bytes."""
    return _get_client().convert_voice(source_audio, **params)


__all__ = [
    "APIConnectionError", "AsyncClient", "AsyncJob", "AsyncJobHandle", "ChatterboxError", "Client",
    "DEFAULT_POLL_INTERVAL_S", "DEFAULT_POLL_TIMEOUT_S", "InferenceFailed", "InferenceTimeout", "Job", "MODEL", "MODELS",
    "OUTPUT_FORMATS", "ParameterError", "Progress", "SegmindClient", "SegmindError", "TTSParams", "encode_audio",
    "convert_voice", "run", "run_sync", "submit_async", "validate_params",
]
