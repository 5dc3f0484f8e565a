"""media/reference.py at submit time: what can be known without DNS is refused by `parse_reference` (a 400),
not left to fail in the worker: private/loopback/metadata IP literals in any form, localhost names, hosts the
fetcher could not connect to as written, and inline audio shorter than the engine accepts."""
from __future__ import annotations

import base64
import io
import ipaddress

import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless import media
from chatterbox_serverless.media import AllowList, ReferenceAudioError, ip_literal, parse_reference
from chatterbox_serverless.media.fetch import _Policy


def clip(seconds: float, sr: int = 16000, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


PRIVATE_FORMS = [
    "http://0177.0.0.1/x.wav",            # octal
    "http://127.000.000.001/",            # zero-padded
    "http://2130706433/",                 # one decimal number
    "http://0x7f.1/",                     # hex, short form
    "http://0x7f000001/",
    "http://127.1/",
    "http://127.0.0.1./x.wav",            # trailing dot
    "https://127.0.0.1:8443/x.wav",
    "http://0251.0376.0251.0376/latest/meta-data",     # 169.254.169.254 in octal
    "http://0xa9fea9fe/latest/meta-data",
    "http://169.254.169.254/latest/meta-data",
    "http://100.100.100.200/",
    "http://10.0.0.1/a.wav", "http://172.16.0.1/", "http://192.168.1.1:8080/",
    "http://0/", "http://0.0.0.0/",
    "http://[::1]/", "http://[::]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/", "http://[fd00:ec2::254]/", "http://[fe80::1]/",
    "http://[64:ff9b::a9fe:a9fe]/",       # NAT64 of the metadata address
    "http://localhost/x.wav", "http://LOCALHOST.:6379/", "http://redis.localhost/",
]


@pytest.mark.parametrize("url", PRIVATE_FORMS)
def test_private_destinations_are_refused_at_submit(url):
    with pytest.raises(ReferenceAudioError) as err:
        parse_reference(url)
    message = str(err.value)
    assert message.startswith("reference_audio: refused: the URL's host is a "), message
    assert "operator allows" in message


@pytest.mark.parametrize("url", ["http://%31%32%37.0.0.1/", "http://%6c%6fcalhost/", "http://exa%6Dple.com/a.wav",
                                 "http://[fe80::1%25eth0]/"])
def test_percent_encoded_hosts_are_refused(url):
    with pytest.raises(ReferenceAudioError, match="must not contain '%'"):
        parse_reference(url)
    # ... and the fetcher, given one anyway, refuses it the same way before any lookup.
    with pytest.raises(media.FetchError, match="must not contain '%'"):
        media.SafeFetcher(resolver=_no_dns).fetch(url)


@pytest.mark.parametrize("url", ["http://010.8.8.8/a.wav", "http://8.8.8.08/",
                                 "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",   # fullwidth digits
                                 "http://\u24c1ocalhost/"])
def test_hosts_the_fetcher_could_not_use_as_written_are_refused(url):
    with pytest.raises(ReferenceAudioError, match="is not a valid URL"):
        parse_reference(url)


@pytest.mark.parametrize("url", ["https://example.com/a.wav", "http://8.8.8.8/a.wav", "http://0x08080808/a.wav",
                                 "http://[2606:4700::1111]/a.wav", "http://[::ffff:8.8.8.8]/a.wav",
                                 "https://cdn.example.com:8443/v.mp3?sig=abc", "http://b\u00fccher.example/a.wav",
                                 "http://localhost.example.com/a.wav"])
def test_public_destinations_pass(url):
    assert parse_reference(url).url == url


def _no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"DNS lookup of {host!r}")


def test_numeric_forms_are_read_like_the_fetcher_reads_them():
    # What passes submit is what the fetcher connects to: the same address, without DNS.
    policy = _Policy(AllowList(), _no_dns, deadline=float(1e12), timeout=5.0)
    assert policy.resolve_sync("0x08080808", 80) == ["8.8.8.8"]
    assert policy.resolve_sync("134744072", 80) == ["8.8.8.8"]
    for host in ("2130706433", "0x7f.1", "127.1", "0"):
        with pytest.raises(media.FetchError, match="refused"):
            policy.resolve_sync(host, 80)


