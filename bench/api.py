"""API throughput and latency on loopback: v2 submit, status and result, with a fast engine double.

    python bench/api.py [--jobs 3000] [--concurrency 16]

The server is the real one (`serve`: FastAPI + uvicorn + SQLite WAL store with synchronous=FULL + the
in-process worker) in a subprocess; the engine is `FakeEngineForTests` (chatterbox_serverless.testing) returning 0.1 s
of silence at once, so the figures measure the service, not the model. The client is a minimal asyncio HTTP/1.1
keep-alive client (cheap, so it leaves the cores to the server). Prints one table of figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

from chatterbox_serverless.testing import spawn

# the real `serve` command (SQLite, in-process worker) with the engine double answering 0.1 s of silence at once
SERVER_ENGINE = {"seconds_per_char": 0.0, "base_seconds": 0.1, "amplitude": 0.0}


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)


async def run_phase(port: int, concurrency: int, items: list, make) -> tuple[float, list[float], list]:
    """Send one request per item over `concurrency` keep-alive connections; (seconds, latencies, bodies)."""
    conns = [await Conn.open("127.0.0.1", port) for _ in range(concurrency)]
    latencies: list[float] = []
    bodies: list = [None] * len(items)
    next_index = 0

    async def loop(conn: Conn) -> None:
        nonlocal next_index
        while next_index < len(items):
            i = next_index
            next_index += 1
            method, path, body = make(items[i])
            t0 = time.perf_counter()
            status, data = await conn.request(method, path, body)
            latencies.append(time.perf_counter() - t0)
            if status not in (200, 422):
                raise RuntimeError(f"{method} {path}: HTTP {status} {data[:200]!r}")
            bodies[i] = data
    t0 = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    seconds = time.perf_counter() - t0
    for c in conns:
        c.writer.close()
    return seconds, latencies, bodies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bench(port: int, jobs: int, concurrency: int) -> list[tuple[str, int, float, list[float]]]:
    rows = []
    payload = json.dumps({"text": "The quick brown fox jumps over the lazy dog.", "seed": 1}).encode()
    await run_phase(port, concurrency, list(range(200)), lambda _: ("POST", "/v2/chatterbox-tts", payload))  # warm
    seconds, lat, bodies = await run_phase(port, concurrency, list(range(jobs)),
                                           lambda _: ("POST", "/v2/chatterbox-tts", payload))
    rows.append(("submit  POST /v2/chatterbox-tts", jobs, seconds, lat))
    ids = [json.loads(b)["request_id"] for b in bodies]
    seconds, lat, _ = await run_phase(port, concurrency, ids,
                                      lambda i: ("GET", f"/v2/requests/{i}/status", b""))
    rows.append(("status  GET /v2/requests/{id}/status", len(ids), seconds, lat))
    # wait until the worker drained the queue, then fetch every result
    conn = await Conn.open("127.0.0.1", port)
    while True:
        _, data = await conn.request("GET", f"/v2/requests/{ids[-1]}/status")
        if json.loads(data)["status"] in ("COMPLETED", "FAILED"):
            break
        await asyncio.sleep(0.1)
    conn.writer.close()
    seconds, lat, _ = await run_phase(port, concurrency, ids, lambda i: ("GET", f"/v2/requests/{i}", b""))
    rows.append(("result  GET /v2/requests/{id}", len(ids), seconds, lat))
    # status latency as SDK clients see it: polling while the server is not saturated (4 connections)
    seconds, lat, _ = await run_phase(port, 4, ids, lambda i: ("GET", f"/v2/requests/{i}/status", b""))
    rows.append(("status, 4 connections", len(ids), seconds, lat))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = spawn("serve", ["--data-dir", tmp, "--no-auth", "--max-queue", "1000000", "--batch-size", "32",
                                    "--batch-wait", "0", "--log-level", "warning"], fake=SERVER_ENGINE, stderr=None)
        port = int(url.rsplit(":", 1)[1])
        try:
            rows = asyncio.run(bench(port, args.jobs, args.concurrency))
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"API on loopback, {os.cpu_count()} cores, {args.concurrency} keep-alive connections (unless said), "
          f"SQLite WAL synchronous=FULL, in-process worker draining the queue meanwhile")
    print(f"{'phase':40} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, n, seconds, lat in rows:
        print(f"{name:40} {n:8d} {n / seconds:8.0f} {pct(lat, .5) * 1e3:8.2f} {pct(lat, .99) * 1e3:8.2f} "
              f"{statistics.fmean(lat) * 1e3:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
