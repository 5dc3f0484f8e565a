"""api/routers/playground.py: `/` serves the playground page with a strict Content-Security-Policy; every file it
references is served with the right content type; no asset names an address outside the server (it works
offline); the files ship in the installed package; what the page reads from the API is there."""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import httpx
import pytest

from chatterbox_serverless.api.routers.playground import ASSETS_PATH, CSP, load_assets
from chatterbox_serverless.testing import FakeEngineForTests, start_server

ROOT = Path(__file__).resolve().parents[3]
ASSETS_DIR = ROOT / "src" / "chatterbox_serverless" / "api" / "playground"
EXTERNAL = re.compile(r"(?:https?:)?//[A-Za-z0-9][A-Za-z0-9.-]*\.[A-Za-z]{2,}|https?://", re.I)
SVG_NAMESPACE = "http://www.w3.org/2000/svg"     # an XML namespace name in icon.svg: an identifier, never fetched
REFERENCES = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("playground"), FakeEngineForTests()) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def test_the_page_is_served_at_the_root_with_a_strict_csp(http):
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"] and csp["media-src"] == ["'self'", "blob:", "data:"]
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert not any("unsafe" in v or "*" in v for values in csp.values() for v in values)
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    assert "<title>Chatterbox playground</title>" in r.text
    # no inline script or style (the CSP would block them): only files of this server
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text) and "<style" not in r.text
    assert not re.search(r"\sstyle\s*=", r.text) and not re.search(r"\son[a-z]+\s*=", r.text)


def test_every_referenced_asset_is_served_with_its_content_type(http):
    html = http.get("/").text
    refs = set(REFERENCES.findall(html))
    assert {"playground/app.js", "playground/style.css", "playground/icon.svg", "docs"} <= refs
    for ref in refs:
        assert not ref.startswith(("/", "http:", "https:", "//")), f"{ref}: relative, so a path prefix works"
        r = http.get("/" + ref)
        assert r.status_code == 200, ref
        suffix = Path(ref).suffix or ".html"
        assert r.headers["content-type"].split(";")[0] == TYPES[suffix], (ref, r.headers["content-type"])
        if ref.startswith("playground/"):
            assert r.headers["content-security-policy"] == CSP and r.headers["x-content-type-options"] == "nosniff"
            assert r.content == (ASSETS_DIR / Path(ref).name).read_bytes()


def test_no_asset_names_an_address_outside_the_server(http):
    assets = {"/": http.get("/").text}
    assets.update({f"{ASSETS_PATH}/{p.name}": http.get(f"{ASSETS_PATH}/{p.name}").text
                   for p in ASSETS_DIR.iterdir()})
    assert len(assets) >= 5
    for path, text in assets.items():
        found = EXTERNAL.findall(text.replace(SVG_NAMESPACE, "") if path.endswith(".svg") else text)
        assert found == [], (path, found)


def test_conditional_requests_unknown_files_and_the_schema(http, server):
    r = http.get(f"{ASSETS_PATH}/app.js")
    again = http.get(f"{ASSETS_PATH}/app.js", headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert http.get("/", headers={"if-none-match": '"other"'}).status_code == 200
    for path in (f"{ASSETS_PATH}/nope.js", f"{ASSETS_PATH}/index.html", f"{ASSETS_PATH}/..%2Fapp.py",
                 f"{ASSETS_PATH}/", f"{ASSETS_PATH}/../routers/playground.py"):
        r = http.get(path)
        assert r.status_code == 404 and set(r.json()) == {"error"}, path
    assert http.post("/", json={}).status_code == 405
    schema = http.get("/openapi.json").json()
    assert "/" not in schema["paths"] and not any(p.startswith(ASSETS_PATH) for p in schema["paths"])


def test_what_the_page_reads_from_the_api_is_there(http):
    """The page finds models as POST /v2/{slug} with a JSON body schema, and builds its form from each property's
    type, minimum, maximum and default; it reads /ready without a key; /v1/account answers 404 without keys."""
    schema = http.get("/openapi.json").json()
    body = schema["paths"]["/v2/chatterbox-tts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["text"]
    props = body["properties"]
    assert props["exaggeration"]["minimum"] == 0 and props["exaggeration"]["maximum"] == 2
    assert props["exaggeration"]["default"] == 0.5 and "enum" in props["output_format"]
    assert "post" in schema["paths"]["/v1/chatterbox-tts"]
    # the Stream box is offered where /v1's body takes a boolean `stream` (the page reads it as it arrives)
    v1 = schema["paths"]["/v1/chatterbox-tts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert v1["properties"]["stream"]["type"] == "boolean" and v1["properties"]["stream"]["default"] is False
    js = http.get(f"{ASSETS_PATH}/app.js").text
    for fetched in ('call("openapi.json"', 'call("ready"', 'call("v1/account")', 'call("v1/audio/voices")',
                    "call(`v2/${slug}`", "call(`v1/${slug}`",
                    "call(`v2/requests/${encodeURIComponent(requestId)}/status`", "v1Body.properties?.stream",
                    "response.body.getReader()", "createBufferSource()"):
        assert fetched in js, fetched
    assert http.get("/ready").status_code == 200
    r = http.get("/v1/account")
    assert r.status_code == 404 and "disabled" in r.json()["error"]


def test_the_files_ship_in_the_installed_package():
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["chatterbox_serverless.api"]
    files = [p.name for p in ASSETS_DIR.iterdir() if p.is_file()]
    for name in files:
        assert any(fnmatch.fnmatch(f"playground/{name}", pat) for pat in patterns), name
    assert sorted(load_assets()) == sorted(files)
