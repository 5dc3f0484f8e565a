"""media/fetch.py: allow-list entries carry a port; without one they admit ports 80 and 443 only, so allowing a
host (`localhost`) no longer opens its other services (Redis on 6379) to client-supplied URLs."""
from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless import media
from chatterbox_serverless.media.fetch import AllowList


def _wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    return buf.getvalue()


WAV = _wav()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(WAV)))
        self.end_headers()
        self.wfile.write(WAV)


@pytest.fixture(scope="module")
def http_port():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def redis_like():
    """A TCP service on loopback that records every connection made to it (standing in for Redis)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    accepted: list[tuple] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, addr = sock.accept()
            except OSError:
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    thread.join(2)
    sock.close()


def localhost_resolver(host: str, port: int) -> list[str]:
    if host == "localhost":
        return ["127.0.0.1"]
    raise OSError("no such host")


from test_media import both  # noqa: E402  (same folder)


def test_entry_without_a_port_admits_80_and_443_only():
    allow = AllowList(["localhost", "*.internal.example", "10.0.0.0/8", "::1", "minio"])
    for host in ("localhost", "a.internal.example", "10.1.2.3", "[::1]", "::1", "minio"):
        assert allow.host_allowed(host, 80) and allow.host_allowed(host, 443), host
        for port in (6379, 5432, 8080, 22, 9000):
            assert not allow.host_allowed(host, port), (host, port)
    assert allow.address_allowed(ipaddress.ip_address("10.9.9.9"), 443)
    assert not allow.address_allowed(ipaddress.ip_address("10.9.9.9"), 6379)


@pytest.mark.parametrize("entry, host, port", [
    ("minio:9000", "minio", 9000),
    ("MINIO.:9000", "minio", 9000),
    ("[::1]:8080", "::1", 8080),
    ("[::1]:8080", "[::1]", 8080),
    ("[fd00::/8]:9000", "fd12::5", 9000),
    ("10.0.0.0/8:9000", "10.2.3.4", 9000),
    ("127.0.0.1:8080", "127.0.0.1", 8080),
    ("127.0.0.1:8080", "0x7f.1", 8080),              # the same address written another way
    ("*.internal.example:8443", "s3.internal.example", 8443),
])
def test_entry_with_a_port_admits_that_port_only(entry, host, port):
    allow = AllowList([entry])
    assert allow.host_allowed(host, port)
    for other in (80, 443, 6379, port + 1):
        assert not allow.host_allowed(host, other), other


def test_several_entries_for_one_host_add_up():
    allow = AllowList(["minio:9000", "minio:9001"])
    assert allow.host_allowed("minio", 9000) and allow.host_allowed("minio", 9001)
    assert not allow.host_allowed("minio", 80)


@pytest.mark.parametrize("entry", ["minio:abc", "minio:0", "minio:70000", "minio:", "[::1", "[::1]x",
                                   "[::1]:", "http://minio:9000", "mi nio", "minio/x", "*.:80"])
def test_malformed_entries_are_refused(entry):
    with pytest.raises(ValueError, match="allowed fetch host"):
        AllowList([entry])


def test_an_allowed_host_does_not_reach_its_other_services(redis_like):
    port, accepted = redis_like
    fetcher = media.SafeFetcher(allow_hosts=["localhost"], resolver=localhost_resolver)
    for result in both(fetcher, f"http://localhost:{port}/"):
        assert isinstance(result, str) and result.startswith("refused:"), result
        assert f"port {port} is not allowed for this host" in result
    assert accepted == []                          # no connection was ever made


def test_the_port_given_is_admitted(http_port):
    fetcher = media.SafeFetcher(allow_hosts=[f"localhost:{http_port}"], resolver=localhost_resolver)
    assert both(fetcher, f"http://localhost:{http_port}/a.wav") == [WAV, WAV]
    fetcher = media.SafeFetcher(allow_hosts=[f"127.0.0.1:{http_port}"])
    assert both(fetcher, f"http://127.0.0.1:{http_port}/a.wav") == [WAV, WAV]
    # An entry for another port of the same host does not admit this one.
    fetcher = media.SafeFetcher(allow_hosts=[f"127.0.0.1:{http_port + 1}"])
    assert all("refused" in r for r in both(fetcher, f"http://127.0.0.1:{http_port}/a.wav"))


def test_public_hosts_are_not_limited_by_the_allow_list():
    # The allow list only widens what may be fetched: a public address on any port is not its business.
    allow = AllowList(["minio:9000"])
    policy_fetcher = media.SafeFetcher(allow_hosts=["minio:9000"],
                                       resolver=lambda h, p: ["93.184.216.34"])
    assert not allow.host_allowed("example.com", 8443)
    from chatterbox_serverless.media.fetch import _Policy
    policy = _Policy(policy_fetcher.allow, policy_fetcher.resolver, deadline=time.monotonic() + 5, timeout=5.0)
    assert policy.resolve_sync("example.com", 8443) == ["93.184.216.34"]
