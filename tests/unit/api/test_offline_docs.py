"""api/docs.py: /docs, /docs/oauth2-redirect and /redoc name no address outside the server, and every asset they
reference is served from the installation with the right content type."""
from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from chatterbox_serverless.api.docs import assets_dir, install_docs

EXTERNAL = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+", re.I)
REFERENCES = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""")
TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",), ".png": ("image/png",),
         ".json": ("application/json",)}


def make_app(**kwargs) -> FastAPI:
    app = FastAPI(title="chatterbox-serverless", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    install_docs(app, **kwargs)
    return app


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app()) as c:
        yield c


def references(html: str) -> list[str]:
    return [a or b for a, b in REFERENCES.findall(html)]


def check_assets(client, html, prefix=""):
    refs = references(html)
    assert refs, "the page references its assets"
    for ref in refs:
        assert ref.startswith(prefix + "/"), ref
        r = client.get(ref.removeprefix(prefix) if prefix else ref)
        assert r.status_code == 200, ref
        suffix = "." + ref.rsplit(".", 1)[-1]
        assert r.headers["content-type"].split(";")[0] in TYPES[suffix], (ref, r.headers["content-type"])
        assert len(r.content) > 100
    return refs


@pytest.mark.parametrize("page, expected", [
    ("/docs", {"/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/favicon.png",
               "/openapi.json"}),
    ("/redoc", {"/docs-assets/redoc.standalone.js", "/docs-assets/favicon.png", "/openapi.json"}),
])
def test_page_references_only_local_assets_that_are_served(client, page, expected):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert EXTERNAL.findall(r.text) == [], "no address outside the server"
    assert set(check_assets(client, r.text)) == expected


def test_swagger_ui_is_configured_without_the_online_validator(client):
    html = client.get("/docs").text
    assert '"validatorUrl": null' in html
    assert "oauth2RedirectUrl: window.location.origin + '/docs/oauth2-redirect'" in html


def test_oauth2_redirect_page(client):
    r = client.get("/docs/oauth2-redirect")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert EXTERNAL.findall(r.text) == []
    assert "oauth2" in r.text.lower()


def test_the_assets_are_the_real_bundles(client):
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and b"SwaggerUIBundle" in js.content and len(js.content) > 500_000
    version = re.search(rb'"(5\.\d+\.\d+)"', js.content)   # Swagger UI 5 reads the OpenAPI 3.1 FastAPI writes
    assert version, "Swagger UI 5 bundle"
    assert len(client.get("/docs-assets/redoc.standalone.js").content) > 500_000
    assert client.get("/docs-assets/swagger-ui.css").content.count(b".swagger-ui") > 10
    assert client.get("/docs-assets/nope.js").status_code == 404
    assert client.head("/docs-assets/swagger-ui.css").status_code == 200


def test_the_pages_are_not_in_the_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/health"}


def test_behind_a_proxy_prefix_the_urls_carry_the_root_path():
    app = make_app()
    with TestClient(app, root_path="/tts") as c:
        html = c.get("/docs").text
        assert EXTERNAL.findall(html) == []
        refs = references(html)
        assert refs and all(ref.startswith("/tts/") for ref in refs), refs
        assert "'/tts/docs/oauth2-redirect'" in html


def test_other_urls_and_pages_left_out():
    with TestClient(make_app(docs_url="/api-docs", redoc_url=None, assets_url="static/docs/")) as c:
        html = c.get("/api-docs").text
        assert "/static/docs/swagger-ui-bundle.js" in html
        check_assets(c, html)
        assert c.get("/redoc").status_code == 404
        assert c.get("/docs").status_code == 404


def test_fastapi_cdn_pages_must_be_off():
    with pytest.raises(ValueError, match="docs_url=None, redoc_url=None"):
        install_docs(FastAPI())
    with pytest.raises(ValueError):
        install_docs(FastAPI(docs_url=None))
    with pytest.raises(ValueError, match="openapi_url"):
        install_docs(FastAPI(docs_url=None, redoc_url=None, openapi_url=None))


def test_assets_dir_holds_the_files():
    folder = assets_dir()
    assert {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"} <= \
        {p.name for p in folder.iterdir()}
