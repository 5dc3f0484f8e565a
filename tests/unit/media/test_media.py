"""media/: reference_audio parsing, SSRF-safe fetching, decoding, encoding.

Network tests talk only to an HTTP server on 127.0.0.1 started here; host names are mapped by a test resolver.
"""
from __future__ import annotations

import base64
import io
import ipaddress
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless import media
from chatterbox_serverless.media import reference as reference_mod
from chatterbox_serverless.media.fetch import AllowList, address_problem

SR = 24000


def tone(seconds: float = 1.0, sr: int = SR, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(2 * np.pi * 3 * freq * t)).astype(np.float32)


def wav_bytes(x: np.ndarray, sr: int = SR, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


WAV = wav_bytes(tone(1.0))


# --- parse_reference -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://example.com/a.wav", "https://cdn.example.com:8443/v.mp3?sig=abc&x=1",
                                 "HTTPS://Example.com/x", "http://[2606:4700::1111]/a.wav"])
def test_parse_url(url):
    src = media.parse_reference("  " + url + "\n")
    assert src.kind == "url" and src.url == url and src.data is None
    assert "sig=" not in src.describe()


def test_parse_inline_forms():
    b64 = base64.b64encode(WAV).decode()
    forms = [
        b64,                                                          # bare, padded
        b64.rstrip("="),                                              # bare, unpadded
        "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),     # line-wrapped (base64 CLI)
        base64.urlsafe_b64encode(WAV).decode(),                       # URL-safe alphabet
        "data:audio/wav;base64," + b64,
        "DATA:Audio/X-WAV;base64," + b64,
        "data:application/octet-stream;base64," + b64,
        "data:audio/wav;codecs=1;base64," + b64,
    ]
    for form in forms:
        src = media.parse_reference(form)
        assert src.kind == "inline" and src.data == WAV, form[:40]
    assert media.parse_reference("data:audio/wav;base64," + b64).media_type == "audio/wav"


@pytest.mark.parametrize("value, needle", [
    (None, "must be a string"),
    (123, "must be a string"),
    ("", "must not be empty"),
    ("   ", "must not be empty"),
    ("ftp://example.com/a.wav", "unsupported URL scheme 'ftp'"),
    ("file:///etc/passwd", "unsupported URL scheme 'file'"),
    ("gopher://127.0.0.1:6379/_x", "unsupported URL scheme 'gopher'"),
    ("http://", "no host"),
    ("http://user:pw@example.com/a.wav", "credentials"),
    ("http://example.com:99999/a.wav", "not a valid URL"),
    ("http://exa mple.com/a.wav", "spaces"),
    ("https://example.com/" + "a" * 5000, "too long"),
    ("example.com/voice.wav", "not a URL, a data: URI or valid base64"),
    ("data:audio/wav,RIFF....", "base64-encoded"),
    ("data:text/plain;base64,aGVsbG8=", "media type"),
    ("data:;base64,aGVsbG8=", "media type"),
    ("data:audio/wav;base64", "no comma"),
    ("data:audio/wav;base64,", "empty"),
    ("not base64 at all!", "not a URL, a data: URI or valid base64"),
    ("QUJD=QUJD", "not a URL, a data: URI or valid base64"),
    ("QUJDR", "truncated"),
    ("aGVsbG8gd29ybGQ=", "unsupported or unrecognised audio format"),   # valid base64, not audio
])
def test_parse_errors_name_the_parameter(value, needle):
    with pytest.raises(media.ReferenceAudioError) as err:
        media.parse_reference(value)
    assert str(err.value).startswith("reference_audio: ")
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, media.MediaError)


def test_parse_byte_limit_is_checked_before_decoding(monkeypatch):
    def no_decode(*a, **k):
        raise AssertionError("base64 decoded before the size check")
    monkeypatch.setattr(reference_mod.base64, "b64decode", no_decode)
    big = base64.b64encode(bytes(3000)).decode()
    for value in (big, "data:audio/wav;base64," + big, big + "\n" * 10_000):
        with pytest.raises(media.ReferenceAudioError, match="too large"):
            media.parse_reference(value, max_bytes=2000)


