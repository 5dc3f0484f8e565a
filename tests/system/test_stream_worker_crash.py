"""A worker SIGKILLed mid-stream: a real `worker` process (FakeEngineForTests, one piece per sentence) and an API
in this process on the same SQLite data dir. A client follows GET /v2/requests/{id}/audio; the worker is killed
after the first pieces went out; another worker takes the job over once the lease ran out. The client's stream
is cut (never continued with the second attempt's audio: an incomplete chunked body), the store tells a reader
of the first attempt that it restarted, the job completes exactly once, and its audio is the second attempt's."""
from __future__ import annotations

import signal
import sqlite3
import threading
import time

import httpx
import numpy as np

from chatterbox_serverless import testing
from chatterbox_serverless.jobs.store import JobState
from chatterbox_serverless.media.stream import unpack_piece

TEXT = " ".join(f"Sentence {i} of a long request that streams." for i in range(8))


def worker(data_dir):
    proc, _ = testing.spawn("worker", ["--data-dir", str(data_dir), "--lease-seconds", "1", "--batch-wait", "0",
                                       "--log-level", "warning"], fake={"piece_delay": 0.5, "max_seconds": 20.0})
    return proc


def test_a_worker_killed_mid_stream_restarts_the_stream_and_the_job_completes_once(tmp_path):
    data = tmp_path / "data"
    with testing.start_server(tmp_path, engine=None, workers=0, data_dir=data, sync_timeout=20.0) as api:
        first = worker(data)
        second = None
        try:
            rid = httpx.post(api.url + "/v2/chatterbox-tts", json={"text": TEXT, "output_format": "pcm",
                                                                  "stream": True}).json()["request_id"]
            received, outcome = [], {}
            got_some = threading.Event()

            def follow():
                try:
                    with httpx.stream("GET", f"{api.url}/v2/requests/{rid}/audio", timeout=60) as r:
                        outcome["status"] = r.status_code
                        for data_part in r.iter_raw():
                            received.append(data_part)
                            got_some.set()
                    outcome["end"] = "complete"
                except httpx.RemoteProtocolError as e:
                    outcome["end"] = f"cut: {e}"
            reader = threading.Thread(target=follow)
            reader.start()
            assert got_some.wait(20), "no audio reached the client"
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            killed_at = time.time()
            before = api.store.read_chunks(rid)
            assert before.attempt == 1 and 1 <= len(before.chunks) < 8
            second = worker(data)
            reader.join(40)
            assert not reader.is_alive()
            assert outcome["status"] == 200 and outcome["end"].startswith("cut"), outcome
            sent = b"".join(received)
            assert 0 < len(sent) and len(sent) < 2 * 24000 * (0.1 + 0.01 * len(TEXT))   # part of the audio only
            testing.wait_until(lambda: api.store.get(rid).state.terminal, timeout=40)
            job = api.store.get(rid)
            assert job.state is JobState.COMPLETED and job.attempts == 2 and job.finished_at > killed_at
            assert api.store.read_chunks(rid, after=0, attempt=1).restarted     # the first attempt's reader: told
            now = api.store.read_chunks(rid, attempt=2)
            assert now.end and [c.seq for c in now.chunks] == list(range(8))
            whole = httpx.get(f"{api.url}/v2/requests/{rid}/audio", timeout=30)
            assert whole.status_code == 200
            assert np.concatenate([unpack_piece(c.data)[1] for c in now.chunks]).tobytes() == whole.content
            with sqlite3.connect(data / "jobs.sqlite3") as db:           # completed exactly once
                ends = [d for (d,) in db.execute("SELECT data FROM job_events WHERE job_id = ? AND type = 'state'",
                                                 (rid,)) if '"COMPLETED"' in d]
            assert len(ends) == 1
        finally:
            for p in (first, second):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(15)
                    except Exception:
                        p.kill()
