"""What the sync and async clients share: configuration, URLs, response handling, retry and poll schedules.
No I/O here, so both clients stay thin and behave the same."""
from __future__ import annotations

import email.utils
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from .. import __version__
from .errors import APIConnectionError, ChatterboxError, InferenceFailed, InferenceTimeout, ParameterError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_POLL_TIMEOUT_S = 600.0
DEFAULT_MAX_POLL_INTERVAL_S = 5.0
DEFAULT_POLL_BACKOFF = 1.5
DEFAULT_MAX_RETRIES = 4
MAX_RETRY_WAIT_S = 60.0         # a Retry-After beyond this is not waited for: the error is raised instead

TERMINAL_STATES = ("COMPLETED", "FAILED")
RETRY_STATUSES = frozenset({429, 502, 503})
USER_AGENT = f"chatterbox-serverless-python/{__version__}"
_VERSION_SUFFIX = re.compile(r"/v\d+$")
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Progress:
    """What a `wait(on_progress=...)` callback receives after every poll."""
    request_id: str
    status: str                      # QUEUED | PROCESSING | COMPLETED | FAILED
    elapsed_s: float                 # since wait() started
    body: dict[str, Any] = field(default_factory=dict, repr=False)   # the status body as received


ProgressCallback = Callable[[Progress], Any]


def resolve_config(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """(root URL without a /vN suffix, API key) from the arguments, else the environment, else defaults.

    The root accepts either form the hosted SDK users know: `http://host:8000` or `http://host:8000/v1`."""
    url = base_url or os.environ.get("CHATTERBOX_API_URL") or DEFAULT_BASE_URL
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base URL must be an http(s) URL, got {url!r}")
    url = _VERSION_SUFFIX.sub("", url)
    key = api_key or os.environ.get("CHATTERBOX_API_KEY") or os.environ.get("SEGMIND_API_KEY") or None
    return url, key


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["x-api-key"] = api_key
    return headers


def same_origin(url: str, root: str) -> bool:
    a, b = urlsplit(url), urlsplit(root)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def raise_for_status(response: httpx.Response, elapsed_s: float = 0.0) -> None:
    """Raise the matching `ChatterboxError` for a non-2xx response (`elapsed_s`: for a 504's timeout error)."""
    if response.is_success:
        return
    body = json_body(response)
    body = body if isinstance(body, dict) else {}
    if body.get("status") == "FAILED":
        raise InferenceFailed(detail=body.get("error"), status_body=body, status=response.status_code)
    if response.status_code == 504:
        request_id = body.get("request_id")     # the job goes on: its id lets the caller pick it up
        if isinstance(request_id, str) and request_id:
            raise InferenceTimeout(request_id=request_id, elapsed_s=elapsed_s, status=504)
    raise ChatterboxError.from_response(response)


def terminal_tolerant(response: httpx.Response) -> dict[str, Any]:
    """The body of a status/result poll. A FAILED request is served with HTTP 422 and a body that still says
    FAILED: such a body is a valid answer, not an error. Anything else non-2xx raises."""
    body = json_body(response)
    if isinstance(body, dict) and body.get("status") in TERMINAL_STATES:
        return body
    raise_for_status(response)
    if not isinstance(body, dict):
        raise ChatterboxError(status=response.status_code, detail="the server answered a poll with non-JSON")
    return body


def parse_submit(response: httpx.Response) -> tuple[str, str, str, dict[str, Any]]:
    raise_for_status(response)
    body = json_body(response)
    if not isinstance(body, dict):
        raise ChatterboxError(status=response.status_code, detail="the submit answer is not a JSON object")
    request_id, status_url, response_url = (body.get(k) for k in ("request_id", "status_url", "response_url"))
    if not (request_id and status_url and response_url):
        raise ChatterboxError(status=response.status_code,
                              detail=f"the submit answer lacks request_id/status_url/response_url: "
                                     f"keys {sorted(body)}")
    return request_id, status_url, response_url, body


def retry_delay(response: httpx.Response | None, attempt: int, now: float | None = None) -> float | None:
    """Seconds to wait before retry number `attempt` (0-based) of a submission, or None: do not retry.

    Retried: 429 and 502/503 (nothing was accepted), honouring `Retry-After` (seconds or an HTTP date),
    and connection failures (response None). Otherwise exponential backoff with jitter: 0.5 s, 1 s, 2 s..."""
    if response is not None and response.status_code not in RETRY_STATUSES:
        return None
    header = response.headers.get("retry-after") if response is not None else None
    if header:
        delay = _parse_retry_after(header, time.time() if now is None else now)
        if delay is not None:
            return delay if delay <= MAX_RETRY_WAIT_S else None
    return backoff_delay(attempt)


def backoff_delay(attempt: int) -> float:
    """0.5 s, 1 s, 2 s, ... up to 8 s, with +-25% jitter so that many clients do not retry in step."""
    return min(0.5 * 2**attempt, 8.0) * (0.75 + 0.5 * random.random())


def _parse_retry_after(value: str, now: float) -> float | None:
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def is_transient(exc: BaseException) -> bool:
    """A poll error worth retrying until the deadline: a network hiccup or a server restarting."""
    if isinstance(exc, (httpx.TransportError, APIConnectionError)):
        return True
    return isinstance(exc, ChatterboxError) and not isinstance(exc, (InferenceFailed, InferenceTimeout)) \
        and exc.status in RETRY_STATUSES


class PollSchedule:
    """Gaps between polls: `interval`, growing by `backoff` up to `max_interval`, never past the deadline."""

    def __init__(self, timeout: float, interval: float, backoff: float, max_interval: float | None) -> None:
        if timeout < 0 or interval <= 0 or backoff < 1:
            raise ValueError("wait() needs timeout >= 0, interval > 0 and backoff >= 1")
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.gap = interval
        self.backoff = backoff
        self.max_interval = max(interval, max_interval if max_interval is not None else interval)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def next_sleep(self) -> float:
        sleep = min(self.gap, max(0.0, self.deadline - time.monotonic()))
        self.gap = min(self.gap * self.backoff, self.max_interval)
        return sleep


def check_slug(slug: str) -> str:
    """The model name, as it goes into a path."""
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug.strip("/")):
        raise ParameterError(f"model name must be letters, digits, '.', '_' or '-', got {slug!r}")
    return slug.strip("/")


