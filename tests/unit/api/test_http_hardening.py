"""The hardening findings that live in the HTTP layer, each reproduced against the real app on a real socket:
JSON-only bodies (no CORS "simple request" submissions), CORS off by default, bounded echoes, `since=nan`,
queue-full 429s that are not failed jobs, /ready while storage is broken, RFC 9110 on the audio URL, a stalled
body answered 408, a client leaving mid-upload counted as 499."""
from __future__ import annotations

import re

import httpx
import pytest

from chatterbox_serverless.testing import FakeEngineForTests, start_server, wait_until
from chatterbox_serverless.testing.http import open_request, parse_response, read_until_closed

V2 = "/v2/chatterbox-tts"


def completed_output(server, client, text="Hello there.", headers=None) -> str:
    rid = client.post(server.url + V2, json={"text": text, "output_format": "wav"}, headers=headers).json()["request_id"]
    wait_until(lambda: client.get(f"{server.url}/v2/requests/{rid}/status", headers=headers).json()["status"]
               == "COMPLETED", 15)
    return client.get(f"{server.url}/v2/requests/{rid}", headers=headers).json()["output"]


def test_only_json_bodies_are_accepted_and_cors_is_off_by_default(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests()) as s:
        # what a web page may send cross-origin without asking (a CORS "simple request")
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"content-type": ctype} if ctype else {}
            r = httpx.post(s.url + V2, content=b'{"text": "hi"}', headers=headers)
            assert r.status_code == 415 and "application/json" in r.json()["error"], (ctype, r.text)
        assert s.store.stats().by_state["QUEUED"] + s.store.stats().by_state["COMPLETED"] == 0
        r = httpx.post(s.url + V2, content=b'{"text": "hi"}', headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200
        preflight = httpx.options(s.url + V2, headers={"origin": "https://evil.example",
                                                       "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
    with start_server(tmp_path / "cors", engine=FakeEngineForTests(), cors_origins="https://app.example") as s:
        ok = httpx.options(s.url + V2, headers={"origin": "https://app.example", "access-control-request-method": "POST",
                                                "access-control-request-headers": "content-type,x-api-key"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(s.url + V2, headers={"origin": "https://evil.example",
                                                   "access-control-request-method": "POST"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_error_messages_echo_bounded_input(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests()) as s:
        long_id = "a" * 5000
        for path in (f"/v2/requests/{long_id}/status", f"/v2/requests/{long_id}", f"/v2/{long_id}", f"/nope/{long_id}"):
            r = httpx.post(s.url + path, json={"text": "x"}) if path.startswith("/v2/a") else httpx.get(s.url + path)
            assert r.status_code == 404 and len(r.json()["error"]) < 300, (path, len(r.text))


def test_since_nan_is_a_400_and_queue_full_is_not_a_failed_job(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests(), accounts=True, workers=0, max_queue=1) as s:
        key, _ = s.accounts.create_key("t", credits=1000, rate_per_min=0)
        h = {"x-api-key": key}
        for since in ("nan", "inf", "-inf"):
            r = httpx.get(s.url + "/v1/account", params={"since": since}, headers=h)
            assert r.status_code == 400 and "since" in r.json()["error"], since
        assert httpx.post(s.url + V2, json={"text": "first"}, headers=h).status_code == 200
        for _ in range(5):
            r = httpx.post(s.url + V2, json={"text": "rejected"}, headers=h)
            assert r.status_code == 429 and r.headers["retry-after"]
        acc = httpx.get(s.url + "/v1/account", params={"ledger": 100}, headers=h).json()
        assert acc["usage"]["failed"] == 0 and acc["usage"]["open_holds"] == 1
        assert [e["kind"] for e in acc["ledger"]] == ["grant", "hold"]    # a refused submission leaves no trace


def test_ready_is_503_while_storage_cannot_be_written(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests()) as s:
        assert httpx.get(s.url + "/ready").status_code == 200
        s.store.writable = lambda: "audio cannot be written (read-only file system)"
        r = httpx.get(s.url + "/ready")
        assert r.status_code == 503 and "cannot be written" in r.json()["error"] and str(tmp_path) not in r.text
        del s.store.writable
        assert httpx.get(s.url + "/ready").status_code == 200


def test_audio_url_follows_rfc_9110(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests()) as s, httpx.Client() as c:
        url = completed_output(s, c)
        full = c.get(url)
        assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
        etag, size = full.headers["etag"], len(full.content)
        assert c.get(url, headers={"if-none-match": etag}).status_code == 304
        assert c.get(url, headers={"if-none-match": etag}).content == b""
        for bad in ("bytes=abc", "bytes=50-10", "pages=1-2"):          # invalid: ignored, the whole file
            r = c.get(url, headers={"range": bad})
            assert r.status_code == 200 and r.content == full.content, bad
        part = c.get(url, headers={"range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == full.content[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{size}"
        r = c.get(url, headers={"range": f"bytes={size + 10}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}" and r.json()["error"]


def test_a_stalled_body_gets_408_and_a_client_leaving_mid_upload_is_499(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests(), body_timeout=0.5) as s:
        port = int(s.url.rsplit(":", 1)[1])
        head = {"Content-Type": "application/json", "Content-Length": "100"}
        sock = open_request(port, "POST", V2, head, b'{"text"')
        answer, closed = read_until_closed(sock, 5)
        sock.close()
        status, _, body = parse_response(answer)
        assert (status, closed) == (408, True) and b'"error"' in body
        open_request(port, "POST", V2, head, b'{"text": "half').close()
        def counted() -> bool:
            metrics = httpx.get(s.url + "/metrics").text
            return re.search(r'chatterbox_http_requests_total\{endpoint="submit_v2",method="POST",status="499"\}',
                             metrics) is not None
        wait_until(counted, 5)
        assert 'status="500"' not in httpx.get(s.url + "/metrics").text


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(tmp_path, path):
    with start_server(tmp_path, engine=FakeEngineForTests()) as s:
        page = httpx.get(s.url + path)
        assert page.status_code == 200 and not re.search(r"https?://(?!127\.0\.0\.1)", page.text)