def test_parse_byte_limit_default_and_boundary():
    assert media.DEFAULT_MAX_BYTES == 10_000_000
    exact = wav_bytes(tone(0.6))
    assert media.parse_reference(base64.b64encode(exact).decode(), max_bytes=len(exact)).data == exact
    with pytest.raises(media.ReferenceAudioError, match="too large"):
        media.parse_reference(base64.b64encode(exact).decode(), max_bytes=len(exact) - 3)


def test_parse_probes_inline_audio_at_submit_time():
    long_clip = base64.b64encode(wav_bytes(tone(3.0, sr=8000), sr=8000)).decode()
    with pytest.raises(media.ReferenceAudioError, match="too long"):
        media.parse_reference(long_clip, max_seconds=2.0)
    assert media.parse_reference(long_clip, max_seconds=5.0).data is not None
    garbage = base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk").decode()
    with pytest.raises(media.ReferenceAudioError, match="reference_audio: the audio could not be decoded"):
        media.parse_reference(garbage)
    assert media.parse_reference(garbage, check_audio=False).data.startswith(b"RIFF")


# --- decode ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_24"),
                                          ("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS"), ("OGG", "OPUS")])
@pytest.mark.parametrize("sr", [16000, 48000])
def test_decode_formats_and_rates(fmt, subtype, sr):
    x = tone(1.0, sr=sr)
    voice = media.decode_audio(wav_bytes(x, sr=sr, subtype=subtype, fmt=fmt))
    assert voice.sample_rate == sr                       # no resampling in decode
    assert voice.samples.dtype == np.float32 and voice.samples.ndim == 1
    assert abs(len(voice.samples) - len(x)) <= 0.05 * sr
    assert 0.3 < np.abs(voice.samples).max() <= 1.0


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 44100, 96000])
def test_decode_any_sample_rate_wav(sr):
    x = tone(0.7, sr=sr)
    voice = media.decode_audio(wav_bytes(x, sr=sr))
    assert voice.sample_rate == sr and len(voice.samples) == len(x)
    np.testing.assert_allclose(voice.samples, x, atol=1e-4)


def test_decode_stereo_is_averaged_to_mono():
    left, right = tone(1.0), tone(1.0, freq=330.0)
    voice = media.decode_audio(wav_bytes(np.stack([left, right], axis=1), subtype="FLOAT"))
    np.testing.assert_allclose(voice.samples, (left + right) / 2, atol=1e-6)


def test_decode_duration_limits():
    clip = wav_bytes(tone(2.0))
    assert len(media.decode_audio(clip, max_seconds=2.0).samples) == 2 * SR
    with pytest.raises(media.DecodeError, match="too long"):
        media.decode_audio(clip, max_seconds=1.5)
    with pytest.raises(media.DecodeError, match="too short"):
        media.decode_audio(wav_bytes(tone(0.2)))
    with pytest.raises(media.DecodeError, match="too long"):
        media.probe_audio(clip, max_seconds=1.0)
    info = media.probe_audio(clip)
    assert (info.format, info.sample_rate, info.channels) == ("wav", SR, 1) and abs(info.seconds - 2.0) < 1e-6


def test_decode_duration_limit_does_not_trust_the_header():
    # An MP3 without a seek table: the decoder's frame count is an estimate; the limit holds while decoding.
    clip = wav_bytes(tone(3.0), fmt="MP3", subtype="MPEG_LAYER_III")
    with pytest.raises(media.DecodeError, match="too long"):
        media.decode_audio(clip, max_seconds=2.0)