def model_of(slug: str | None, params: dict[str, Any]) -> str:
    """The model a call names: `slug` (the hosted SDK's first argument) or `model=` (taken out of `params`: no
    model has a parameter of that name); both: they must agree; neither: chatterbox-tts. Checked as a path part."""
    from .params import MODEL
    model = params.pop("model", None)
    if slug is not None and model is not None and slug != model:
        raise ParameterError(f"two models named: {slug!r} and model={model!r}")
    return check_slug(slug if slug is not None else model if model is not None else MODEL)


def partial_path(path: Path) -> Path:
    """Where a download is written before it is renamed onto `path` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def v2_urls(root: str, request_id: str) -> tuple[str, str]:
    """(status_url, response_url) of a request id, for picking up a job submitted earlier."""
    return f"{root}/v2/requests/{request_id}/status", f"{root}/v2/requests/{request_id}"


def output_url(result: dict[str, Any] | str) -> str:
    if isinstance(result, str):
        return result
    url = result.get("output") if isinstance(result, dict) else None
    if not url or not isinstance(url, str):
        state = result.get("status") if isinstance(result, dict) else None
        raise ChatterboxError(detail=f"the result has no output URL (status {state!r})")
    return url


def voice_url(root: str, voice: str) -> str:
    from urllib.parse import quote
    if not isinstance(voice, str) or not voice.strip():
        raise ParameterError("a voice id or name is required")
    return f"{root}/v1/audio/voices/{quote(voice.strip(), safe='')}"


def voice_upload(name: str, audio: str | bytes | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The request creating a voice: multipart with the file for a path or bytes (as OpenAI's SDK sends it);
    JSON with the string for an http(s) URL, a data: URI or base64."""
    if not isinstance(name, str) or not name.strip():
        raise ParameterError("a voice needs a name")
    if isinstance(audio, str) and not os.path.exists(audio):
        return "POST", {"json": {"name": name, "audio_sample": audio}}
    if isinstance(audio, (bytes, bytearray, memoryview)):
        data, filename = bytes(audio), "sample"
    else:
        path = Path(audio).expanduser()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ParameterError(f"audio_sample: cannot read {str(path)!r}: {e.strerror or e}") from None
        filename = path.name
    return "POST", {"data": {"name": name}, "files": {"audio_sample": (filename, data)}}
