"""api/fileresponse.py: GET/HEAD of a stored file (path or bytes) under RFC 9110: ETag, 304, 206, 416, If-Range,
invalid Range ignored, streaming in chunks."""
from __future__ import annotations

import os
import time
from email.utils import formatdate

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from chatterbox_serverless.api.fileresponse import CHUNK_SIZE, StoredFileResponse, parse_range, serve_file

DATA = bytes(range(256)) * 4          # 1024 bytes, every byte's position is recognisable
SIZE = len(DATA)
EXTRA = {"x-request-id": "job-1", "cache-control": "private, max-age=60",
         "content-disposition": 'inline; filename="job-1.mp3"'}


@pytest.fixture
def audio_path(tmp_path):
    path = tmp_path / "job-1.mp3"
    path.write_bytes(DATA)
    old = time.time() - 3600             # an hour old: its Last-Modified is a strong validator
    os.utime(path, (old, old))
    return path


@pytest.fixture
def client(audio_path):
    app = FastAPI()

    @app.api_route("/path/{name}", methods=["GET", "HEAD"])
    def by_path(name: str):
        return serve_file(audio_path.parent / name, "audio/mpeg", EXTRA, etag_key="job-1")

    @app.api_route("/bytes", methods=["GET", "HEAD"])
    def by_bytes():
        return serve_file(DATA, "audio/mpeg", EXTRA)

    with TestClient(app) as c:
        yield c


SOURCES = {"path": "/path/job-1.mp3", "bytes": "/bytes"}
BOTH = pytest.mark.parametrize("source", ["path", "bytes"])
METHODS = pytest.mark.parametrize("method", ["GET", "HEAD"])


def call(client, method, source, **headers):
    return client.request(method, SOURCES[source], headers=headers)


def etag_of(client, source):
    return call(client, "HEAD", source).headers["etag"]


# --- parse_range: the grammar ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("bytes=0-9", [(0, 9)]), ("bytes=10-", [(10, 99)]), ("bytes=-10", [(90, 99)]), ("bytes=-1000", [(0, 99)]),
    ("bytes=90-1000", [(90, 99)]), ("BYTES=0-0", [(0, 0)]), (" bytes = 5-6 ", [(5, 6)]),
    ("bytes=0-9,5-19", [(0, 19)]), ("bytes=0-9,10-19", [(0, 19)]), ("bytes=0-9,50-59", [(0, 9), (50, 59)]),
    ("bytes=0-9,,", [(0, 9)]), ("bytes=100-", []), ("bytes=100-200", []), ("bytes=-0", []),
    ("bytes=100-,0-1", [(0, 1)]),
    ("bytes=abc", None), ("bytes=50-10", None), ("items=0-5", None), ("0-5", None), ("bytes=", None),
    ("bytes=1-2-3", None), ("bytes=+1-2", None), ("bytes=0x1-2", None), ("bytes=٣-4", None), ("bytes=--5", None),
    ("bytes=0-1,abc", None), ("bytes=" + ",".join(["0-0"] * 101), None),
])
def test_parse_range(value, expected):
    assert parse_range(value, 100) == expected


def test_parse_range_empty_representation_is_ignored():
    assert parse_range("bytes=0-", 0) is None and parse_range("bytes=-5", 0) is None


# --- 200 -------------------------------------------------------------------------------------------------------
@BOTH
@METHODS
def test_full_response_has_validators_and_length(client, source, method):
    r = call(client, method, source)
    assert r.status_code == 200
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-length"] == str(SIZE)
    assert r.headers["content-type"] == "audio/mpeg"
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    for k, v in EXTRA.items():
        assert r.headers[k] == v
    assert "content-range" not in r.headers
    assert r.content == (DATA if method == "GET" else b"")
    assert ("last-modified" in r.headers) == (source == "path")


@BOTH
def test_etag_is_stable(client, source):
    assert etag_of(client, source) == etag_of(client, source)


