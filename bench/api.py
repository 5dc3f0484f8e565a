"""API throughput and latency on loopback: v2 submit, status and result, with a fast engine double.

    python bench/api.py [--jobs 3000] [--concurrency 16]

The server is the real one (`serve_app`: FastAPI + uvicorn + SQLite WAL store with synchronous=FULL + the
in-process worker) in a subprocess; the engine is `InstantEngineForBench`, a benchmark double returning 0.1 s of
silence at once, so the figures measure the service, not the model. The client is a minimal asyncio HTTP/1.1
keep-alive client (cheap, so it leaves the cores to the server). Prints one table of figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r"""
import sys, numpy as np
from pathlib import Path
from chatterbox_serverless.api.logs import configure_logging
from chatterbox_serverless.api.serve import serve_app
from chatterbox_serverless.engine.types import SynthesisResult
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.settings import Settings

class InstantEngineForBench:   # benchmark double: 0.1 s of silence per request, no compute
    sample_rate = 24000
    def synthesize(self, requests):
        return [SynthesisResult(audio=np.zeros(2400, np.float32), metrics={}) for _ in requests]

data, port = Path(sys.argv[1]), int(sys.argv[2])
configure_logging(json_lines=True, level="warning")
cfg = Settings(data_dir=data, max_queue=1_000_000, batch_size=32, batch_wait=0.0)
store = SQLiteJobStore(data / "jobs.sqlite3")
serve_app(cfg, store, InstantEngineForBench(), workers=1, host="127.0.0.1", port=port)
"""


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, tmp, str(port)])
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("the server did not start")
                    time.sleep(0.1)
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
