"""Scale-out figures: throughput with 1 vs 2 worker processes on one Redis, and what the Redis path adds to
latency compared with the embedded SQLite store.

    python bench/fleet.py                       # starts its own redis-server in a temp dir
    python bench/fleet.py --jobs 400 --cost 0.25 --batch-size 8

1. Scaling: N jobs queued in Redis, then 1 (or 2) `worker` processes drain them. The engine is the test double
   (chatterbox_serverless.testing.FakeEngineForTests, run by `python -m chatterbox_serverless.testing worker`) with a fixed cost per batch (`--cost` seconds, a sleep: it stands
   for a GPU, so two workers on one small CPU still scale the way two GPUs would). Jobs/s and speed-up.
2. Latency: store operations (submit, status read, claim+complete) p50/p99 on SQLite vs Redis, and a full
   /v1 request over HTTP (submit, batch, engine with zero cost, encode, result) on the single-machine setup
   (`serve`, SQLite, in-process worker) vs the fleet setup (`serve --store redis:// --workers 0` + a `worker`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from chatterbox_serverless.jobs.redis_store import RedisJobStore
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job, JobState
from chatterbox_serverless.testing import free_port

ENV = {**os.environ, "CHATTERBOX_URL_SECRET": "bench-secret"}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 50) * 1000:6.2f} ms   p99 {pct(values, 99) * 1000:6.2f} ms"


class Procs:
    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []

    def spawn(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(argv, env={**ENV, **env}, stdout=log, stderr=log)
        self.procs.append(p)
        return p

    def stop(self, procs: list[subprocess.Popen] | None = None) -> None:
        procs = self.procs if procs is None else procs
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in procs:
            if p in self.procs:
                self.procs.remove(p)


def start_redis(tmp: Path, appendfsync: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--dir", str(tmp), "--save", "", "--appendonly", "yes",
                             "--appendfsync", appendfsync, "--logfile", str(tmp / "redis.log")])
    url = f"redis://127.0.0.1:{port}/0"
    probe = RedisJobStore(url, prefix="probe:")
    for _ in range(200):
        try:
            probe.ping()
            break
        except Exception:
            time.sleep(0.05)
    probe.close()
    return proc, url


def worker_argv(url: str, prefix: str, name: str, batch: int, tmp: Path) -> list[str]:
    return [sys.executable, "-m", "chatterbox_serverless.testing", "worker", "--store", url,
            "--redis-prefix", prefix, "--worker-id", name, "--batch-size", str(batch), "--batch-wait", "0.01",
            "--data-dir", str(tmp / name), "--log-format", "plain", "--log-level", "warning"]


def wait_for(pred, timeout: float = 60.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(interval)


def scaling(url: str, procs: Procs, tmp: Path, n_workers: int, jobs: int, cost: float, batch: int) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:6]}:"
    store = RedisJobStore(url, prefix=prefix)
    workers = [procs.spawn(f"w{n_workers}-{i}", worker_argv(url, prefix, f"w{i}", batch, tmp), CHATTERBOX_FAKE_ENGINE=repr({"delay": cost}))
               for i in range(n_workers)]
    wait_for(lambda: len(store.stats().workers) == n_workers)
    ids = []
    t0 = time.perf_counter()
    for i in range(jobs):
        job = Job(id=str(uuid.uuid4()), owner=f"acct-{i % 4}", params={"text": f"job {i}", "output_format": "wav"})
        store.submit(job, 1_000_000)
        ids.append(job.id)
    wait_for(lambda: store.stats().by_state["COMPLETED"] == jobs, timeout=600, interval=0.02)
    seconds = time.perf_counter() - t0
    assert all(store.get(i).state is JobState.COMPLETED for i in ids)
    procs.stop(workers)
    store.close()
    return jobs / seconds


def store_latency(store, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"submit": [], "get (status)": [], "claim+complete": []}
    for i in range(n):
        job = Job(id=str(uuid.uuid4()), owner="acct", params={"text": "latency"})
        t = time.perf_counter()
        store.submit(job, 1_000_000)
        out["submit"].append(time.perf_counter() - t)
        t = time.perf_counter()
        store.get(job.id)
        out["get (status)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        (claimed,) = store.claim("bench", 1, 30)
        store.complete(claimed.id, "bench", b"\0" * 48000, "audio/wav", {})
        out["claim+complete"].append(time.perf_counter() - t)
    return out


def v1_latency(api: str, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=30) as client:
        for i in range(n + 5):
            t = time.perf_counter()
            r = client.post(api + "/v1/chatterbox-tts", json={"text": f"hello {i}", "output_format": "wav"})
            r.raise_for_status()
            if i >= 5:              # warm-up
                out.append(time.perf_counter() - t)
    return out


def wait_http(url: str, procs: list[subprocess.Popen]) -> None:
    def up():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a server process exited (see its log)")
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(up, timeout=300, interval=0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=240, help="jobs per scaling run (default 240)")
    ap.add_argument("--cost", type=float, default=0.25, help="engine seconds per batch (default 0.25)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ops", type=int, default=500, help="store operations per latency figure (default 500)")
    ap.add_argument("--requests", type=int, default=100, help="v1 requests per latency figure (default 100)")
    ap.add_argument("--appendfsync", choices=("always", "everysec"), default="always",
                    help="Redis AOF fsync policy (default always: durable like SQLite's synchronous=FULL)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cbx-bench-fleet-"))
    procs = Procs(tmp)
    redis_proc, url = start_redis(tmp, args.appendfsync)
    print(f"Redis {url} with appendonly yes, appendfsync {args.appendfsync}; SQLite with synchronous=FULL\n")
    try:
        print(f"1. Throughput: {args.jobs} jobs, engine double at {args.cost:g} s per batch of {args.batch_size}, "
              f"Redis store")
        rates = {}
        for n in (1, 2):
            rates[n] = scaling(url, procs, tmp, n, args.jobs, args.cost, args.batch_size)
            ideal = args.batch_size / args.cost * n
            print(f"   {n} worker{'s' if n > 1 else ' '}: {rates[n]:7.1f} jobs/s   (ideal {ideal:.1f})")
        print(f"   speed-up 2 vs 1 worker: {rates[2] / rates[1]:.2f}x")

        print(f"\n2. Latency of store operations, {args.ops} each (one client, loopback)")
        sqlite = SQLiteJobStore(tmp / "lat" / "jobs.sqlite3")
        redis_store = RedisJobStore(url, prefix="bench-lat:")
        for name, store in (("SQLite", sqlite), ("Redis ", redis_store)):
            for op, values in store_latency(store, args.ops).items():
                print(f"   {name} {op:15s} {ms(values)}")
            store.close()

        print(f"\n3. Latency of a /v1 request end to end, {args.requests} sequential, engine cost 0")
        port = free_port()
        single = procs.spawn("serve-sqlite", [sys.executable, "-m", "chatterbox_serverless.testing", "serve",
                                              "--data-dir", str(tmp / "sqlite-data"), "--port", str(port), "--no-auth",
                                              "--batch-size", "4", "--max-queue", "10000", "--log-level", "warning"],
                             CHATTERBOX_FAKE_ENGINE=repr({"delay": 0.0}))
        wait_http(f"http://127.0.0.1:{port}", [single])
        v1_sqlite = v1_latency(f"http://127.0.0.1:{port}", args.requests)
        procs.stop([single])
        port = free_port()
        api = procs.spawn("serve-redis", [sys.executable, "-m", "chatterbox_serverless.cli", "serve", "--store", url,
                                          "--redis-prefix", "bench-v1:", "--workers", "0", "--no-auth", "--port", str(port),
                                          "--data-dir", str(tmp / "api"), "--log-level", "warning"])
        worker = procs.spawn("worker-redis", worker_argv(url, "bench-v1:", "w-v1", args.batch_size, tmp),
                             CHATTERBOX_FAKE_ENGINE=repr({"delay": 0.0}))
        wait_http(f"http://127.0.0.1:{port}", [api, worker])
        v1_redis = v1_latency(f"http://127.0.0.1:{port}", args.requests)
        procs.stop([api, worker])
        print(f"   serve (SQLite, in-process worker)           {ms(v1_sqlite)}")
        print(f"   serve --store redis + worker process        {ms(v1_redis)}")
        print(f"   added by the Redis path (p50)               "
              f"{(pct(v1_redis, 50) - pct(v1_sqlite, 50)) * 1000:+.2f} ms")
    except BaseException:
        print(f"(logs kept in {tmp})", file=sys.stderr)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        procs.stop()
        redis_proc.terminate()
        redis_proc.wait()


if __name__ == "__main__":
    main()
