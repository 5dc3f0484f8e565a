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
resolved address), each with an optional port ("minio:9000", "[::1]:8080"); an entry without a port admits
ports 80 and 443 only. Hosts that are IP literals in any form inet_aton reads ("2130706433", "0x7f.1") are read
as the address they denote (`ip_literal`), never sent to DNS. Errors are a `FetchError` whose message names the reason, never the full URL (which may
carry a signed token).
"""
from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
import time
import typing
from typing import Callable, Iterable, Sequence

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


DEFAULT_PORTS = frozenset({80, 443})     # what an allow-list entry without a port admits
_IPV4_PART = re.compile(r"0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*")
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def ip_literal(host: str) -> IPAddress | None:
    """The address `host` denotes when it is an IP literal in any form a connect would read it in, else None.

    IPv6 with or without brackets (zone ids included); IPv4 as inet_aton reads it: 1 to 4 parts, each decimal,
    octal (leading 0) or hex (0x), the last part filling the remaining bytes ("127.1", "0x7f.1", "2130706433",
    "0177.0.0.1"), and a trailing dot allowed. Such a host is never looked up in DNS: getaddrinfo would read it
    the same way."""
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    parts = text.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p[2:] or "0", 16) if p.startswith("0x") else int(p, 8) if p.startswith("0") else int(p)
              for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (5 - len(values))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (24 - 8 * i)
    return ipaddress.IPv4Address(number)


def _port(text: str, raw: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"allowed fetch host {raw!r}: the port must be a number from 1 to 65535")
    return int(text)


class AllowList:
    """Operator-allowed destinations: host names, "*.suffix" wildcards, IP addresses and CIDR networks, each with an
    optional port ("minio:9000", "[::1]:8080", "10.0.0.0/8:9000"). An entry without a port admits ports 80 and 443
    only: allowing a host never opens its other services (Redis, databases, admin ports) to client URLs.

    Raises ValueError naming a malformed entry."""

    def __init__(self, entries: Iterable[str] = ()):
        self.names: dict[str, frozenset[int]] = {}
        self.suffixes: list[tuple[str, frozenset[int]]] = []
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, frozenset[int]]] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            host, ports = self._split(entry, raw)
            host = host.rstrip(".")
            if host.startswith("*."):
                self._check_name(host[2:], raw)
                self.suffixes.append((host[1:], ports))          # ".example.com"
                continue
            try:
                self.networks.append((ipaddress.ip_network(host, strict=False), ports))
                continue
            except ValueError:
                pass
            ip = ip_literal(host)                                 # "127.1", "0x7f.0.0.1": the address it is
            if ip is not None:
                self.networks.append((ipaddress.ip_network(ip), ports))
                continue
            self._check_name(host, raw)
            self.names[host] = self.names.get(host, frozenset()) | ports

    @staticmethod
    def _split(entry: str, raw: str) -> tuple[str, frozenset[int]]:
        """(host, ports) of "host", "host:port", "[v6]", "[v6]:port", or a bare IPv6 address/network (no port)."""
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"allowed fetch host {raw!r}: expected [IPv6] or [IPv6]:port")
            return host, frozenset({_port(rest[1:], raw)}) if rest else DEFAULT_PORTS
        if entry.count(":") > 1:                                  # "::1", "fd00::/8": IPv6, no port
            return entry, DEFAULT_PORTS
        host, colon, port = entry.partition(":")
        return host, frozenset({_port(port, raw)}) if colon else DEFAULT_PORTS

    @staticmethod
    def _check_name(name: str, raw: str) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"allowed fetch host {raw!r}: expected a host name, *.domain, an IP address or a "
                             "network, with an optional :port")

    def host_allowed(self, host: str, port: int) -> bool:
        """Whether the operator allows connecting to `host` (a name or an IP literal) on `port`."""
        host = host.lower().rstrip(".")
        if port in self.names.get(host, ()):
            return True
        if any(port in ports and host.endswith(suffix) for suffix, ports in self.suffixes):
            return True
        ip = ip_literal(host)
        return ip is not None and self.address_allowed(ip, port)

    def address_allowed(self, ip: IPAddress, port: int) -> bool:
        return any(port in ports and ip.version == net.version and ip in net for net, ports in self.networks)

    def allowed_on_other_ports(self, host: str, ips: Iterable[IPAddress] = ()) -> bool:
        """Whether an entry names `host` (or one of `ips`) with other ports: to explain a refusal."""
        host = host.lower().rstrip(".")
        ip = ip_literal(host)
        candidates = [*ips, *([ip] if ip is not None else [])]
        return (host in self.names or any(host.endswith(suffix) for suffix, _ in self.suffixes)
                or any(a.version == net.version and a in net for a in candidates for net, _ in self.networks))

    def __bool__(self) -> bool:
        return bool(self.names or self.suffixes or self.networks)


def _parse_ip(text: str) -> IPAddress | None:
    """A resolver's answer (a plain IPv4 or IPv6 address) as an address, or None."""
    try:
        return ipaddress.ip_address(text)
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
    """Resolution + the address check of one fetch."""

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

    def vet(self, host: str, port: int, addresses: Sequence[str]) -> list[str]:
        """The addresses to connect to, or FetchError. If any resolved address is refused, all are."""
        ips = []
        for a in addresses:
            ip = _parse_ip(a)
            if ip is None:
                raise FetchError(f"could not resolve host {host!r}")
            ips.append(ip)
        if not ips:
            raise FetchError(f"could not resolve host {host!r}")
        if not self.allow.host_allowed(host, port):
            for ip in ips:
                problem = None if self.allow.address_allowed(ip, port) else address_problem(ip)
                if problem:
                    what = f"{host} is" if ip_literal(host) is not None else f"host {host!r} resolves to"
                    why = (f"port {port} is not allowed for this host (an allowed host without a port admits "
                           "ports 80 and 443 only)" if self.allow.allowed_on_other_ports(host, ips)
                           else "only public addresses are fetched unless the operator allows the host")
                    raise FetchError(f"refused: {what} a {problem} address ({why})")
        return [str(ip) for ip in ips]

    def resolve_sync(self, host: str, port: int) -> list[str]:
        ip = ip_literal(host)
        if ip is not None:
            return self.vet(host, port, [str(ip)])
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
        return self.vet(host, port, result[0])


