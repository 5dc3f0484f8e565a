"""Download a reference clip from a client-supplied URL without opening an SSRF hole.

A client chooses the URL, so by default the fetcher only ever connects to public unicast addresses. It refuses
loopback, private (RFC 1918, ULA), link-local, CGNAT, multicast, reserved, unspecified and cloud-metadata
addresses, IPv4 and IPv6 alike (IPv4 embedded in IPv6 - mapped, 6to4, NAT64 - is checked as IPv4).

How the check cannot be bypassed:
  * It runs at connect time, inside httpx's network layer (a custom httpcore network backend): the host name is
    resolved once, every address it resolves to is checked, and the socket is opened to one of exactly those
    addresses. There is no second lookup an attacker's DNS could answer differently (no DNS-rebinding gap).
    The request keeps its Host header and TLS SNI / certificate check against the URL's host name.
  * Redirects are followed by hand, at most `max_redirects`, and every hop is a new URL whose host goes through
    the same check (an allowed public host cannot bounce the fetch to 169.254.169.254).
  * Environment proxies are ignored (a proxy would resolve names itself).
  * The body is streamed and cut at `max_bytes`; the whole fetch (DNS, connect, TLS, every hop, the body) is
    bounded by `timeout` seconds: every socket wait is clamped to the time left.

The operator may allow hosts that would otherwise be refused (`allow_hosts`): exact host names ("minio"),
subdomain wildcards ("*.internal.example"), IP addresses or networks ("10.1.2.0/24", matched against the
resolved address). Errors are a `FetchError` whose message names the reason, never the full URL (which may
carry a signed token).
"""
from __future__ import annotations

import inspect
import ipaddress
import socket
import ssl
import threading
import time
import typing
from typing import Callable, Iterable, Sequence

import anyio
import httpcore
import httpx

from chatterbox_serverless.media import MediaError

IPAddress = typing.Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Resolver = Callable[[str, int], Sequence[str]]   # (host, port) -> IP address strings

DEFAULT_MAX_BYTES = 10_000_000
DEFAULT_TIMEOUT = 20.0
DEFAULT_MAX_REDIRECTS = 5
USER_AGENT = "chatterbox-serverless (reference audio fetch)"
_REDIRECT_CODES = (301, 302, 303, 307, 308)

# Addresses Python's ipaddress does not flag as non-global but that must never be fetched from.
_EXTRA_BLOCKED = [ipaddress.ip_network(n) for n in (
    "100.64.0.0/10",        # CGNAT shared space (Alibaba Cloud metadata lives at 100.100.100.200)
    "192.0.0.0/24",         # IETF protocol assignments (Oracle Cloud metadata: 192.0.0.192)
    "168.63.129.16/32",     # Azure wire server / platform DNS (a "public" address only reachable inside Azure)
    "64:ff9b:1::/48",       # local-use NAT64
)]
_METADATA = {ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "192.0.0.192", "168.63.129.16", "fd00:ec2::254",
)}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(MediaError):
    """The URL could not be fetched, or was refused; the message says why."""