@pytest.mark.parametrize("data, needle", [
    (b"", "empty"),
    (b"hello world, this is not audio" * 20, "unsupported or unrecognised"),
    (bytes(5000), "unsupported or unrecognised"),
    (b"<html><body>404 Not Found</body></html>", "unsupported or unrecognised"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00garbage", "could not be decoded"),
    (b"fLaC" + bytes(100), "could not be decoded"),
    (b"OggS" + bytes(100), "could not be decoded"),
])
def test_decode_undecodable(data, needle):
    with pytest.raises(media.DecodeError, match=needle):
        media.decode_audio(data)


def test_decode_refuses_formats_outside_the_contract():
    aiff = wav_bytes(tone(1.0), fmt="AIFF")          # libsndfile reads AIFF, the API does not take it
    assert sf.info(io.BytesIO(aiff)).format == "AIFF"
    with pytest.raises(media.DecodeError, match="unsupported or unrecognised"):
        media.decode_audio(aiff)


def test_decode_refuses_nonfinite_samples():
    x = tone(1.0)
    x[100] = np.nan
    with pytest.raises(media.DecodeError, match="NaN"):
        media.decode_audio(wav_bytes(x, subtype="FLOAT"))


# --- encode ----------------------------------------------------------------------------------------------------

def _aligned_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 4000) -> float:
    """Best normalised correlation of b against a over lags 0..max_lag (codecs add a delay)."""
    n = min(len(a), len(b)) - max_lag
    best = -1.0
    for lag in range(0, max_lag, 8):
        x, y = a[:n], b[lag:lag + n]
        best = max(best, float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-9)))
    return best


@pytest.mark.parametrize("fmt", ["mp3", "wav", "flac", "ogg"])
def test_encode_round_trip(fmt):
    x = tone(2.0)
    data, media_type = media.encode_audio(x, SR, fmt)
    assert media_type == media.FORMATS[fmt]
    voice = media.decode_audio(data)
    assert voice.sample_rate == SR                       # 24 kHz is native to every encoder
    assert abs(len(voice.samples) - len(x)) <= 0.1 * SR
    assert _aligned_correlation(x, voice.samples) > 0.9
    assert media.probe_audio(data).format == fmt


def test_encode_details():
    assert media.DEFAULT_FORMAT == "mp3" and set(media.FORMATS) == {"mp3", "wav", "flac", "ogg", "opus", "aac", "pcm"}
    assert media.FORMATS["mp3"] == "audio/mpeg"
    wav, _ = media.encode_audio(tone(0.5), SR, "wav")
    assert sf.info(io.BytesIO(wav)).subtype == "PCM_16"
    ogg, _ = media.encode_audio(tone(0.5), SR, "ogg")
    assert sf.info(io.BytesIO(ogg)).subtype == "OPUS"
    mp3, _ = media.encode_audio(tone(0.5), SR)
    assert mp3[:3] == b"ID3" or mp3[0] == 0xFF
    data, _ = media.encode_audio(tone(0.5), SR, "WAV")   # case-insensitive
    assert data == wav


def test_encode_resamples_where_the_codec_needs_it():
    x = tone(1.0, sr=22050)
    data, _ = media.encode_audio(x, 22050, "ogg")           # opus has no 22.05 kHz
    voice = media.decode_audio(data)
    assert voice.sample_rate == 48000 and abs(len(voice.samples) - 48000) < 0.05 * 48000
    data, _ = media.encode_audio(tone(1.0, sr=96000), 96000, "mp3")   # not an MPEG rate
    assert media.decode_audio(data).sample_rate == 48000
    data, _ = media.encode_audio(x, 22050, "flac")
    assert media.decode_audio(data).sample_rate == 22050


def test_encode_sanitises_and_rejects():
    x = tone(0.6) * 3
    x[10] = np.nan
    x[11] = np.inf
    data, _ = media.encode_audio(x.astype(np.float64), SR, "wav")
    y = media.decode_audio(data).samples
    assert np.isfinite(y).all() and np.abs(y).max() <= 1.0 and y[10] == 0.0
    with pytest.raises(media.EncodeError, match="output_format"):
        media.encode_audio(tone(0.5), SR, "m4a")
    with pytest.raises(media.EncodeError, match="mono"):
        media.encode_audio(np.zeros((100, 2), np.float32), SR, "wav")
    with pytest.raises(media.EncodeError, match="no audio"):
        media.encode_audio(np.zeros(0, np.float32), SR, "mp3")
    with pytest.raises(media.EncodeError, match="sample rate"):
        media.encode_audio(tone(0.5), 0, "wav")


