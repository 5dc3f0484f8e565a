"""What is specific to the SQLite store (the shared contract is tests/test_store_contract.py)."""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from chatterbox_serverless.jobs import sqlite_store
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job, JobState, StoreUnavailable


def test_wal_and_full_sync(tmp_path):
    s = SQLiteJobStore(tmp_path / "j.db")
    assert s._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._writer.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    s.close()


def test_expired_results_are_hidden_before_the_purge(tmp_path):
    s = SQLiteJobStore(tmp_path / "j.db", retention_seconds=0.2)
    s.submit(Job(id="a", owner="", params={}), 10)
    s.claim("w", 1, 30)
    assert s.complete("a", "w", b"RIFF", "audio/wav", {})
    assert s.get("a").state == JobState.COMPLETED and s.get_audio("a") == (b"RIFF", "audio/wav")
    time.sleep(0.3)
    assert s.get("a") is None and s.get_audio("a") is None
    assert s.stats().by_state["COMPLETED"] == 0
    s.close()


def test_audio_is_written_under_an_attempt_unique_name(tmp_path):
    s = SQLiteJobStore(tmp_path / "j.db")
    s.submit(Job(id="a", owner="", params={}), 10)
    s.claim("w1", 1, 0.01)
    time.sleep(0.02)
    s.recover_expired(3)
    s.claim("w2", 1, 30)
    assert not s.complete("a", "w1", b"old", "audio/wav", {})      # lost its lease: nothing written
    assert s.complete("a", "w2", b"new", "audio/wav", {})
    assert [p.read_bytes() for p in s.audio_dir.iterdir()] == [b"new"]
    s.close()


def test_orphan_audio_files_are_swept(tmp_path):
    s = SQLiteJobStore(tmp_path / "j.db")
    orphan = s.audio_dir / "gone.1234.wav"
    orphan.write_bytes(b"x")
    fresh = s.audio_dir / "fresh.1234.wav"
    fresh.write_bytes(b"x")
    old = time.time() - sqlite_store.ORPHAN_AUDIO_SECONDS - 10
    os.utime(orphan, (old, old))
    s.purge_expired(3600)
    assert not orphan.exists() and fresh.exists()
    s.close()


def test_a_database_that_cannot_be_written_is_store_unavailable(tmp_path):
    s = SQLiteJobStore(tmp_path / "j.db")
    # another process holds the write lock longer than the busy timeout allows
    other = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    s._writer.execute("PRAGMA busy_timeout=50")
    with pytest.raises(StoreUnavailable):
        s.submit(Job(id="a", owner="", params={}), 10)
    other.execute("ROLLBACK")
    s.submit(Job(id="a", owner="", params={}), 10)       # and it recovers by itself
    assert s.get("a") is not None
    other.close()
    s.close()


def test_reads_do_not_wait_for_a_writer(tmp_path):
    s = SQLiteJobStore(tmp_path / "j.db")
    s.submit(Job(id="a", owner="", params={}), 10)
    other = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE jobs SET attempts = 5")
    got = []
    t = threading.Thread(target=lambda: got.append(s.get("a")))
    t.start()
    t.join(2)
    assert got and got[0].attempts == 0          # the committed state, at once
    other.execute("ROLLBACK")
    other.close()
    s.close()


def test_concurrent_submissions_are_group_committed_and_bounded_exactly(tmp_path):
    from chatterbox_serverless.jobs.store import QueueFull
    s = SQLiteJobStore(tmp_path / "j.db")
    results: list[str] = []

    def submit(i: int) -> None:
        try:
            s.submit(Job(id=f"j{i}", owner="", params={"i": i}), 50)
            results.append("ok")
        except QueueFull:
            results.append("full")
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 50 and results.count("full") == 50
    s.close()
    reopened = SQLiteJobStore(tmp_path / "j.db")
    assert reopened.stats().by_state["QUEUED"] == 50
    with pytest.raises(sqlite3.IntegrityError):
        reopened.submit(Job(id="j-dup", owner="", params={}), 1000) or reopened.submit(
            Job(id="j-dup", owner="", params={}), 1000)
    reopened.close()


def test_a_database_from_before_retry_later_is_migrated(tmp_path):
    """A jobs table without `retry_reason` (and no probe table): both added at open; old rows work on."""
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, params TEXT NOT NULL, state TEXT NOT NULL,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT, metrics TEXT NOT NULL DEFAULT '{}', media_type TEXT, audio_file TEXT, worker_id TEXT,
            lease_until REAL);
        INSERT INTO jobs (id, owner, params, state, created_at) VALUES ('old', '', '{"text": "x"}', 'QUEUED', 1.0);
    """)
    db.close()
    s = SQLiteJobStore(path)
    again = SQLiteJobStore(path)
    try:
        assert [j.id for j in s.claim("w", 1, 30)] == ["old"]
        assert s.retry_later("old", "w", "could not store", 0.05)
        time.sleep(0.1)
        assert again.recover_expired(1) == 1
        assert s.get("old").error == "could not store"
        assert s.writable() is None
    finally:
        s.close()
        again.close()


def test_writable_names_the_broken_part_without_its_path(tmp_path, monkeypatch):
    s = SQLiteJobStore(tmp_path / "data" / "jobs.sqlite3")
    try:
        assert s.writable() is None
        monkeypatch.setattr(sqlite_store.os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255)))
        assert s.writable() == "audio files cannot be written (the disk is full)"
        monkeypatch.undo()
        blocker = sqlite3.connect(s.path, isolation_level=None)      # another process holds the write lock
        s._writer.execute("PRAGMA busy_timeout=50")
        blocker.execute("BEGIN IMMEDIATE")
        try:
            problem = s.writable()
            assert problem.startswith("the job database cannot be written") and str(tmp_path) not in problem
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert s.writable() is None
    finally:
        s.close()
