"""`chatterbox-serverless serve`: the API and (by default) an in-process worker on one machine.

Jobs live in SQLite under --data-dir (jobs.sqlite3, audio/), so a restart loses nothing that was accepted; or,
with `--store redis://HOST:PORT/DB`, in Redis shared by several API replicas and `worker` processes (scale-out).
SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight requests and the batch in hand finish within the
grace time, and hands unfinished jobs back to the queue.

Several models: `--model` once per model (the first is the default), one engine and one in-process worker each;
with `--workers 0` nothing is loaded and the specs only name the models this API serves (engine/options.py).
"""
from __future__ import annotations

import argparse
import socket
import sys

from ..settings import SERVE
from ..settings import add_arguments as add_settings_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, SERVE)


def _fail(message: str) -> int:
    print(f"chatterbox-serverless serve: {message}", file=sys.stderr)
    return 2


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (IPv4 or IPv6). Raises OSError (port in use, bad address)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    infos = socket.getaddrinfo(host.strip("[]"), port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    af, kind, proto, _, address = infos[0]
    sock = socket.socket(af, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def run(args: argparse.Namespace) -> int:
    from ..engine.options import engines_from_args, model_specs, served_models_of_specs
    from ..service import ServiceError, build_service
    from ..settings import from_args
    from .logs import configure_logging

    try:
        settings = from_args(args)
    except ValueError as e:
        return _fail(str(e))
    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    try:     # before anything slow or lasting (the model, a first admin key): the port must be ours
        sock = bind_socket(settings.host, settings.port)
    except OSError as e:
        why = "the address is already in use (another server on that port?)" if e.errno in (98, 48) else \
            (e.strerror or str(e))
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {why}")
    try:
        specs, engines, served = model_specs(args), None, None
        if settings.workers > 0:
            engines = engines_from_args(args, settings.data_dir, "serve")
            if engines is None:
                return 2
        else:
            try:
                served = served_models_of_specs(specs)
            except ValueError as e:
                return _fail(str(e))
        try:
            service = build_service(settings, engines=engines, served_models=served, model_name=",".join(specs))
        except ServiceError as e:
            return _fail(str(e))
        try:
            serve(service, sockets=[sock], announce=True)
        finally:
            service.close()
    finally:
        sock.close()
    return 0


def serve(service, *, sockets=None, announce: bool = False) -> None:
    """Run the API over `service` under uvicorn until SIGTERM/SIGINT (blocking). With `announce`, the start-up
    notice (a first admin key, printed once) comes once the app is built and the socket is bound. Used by `run`
    and by test servers in subprocesses."""
    import uvicorn

    from ..service import announce_auth
    from .app import create_app

    settings = service.settings
    app = create_app(service)
    if announce:
        announce_auth(service)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            proxy_headers=True, server_header=False,
                            timeout_graceful_shutdown=max(1, int(settings.sync_timeout) + 5), timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=sockets)