# --- address policy -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
    "169.254.1.1", "100.64.0.1", "100.100.100.200", "0.0.0.0", "224.0.0.1", "239.255.255.250",
    "255.255.255.255", "240.0.0.1", "192.0.0.192", "168.63.129.16", "198.18.0.1", "fe80::1", "fc00::1",
    "fd00:ec2::254", "ff02::1", "ff0e::1", "::", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
    "::ffff:10.1.1.1", "64:ff9b::a00:1", "64:ff9b:1::1", "2002:7f00:1::1", "2002:a9fe:a9fe::1", "::127.0.0.1",
    "2001:db8::1",
])
def test_address_policy_refuses(address):
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::1"])
def test_address_policy_allows_public(address):
    assert address_problem(ipaddress.ip_address(address)) is None


def test_allow_list_entries():
    allow = AllowList(["minio", "*.internal.example", "10.1.2.0/24", "::1", " Storage.Local. "])
    for port in (80, 443):                       # without a port: the web ports only
        assert allow.host_allowed("minio", port) and allow.host_allowed("MINIO", port)
        assert allow.host_allowed("a.internal.example", port) and allow.host_allowed("a.b.internal.example", port)
        assert not allow.host_allowed("internal.example", port) and not allow.host_allowed("evilinternal.example", port)
        assert allow.host_allowed("storage.local", port) and allow.host_allowed("10.1.2.77", port)
        assert allow.host_allowed("[::1]", port)
        assert not allow.host_allowed("10.1.3.1", port) and not allow.host_allowed("minio.evil.com", port)
        assert allow.address_allowed(ipaddress.ip_address("10.1.2.3"), port)
    assert not AllowList([])


# --- fetch against a loopback server -------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server_version = "test"
    protocol_version = "HTTP/1.1"
    seen_hosts: list[str] = []

    def log_message(self, *args):   # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        _Handler.seen_hosts.append(self.headers.get("Host", ""))
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        try:
            if url.path == "/audio.wav":
                self._send(200, WAV, {"Content-Type": "audio/wav"})
            elif url.path == "/redirect":
                self._send(int(q.get("code", 302)), headers={"Location": q["to"]})
            elif url.path == "/loop":
                self._send(302, headers={"Location": "/loop"})
            elif url.path == "/missing":
                self._send(404, b"not found")
            elif url.path == "/empty":
                self._send(200, b"")
            elif url.path == "/gzip":
                import gzip
                self._send(200, gzip.compress(WAV), {"Content-Encoding": "gzip"})
            elif url.path == "/declared-big":
                self._send(200, b"x" * 100, {"Content-Length": "50000000"})
            elif url.path == "/chunked-big":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"4000\r\n" + b"y" * 0x4000 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif url.path == "/slow":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):     # 1 byte every 50 ms: each read is quick, the whole takes 5 s
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self._send(404)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


class CountingResolverForTests:
    """Maps test host names to fixed addresses and counts lookups (no real DNS)."""

    def __init__(self, table: dict[str, list[str]]):
        self.table, self.calls = table, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError("no such host")
        return self.table[host]


def both(fetcher: media.SafeFetcher, url: str) -> list:
    """The result of fetching `url` twice (bytes or the FetchError message): the same both times."""
    out = []
    for _ in range(2):
        try:
            out.append(fetcher.fetch(url))
        except media.FetchError as e:
            out.append(str(e))
    return out


def test_fetch_loopback_refused_by_default(server):
    base, port = server
    for result in both(media.SafeFetcher(), f"{base}/audio.wav"):
        assert isinstance(result, str) and "refused" in result and "loopback" in result


def test_fetch_loopback_allowed_by_allow_list(server):
    base, port = server
    assert both(media.SafeFetcher(allow_hosts=[f"127.0.0.1:{port}"]), f"{base}/audio.wav") == [WAV, WAV]
    assert both(media.SafeFetcher(allow_hosts=[f"127.0.0.0/8:{port}"]), f"{base}/audio.wav") == [WAV, WAV]


