"""The blocking client: `Client` and its job handle `Job`."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import _base
from ._base import (DEFAULT_MAX_POLL_INTERVAL_S, DEFAULT_MAX_RETRIES, DEFAULT_POLL_BACKOFF, DEFAULT_POLL_INTERVAL_S,
                    DEFAULT_POLL_TIMEOUT_S, PollSchedule, Progress, ProgressCallback)
from .errors import APIConnectionError, InferenceFailed, InferenceTimeout
from .params import VC, AudioSource, validate_params


@dataclass
class Job:
    """A request submitted to the queue (`POST /v2/...`). Poll it with `status()`, block with `wait()`."""
    request_id: str
    status_url: str
    response_url: str
    submit_response: dict[str, Any]
    _client: Client = field(repr=False)

    def status(self) -> dict[str, Any]:
        """The status body now: `status` is QUEUED, PROCESSING, COMPLETED or FAILED (then with `error`)."""
        return _base.terminal_tolerant(self._client._send("GET", self.status_url))

    def result(self) -> dict[str, Any]:
        """The final body: `output` (the audio URL) and `metrics` once COMPLETED; FAILED bodies are returned too."""
        return _base.terminal_tolerant(self._client._send("GET", self.response_url))

    def wait(self, timeout: float = DEFAULT_POLL_TIMEOUT_S, interval: float = DEFAULT_POLL_INTERVAL_S, *,
             backoff: float = DEFAULT_POLL_BACKOFF, max_interval: float | None = DEFAULT_MAX_POLL_INTERVAL_S,
             on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Poll until the request is COMPLETED and return the result body.

        The first gap between polls is `interval` seconds; each next one is `backoff` times longer, up to
        `max_interval` (`backoff=1` polls at a fixed cadence, as the hosted SDK does). `on_progress` is called
        with a `Progress` after every poll. Network errors and 429/502/503 while polling are retried until
        the deadline (a restarting server does not lose the job).

        Raises `InferenceFailed` (`e.detail`: the server's reason) or `InferenceTimeout` (`e.request_id`)."""
        schedule = PollSchedule(timeout, interval, backoff, max_interval)
        last_error: Exception | None = None
        while True:
            try:
                body = self.status()
            except Exception as e:  # noqa: BLE001 - filtered just below
                if not _base.is_transient(e):
                    raise
                last_error, body = e, None
            if body is not None:
                last_error = None
                state = body.get("status")
                if on_progress is not None:
                    on_progress(Progress(self.request_id, str(state), schedule.elapsed(), body))
                if state == "COMPLETED":
                    return self.result()
                if state == "FAILED":
                    raise InferenceFailed(detail=body.get("error"), status_body=body)
            if schedule.expired():
                raise InferenceTimeout(self.request_id, schedule.elapsed()) from last_error
            time.sleep(schedule.next_sleep())

    def download(self, path: str | os.PathLike, result: dict[str, Any] | None = None) -> Path:
        """Write the audio of this (completed) request to `path`; return the path."""
        return self._client.download(result if result is not None else self.result(), path)


