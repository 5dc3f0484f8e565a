"""Operations: GET /health (alive), /ready (model, worker, store writable), /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ...jobs.store import JobStore
from ..context import ApiContext
from ..schemas import ErrorResponse


class StoreCollector:
    """Prometheus gauges read from the store at scrape time (queue depth, jobs by state, workers)."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        try:
            stats = self.store.stats()
        except Exception:
            return
        jobs = GaugeMetricFamily("chatterbox_jobs", "Live (unexpired) jobs by state", labels=["state"])
        for state, n in sorted(stats.by_state.items()):
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("chatterbox_queue_depth", "Jobs waiting in the queue",
                                value=stats.by_state.get("QUEUED", 0))
        yield GaugeMetricFamily("chatterbox_oldest_queued_seconds", "Age of the oldest queued job",
                                value=stats.oldest_queued_age)
        yield GaugeMetricFamily("chatterbox_workers_alive", "Workers that heart-beat recently",
                                value=len(stats.workers))


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter(tags=["operations"])
    service, store, worker = ctx.service, ctx.store, ctx.worker
    ctx.metrics.registry.register(StoreCollector(store))

    @r.get("/health", summary="The process is alive")
    async def health():
        return {"status": "ok"}

    @r.get("/ready", summary="Model loaded, worker running, jobs and audio can be stored",
           responses={503: {"model": ErrorResponse}})
    def ready():
        stats = store.stats()
        problem = ctx.no_worker_reason()
        if problem is None:
            writable = getattr(store, "writable", None)
            problem = writable() if writable is not None else None
        body = {"model": service.model_name or None, "models": list(ctx.models),
                "engine_loaded": service.engine is not None,
                "worker": worker.worker_id if worker else None, "workers_alive": len(stats.workers),
                "workers": stats.workers, "oldest_queued_age_s": round(stats.oldest_queued_age, 3),
                "queue_depth": stats.by_state.get("QUEUED", 0)}
        if problem:
            return JSONResponse({"error": f"not ready: {problem}", "status": "not ready", **body}, status_code=503)
        return {"status": "ready", **body}

    @r.get("/metrics", summary="Prometheus metrics", responses={200: {"content": {"text/plain": {}}}})
    def metrics():
        data = generate_latest(ctx.metrics.registry)
        if worker is not None:
            data += generate_latest(worker.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return r
