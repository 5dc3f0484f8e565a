"""The `reference_audio` request parameter: what it is, and how to get its bytes.

Three forms are accepted (api-contract.md):
  * an http(s) URL                      -> fetched by the worker (SafeFetcher), so fetch errors FAIL the job;
  * a `data:` URI, base64, of media type audio/*, application/octet-stream or application/ogg;
  * bare base64 (standard or URL-safe alphabet; padding and line breaks optional).
Inline data is decoded (base64) and probed (container, rate, duration: at least `min_seconds`, at most
`max_seconds`) by `parse_reference` at submit time, so a bad value is a 400 before a job exists. The byte limit is checked before decoding base64.

URLs are checked at submit time as far as that can be known without DNS: a host that is an IP literal in any form
(dotted, decimal, octal, hex, short, IPv6, IPv4-mapped) on a loopback/private/link-local/metadata/... address, or
a localhost name, is refused unless the operator's allow-list (`allow_hosts`, as `SafeFetcher` takes it) admits
it on that port; a host the fetcher could not connect to as written (%-escapes, "0177.0.0.1", invalid IDNA) is
refused. Names are resolved, and checked again, only when the worker fetches.

Typical use:
    api:     source = parse_reference(body["reference_audio"], allow_hosts=settings.allow_fetch_hosts)
             # ReferenceAudioError -> 400, message names the param
    worker:  voice = load_reference(params["reference_audio"], fetcher)
             # MediaError -> job FAILED with error f"reference_audio: {e}"
"""
from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass
from typing import Iterable, Protocol

import httpx

from chatterbox_serverless.engine.contract import VoiceAudio
from chatterbox_serverless.media import MediaError
from chatterbox_serverless.media.decode import DEFAULT_MAX_SECONDS, DEFAULT_MIN_SECONDS, decode_audio, probe_audio
from chatterbox_serverless.media.fetch import AllowList, address_problem, ip_literal

DEFAULT_MAX_BYTES = 10_000_000          # 10 MB of audio, inline or fetched
MAX_URL_LENGTH = 4096
PARAM = "reference_audio"

_ALLOWED_DATA_TYPES = ("application/octet-stream", "application/ogg")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
_WHITESPACE = re.compile(r"\s+")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class ReferenceAudioError(MediaError):
    """The `reference_audio` value is malformed, too large or not usable audio (answered as 400)."""


@dataclass(frozen=True)
class ReferenceSource:
    """Where the reference audio is: exactly one of `url` / `data` is set."""
    url: str | None = None
    data: bytes | None = None
    media_type: str | None = None        # as declared by a data: URI

    @property
    def kind(self) -> str:
        return "url" if self.url is not None else "inline"

    def describe(self) -> str:
        """For logs: the URL's origin, or the inline size (never a signed query string or the data)."""
        if self.url is not None:
            parts = urllib.parse.urlsplit(self.url)
            return f"url {parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        return f"inline {len(self.data or b'')} bytes"


class Fetcher(Protocol):
    """What `resolve` needs to download a URL (SafeFetcher, or a test double)."""
    def fetch(self, url: str) -> bytes: ...


def _fail(message: str) -> ReferenceAudioError:
    return ReferenceAudioError(f"{PARAM}: {message}")


def _mb(n: int) -> str:
    return f"{n / 1_000_000:g} MB"


def parse_reference(value: object, *, allow_hosts: Iterable[str] | AllowList = (),
                    max_bytes: int = DEFAULT_MAX_BYTES, check_audio: bool = True,
                    max_seconds: float = DEFAULT_MAX_SECONDS,
                    min_seconds: float = DEFAULT_MIN_SECONDS) -> ReferenceSource:
    """Classify and validate `reference_audio`. Raises ReferenceAudioError with a message naming the parameter.

    A URL's host is checked as far as it can be without DNS (see the module docstring): `allow_hosts` is the
    operator's allow-list, the entries `SafeFetcher(allow_hosts=...)` takes. Inline data is base64-decoded here;
    with `check_audio` its header is probed too (format, sample rate, min_seconds <= duration <= max_seconds),
    so undecodable, too long or too short inline audio is known at submit time."""
    allow = allow_hosts if isinstance(allow_hosts, AllowList) else AllowList(allow_hosts)
    return _parse(value, allow, max_bytes, check_audio, max_seconds, min_seconds)


def _parse(value: object, allow: AllowList | None, max_bytes: int, check_audio: bool, max_seconds: float,
           min_seconds: float) -> ReferenceSource:
    """`parse_reference`; `allow` None: no destination check (the worker's fetcher checks at connect time)."""
    if not isinstance(value, str):
        raise _fail("must be a string (an http(s) URL, a data: URI or base64)")
    text = value.strip()
    if not text:
        raise _fail("must not be empty (omit it to use the built-in voice)")

    scheme = _SCHEME.match(text)
    if scheme:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            return ReferenceSource(url=_check_url(text, allow))
        if name == "data":
            media_type, payload = _split_data_uri(text)
            data = _decode_base64(payload, max_bytes)
            source = ReferenceSource(data=data, media_type=media_type)
        else:
            raise _fail(f"unsupported URL scheme {name!r} (use http or https, a data: URI or base64)")
    else:
        source = ReferenceSource(data=_decode_base64(text, max_bytes))

    if check_audio:
        _check_audio(source.data or b"", max_seconds, min_seconds)
    return source