class Client:
    """A client of a chatterbox-serverless server (or any server speaking the hosted API's contract).

    `api_key` and `base_url` default to `CHATTERBOX_API_KEY` (or `SEGMIND_API_KEY`) and `CHATTERBOX_API_URL`
    (else http://127.0.0.1:8000); the base URL may end in `/v1` like the hosted SDK's. `timeout`: seconds for
    each HTTP call (`sync_timeout` for `run_sync`, which holds the connection while the audio is made).
    Submissions answered 429/502/503, or whose connection fails, are retried up to `max_retries` times,
    honouring `Retry-After`. Use it as a context manager, or call `close()`."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout: float = 30.0, *,
                 sync_timeout: float = 600.0, max_retries: int = DEFAULT_MAX_RETRIES,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url, self.api_key = _base.resolve_config(base_url, api_key)
        self.timeout = timeout
        self.sync_timeout = sync_timeout
        self.max_retries = max_retries
        self._http = httpx.Client(headers=_base.default_headers(self.api_key),
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                  transport=transport, follow_redirects=False)

    # --- the hosted SDK's surface -----------------------------------------------------------------------------
    def run(self, slug: str | None = None, **params: Any) -> dict[str, Any]:
        """Submit to the queue and wait (default cadence, 600 s): the result body once COMPLETED. `slug` (or
        `model=`): the model, chatterbox-tts by default. Every other keyword is a request parameter; for another
        deadline use `submit_async(...).wait(timeout=...)`."""
        return self.submit_async(slug, **params).wait()

    def run_sync(self, slug: str | None = None, **params: Any) -> httpx.Response:
        """One blocking `POST /v1/{model}`: the response carries the audio bytes (`.content`). `slug` (or
        `model=`): the model, chatterbox-tts by default; the other keywords are its parameters."""
        slug = _base.model_of(slug, params)
        body = validate_params(params, slug)
        start = time.monotonic()
        response = self._post_with_retries(f"{self.base_url}/v1/{slug}", body, headers={"Accept": "*/*"},
                                           timeout=httpx.Timeout(self.sync_timeout, connect=10.0))
        _base.raise_for_status(response, elapsed_s=time.monotonic() - start)
        return response

    def submit_async(self, slug: str | None = None, **params: Any) -> Job:
        """`POST /v2/{model}`: queue the request and return its `Job` at once. `slug` (or `model=`): the
        model, chatterbox-tts by default; the other keywords are its parameters."""
        slug = _base.model_of(slug, params)
        body = validate_params(params, slug)
        response = self._post_with_retries(f"{self.base_url}/v2/{slug}", body)
        request_id, status_url, response_url, submitted = _base.parse_submit(response)
        return Job(request_id, status_url, response_url, submitted, self)

    def convert_voice(self, source_audio: AudioSource, *, reference_audio: AudioSource | None = None,
                      voice: str | None = None, **params: Any) -> bytes:
        """Voice conversion (`POST /v1/chatterbox-vc`): the speech of `source_audio` (a local file or bytes,
        uploaded inline, or an http(s) URL / data: URI / base64 string) spoken again in the target voice:
        `reference_audio` (a clip to clone), `voice` (a library voice's name or id), or neither (the model's
        built-in voice). Other keywords: seed, output_format (mp3 by default), speed. Returns the audio bytes."""
        response = self.run_sync(VC, source_audio=source_audio, reference_audio=reference_audio, voice=voice,
                                    **params)
        return response.content

    # --- beyond it ----------------------------------------------------------------------------------------------
    def job(self, request_id: str) -> Job:
        """The handle of a request submitted earlier (for instance after an `InferenceTimeout`)."""
        status_url, response_url = _base.v2_urls(self.base_url, request_id)
        return Job(request_id, status_url, response_url, {}, self)

    def download(self, result: dict[str, Any] | str, path: str | os.PathLike) -> Path:
        """Write the audio of a result body (or an output URL) to `path` (atomically); return the path."""
        url = _base.output_url(result)
        path = Path(path)
        response = self._send("GET", url, stream=True, output=True)
        try:
            if not response.is_success:
                response.read()
                _base.raise_for_status(response)
            tmp = _base.partial_path(path)
            try:
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except httpx.TransportError as e:
            raise APIConnectionError.from_httpx(e, url) from e
        finally:
            response.close()
        return path

    def fetch_audio(self, result: dict[str, Any] | str) -> bytes:
        """The audio bytes of a result body (or an output URL)."""
        response = self._send("GET", _base.output_url(result), output=True)
        _base.raise_for_status(response)
        return response.content

    # --- the voice library (per key) ---------------------------------------------------------------------------
    def create_voice(self, name: str, audio: str | bytes | os.PathLike) -> dict[str, Any]:
        """Add a voice to this key's library from a clip: a local file or bytes (uploaded), or an http(s) URL /
        data: URI / base64 string (fetched or decoded by the server). Use it as `voice=name` (or its `id`)."""
        url = f"{self.base_url}/v1/audio/voices"
        method, kwargs = _base.voice_upload(name, audio)
        response = self._send(method, url, timeout=httpx.Timeout(self.sync_timeout, connect=10.0), **kwargs)
        _base.raise_for_status(response)
        return response.json()

    def list_voices(self) -> list[dict[str, Any]]:
        response = self._send("GET", f"{self.base_url}/v1/audio/voices")
        _base.raise_for_status(response)
        return response.json()["data"]

    def get_voice(self, voice: str) -> dict[str, Any]:
        """One of this key's voices, by id or name."""
        response = self._send("GET", _base.voice_url(self.base_url, voice))
        _base.raise_for_status(response)
        return response.json()

    def delete_voice(self, voice: str) -> dict[str, Any]:
        """Delete one of this key's voices, by id or name."""
        response = self._send("DELETE", _base.voice_url(self.base_url, voice))
        _base.raise_for_status(response)
        return response.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, url: str, *, stream: bool = False, output: bool = False,
              **kwargs: Any) -> httpx.Response:
        """One HTTP exchange; transport failures become `APIConnectionError`. `output`: a signed audio URL,
        fetched without the API key unless it is on the server's own origin."""
        request = self._http.build_request(method, url, **kwargs)
        if output:
            request.headers["Accept"] = "*/*"
            if not _base.same_origin(url, self.base_url):
                request.headers.pop("x-api-key", None)
        try:
            return self._http.send(request, stream=stream)
        except httpx.TransportError as e:
            raise APIConnectionError.from_httpx(e, url) from e

    def _post_with_retries(self, url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._send("POST", url, json=body, **kwargs)
            except APIConnectionError as e:
                if e.request_sent or attempt >= self.max_retries:   # sent: it may have been accepted
                    raise
                wait_s = _base.backoff_delay(attempt)
            else:
                delay = _base.retry_delay(response, attempt) if attempt < self.max_retries else None
                if delay is None:
                    return response
                wait_s = delay
                response.close()
            time.sleep(wait_s)
            attempt += 1