def test_path_etag_changes_with_the_file(client, audio_path):
    before = etag_of(client, "path")
    audio_path.write_bytes(DATA[:-1] + b"x")
    assert etag_of(client, "path") != before


def test_path_etag_uses_the_key_size_and_mtime_not_the_content(tmp_path):
    async def etag(path, key):
        sent = []

        async def send(message):
            sent.append(message)

        await StoredFileResponse(path, "audio/mpeg", etag_key=key)(
            {"type": "http", "method": "HEAD", "headers": []}, None, send)
        return dict(sent[0]["headers"])[b"etag"]

    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(b"1234")
    b.write_bytes(b"1234")
    os.utime(a, ns=(10**18, 10**18))
    os.utime(b, ns=(10**18, 10**18))
    assert anyio.run(etag, a, "job") == anyio.run(etag, b, "job")        # same key, size, mtime
    assert anyio.run(etag, a, "job") != anyio.run(etag, a, "other")
    os.utime(b, ns=(10**18 + 1, 10**18 + 1))
    assert anyio.run(etag, a, "job") != anyio.run(etag, b, "job")


def test_bytes_etag_is_a_content_hash():
    assert StoredFileResponse(b"abc", "audio/wav")._etag == StoredFileResponse(bytearray(b"abc"), "x/y")._etag
    assert StoredFileResponse(b"abc", "audio/wav")._etag != StoredFileResponse(b"abd", "audio/wav")._etag


# --- 304 -------------------------------------------------------------------------------------------------------
@BOTH
@METHODS
@pytest.mark.parametrize("form", ["exact", "star", "list", "weak"])
def test_if_none_match_gives_304(client, source, method, form):
    etag = etag_of(client, source)
    value = {"exact": etag, "star": "*", "list": f'"nope", {etag} , "other"', "weak": "W/" + etag}[form]
    r = call(client, method, source, **{"if-none-match": value})
    assert r.status_code == 304
    assert r.headers["etag"] == etag
    assert r.content == b""
    assert "content-type" not in r.headers and "content-disposition" not in r.headers
    assert "content-length" not in r.headers and "content-range" not in r.headers
    assert r.headers["cache-control"] == EXTRA["cache-control"] and r.headers["x-request-id"] == "job-1"


@BOTH
@METHODS
def test_if_none_match_other_etag_gives_200(client, source, method):
    r = call(client, method, source, **{"if-none-match": '"something-else"'})
    assert r.status_code == 200 and r.headers["content-length"] == str(SIZE)


@BOTH
def test_if_none_match_beats_range(client, source):
    r = call(client, "GET", source, **{"if-none-match": etag_of(client, source), "range": "bytes=0-1"})
    assert r.status_code == 304


@METHODS
def test_if_modified_since(client, method, audio_path):
    later = formatdate(audio_path.stat().st_mtime + 10, usegmt=True)
    earlier = formatdate(audio_path.stat().st_mtime - 10, usegmt=True)
    assert call(client, method, "path", **{"if-modified-since": later}).status_code == 304
    assert call(client, method, "path", **{"if-modified-since": earlier}).status_code == 200
    assert call(client, method, "path", **{"if-modified-since": "not a date"}).status_code == 200
    # If-None-Match takes precedence over If-Modified-Since
    assert call(client, method, "path", **{"if-modified-since": later, "if-none-match": '"x"'}).status_code == 200


# --- 412 -------------------------------------------------------------------------------------------------------
@BOTH
@METHODS
def test_if_match(client, source, method):
    etag = etag_of(client, source)
    assert call(client, method, source, **{"if-match": etag}).status_code == 200
    assert call(client, method, source, **{"if-match": "*"}).status_code == 200
    r = call(client, method, source, **{"if-match": '"other"'})
    assert r.status_code == 412 and r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == "job-1" and "cache-control" not in r.headers
    if method == "GET":
        assert "If-Match" in r.json()["error"]
    assert call(client, method, source, **{"if-match": "W/" + etag}).status_code == 412   # strong comparison