def test_every_url_refused_at_submit_is_refused_by_the_fetcher_too():
    loopback = {"localhost": ["127.0.0.1"], "localhost.": ["127.0.0.1"], "redis.localhost": ["127.0.0.1"]}
    fetcher = media.SafeFetcher(resolver=lambda h, p: loopback[h])
    for url in PRIVATE_FORMS:
        with pytest.raises(media.FetchError, match="refused|invalid URL"):
            fetcher.fetch(url)


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("127.000.000.001", "127.0.0.1"),
    ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0x7F.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"), ("10.1.257", "10.1.1.1"), ("0", "0.0.0.0"), ("0x", "0.0.0.0"),
    ("1.2.3.4.", "1.2.3.4"), ("4294967295", "255.255.255.255"), ("[::1]", "::1"), ("::FFFF:127.0.0.1", "::ffff:7f00:1"),
])
def test_ip_literal_reads_every_form(text, address):
    assert ip_literal(text) == ipaddress.ip_address(address)


@pytest.mark.parametrize("text", ["example.com", "4294967296", "256.1.1.1", "1.2.3.4.5", "08.1.1.1", "0x1g",
                                  "1..2", "", ".", "1.2.3.256", "[::1", "::g", "12a"])
def test_ip_literal_leaves_names_alone(text):
    assert ip_literal(text) is None


def test_the_allow_list_admits_private_destinations_on_its_ports():
    assert parse_reference("http://127.0.0.1:8080/x.wav", allow_hosts=["127.0.0.1:8080"]).url
    assert parse_reference("http://0x7f.1:8080/x.wav", allow_hosts=["127.0.0.1:8080"]).url
    assert parse_reference("http://localhost:9000/x.wav", allow_hosts=["localhost:9000"]).url
    assert parse_reference("http://10.1.2.3/x.wav", allow_hosts=AllowList(["10.0.0.0/8"])).url
    assert parse_reference("https://[::1]/x.wav", allow_hosts=["::1"]).url
    # Without a port an entry admits 80 and 443 only.
    for url in ("http://127.0.0.1:6379/", "http://localhost:6379/", "http://10.1.2.3:9000/x.wav"):
        with pytest.raises(ReferenceAudioError, match="refused"):
            parse_reference(url, allow_hosts=["127.0.0.1", "localhost", "10.0.0.0/8"])
    # Allowed or not, a host the fetcher cannot use as written is still refused.
    with pytest.raises(ReferenceAudioError, match="not a valid URL"):
        parse_reference("http://0177.0.0.1:8080/x.wav", allow_hosts=["127.0.0.1:8080"])


def test_the_worker_path_leaves_destinations_to_its_fetcher():
    # load_reference (the worker) does not re-check the destination with an empty allow-list: its fetcher,
    # configured with the operator's allow-list, decides at connect time.
    class Fetcher:
        def fetch(self, url):
            return clip(1.0)

    voice = media.load_reference("http://127.0.0.1:8080/x.wav", Fetcher())
    assert voice.sample_rate == 16000


# --- inline audio too short ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("MP3", "MPEG_LAYER_III"),
                                          ("OGG", "VORBIS")])
def test_inline_audio_shorter_than_the_minimum_is_refused_at_submit(fmt, subtype):
    short = base64.b64encode(clip(0.3, fmt=fmt, subtype=subtype)).decode()
    for value in (short, f"data:audio/x;base64,{short}"):
        with pytest.raises(ReferenceAudioError, match=r"^reference_audio: the audio is too short \(0\.3\d s; "
                                                      r"at least 0\.5 s\)"):
            parse_reference(value)
    assert parse_reference(base64.b64encode(clip(0.6, fmt=fmt, subtype=subtype)).decode()).data


def test_minimum_matches_the_worker_and_is_a_parameter():
    assert media.DEFAULT_MIN_SECONDS == 0.5
    exact = base64.b64encode(clip(0.5)).decode()
    assert parse_reference(exact).data                    # the worker accepts exactly 0.5 s too
    media.decode_audio(parse_reference(exact).data)
    with pytest.raises(ReferenceAudioError, match="too short"):
        parse_reference(exact, min_seconds=1.0)
    empty_wav = base64.b64encode(clip(0.0)).decode()
    with pytest.raises(ReferenceAudioError, match="too short"):
        parse_reference(empty_wav)
    assert parse_reference(base64.b64encode(clip(0.3)).decode(), check_audio=False).data


def test_reference_error_no_longer_shadows_the_builtin():
    assert not hasattr(media, "ReferenceError") and "ReferenceError" not in media.__all__
    assert issubclass(ReferenceAudioError, media.MediaError) and issubclass(ReferenceAudioError, ValueError)