def test_fetch_connects_to_the_resolved_address_keeping_the_host(server):
    _, port = server
    resolver = CountingResolverForTests({"audio.test": ["127.0.0.1"]})
    fetcher = media.SafeFetcher(allow_hosts=[f"audio.test:{port}"], resolver=resolver)
    _Handler.seen_hosts.clear()
    assert both(fetcher, f"http://audio.test:{port}/audio.wav") == [WAV, WAV]
    assert resolver.calls == ["audio.test", "audio.test"]          # one lookup per fetch, no second chance
    assert _Handler.seen_hosts == [f"audio.test:{port}"] * 2       # Host header of the URL, not the IP


@pytest.mark.parametrize("addresses", [["10.1.2.3"], ["192.168.0.10"], ["169.254.169.254"], ["fd00::5"],
                                       ["::ffff:127.0.0.1"], ["93.184.216.34", "127.0.0.1"]])
def test_fetch_hostname_resolving_to_private_is_refused(addresses):
    resolver = CountingResolverForTests({"evil.test": addresses})
    for result in both(media.SafeFetcher(resolver=resolver), "http://evil.test/a.wav"):
        assert isinstance(result, str) and result.startswith("refused: host 'evil.test' resolves to a")


def test_fetch_redirect_to_private_is_refused(server):
    base, port = server
    resolver = CountingResolverForTests({"audio.test": ["127.0.0.1"], "evil.test": ["10.0.0.7"],
                                        "localhost": ["127.0.0.1", "::1"]})
    fetcher = media.SafeFetcher(allow_hosts=[f"audio.test:{port}"], resolver=resolver)
    allowed = f"http://audio.test:{port}"
    for target in (f"{base}/audio.wav",                               # the same server, by its IP: not allowed
                   f"http://localhost:{port}/audio.wav",
                   "http://evil.test/latest/meta-data",
                   "http://169.254.169.254/latest/meta-data"):
        url = f"{allowed}/redirect?to={urllib.parse.quote(target)}"
        for result in both(fetcher, url):
            assert isinstance(result, str) and "refused" in result, (target, result)
    # ... while a redirect within allowed hosts is followed (relative Location, 301/303/307/308 too)
    for code in (301, 302, 303, 307, 308):
        url = f"{allowed}/redirect?code={code}&to=/audio.wav"
        assert both(fetcher, url) == [WAV, WAV]


def test_fetch_redirect_to_other_scheme_refused(server):
    base, port = server
    fetcher = media.SafeFetcher(allow_hosts=[f"127.0.0.1:{port}"])
    for result in both(fetcher, f"{base}/redirect?to=file:///etc/passwd"):
        assert "unsupported URL scheme 'file'" in result


def test_fetch_limits_and_http_errors(server):
    base, port = server
    fetcher = media.SafeFetcher(allow_hosts=[f"127.0.0.1:{port}"], max_bytes=500_000, max_redirects=3)
    cases = {
        "/loop": "too many redirects",
        "/missing": "answered HTTP 404",
        "/empty": "empty body",
        "/gzip": "compressed body (Content-Encoding: gzip)",
        "/declared-big": "too large (50000000 bytes",
        "/chunked-big": "too large (more than 500000 bytes)",
    }
    for path, needle in cases.items():
        for result in both(fetcher, base + path):
            assert isinstance(result, str) and needle in result, (path, result)


def test_fetch_total_timeout(server):
    base, port = server
    fetcher = media.SafeFetcher(allow_hosts=[f"127.0.0.1:{port}"], timeout=0.6)
    t0 = time.monotonic()
    for result in both(fetcher, base + "/slow"):
        assert isinstance(result, str) and "timed out" in result, result
    assert time.monotonic() - t0 < 3.0      # two fetches, each cut at 0.6 s although the body takes 5 s


def test_fetch_errors_do_not_leak_the_query(server):
    base, port = server
    fetcher = media.SafeFetcher(allow_hosts=[f"127.0.0.1:{port}"])
    for result in both(fetcher, base + "/missing?X-Amz-Signature=secret123"):
        assert "secret123" not in result and "127.0.0.1" in result
    resolver = CountingResolverForTests({})
    for result in both(media.SafeFetcher(resolver=resolver), "http://nowhere.test/?token=secret123"):
        assert "could not resolve host 'nowhere.test'" in result and "secret123" not in result