def _check_audio(data: bytes, max_seconds: float, min_seconds: float) -> None:
    try:
        info = probe_audio(data, max_seconds=max_seconds)
        if info.seconds < min_seconds:
            # The header says too short: decode (a short clip is cheap) for the worker's exact verdict and message.
            decode_audio(data, max_seconds=max_seconds, min_seconds=min_seconds)
    except MediaError as e:
        raise _fail(str(e)) from None


def _check_url(url: str, allow: AllowList | None) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise _fail(f"the URL is too long (at most {MAX_URL_LENGTH} characters)")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise _fail("the URL must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port                  # raises ValueError on a bad port
    except ValueError:
        raise _fail("is not a valid URL") from None
    if not parts.hostname:
        raise _fail("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise _fail("URLs with credentials (user:password@) are not accepted")
    if port == 0:
        raise _fail("is not a valid URL (port 0)")
    if "%" in parts.hostname:
        raise _fail("the URL's host must not contain '%' (percent-encoding or an IPv6 zone)")
    port = port or (443 if parts.scheme.lower() == "https" else 80)
    if allow is not None:
        _check_destination(parts.hostname, port, allow)
    try:
        host = httpx.URL(url).host             # what the fetcher will parse and connect to
    except Exception:  # noqa: BLE001 - httpx.InvalidURL and the IDNA codec's errors
        raise _fail("is not a valid URL (the host is not a valid name or address)") from None
    if allow is not None and host != parts.hostname:
        _check_destination(host, port, allow)
    return url


def _check_destination(host: str, port: int, allow: AllowList) -> None:
    """Refuse, without DNS, a host that can only be a loopback/private/... destination the operator did not allow."""
    if allow.host_allowed(host, port):
        return
    ip = ip_literal(host)
    if ip is not None:
        problem = address_problem(ip)
        if problem:
            raise _fail(f"refused: the URL's host is a {problem} address (only public addresses are fetched "
                        "unless the operator allows the host and port)")
        return
    name = host.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):     # RFC 6761: always loopback
        raise _fail("refused: the URL's host is a loopback name (only public addresses are fetched unless the "
                    "operator allows the host and port)")


def _split_data_uri(uri: str) -> tuple[str, str]:
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise _fail("malformed data: URI (no comma before the data)")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if "base64" not in params[1:]:
        raise _fail("data: URIs must be base64-encoded (data:audio/wav;base64,...)")
    if not (media_type.startswith("audio/") or media_type in _ALLOWED_DATA_TYPES):
        shown = media_type or "none"
        raise _fail(f"data: URI media type must be audio/* or application/octet-stream (got {shown!r})")
    if "%" in payload:
        payload = urllib.parse.unquote(payload)
    return media_type, payload


def _decode_base64(text: str, max_bytes: int) -> bytes:
    # Cheap bound first (before any copy): base64 is 4/3 the size, whitespace allowed but not unbounded.
    if len(text) > 2 * (max_bytes * 4 // 3) + 1024:
        raise _fail(f"the audio is too large (at most {_mb(max_bytes)})")
    compact = _WHITESPACE.sub("", text)
    if not compact:
        raise _fail("the base64 data is empty")
    if not _BASE64_CHARS.fullmatch(compact):
        raise _fail("is not a URL, a data: URI or valid base64")
    unpadded = compact.rstrip("=")
    if (len(unpadded) * 3) // 4 > max_bytes:
        raise _fail(f"the audio is too large (at most {_mb(max_bytes)})")
    if len(unpadded) % 4 == 1:
        raise _fail("is not valid base64 (truncated)")
    padded = unpadded + "=" * (-len(unpadded) % 4)
    try:
        data = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise _fail("is not valid base64") from None
    if not data:
        raise _fail("the base64 data is empty")
    return data


def resolve(source: ReferenceSource, fetcher: Fetcher) -> bytes:
    """The audio bytes: inline data as is, a URL through `fetcher.fetch` (FetchError on failure)."""
    if source.data is not None:
        return source.data
    assert source.url is not None
    return fetcher.fetch(source.url)


def _as_source(value: str | ReferenceSource, max_bytes: int, max_seconds: float) -> ReferenceSource:
    if isinstance(value, ReferenceSource):
        return value
    try:
        return _parse(value, None, max_bytes, False, max_seconds, 0.0)
    except ReferenceAudioError as e:
        raise ReferenceAudioError(str(e).removeprefix(f"{PARAM}: ")) from None


def load_reference(value: str | ReferenceSource, fetcher: Fetcher, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   max_seconds: float = DEFAULT_MAX_SECONDS,
                   min_seconds: float = DEFAULT_MIN_SECONDS) -> VoiceAudio:
    """parse -> fetch (if a URL) -> decode, for the worker. Every failure is a MediaError (ReferenceAudioError,
    FetchError or DecodeError) whose message is the reason for the FAILED job; it does not repeat the parameter
    name, the caller prefixes it (the worker stores "reference_audio: <message>")."""
    source = _as_source(value, max_bytes, max_seconds)
    data = resolve(source, fetcher)
    return decode_audio(data, max_seconds=max_seconds, min_seconds=min_seconds)