def address_problem(ip: IPAddress) -> str | None:
    """Why the fetcher must not connect to `ip` ("loopback", "private", ...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_problem(embedded)
        if ip.scope_id:
            return "scoped (link-local)"
    if ip in _METADATA:
        return "cloud metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version):
        return "reserved (shared or special-purpose)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


class AllowList:
    """Operator-allowed destinations: host names, "*.suffix" wildcards, IP addresses and CIDR networks."""

    def __init__(self, entries: Iterable[str] = ()):
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            if entry.startswith("*."):
                self.suffixes.append(entry[1:])            # ".example.com"
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return True
        ip = _parse_ip(host)
        return ip is not None and self.address_allowed(ip)

    def address_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.names or self.suffixes or self.networks)


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (getaddrinfo, TCP), in the system's preference order, deduplicated."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in out:
            out.append(sockaddr[0])
    return out


class _Policy:
    """Resolution + the address check, shared by the sync and async backends. One instance per fetch."""

    def __init__(self, allow: AllowList, resolver: Resolver, deadline: float, timeout: float):
        self.allow, self.resolver, self.deadline, self.timeout = allow, resolver, deadline, timeout

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchError(f"timed out after {self.timeout:g} s")
        return left

    def clamp(self, timeout: float | None) -> float:
        left = self.remaining()
        return left if timeout is None else min(timeout, left)

    def vet(self, host: str, addresses: Sequence[str]) -> list[str]:
        """The addresses to connect to, or FetchError. If any resolved address is refused, all are."""
        ips = []
        for a in addresses:
            ip = _parse_ip(a)
            if ip is None:
                raise FetchError(f"could not resolve host {host!r}")
            ips.append(ip)
        if not ips:
            raise FetchError(f"could not resolve host {host!r}")
        if not self.allow.host_allowed(host):
            for ip in ips:
                problem = None if self.allow.address_allowed(ip) else address_problem(ip)
                if problem:
                    what = f"{host} is" if _parse_ip(host) is not None else f"host {host!r} resolves to"
                    raise FetchError(f"refused: {what} a {problem} address "
                                     "(only public addresses are fetched unless the operator allows the host)")
        return [str(ip) for ip in ips]

    def resolve_sync(self, host: str, port: int) -> list[str]:
        ip = _parse_ip(host)
        if ip is not None:
            return self.vet(host, [str(ip)])
        result: list = []

        def run() -> None:
            try:
                result.append(list(self.resolver(host, port)))
            except Exception as e:  # noqa: BLE001 - reported below
                result.append(e)

        worker = threading.Thread(target=run, name="dns-resolve", daemon=True)  # getaddrinfo has no timeout
        worker.start()
        worker.join(self.remaining())
        if not result:
            raise FetchError(f"timed out after {self.timeout:g} s (resolving {host!r})")
        if isinstance(result[0], Exception):
            raise FetchError(f"could not resolve host {host!r}")
        return self.vet(host, result[0])

    async def resolve_async(self, host: str, port: int) -> list[str]:
        ip = _parse_ip(host)
        if ip is not None:
            return self.vet(host, [str(ip)])
        try:
            with anyio.fail_after(self.remaining()):
                addresses = await _run_in_thread(self.resolver, host, port)
        except TimeoutError:
            raise FetchError(f"timed out after {self.timeout:g} s (resolving {host!r})") from None
        except FetchError:
            raise
        except Exception:
            raise FetchError(f"could not resolve host {host!r}") from None
        return self.vet(host, list(addresses))


_ANYIO_ABANDON = "abandon_on_cancel" in inspect.signature(anyio.to_thread.run_sync).parameters


async def _run_in_thread(func: Callable, *args: typing.Any) -> typing.Any:
    """Run blocking `func` in a worker thread; on cancellation (the deadline) stop waiting for it."""
    flag = "abandon_on_cancel" if _ANYIO_ABANDON else "cancellable"      # anyio < 4.1 names it `cancellable`
    return await anyio.to_thread.run_sync(func, *args, **{flag: True})


# --- sync network layer ---------------------------------------------------------------------------------------

class _SyncStream(httpcore.NetworkStream):
    """Wraps a socket stream so that no wait outlasts the fetch's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, policy: _Policy):
        self._inner, self._policy = inner, policy

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._policy.clamp(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._policy.clamp(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _SyncStream(self._inner.start_tls(ssl_context, server_hostname, self._policy.clamp(timeout)),
                           self._policy)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _SyncBackend(httpcore.SyncBackend):
    def __init__(self, policy: _Policy):
        self._policy = policy

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:
        addresses = self._policy.resolve_sync(host, port)
        last: Exception | None = None
        for address in addresses:            # connect to a vetted address, never to the name
            try:
                stream = super().connect_tcp(address, port, self._policy.clamp(timeout), local_address,
                                             socket_options)
                return _SyncStream(stream, self._policy)
            except httpcore.ConnectError as e:
                last = e
        raise last if last else FetchError(f"could not connect to {host!r}")

    def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> httpcore.NetworkStream:
        raise FetchError("unix sockets are not fetched")


# --- async network layer --------------------------------------------------------------------------------------

class _AsyncStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, policy: _Policy):
        self._inner, self._policy = inner, policy

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, self._policy.clamp(timeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, self._policy.clamp(timeout))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        inner = await self._inner.start_tls(ssl_context, server_hostname, self._policy.clamp(timeout))
        return _AsyncStream(inner, self._policy)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _AsyncBackend(httpcore.AnyIOBackend):
    def __init__(self, policy: _Policy):
        self._policy = policy

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.AsyncNetworkStream:
        addresses = await self._policy.resolve_async(host, port)
        last: Exception | None = None
        for address in addresses:
            try:
                stream = await super().connect_tcp(address, port, self._policy.clamp(timeout), local_address,
                                                   socket_options)
                return _AsyncStream(stream, self._policy)
            except httpcore.ConnectError as e:
                last = e
        raise last if last else FetchError(f"could not connect to {host!r}")

    async def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> httpcore.AsyncNetworkStream:
        raise FetchError("unix sockets are not fetched")


# --- the fetcher ----------------------------------------------------------------------------------------------

class SafeFetcher:
    """GET a URL's body with SSRF protection, a size limit, a total time limit and bounded redirects.

    `fetch` (blocking) and `afetch` (asyncio/anyio) behave the same. Thread-safe and reusable: each call gets its
    own connection (no pooling between fetches), so one slow fetch never holds back another."""

    def __init__(self, allow_hosts: Iterable[str] = (), max_bytes: int = DEFAULT_MAX_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, max_redirects: int = DEFAULT_MAX_REDIRECTS,
                 resolver: Resolver | None = None, ssl_context: ssl.SSLContext | None = None):
        self.allow = AllowList(allow_hosts)
        self.max_bytes = int(max_bytes)
        self.timeout = float(timeout)
        self.max_redirects = int(max_redirects)
        self.resolver: Resolver = resolver or system_resolver
        self.ssl_context = ssl_context or httpx.create_ssl_context(trust_env=False)

    # -- public API --

    def fetch(self, url: str) -> bytes:
        policy = self._policy()
        transport = httpx.HTTPTransport(verify=self.ssl_context, trust_env=False)
        transport._pool = httpcore.ConnectionPool(ssl_context=self.ssl_context, network_backend=_SyncBackend(policy),
                                                  max_connections=1, retries=0)
        with httpx.Client(transport=transport, **self._client_args()) as client:
            current = self._check_url(url)
            for _hop in range(self.max_redirects + 1):
                try:
                    with client.stream("GET", current) as response:
                        nxt = self._next_hop(current, response)
                        if nxt is None:
                            self._check_response(current, response)
                            body = bytearray()
                            for chunk in response.iter_raw():
                                body += chunk
                                self._check_size(current, len(body), policy)
                            return self._finish(current, body)
                except httpx.HTTPError as e:
                    raise self._transport_error(current, e) from None
                current = nxt
        raise FetchError(f"too many redirects (more than {self.max_redirects})")

    async def afetch(self, url: str) -> bytes:
        policy = self._policy()
        transport = httpx.AsyncHTTPTransport(verify=self.ssl_context, trust_env=False)
        transport._pool = httpcore.AsyncConnectionPool(ssl_context=self.ssl_context,
                                                       network_backend=_AsyncBackend(policy),
                                                       max_connections=1, retries=0)
        async with httpx.AsyncClient(transport=transport, **self._client_args()) as client:
            current = self._check_url(url)
            for _hop in range(self.max_redirects + 1):
                try:
                    async with client.stream("GET", current) as response:
                        nxt = self._next_hop(current, response)
                        if nxt is None:
                            self._check_response(current, response)
                            body = bytearray()
                            async for chunk in response.aiter_raw():
                                body += chunk
                                self._check_size(current, len(body), policy)
                            return self._finish(current, body)
                except httpx.HTTPError as e:
                    raise self._transport_error(current, e) from None
                current = nxt
        raise FetchError(f"too many redirects (more than {self.max_redirects})")

    # -- helpers --

    def _policy(self) -> _Policy:
        return _Policy(self.allow, self.resolver, time.monotonic() + self.timeout, self.timeout)

    def _client_args(self) -> dict:
        return dict(
            follow_redirects=False, trust_env=False, timeout=httpx.Timeout(self.timeout),
            headers={"User-Agent": USER_AGENT, "Accept": "audio/*, application/octet-stream;q=0.9, */*;q=0.1",
                     "Accept-Encoding": "identity"},
        )

    @staticmethod
    def _check_url(url: str | httpx.URL) -> httpx.URL:
        try:
            u = httpx.URL(url)
        except Exception:
            raise FetchError("invalid URL") from None
        if u.scheme not in ("http", "https"):
            raise FetchError(f"unsupported URL scheme {u.scheme!r} (only http and https)")
        if not u.host:
            raise FetchError("the URL has no host")
        if u.userinfo:
            raise FetchError("URLs with credentials (user:password@) are not fetched")
        return u

    def _next_hop(self, current: httpx.URL, response: httpx.Response) -> httpx.URL | None:
        if response.status_code not in _REDIRECT_CODES:
            return None
        location = response.headers.get("location")
        if not location:
            raise FetchError(f"{_origin(current)} answered a redirect without a Location")
        try:
            return self._check_url(current.join(location))
        except FetchError as e:
            raise FetchError(f"redirect from {_origin(current)} refused: {e}") from None

    def _check_response(self, url: httpx.URL, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise FetchError(f"{_origin(url)} answered HTTP {response.status_code}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # We ask for identity; decompressing would let a tiny body expand past every limit.
            raise FetchError(f"{_origin(url)} answered a compressed body (Content-Encoding: {encoding[:40]}), "
                             "which is not accepted")
        length = response.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            raise FetchError(f"the file at {_origin(url)} is too large ({int(length)} bytes; "
                             f"at most {self.max_bytes})")

    def _check_size(self, url: httpx.URL, size: int, policy: _Policy) -> None:
        if size > self.max_bytes:
            raise FetchError(f"the file at {_origin(url)} is too large (more than {self.max_bytes} bytes)")
        policy.remaining()

    @staticmethod
    def _finish(url: httpx.URL, body: bytearray) -> bytes:
        if not body:
            raise FetchError(f"{_origin(url)} answered an empty body")
        return bytes(body)

    def _transport_error(self, url: httpx.URL, e: httpx.HTTPError) -> FetchError:
        if isinstance(e, httpx.TimeoutException):
            return FetchError(f"timed out after {self.timeout:g} s fetching from {_origin(url)}")
        detail = str(e).strip().replace("\n", " ")[:200] or type(e).__name__
        if isinstance(e, httpx.ConnectError):
            return FetchError(f"could not connect to {_origin(url)} ({detail})")
        return FetchError(f"fetching from {_origin(url)} failed ({detail})")


def _origin(url: httpx.URL) -> str:
    """scheme://host[:port] - never the path or query, which may hold a signed token."""
    port = f":{url.port}" if url.port else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}"
