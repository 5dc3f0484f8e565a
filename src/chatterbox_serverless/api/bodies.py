"""A job's status and result bodies, built in one place for the HTTP routes and for webhook deliveries (which
run without a request: they use the base URL the job was submitted at). No FastAPI here, so a `worker` process
delivering webhooks does not import the web stack.

The hosted contract's fields (`request_id`, `status`, `output` on the result, `metrics`, `error` when FAILED;
HTTP 422 when FAILED), and this server's additive ones, each only where it applies:

    cancelled       true when the client cancelled the job (status FAILED, error "cancelled by the client")
    queue_position  QUEUED jobs: how many jobs will be claimed before this one (0: next), see JobStore
    webhook         jobs submitted with webhook_url: {"state": pending|delivered|failed, "attempts",
                    "last_status" (the receiver's HTTP status), "last_error"}
"""
from __future__ import annotations

from typing import Any

from ..jobs.store import Job, JobState
from ..media.formats import MEDIA_TYPES
from .signing import UrlSigner

EXT_BY_TYPE = {media_type: name for name, media_type in MEDIA_TYPES.items()}


class JobBodies:
    def __init__(self, signer: UrlSigner, retention_seconds: float):
        self.signer = signer
        self.retention_seconds = retention_seconds

    def output_url(self, base_url: str, job: Job) -> str | None:
        """The signed URL of a COMPLETED job's audio, under `base_url` (scheme://host[:port][/prefix])."""
        if job.state != JobState.COMPLETED or job.finished_at is None:
            return None
        ext = EXT_BY_TYPE.get(job.media_type or "", "bin")
        expires = int(job.finished_at + self.retention_seconds)
        name = f"{job.id}.{ext}"
        return f"{base_url}/files/{name}?{self.signer.query(name, expires)}"

    def body(self, base_url: str, job: Job, with_output: bool,
             queue_position: int | None = None) -> tuple[dict[str, Any], int]:
        """The status (or, `with_output`, result) body and its HTTP status (422 when FAILED)."""
        body: dict[str, Any] = {"request_id": job.id, "status": job.state.value}
        if with_output:
            body["output"] = self.output_url(base_url, job)
        body["metrics"] = job.metrics or {}
        if job.state == JobState.FAILED:
            body["error"] = job.error or "failed"
            if job.cancelled:
                body["cancelled"] = True
        if job.state == JobState.QUEUED and queue_position is not None:
            body["queue_position"] = queue_position
        if job.webhook is not None:
            body["webhook"] = dict(job.webhook)
        return body, 422 if job.state == JobState.FAILED else 200
