"""The fleet on loopback: API processes (the real `serve --store redis://... --workers 0` command) and worker
processes (the real `worker` code path and options, with FakeEngineForTests as the engine) sharing a
redis-server that the test starts with AOF persistence (fsync always) in a temp dir.

Shown here: stateless API replicas (a job submitted to one is polled and downloaded from the other), v1 answers
502 while no worker is alive and v2 keeps queueing, a worker SIGKILLed mid-batch loses its jobs to the other
worker and every job completes exactly once, and Redis SIGKILLed and restarted loses nothing accepted; a mixed
fleet (workers of different models) where a Turbo job waits for a Turbo worker.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chatterbox_serverless.jobs.redis_store import RedisJobStore
from chatterbox_serverless.jobs.store import JobState, StoreUnavailable

from chatterbox_serverless.testing import wait_until
from chatterbox_serverless.testing.redis import RedisProcess, free_port
pytestmark = pytest.mark.redis

PREFIX = "fleet:"
LEASE = 1.5


class Fleet:
    def __init__(self, tmp: Path, redis_url: str):
        self.tmp, self.redis_url = tmp, redis_url
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "CHATTERBOX_URL_SECRET": "fleet-test-secret-shared-by-every-replica"}
        self.store = RedisJobStore(redis_url, prefix=PREFIX, timeout=1.0)

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log, stderr=log)
        self.procs[name] = proc
        return proc

    def start_api(self, name: str, models: tuple[str, ...] = ()) -> str:
        port = free_port()
        self._spawn(name, [sys.executable, "-m", "chatterbox_serverless.cli", "serve", "--store", self.redis_url,
                           "--redis-prefix", PREFIX, "--workers", "0", "--no-auth", "--host", "127.0.0.1", "--port", str(port),
                           "--data-dir", str(self.tmp / name), "--lease-seconds", str(LEASE),
                           "--log-format", "plain", "--log-level", "warning",
                           *(a for m in models for a in ("--model", m))])
        return f"http://127.0.0.1:{port}"

    def start_worker(self, name: str, delay: float, models: tuple[str, ...] = ()) -> None:
        # the real `worker` command with FakeEngineForTests as its engine (one per --model, as its API model)
        self._spawn(name, [sys.executable, "-m", "chatterbox_serverless.testing", "worker", "--store", self.redis_url, "--redis-prefix", PREFIX, "--worker-id", name,
                           "--data-dir", str(self.tmp / name), "--batch-size", "4", "--batch-wait", "0.05",
                           "--lease-seconds", str(LEASE), "--max-attempts", "5", "--shutdown-grace", "5",
                           "--log-format", "plain", "--log-level", "warning",
                           *(a for m in models for a in ("--model", m))],
                    env={"CHATTERBOX_FAKE_ENGINE": repr({"delay": delay})})

    def wait_up(self, url: str, timeout: float = 60) -> None:
        def up():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"{name} exited: {self.log(name)}")
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, timeout, 0.1)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.store.close()


@pytest.fixture
def fleet_env(tmp_path):
    server = RedisProcess(tmp_path / "redis").start()
    fleet = Fleet(tmp_path, server.url)
    yield fleet, server
    fleet.stop_all()
    server.stop()


def submit(api: str, text: str) -> str:
    r = httpx.post(api + "/v2/chatterbox-tts", json={"text": text}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def completed_once(store: RedisJobStore, ids: set[str]) -> None:
    events = store.events()
    completions = collections.Counter(e["job"] for e in events if e["state"] == "COMPLETED")
    assert set(completions) == ids, f"missing: {ids - set(completions)}; unexpected: {set(completions) - ids}"
    assert max(completions.values()) == 1, [j for j, n in completions.items() if n > 1]
    assert not [e for e in events if e["state"] == "FAILED"]


def test_two_apis_two_workers_survive_a_worker_killed_mid_batch(fleet_env):
    fleet, _ = fleet_env
    apis = [fleet.start_api("api-1"), fleet.start_api("api-2")]
    for url in apis:
        fleet.wait_up(url)

    # No worker alive: /ready says so, v1 answers 502 at once, v2 keeps queueing.
    r = httpx.get(apis[0] + "/ready", timeout=5)
    assert r.status_code == 503 and r.json()["workers_alive"] == 0 and "worker" in r.json()["error"]
    r = httpx.post(apis[1] + "/v1/chatterbox-tts", json={"text": "sync"}, timeout=10)
    assert r.status_code == 502 and "worker" in r.json()["error"]
    ids = {submit(apis[0], "queued before any worker")}

    fleet.start_worker("worker-1", delay=0.8)
    fleet.start_worker("worker-2", delay=0.8)
    wait_until(lambda: httpx.get(apis[1] + "/ready", timeout=5).json().get("workers_alive") == 2, 60, 0.2)
    ids |= {submit(apis[i % 2], f"job number {i}") for i in range(31)}

    # SIGKILL worker-1 while it holds a batch.
    wait_until(lambda: fleet.store.stats().workers.get("worker-1", {}).get("jobs_in_hand", 0) > 0, 30, 0.02)
    fleet.procs["worker-1"].kill()

    def all_done():
        jobs = [fleet.store.get(i) for i in ids]
        assert all(j is not None and j.state is not JobState.FAILED for j in jobs), [j.error for j in jobs if j]
        return all(j.state is JobState.COMPLETED for j in jobs)
    wait_until(all_done, 90, 0.2)
    completed_once(fleet.store, ids)
    retried = [i for i in ids if fleet.store.get(i).attempts > 1]
    assert retried, "worker-1 was killed holding jobs: they must have been run again by worker-2"

    # Stateless replicas: any job's status and audio from either API.
    for job_id in sorted(ids)[:4]:
        body = httpx.get(f"{apis[1]}/v2/requests/{job_id}", timeout=5).json()
        assert body["status"] == "COMPLETED" and body["output"].startswith(apis[1])
        for api in apis:
            audio = httpx.get(api + body["output"][len(apis[1]):], timeout=5)
            assert audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg" and audio.content

    # The fleet as seen by the API: worker-1's liveness key expired.
    wait_until(lambda: httpx.get(apis[0] + "/ready", timeout=5).json().get("workers_alive") == 1, 10, 0.2)
    metrics = httpx.get(apis[0] + "/metrics", timeout=5).text
    assert "chatterbox_workers_alive 1.0" in metrics and 'chatterbox_jobs{state="COMPLETED"} 32.0' in metrics
    r = httpx.post(apis[0] + "/v1/chatterbox-tts", json={"text": "sync again"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"


def test_redis_killed_and_restarted_loses_nothing_accepted(fleet_env):
    fleet, server = fleet_env
    api = fleet.start_api("api-1")
    fleet.start_worker("worker-1", delay=0.3)
    fleet.wait_up(api)
    wait_until(lambda: httpx.get(api + "/ready", timeout=5).json().get("workers_alive") == 1, 60, 0.2)
    ids = {submit(api, f"before {i}") for i in range(20)}
    wait_until(lambda: fleet.store.stats().by_state["COMPLETED"] >= 3, 30, 0.05)

    server.kill()                      # SIGKILL: what was acknowledged is in the AOF (appendfsync always)
    r = httpx.post(api + "/v2/chatterbox-tts", json={"text": "during the outage"}, timeout=10)
    assert r.status_code == 502 and "unavailable" in r.json()["error"]
    r = httpx.get(f"{api}/v2/requests/{next(iter(ids))}/status", timeout=10)
    assert r.status_code == 502 and r.json()["error"]
    with pytest.raises(StoreUnavailable):
        fleet.store.stats()
    time.sleep(1.0)
    server.start()

    # The API and the worker recover by themselves.
    wait_until(lambda: httpx.post(api + "/v2/chatterbox-tts", json={"text": "probe"}, timeout=10).status_code == 200,
               30, 0.2)
    ids |= {submit(api, f"after {i}") for i in range(5)}
    # Every job accepted before or after the outage (the probes too) is there and ends COMPLETED exactly once.
    everything = {k.decode()[len(PREFIX + "job:"):] for k in fleet.store.r.scan_iter(match=PREFIX + "job:*")}
    assert ids <= everything

    def all_done():
        return all(fleet.store.get(i).state is JobState.COMPLETED for i in everything)
    wait_until(all_done, 90, 0.2)
    completed_once(fleet.store, everything)
    assert httpx.get(api + "/ready", timeout=5).status_code == 200


def test_two_replicas_racing_for_the_last_credits_never_double_spend(fleet_env):
    """Accounts on Redis: a key with 20 credits submits concurrently through two API replicas (no worker, so
    every accepted job keeps its hold): exactly as many are accepted as the credits cover, the rest get 406."""
    import threading

    from chatterbox_serverless.accounts.redis_store import RedisAccountStore

    fleet, _ = fleet_env
    out = subprocess.run([sys.executable, "-m", "chatterbox_serverless.cli", "keys", "create", "--store",
                          fleet.redis_url, "--credits", "20", "--rate", "0", "--name", "race"],
                         env={**fleet.env, "CHATTERBOX_REDIS_PREFIX": PREFIX}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    key = out.stdout.split()[0]
    apis = []
    for name in ("api-1", "api-2"):
        port = free_port()
        fleet._spawn(name, [sys.executable, "-m", "chatterbox_serverless.cli", "serve", "--store", fleet.redis_url,
                            "--redis-prefix", PREFIX, "--workers", "0", "--port", str(port), "--data-dir",
                            str(fleet.tmp / name), "--log-format", "plain", "--log-level", "warning"])
        apis.append(f"http://127.0.0.1:{port}")
    for url in apis:
        fleet.wait_up(url)
    assert httpx.post(apis[0] + "/v2/chatterbox-tts", json={"text": "x"}, timeout=5).status_code == 401

    codes: list[int] = []
    barrier = threading.Barrier(16)

    def submit_many(i: int) -> None:
        with httpx.Client(timeout=30, headers={"x-api-key": key}) as client:
            barrier.wait()
            for _ in range(3):
                r = client.post(apis[i % 2] + "/v2/chatterbox-tts", json={"text": "the same short text"})
                codes.append(r.status_code)

    threads = [threading.Thread(target=submit_many, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(codes) <= {200, 406} and codes.count(406) > 0, collections.Counter(codes)
    accounts = RedisAccountStore(fleet.redis_url, prefix=PREFIX)
    try:
        (acc,) = accounts.list()
        holds = [h for h in accounts.holds() if h.account_id == acc.id]
        per_job = holds[0].amount
        assert len(holds) == codes.count(200) and all(h.amount == per_job for h in holds)
        assert acc.balance == 20 and acc.held == per_job * len(holds) <= 20 < per_job * (len(holds) + 1)
    finally:
        accounts.close()


def test_a_turbo_job_waits_for_a_turbo_worker_in_a_mixed_fleet(fleet_env):
    """An API replica serving both models (from the specs alone: nothing loaded) and a worker of the original
    model: the original's jobs complete, the Turbo job stays QUEUED (never claimed, not even once) until a
    Turbo worker starts, which completes it."""
    from chatterbox_serverless.jobs.store import Job

    fleet, _server = fleet_env
    api = fleet.start_api("api", models=("tiny-random", "tiny-random-turbo"))
    fleet.start_worker("w-original", delay=0.05, models=("tiny-random",))
    fleet.wait_up(api)
    turbo = Job(id="turbo-job-1", owner="", params={"text": "Turbo, please.", "output_format": "wav"})
    fleet.store.submit(turbo, 100, model="chatterbox-turbo")      # as the API's Turbo route submits it
    originals = {submit(api, f"original {i}") for i in range(3)}
    wait_until(lambda: all(fleet.store.get(i).state == JobState.COMPLETED for i in originals), 30)
    wait_until(lambda: "w-original" in httpx.get(api + "/ready", timeout=5).json()["workers"], 10)
    assert httpx.get(api + "/ready", timeout=5).json()["workers"]["w-original"]["models"] == ["chatterbox-tts"]
    time.sleep(1.0)                                               # ~10 more polls of the original's worker
    assert fleet.store.get(turbo.id).state == JobState.QUEUED
    assert fleet.store.queue_position(turbo.id) == 0
    fleet.start_worker("w-turbo", delay=0.05, models=("tiny-random-turbo",))
    wait_until(lambda: fleet.store.get(turbo.id).state == JobState.COMPLETED, 30)
    claims = [e.data for e in fleet.store.job_events(turbo.id) if e.data.get("status") == "PROCESSING"]
    assert len(claims) == 1                                       # claimed once, by the Turbo worker
    done = [e for e in fleet.store.events() if e["job"] == turbo.id]
    assert [(e["state"], e["worker"]) for e in done] == [("COMPLETED", "w-turbo")]
    assert {e["worker"] for e in fleet.store.events() if e["job"] in originals} == {"w-original"}