@METHODS
def test_if_unmodified_since(client, method, audio_path):
    earlier = formatdate(audio_path.stat().st_mtime - 10, usegmt=True)
    later = formatdate(audio_path.stat().st_mtime + 10, usegmt=True)
    assert call(client, method, "path", **{"if-unmodified-since": earlier}).status_code == 412
    assert call(client, method, "path", **{"if-unmodified-since": later}).status_code == 200


# --- 206 -------------------------------------------------------------------------------------------------------
@BOTH
@METHODS
@pytest.mark.parametrize("value, first, last", [
    ("bytes=10-19", 10, 19), ("bytes=1000-", 1000, SIZE - 1), ("bytes=-24", SIZE - 24, SIZE - 1),
    ("bytes=0-0", 0, 0), ("bytes=1020-5000", 1020, SIZE - 1), ("bytes=-5000", 0, SIZE - 1),
    ("bytes=0-9,10-19", 0, 19), ("bytes=5-15, 0-9", 0, 15),
])
def test_single_range_gives_206(client, source, method, value, first, last):
    r = call(client, method, source, range=value)
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {first}-{last}/{SIZE}"
    assert r.headers["content-length"] == str(last - first + 1)
    assert r.headers["content-type"] == "audio/mpeg" and r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"] == etag_of(client, source)
    assert r.content == (DATA[first:last + 1] if method == "GET" else b"")


@BOTH
@METHODS
def test_if_range_with_matching_etag_gives_206(client, source, method):
    r = call(client, method, source, range="bytes=0-3", **{"if-range": etag_of(client, source)})
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes 0-3/{SIZE}"


@BOTH
@METHODS
@pytest.mark.parametrize("if_range", ['"different"', "weak", "Mon, 01 Jan 2001 00:00:00 GMT", "garbage"])
def test_if_range_not_matching_gives_full_200(client, source, method, if_range):
    if if_range == "weak":
        if_range = "W/" + etag_of(client, source)
    r = call(client, method, source, range="bytes=0-3", **{"if-range": if_range})
    assert r.status_code == 200 and "content-range" not in r.headers
    assert r.headers["content-length"] == str(SIZE)
    assert r.content == (DATA if method == "GET" else b"")


@METHODS
def test_if_range_with_the_last_modified_date(client, method, audio_path):
    r = call(client, method, "path", range="bytes=0-3",
             **{"if-range": formatdate(audio_path.stat().st_mtime, usegmt=True)})
    assert r.status_code == 206


def test_if_range_date_of_a_file_modified_this_second_is_not_strong(client, audio_path):
    now = time.time()
    os.utime(audio_path, (now, now))
    r = call(client, "GET", "path", range="bytes=0-3", **{"if-range": formatdate(now, usegmt=True)})
    assert r.status_code == 200


# --- Range ignored / several ranges ----------------------------------------------------------------------------
@BOTH
@METHODS
@pytest.mark.parametrize("value", ["bytes=abc", "bytes=50-10", "items=0-5", "0-5", "bytes=", "bytes=1-2-3",
                                   "bytes=0-1, xyz"])
def test_invalid_range_is_ignored(client, source, method, value):
    r = call(client, method, source, range=value)
    assert r.status_code == 200, r.text
    assert "content-range" not in r.headers and r.headers["content-length"] == str(SIZE)
    assert r.content == (DATA if method == "GET" else b"")


@BOTH
@METHODS
def test_several_disjoint_ranges_give_the_whole_file(client, source, method):
    r = call(client, method, source, range="bytes=0-9,100-109")
    assert r.status_code == 200 and r.headers["content-length"] == str(SIZE)
    assert r.content == (DATA if method == "GET" else b"")


# --- 416 -------------------------------------------------------------------------------------------------------
@BOTH
@METHODS
@pytest.mark.parametrize("value", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 10}", "bytes=-0",
                                   f"bytes={SIZE}-,{SIZE + 1}-"])