def test_fetch_refuses_bad_urls():
    fetcher = media.SafeFetcher()
    assert "unsupported URL scheme" in both(fetcher, "ftp://example.com/a")[0]
    assert "credentials" in both(fetcher, "http://u:p@example.com/a")[0]
    assert "refused" in both(fetcher, "http://[::1]:1/a")[0]
    assert "refused" in both(fetcher, "http://2130706433/a")[0]          # 127.0.0.1 as a decimal integer
    assert "refused" in both(fetcher, "http://0x7f.1/a")[0]


# --- resolve / load_reference -------------------------------------------------------------------------------------

class FakeFetcherForTests:
    def __init__(self, data: bytes | None = None, error: str | None = None):
        self.data, self.error, self.urls = data, error, []

    def fetch(self, url: str) -> bytes:
        self.urls.append(url)
        if self.error:
            raise media.FetchError(self.error)
        return self.data


def test_resolve_inline_and_url():
    inline = media.parse_reference(base64.b64encode(WAV).decode())
    fake = FakeFetcherForTests(b"fetched")
    assert media.resolve(inline, fake) == WAV and fake.urls == []
    url_source = media.parse_reference("https://example.com/v.wav")
    assert media.resolve(url_source, fake) == b"fetched"
    assert fake.urls == ["https://example.com/v.wav"]


def test_load_reference_end_to_end(server):
    base, port = server
    fetcher = media.SafeFetcher(allow_hosts=[f"127.0.0.1:{port}"])
    voice = media.load_reference(f"{base}/audio.wav", fetcher)
    assert voice.sample_rate == SR and len(voice.samples) == SR
    voice = media.load_reference("data:audio/wav;base64," + base64.b64encode(WAV).decode(), fetcher)
    assert len(voice.samples) == SR
    with pytest.raises(media.FetchError, match=r"^refused"):
        media.load_reference(f"{base}/audio.wav", media.SafeFetcher())
    with pytest.raises(media.DecodeError, match=r"^unsupported or unrecognised"):
        media.load_reference("https://example.com/x", FakeFetcherForTests(b"<html>not audio</html>"))
    with pytest.raises(media.DecodeError, match=r"^the audio is too long"):
        media.load_reference(f"{base}/audio.wav", fetcher, max_seconds=0.5)
    with pytest.raises(media.ReferenceAudioError, match=r"^unsupported URL scheme 'ftp'"):   # caller adds the name
        media.load_reference("ftp://example.com/x", fetcher)


# --- TLS: connecting to the vetted IP keeps SNI and certificate checks on the URL's host -----------------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    import shutil
    import ssl
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=audio.test",
                    "-addext", "subjectAltName=DNS:audio.test"], check=True, capture_output=True)
    server_names: list = []
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, name, _ctx: server_names.append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], str(cert), server_names
    httpd.shutdown()
    httpd.server_close()


def test_fetch_tls_keeps_sni_and_verifies_the_url_host(tls_server):
    import ssl
    port, cert, server_names = tls_server
    client_ctx = ssl.create_default_context(cafile=cert)
    resolver = CountingResolverForTests({"audio.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    fetcher = media.SafeFetcher(allow_hosts=[f"audio.test:{port}", f"other.test:{port}"], resolver=resolver, ssl_context=client_ctx)
    server_names.clear()
    assert both(fetcher, f"https://audio.test:{port}/audio.wav") == [WAV, WAV]
    assert server_names == ["audio.test", "audio.test"]
    # Same address, but the certificate is not valid for the URL's host: refused by TLS verification.
    for result in both(fetcher, f"https://other.test:{port}/audio.wav"):
        assert isinstance(result, str) and "could not connect" in result and "certificate" in result.lower()
    # Not allowed: refused before any connection.
    strict = media.SafeFetcher(resolver=resolver, ssl_context=client_ctx)
    assert all("refused" in r for r in both(strict, f"https://audio.test:{port}/audio.wav"))