# --- network layer ---------------------------------------------------------------------------------------

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


# --- the fetcher ----------------------------------------------------------------------------------------------

class SafeFetcher:
    """GET a URL's body with SSRF protection, a size limit, a total time limit and bounded redirects.

    `fetch` blocks (async callers run it in a thread). Thread-safe and reusable: each call gets its
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

    def post(self, url: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        """POST `body` to `url` (a webhook) under the same address policy and total time limit as `fetch`, and
        return the HTTP status. Redirects are not followed (a 3xx is returned as it is); the answer's body is
        read up to 64 KiB and dropped. Raises FetchError when the URL is refused or the request fails."""
        policy = self._policy()
        transport = httpx.HTTPTransport(verify=self.ssl_context, trust_env=False)
        transport._pool = httpcore.ConnectionPool(ssl_context=self.ssl_context, network_backend=_SyncBackend(policy),
                                                  max_connections=1, retries=0)
        current = self._check_url(url)
        args = self._client_args()
        args["headers"] = {"User-Agent": "chatterbox-serverless (webhook)",
                           "Content-Type": "application/json", **(headers or {})}
        with httpx.Client(transport=transport, **args) as client:
            try:
                with client.stream("POST", current, content=body) as response:
                    read = 0
                    for chunk in response.iter_raw():
                        read += len(chunk)
                        if read > 65536:
                            break
                        policy.remaining()
                    return response.status_code
            except httpx.HTTPError as e:
                raise self._transport_error(current, e) from None

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
        if "%" in u.host:       # httpx keeps %-escapes in the host: no name has them, no address needs them
            raise FetchError("the URL's host must not contain '%' (percent-encoding or an IPv6 zone)")
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
