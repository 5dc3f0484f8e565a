"""A stored file (audio) served to GET and HEAD as RFC 9110 asks: validators, conditional requests, one byte range.

    return serve_file(path, "audio/mpeg", {"content-disposition": ...}, etag_key=job_id)   # streamed from disk
    return serve_file(data, "audio/mpeg", headers)                                          # bytes in memory

What the response does, evaluated when it is sent (RFC 9110 §13.2.2 order):

* validators: a strong `ETag` on every 200/206/304; for a path also `Last-Modified`. A path's ETag is a hash of
  (`etag_key` or the file's name, size, mtime in ns), read from the opened file (fstat), so it costs no read and is
  the same on every replica that sees the same file; bytes get a hash of their content (the same bytes give the
  same ETag anywhere). Path and bytes copies of one file therefore have different ETags: serve one job one way.
* `If-Match` (strong comparison, `*` matches) or else `If-Unmodified-Since` failing: 412 `{"error"}`.
* `If-None-Match` (weak comparison, `*` matches) or else `If-Modified-Since` satisfied: 304 with the validators
  and the caller's headers minus `content-*`, no body.
* `Range: bytes=a-b | a- | -n`: 206 with `Content-Range: bytes a-b/size`; ranges that overlap or touch are
  coalesced, and when several disjoint ranges remain the whole file is sent with 200 (RFC 9110 §14.2 lets a server
  ignore Range; no multipart/byteranges). A Range header that is not valid `bytes=` syntax (other unit,
  `bytes=abc`, `bytes=50-10`, more than 100 parts) is ignored: 200. An empty file ignores Range. When no range
  is satisfiable (every start at or past the end, or `-0`): 416 with `Content-Range: bytes */size` and
  `{"error"}`. `If-Range` that does not match (strong ETag, or the exact Last-Modified date of a file at least
  one second old) turns Range off: 200.
* HEAD answers exactly as GET would (status and headers, `Content-Length` included) without the body.

Files are opened once (in a worker thread) and streamed in 64 KiB reads; the open descriptor keeps the bytes
readable even if the janitor deletes the file meanwhile. A file gone before it is opened: 404 `{"error"}`.
Error answers (404/412/416) carry only the caller's `x-*` headers (e.g. `x-request-id`), not its cache or
content headers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import time
from email.utils import formatdate, parsedate_to_datetime
from typing import BinaryIO, Mapping

import anyio
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup
else:                                       # anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

CHUNK_SIZE = 64 * 1024
MAX_RANGES = 100

_RANGE_SPEC = re.compile(r"^(?:([0-9]+)-([0-9]*)|-([0-9]+))$")
_ETAG = re.compile(r'(W/)?("[\x21\x23-\x7e\x80-\xff]*")')


def parse_range(value: str, size: int) -> list[tuple[int, int]] | None:
    """The satisfiable byte ranges of a Range header for a representation of `size` bytes, as inclusive
    (first, last) pairs, clamped to the file, sorted, overlapping or adjacent ones merged. None: the header is to
    be ignored (not valid `bytes=` syntax, too many parts, or an empty representation). []: not satisfiable."""
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes" or size <= 0:
        return None
    parts = [p.strip() for p in spec.split(",")]
    parts = [p for p in parts if p]           # RFC 9110 §5.6.1: empty list elements are allowed
    if not parts or len(parts) > MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    for part in parts:
        m = _RANGE_SPEC.match(part)
        if m is None:
            return None
        first, last, suffix = m.groups()
        if suffix is not None:
            n = int(suffix)
            if n > 0:
                ranges.append((max(0, size - n), size - 1))
            continue
        a = int(first)
        b = int(last) if last else None
        if b is not None and b < a:
            return None                        # invalid int-range: the whole header is invalid
        if a < size:
            ranges.append((a, size - 1 if b is None else min(b, size - 1)))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _etags(value: str) -> list[tuple[bool, str]]:
    """(weak, opaque tag with quotes) for each entity tag of an If-Match / If-None-Match / If-Range value."""
    return [(bool(m.group(1)), m.group(2)) for m in _ETAG.finditer(value)]


def _http_date(value: str) -> float | None:
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return when.timestamp()


def _strong_match(value: str, etag: str) -> bool:
    if value.strip() == "*":
        return True
    return any(not weak and tag == etag for weak, tag in _etags(value))


def _weak_match(value: str, etag: str) -> bool:
    if value.strip() == "*":
        return True
    return any(tag == etag for _, tag in _etags(value))


class StoredFileResponse(Response):
    """See the module docstring. `source`: a filesystem path (streamed) or bytes. `headers`: sent with 200/206
    (and, but for `content-*`, with 304), e.g. content-disposition, cache-control, x-request-id."""

    chunk_size = CHUNK_SIZE

    def __init__(self, source: str | os.PathLike[str] | bytes | bytearray | memoryview, media_type: str,
                 headers: Mapping[str, str] | None = None, *, etag_key: str | None = None,
                 background: BackgroundTask | None = None):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.path: str | None = None
            self.data: bytes | None = bytes(source)
            self._etag: str | None = '"' + hashlib.sha256(self.data).hexdigest()[:40] + '"'
        else:
            self.path = os.fspath(source)
            self.data = None
            self._etag = None
        self.etag_key = etag_key
        self.status_code = 200
        self.media_type = media_type
        self.background = background
        self.body = b""
        self.raw_headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                            for k, v in (headers or {}).items()]

    # --- ASGI ----------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET").upper()
        head = method == "HEAD"
        request = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        file: BinaryIO | None = None
        if self.path is not None:
            try:
                file, size, mtime = await anyio.to_thread.run_sync(_open, self.path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                await self._error(send, head, 404, "this file does not exist or has expired")
                return
            key = self.etag_key or os.path.basename(self.path)
            etag = '"' + hashlib.sha256(f"{key}\0{size}\0{mtime}".encode()).hexdigest()[:40] + '"'
            last_modified: float | None = mtime / 1e9
        else:
            assert self.data is not None and self._etag is not None
            size, etag, last_modified = len(self.data), self._etag, None
        try:
            await self._respond(scope, receive, send, request, head, file, size, etag, last_modified)
        finally:
            if file is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(file.close)
        if self.background is not None:
            await self.background()

    async def _respond(self, scope: Scope, receive: Receive, send: Send, request: dict[str, str], head: bool,
                       file: BinaryIO | None, size: int, etag: str, last_modified: float | None) -> None:
        validators = [(b"etag", etag.encode("latin-1"))]
        if last_modified is not None:
            validators.append((b"last-modified", formatdate(last_modified, usegmt=True).encode("latin-1")))
        mtime_s = None if last_modified is None else int(last_modified)

        # 1-2: preconditions that fail with 412
        if_match = request.get("if-match")
        if if_match is not None:
            if not _strong_match(if_match, etag):
                await self._error(send, head, 412, "precondition failed: If-Match does not match the file's ETag")
                return
        elif "if-unmodified-since" in request and mtime_s is not None:
            when = _http_date(request["if-unmodified-since"])
            if when is not None and mtime_s > when:
                await self._error(send, head, 412, "precondition failed: the file was modified since "
                                                   "If-Unmodified-Since")
                return
        # 3-4: not modified
        if_none_match = request.get("if-none-match")
        not_modified = False
        if if_none_match is not None:
            not_modified = _weak_match(if_none_match, etag)
        elif "if-modified-since" in request and mtime_s is not None:
            when = _http_date(request["if-modified-since"])
            not_modified = when is not None and mtime_s <= when
        if not_modified:
            extra = [(k, v) for k, v in self.raw_headers
                     if k not in (b"etag", b"last-modified") and (not k.startswith(b"content-")
                                                                  or k == b"content-location")]
            await send({"type": "http.response.start", "status": 304, "headers": validators + extra})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        # 5: range
        first, last, status = 0, size - 1, 200
        http_range = request.get("range")
        if http_range is not None and self._if_range_holds(request.get("if-range"), etag, last_modified):
            ranges = parse_range(http_range, size)
            if ranges == []:
                await self._error(send, head, 416, f"range not satisfiable: {http_range.strip()!r} starts at or "
                                                   f"past the end of this {size}-byte file",
                                  [(b"content-range", f"bytes */{size}".encode("latin-1"))])
                return
            if ranges is not None and len(ranges) == 1:
                (first, last), status = ranges[0], 206
        headers = [(k, v) for k, v in self.raw_headers
                   if k not in (b"etag", b"last-modified", b"content-length", b"content-range", b"content-type",
                                b"accept-ranges")]
        headers += validators + [(b"accept-ranges", b"bytes"), (b"content-type", self.media_type.encode("latin-1")),
                                 (b"content-length", str(last - first + 1).encode("latin-1"))]
        if status == 206:
            headers.append((b"content-range", f"bytes {first}-{last}/{size}".encode("latin-1")))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if head or size == 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if file is None:
            assert self.data is not None
            await send({"type": "http.response.body", "body": self.data[first:last + 1], "more_body": False})
            return
        await self._stream(scope, receive, send, file, first, last + 1)

    def _if_range_holds(self, if_range: str | None, etag: str, last_modified: float | None) -> bool:
        if if_range is None:
            return True
        value = if_range.strip()
        if value.startswith(("\"", "W/")):
            return _strong_match(value, etag)
        when = _http_date(value)
        # a date is a strong validator only if the file is at least one second older than now (RFC 9110 §8.8.2.2)
        return (when is not None and last_modified is not None and int(last_modified) == int(when)
                and last_modified <= time.time() - 1)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, file: BinaryIO, start: int,
                      end: int) -> None:
        async def send_file() -> None:
            await anyio.to_thread.run_sync(file.seek, start)
            pos = start
            while pos < end:
                chunk = await anyio.to_thread.run_sync(file.read, min(self.chunk_size, end - pos))
                if not chunk:
                    raise RuntimeError(f"{self.path} is shorter than its size when opened")
                pos += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": pos < end})

        spec = tuple(int(x) for x in scope.get("asgi", {}).get("spec_version", "2.0").split("."))
        if spec >= (2, 4):           # send raises once the client is gone
            await send_file()
            return
        try:
            async with anyio.create_task_group() as tg:   # older servers: stop reading when the client leaves
                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await send_file()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:          # anyio wraps the one real error: raise it as itself
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _error(self, send: Send, head: bool, status: int, message: str,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        headers = [(k, v) for k, v in self.raw_headers if k.startswith(b"x-")] + (extra or [])
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


def _open(path: str) -> tuple[BinaryIO, int, int]:
    file = open(path, "rb")
    try:
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(path)
    except BaseException:
        file.close()
        raise
    return file, st.st_size, st.st_mtime_ns


def serve_file(source: str | os.PathLike[str] | bytes, media_type: str, headers: Mapping[str, str] | None = None,
               *, etag_key: str | None = None, background: BackgroundTask | None = None) -> StoredFileResponse:
    """The response for a GET/HEAD of a stored file: return it from the endpoint. `source` is a path (streamed
    from disk) or the bytes; `etag_key` (e.g. the job id) goes into a path's ETag with its size and mtime."""
    return StoredFileResponse(source, media_type, headers, etag_key=etag_key, background=background)


__all__ = ["StoredFileResponse", "serve_file", "parse_range", "CHUNK_SIZE", "MAX_RANGES"]
