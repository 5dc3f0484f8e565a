"""The HTTP layer (FastAPI) over a `Service` (service.py): one router per surface, over one `ApiContext`.

    routers/hosted.py      the hosted contract: /v1 and /v2 chatterbox-tts (and /v1|v2/<model> for every other
                           model served: service.served_models), /v2/requests/{id}[/status]
    routers/files.py       /files/{id}.{ext}: the signed audio URLs
    routers/accounts.py    /v1/account, /v1/admin/keys...
    routers/operations.py  /health, /ready, /metrics
    routers/openai.py      OpenAI's speech API: /v1/audio/speech, /v1/models (errors in OpenAI's shape)
    routers/voices.py      the voice library: /v1/audio/voices (OpenAI's shape too)
    routers/playground.py  / (the web playground) and /playground/* (its files, shipped in api/playground/)
    docs.py                /docs, /redoc (assets served from the installation: they work offline), /openapi.json

Every error is `{"error": "..."}` (unknown routes, wrong methods, malformed JSON and validation included; a
client error is never 422, which means FAILED here). Adding a route: one function in one router; a new surface:
a module in routers/ with `router(ctx) -> APIRouter`, listed in ROUTERS.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from .. import __version__
from ..service import Service
from .auth import RemainingCreditsMiddleware
from .context import ApiContext
from .docs import install_docs
from .errors import install_error_handlers
from .middleware import BodyTimeout, RequestContext
from .routers import accounts, files, hosted, openai, operations, playground, voices

log = logging.getLogger("chatterbox_serverless.api")

ROUTERS = (hosted, files, accounts, operations, openai, voices, playground)


def create_app(service: Service) -> FastAPI:
    """The API over `service`. The app's lifespan starts and stops the service's worker (or janitor); closing
    the store stays with whoever built the service."""
    ctx = ApiContext(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        log.info("API ready", extra={"worker": service.worker.worker_id if service.worker else None,
                                     "version": __version__})
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="chatterbox-serverless", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  docs_url=None, redoc_url=None,
                  description="Self-hosted Chatterbox TTS with the hosted API's contract: `/v1` sync, `/v2` "
                              "queued jobs. Every error body is `{\"error\": ...}`; HTTP 422 means FAILED.")
    app.state.ctx = ctx
    app.state.service = service
    install_error_handlers(app)
    for module in ROUTERS:
        app.include_router(module.router(ctx))
    install_docs(app)
    app.add_middleware(RemainingCreditsMiddleware)
    if service.settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(service.settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
                           allow_headers=["authorization", "x-api-key", "content-type", "x-request-id"],
                           expose_headers=["x-request-id", "x-remaining-credits", "x-seed-value", "retry-after"])
    app.add_middleware(BodyTimeout, body_timeout=service.settings.body_timeout)
    # the request-id/logging middleware wraps everything, error handlers and the 408 included
    app.add_middleware(RequestContext, requests=ctx.metrics.requests, latency=ctx.metrics.latency)
    return app