def test_unsatisfiable_range_gives_416(client, source, method, value):
    r = call(client, method, source, range=value)
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{SIZE}"
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == "job-1"
    if method == "GET":
        assert "not satisfiable" in r.json()["error"]
        assert r.headers["content-length"] == str(len(r.content))
    else:
        assert r.content == b""


# --- edges -----------------------------------------------------------------------------------------------------
@METHODS
def test_missing_file_gives_404_json(client, method):
    r = client.request(method, "/path/gone.mp3")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    if method == "GET":
        assert r.json() == {"error": "this file does not exist or has expired"}


def test_empty_file(tmp_path):
    app = FastAPI()
    (tmp_path / "e.wav").write_bytes(b"")

    @app.get("/e")
    def e():
        return serve_file(tmp_path / "e.wav", "audio/wav")

    with TestClient(app) as c:
        r = c.get("/e")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
        r = c.get("/e", headers={"range": "bytes=0-"})
        assert r.status_code == 200 and r.content == b""


async def _collect(response, method="GET", headers=(), spec="2.3"):
    sent = []

    async def receive():
        await anyio.sleep_forever()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "headers": list(headers), "asgi": {"spec_version": spec}}
    await response(scope, receive, send)
    return sent


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_a_file_is_streamed_in_chunks(tmp_path, spec):
    big = os.urandom(5 * CHUNK_SIZE + 123)
    (tmp_path / "big.flac").write_bytes(big)
    sent = anyio.run(_collect, serve_file(tmp_path / "big.flac", "audio/flac"), "GET", (), spec)
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(bodies) == 6 and all(len(m["body"]) <= CHUNK_SIZE for m in bodies)
    assert [m["more_body"] for m in bodies] == [True] * 5 + [False]
    assert b"".join(m["body"] for m in bodies) == big
    ranged = anyio.run(_collect, serve_file(tmp_path / "big.flac", "audio/flac"), "GET",
                       [(b"range", b"bytes=100-200000")], spec)
    assert ranged[0]["status"] == 206
    assert b"".join(m["body"] for m in ranged[1:]) == big[100:200001]
    assert all(len(m["body"]) <= CHUNK_SIZE for m in ranged[1:]) and ranged[-1]["more_body"] is False


def test_a_deleted_file_is_still_served_once_opened(tmp_path):
    """The janitor may unlink the file mid-download: the open descriptor keeps it readable."""
    data = os.urandom(3 * CHUNK_SIZE)
    path = tmp_path / "gone-soon.ogg"
    path.write_bytes(data)
    out = []

    async def main():
        async def receive():
            await anyio.sleep_forever()

        async def send(message):
            if message["type"] == "http.response.start":
                path.unlink()
            else:
                out.append(message["body"])

        await serve_file(path, "audio/ogg")({"type": "http", "method": "GET", "headers": []}, receive, send)

    anyio.run(main)
    assert b"".join(out) == data


def test_stream_stops_when_the_client_disconnects(tmp_path):
    data = os.urandom(50 * CHUNK_SIZE)
    (tmp_path / "long.wav").write_bytes(data)
    bodies = []

    async def main():
        gone = anyio.Event()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body":
                bodies.append(message)
                if len(bodies) == 3:
                    gone.set()
                await anyio.sleep(0.01)

        scope = {"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.3"}}
        with anyio.fail_after(5):
            await serve_file(tmp_path / "long.wav", "audio/wav")(scope, receive, send)

    anyio.run(main)
    assert 3 <= len(bodies) < 10


def test_background_task_runs(client, tmp_path):
    ran = []
    app = FastAPI()

    @app.get("/x")
    def x():
        from starlette.background import BackgroundTask
        return serve_file(b"abc", "audio/wav", background=BackgroundTask(ran.append, 1))

    with TestClient(app) as c:
        assert c.get("/x").content == b"abc"
    assert ran == [1]
