"""Audio bodies that follow a job's chunk channel (jobs/store.py) while its worker produces it.

    read = await first_piece(store, job_id, timeout)      # the first pieces, or the job's end, or the timeout
    body = encoded_audio(store, job_id, read, "mp3")       # bytes as the pieces arrive (media/stream.py encoders)

The status is sent before the first byte, so whatever goes wrong afterwards cannot change it: the job failing,
its stream restarting (a worker died and another attempt began: its pieces are not joined with what was sent),
the result expiring. `encoded_audio` then raises `StreamInterrupted`; a raw audio response lets it cut the
connection (the client sees an incomplete chunked body, never a clean end), an SSE response turns it into an
`error` event. Any API replica can serve a stream: everything comes from the store, polled every
STREAM_POLL_S while the job runs.
"""
from __future__ import annotations

import logging
import time
from typing import AsyncIterator

import anyio
import numpy as np
from fastapi.concurrency import run_in_threadpool

from ..jobs.store import ChunkRead, JobState, JobStore
from ..media.stream import StreamEncoder, unpack_piece

log = logging.getLogger("chatterbox_serverless.api")

STREAM_POLL_S = 0.05      # how often a stream looks for new pieces while its job runs
RESTARTED = ("the request was interrupted (its worker stopped) and is being generated again; the audio sent so "
             "far is not continued: request it again")


class StreamInterrupted(Exception):
    """The stream cannot go on (after its first byte): the job failed, restarted or expired."""


async def first_piece(store: JobStore, job_id: str, timeout: float) -> ChunkRead | None:
    """Wait until the job has streamed pieces (the read holding them), or it ended, or `timeout` seconds passed
    (the last read: no pieces). None when the job is unknown or expired."""
    deadline = time.monotonic() + timeout
    while True:
        read = await run_in_threadpool(store.read_chunks, job_id)
        if read is None or read.chunks or read.state.terminal or time.monotonic() >= deadline:
            return read
        await anyio.sleep(STREAM_POLL_S)


async def pieces(store: JobStore, job_id: str, first: ChunkRead) -> AsyncIterator[tuple[int, np.ndarray]]:
    """(sample rate, int16 samples) of every piece of `first`'s attempt, in order, as they come; ends after the
    last piece of a COMPLETED job; raises StreamInterrupted otherwise."""
    read, attempt, after = first, first.attempt, -1
    while True:
        for chunk in read.chunks:
            yield unpack_piece(chunk.data)
            after = chunk.seq
        if read.restarted:
            raise StreamInterrupted(RESTARTED)
        if read.end:
            if read.state == JobState.COMPLETED:
                return
            job = await run_in_threadpool(store.get, job_id)
            raise StreamInterrupted(f"the request failed: {job.error if job and job.error else 'failed'}")
        if not read.chunks:
            await anyio.sleep(STREAM_POLL_S)
        read = await run_in_threadpool(store.read_chunks, job_id, after, attempt)
        if read is None:
            raise StreamInterrupted("the request expired")


async def encoded_audio(store: JobStore, job_id: str, first: ChunkRead, fmt: str,
                        speed: float = 1.0) -> AsyncIterator[bytes]:
    """The job's audio encoded as `fmt` (at `speed`), bytes as soon as its encoder gives them."""
    encoder: StreamEncoder | None = None
    try:
        async for rate, samples in pieces(store, job_id, first):
            if encoder is None:
                encoder = StreamEncoder(fmt, rate, speed)
            data = await run_in_threadpool(encoder.feed, samples)
            if data:
                yield data
        if encoder is not None:
            data = await run_in_threadpool(encoder.finish)
            if data:
                yield data
    finally:
        if encoder is not None:
            encoder.close()


async def cut_on_failure(body: AsyncIterator[bytes], job_id: str) -> AsyncIterator[bytes]:
    """A raw audio body: on StreamInterrupted, log it and end the response without its last chunk (the
    connection is closed; the client sees an incomplete body)."""
    try:
        async for data in body:
            yield data
    except StreamInterrupted as e:
        log.warning("audio stream of %s ended early: %s", job_id, e, extra={"request_id": job_id})
        raise
