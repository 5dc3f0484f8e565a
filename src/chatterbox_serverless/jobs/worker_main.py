"""`chatterbox-serverless worker`: a worker process on any host, sharing a job store with the API replicas.

    chatterbox-serverless worker --store redis://redis:6379/0 --model ResembleAI/chatterbox --device cuda
    chatterbox-serverless worker --store redis://redis:6379/0 --model ResembleAI/chatterbox-turbo   # Turbo jobs only

It claims only jobs of the models it serves (one engine, and one worker thread, per `--model`; the API model of
each: engine/catalog.py), and advertises them ("models" in /ready's worker list). It claims batches from the shared queue, runs the engine, stores each result (audio included) in the store (which
settles the job's credits in the same step), and advertises itself (heartbeat with a TTL) so the API's /ready
and /metrics show the fleet. SIGTERM: stop claiming, finish the batch in hand within the grace time, hand the rest
back to the queue. A worker that dies without that (SIGKILL, lost host) loses its leases after --lease-seconds
and its jobs are retried elsewhere.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..settings import WORKER
from ..settings import add_arguments as add_settings_arguments

log = logging.getLogger("chatterbox_serverless.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, WORKER)


def run(args: argparse.Namespace) -> int:
    from ..api.logs import configure_logging
    from ..engine.options import engines_from_args, model_specs
    from ..service import ServiceError, build_service
    from ..settings import from_args

    try:
        settings = from_args(args)
    except ValueError as e:
        print(f"chatterbox-serverless worker: {e}", file=sys.stderr)
        return 2
    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    engines = engines_from_args(args, settings.data_dir, "worker")
    if engines is None:
        return 2
    try:
        service = build_service(settings, engines=engines, with_worker=True, model_name=",".join(model_specs(args)))
    except ServiceError as e:
        print(f"chatterbox-serverless worker: {e}", file=sys.stderr)
        return 2
    try:
        run_worker(service)
    finally:
        service.close()
    return 0


def run_worker(service, stop: threading.Event | None = None) -> None:
    """Run the service's worker until SIGTERM/SIGINT (or `stop` is set); blocking. Used by `run` and by test
    processes that supply an engine double."""
    settings, worker = service.settings, service.worker
    if settings.metrics_port:
        from prometheus_client import start_http_server
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=worker.metrics.registry)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s serving %s from %s", worker.worker_id, ", ".join(service.served_models),
             settings.describe_store(),
             extra={"batch_size": settings.batch_size, "lease_seconds": settings.lease_seconds})
    service.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
