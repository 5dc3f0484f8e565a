"""API docs that work offline: Swagger UI at /docs and ReDoc at /redoc, their scripts, styles and icon served by
this server from the installation instead of a CDN (FastAPI's own pages load them from cdn.jsdelivr.net and a
favicon from fastapi.tiangolo.com, so they are blank without internet).

    app = FastAPI(..., docs_url=None, redoc_url=None)     # FastAPI's CDN pages off
    install_docs(app)                                      # /docs, /docs/oauth2-redirect, /redoc, /docs-assets/*

The files come from the `fastapi-offline` package (a dependency; its `static/` folder ships the swagger-ui-dist 5
bundle and CSS, the ReDoc 2 standalone bundle and a favicon); only those files are used, not its FastAPI subclass.
The pages point at them by paths relative to the server (with the ASGI root_path in front), so no address outside
the server appears in them; Swagger UI's online validator badge is off (`validatorUrl: null`).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON = "swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", \
    "favicon.png"


def assets_dir() -> Path:
    """The installed folder holding the Swagger UI and ReDoc files."""
    folder = Path(str(files("fastapi_offline") / "static"))
    missing = [name for name in (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON) if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"the docs assets are incomplete in {folder} (missing {', '.join(missing)}): "
                           "reinstall the fastapi-offline package")
    return folder


def install_docs(app: FastAPI, *, docs_url: str | None = "/docs", redoc_url: str | None = "/redoc",
                 assets_url: str = ASSETS_URL) -> None:
    """Serve the docs pages on `app` with local assets under `assets_url`. `docs_url` or `redoc_url` None leaves
    that page out. The app must be created with `docs_url=None, redoc_url=None` (else FastAPI's CDN pages would
    answer first): a ValueError says so. The OAuth2 redirect page goes to `app.swagger_ui_oauth2_redirect_url`
    (default /docs/oauth2-redirect). Call it before or after the routers: the paths are exact."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with FastAPI(docs_url=None, redoc_url=None): install_docs serves /docs and "
                         "/redoc itself, without a CDN")
    if app.openapi_url is None:
        raise ValueError("the app has no OpenAPI schema (openapi_url=None): there is nothing to document")
    assets_url = "/" + assets_url.strip("/")
    app.mount(assets_url, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url
    oauth2_url = app.swagger_ui_oauth2_redirect_url

    if docs_url is not None:
        async def swagger_ui(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            return get_swagger_ui_html(
                openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}{assets_url}/{SWAGGER_JS}", swagger_css_url=f"{root}{assets_url}/{SWAGGER_CSS}",
                swagger_favicon_url=f"{root}{assets_url}/{FAVICON}",
                oauth2_redirect_url=root + oauth2_url if oauth2_url else None, init_oauth=app.swagger_ui_init_oauth,
                swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})

        app.add_api_route(docs_url, swagger_ui, methods=["GET"], include_in_schema=False)
        if oauth2_url:
            async def swagger_ui_redirect() -> HTMLResponse:
                return get_swagger_ui_oauth2_redirect_html()

            app.add_api_route(oauth2_url, swagger_ui_redirect, methods=["GET"], include_in_schema=False)

    if redoc_url is not None:
        async def redoc(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            return get_redoc_html(openapi_url=root + openapi_url, title=f"{app.title} - ReDoc",
                                  redoc_js_url=f"{root}{assets_url}/{REDOC_JS}",
                                  redoc_favicon_url=f"{root}{assets_url}/{FAVICON}", with_google_fonts=False)

        app.add_api_route(redoc_url, redoc, methods=["GET"], include_in_schema=False)


__all__ = ["install_docs", "assets_dir", "ASSETS_URL"]
