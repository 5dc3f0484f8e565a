"""The web playground: GET / (the page) and GET /playground/{file} (its script, style and icon).

Plain HTML, CSS and JavaScript shipped in the package (`api/playground/`), no build step, nothing loaded from
outside the server: it works offline. The page reads everything else from this server's API: the models and
every parameter's range and default from /openapi.json, the voice library from GET /v1/audio/voices when that
route exists, and it calls the hosted routes with the key the person typed (kept in the browser only, sent only
to this server as `x-api-key`). A strict Content-Security-Policy keeps it that way: scripts, styles and requests
only to this server; audio from this server or from blob:/data: URLs the page makes itself.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..context import ApiContext
from ..errors import ApiError, echo

ASSETS_PATH = "/playground"
PAGE = "index.html"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
CSP = "; ".join((
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "media-src 'self' blob: data:", "connect-src 'self'", "font-src 'self'", "object-src 'none'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"))
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer", "permissions-policy": "microphone=(self)",
                    "cross-origin-opener-policy": "same-origin"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """The playground's files from the installation, by name (read once: they are small)."""
    folder = files("chatterbox_serverless.api") / "playground"
    assets = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in TYPES:
            body = entry.read_bytes()
            assets[entry.name] = Asset(body, TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    if PAGE not in assets:
        raise RuntimeError(f"the playground is incomplete in {folder} (missing {PAGE}): reinstall the package")
    return assets


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    assets = load_assets()

    def serve(request: Request, asset: Asset) -> Response:
        headers = {**SECURITY_HEADERS, "etag": asset.etag, "cache-control": "no-cache"}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    @r.get("/")
    def page(request: Request):
        return serve(request, assets[PAGE])

    @r.get(ASSETS_PATH + "/{name}")
    def asset(request: Request, name: str):
        found = assets.get(name) if name != PAGE else None
        if found is None:
            raise ApiError(404, f"not found: {request.method} {echo(request.url.path)}")
        return serve(request, found)

    return r
